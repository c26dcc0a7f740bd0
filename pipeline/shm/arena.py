"""A long-lived shared-memory arena carved into variable-size blocks by its one owner.

The owner process is the only allocator, so the free list is plain process-local state
(no cross-process lock). Other processes only read and write inside blocks they were
handed by offset. A full arena is the frontend's admission signal, not an error.
"""
from __future__ import annotations

import bisect
from dataclasses import dataclass

import numpy as np

from pipeline.shm.segment import SharedSegment

ALIGN = 4096  # page-aligned blocks: ONNX Runtime and numpy get aligned tensors


def _align(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


class BlockAllocator:
    """First-fit over a sorted free list; neighbours coalesce on release."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity - capacity % ALIGN
        self._free_offsets: list[int] = [0]
        self._free_sizes: list[int] = [self.capacity]
        self._used: dict[int, int] = {}

    @property
    def used_bytes(self) -> int:
        return sum(self._used.values())

    @property
    def blocks_in_use(self) -> int:
        return len(self._used)

    def allocate(self, nbytes: int) -> int | None:
        """Offset of a new block of at least nbytes, or None when no free run is large enough."""
        size = _align(max(nbytes, 1))
        for i, free in enumerate(self._free_sizes):
            if free >= size:
                offset = self._free_offsets[i]
                if free == size:
                    del self._free_offsets[i], self._free_sizes[i]
                else:
                    self._free_offsets[i] += size
                    self._free_sizes[i] -= size
                self._used[offset] = size
                return offset
        return None

    def release(self, offset: int) -> None:
        size = self._used.pop(offset)  # KeyError: a double free is a bug, never silent
        i = bisect.bisect_left(self._free_offsets, offset)
        self._free_offsets.insert(i, offset)
        self._free_sizes.insert(i, size)
        # coalesce with the following, then the preceding free run
        if i + 1 < len(self._free_offsets) and offset + size == self._free_offsets[i + 1]:
            self._free_sizes[i] += self._free_sizes.pop(i + 1)
            self._free_offsets.pop(i + 1)
        if i > 0 and self._free_offsets[i - 1] + self._free_sizes[i - 1] == offset:
            self._free_sizes[i - 1] += self._free_sizes.pop(i)
            self._free_offsets.pop(i)


@dataclass(frozen=True)
class Block:
    """A block handed out by an Arena; offsets are relative to the segment."""

    segment: str
    offset: int
    size: int


class Arena:
    """A shared segment plus its allocator, both owned by one process."""

    def __init__(self, segment: SharedSegment) -> None:
        self.segment = segment
        self._allocator = BlockAllocator(segment.size)

    @classmethod
    def create(cls, name: str, size: int) -> Arena:
        return cls(SharedSegment.create(name, size))

    @property
    def name(self) -> str:
        return self.segment.name

    @property
    def capacity(self) -> int:
        return self._allocator.capacity

    @property
    def used_bytes(self) -> int:
        return self._allocator.used_bytes

    @property
    def blocks_in_use(self) -> int:
        return self._allocator.blocks_in_use

    def allocate(self, nbytes: int) -> Block | None:
        offset = self._allocator.allocate(nbytes)
        return None if offset is None else Block(self.name, offset, nbytes)

    def release(self, block: Block) -> None:
        self._allocator.release(block.offset)

    def ndarray(self, offset: int, shape: tuple[int, ...], dtype: str | np.dtype) -> np.ndarray:
        return self.segment.ndarray(offset, shape, dtype)

    def close(self) -> None:
        self.segment.close()
