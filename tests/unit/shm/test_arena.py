"""The arena's block allocator (first fit, alignment, coalescing) and the arena on a real segment."""
from __future__ import annotations

import bisect
import os
import random

import numpy as np
import pytest

from pipeline.shm.arena import ALIGN, Arena, Block, BlockAllocator
from pipeline.shm.segment import SHM_DIR, SharedSegment, segment_name

PAGES = 16


def _pages(n: int) -> int:
    return n * ALIGN


# --- BlockAllocator -------------------------------------------------------------------------


def test_capacity_rounds_down_to_alignment() -> None:
    """Capacity is the largest multiple of ALIGN that fits."""
    assert BlockAllocator(_pages(PAGES) + 123).capacity == _pages(PAGES)
    assert BlockAllocator(ALIGN - 1).capacity == 0
    assert BlockAllocator(ALIGN - 1).allocate(1) is None


def test_blocks_are_aligned_and_rounded_up() -> None:
    """Every block starts on an ALIGN boundary and takes whole pages (0 bytes takes one page)."""
    alloc = BlockAllocator(_pages(PAGES))
    sizes = [1, ALIGN, ALIGN + 1, 0, 3 * ALIGN - 1]
    offsets = [alloc.allocate(n) for n in sizes]
    assert offsets == [0, _pages(1), _pages(2), _pages(4), _pages(5)]
    assert all(o is not None and o % ALIGN == 0 for o in offsets)
    assert alloc.used_bytes == _pages(1 + 1 + 2 + 1 + 3)
    assert alloc.blocks_in_use == 5


def test_first_fit_takes_the_lowest_hole() -> None:
    """A request goes into the first free run large enough, not the best-fitting one."""
    alloc = BlockAllocator(_pages(PAGES))
    big = alloc.allocate(_pages(3))          # [0, 3)
    alloc.allocate(_pages(1))                # [3, 4)
    small = alloc.allocate(_pages(1))        # [4, 5)
    alloc.allocate(_pages(1))                # [5, 6)
    alloc.release(big)
    alloc.release(small)                     # holes: [0, 3) and [4, 5)
    assert alloc.allocate(_pages(1)) == 0    # best fit would be page 4
    assert alloc.allocate(_pages(2)) == _pages(1)
    assert alloc.allocate(_pages(1)) == _pages(4)
    assert alloc.allocate(_pages(2)) == _pages(6)  # skips holes too small


def test_exhaustion_returns_none() -> None:
    """A request no free run can hold returns None and changes nothing."""
    alloc = BlockAllocator(_pages(PAGES))
    assert alloc.allocate(_pages(PAGES) + 1) is None
    assert [alloc.allocate(ALIGN) for _ in range(PAGES)] == [_pages(i) for i in range(PAGES)]
    assert alloc.allocate(1) is None
    assert alloc.used_bytes == _pages(PAGES)
    alloc.release(_pages(7))
    assert alloc.allocate(_pages(2)) is None  # one page free, not two
    assert alloc.allocate(1) == _pages(7)


@pytest.mark.parametrize("order", ["forward", "backward", "odd_then_even", "middle_last"])
def test_release_coalesces_to_full_capacity(order: str) -> None:
    """After fragmenting and freeing everything, one block of the whole capacity fits again."""
    alloc = BlockAllocator(_pages(PAGES))
    offsets = [alloc.allocate(ALIGN) for _ in range(PAGES)]
    assert None not in offsets
    if order == "backward":
        offsets.reverse()
    elif order == "odd_then_even":
        offsets = offsets[1::2] + offsets[0::2]
    elif order == "middle_last":  # the last release must merge with both neighbours
        offsets = offsets[:7] + offsets[8:] + [offsets[7]]
    for i, offset in enumerate(offsets):
        alloc.release(offset)
        assert alloc.blocks_in_use == PAGES - 1 - i
    assert alloc.used_bytes == 0
    assert alloc.allocate(_pages(PAGES)) == 0


def test_double_release_raises() -> None:
    """Releasing a block twice, or an offset never handed out, raises KeyError."""
    alloc = BlockAllocator(_pages(PAGES))
    a = alloc.allocate(10)
    alloc.allocate(10)
    alloc.release(a)
    with pytest.raises(KeyError):
        alloc.release(a)
    with pytest.raises(KeyError):
        alloc.release(_pages(5))
    assert alloc.blocks_in_use == 1


def _largest_gap(live: dict[int, int], capacity: int) -> int:
    edge, largest = 0, 0
    for offset in sorted(live):
        largest = max(largest, offset - edge)
        edge = offset + live[offset]
    return max(largest, capacity - edge)


def test_random_sequence_never_overlaps() -> None:
    """Random allocate/release: no overlapping blocks, None only when no gap fits, exact used_bytes."""
    rng = random.Random(1234)
    capacity = _pages(256)
    alloc = BlockAllocator(capacity)
    live: dict[int, int] = {}   # offset -> aligned size
    starts: list[int] = []      # sorted offsets of live blocks (the interval set)
    failures = 0
    for _ in range(5000):
        if live and (rng.random() < 0.45 or failures > 3):
            offset = rng.choice(starts)
            alloc.release(offset)
            del live[offset]
            starts.remove(offset)
            failures = 0
            continue
        nbytes = rng.choice([0, 1, ALIGN - 1, ALIGN, ALIGN + 1]) + rng.randrange(0, _pages(24))
        size = -(-max(nbytes, 1) // ALIGN) * ALIGN
        offset = alloc.allocate(nbytes)
        if offset is None:
            assert _largest_gap(live, capacity) < size, "allocation failed although a gap fits"
            failures += 1
            continue
        assert offset % ALIGN == 0 and 0 <= offset and offset + size <= capacity
        i = bisect.bisect_left(starts, offset)
        if i > 0:
            prev = starts[i - 1]
            assert prev + live[prev] <= offset, f"block {offset} overlaps block {prev}"
        if i < len(starts):
            assert offset + size <= starts[i], f"block {offset} overlaps block {starts[i]}"
        starts.insert(i, offset)
        live[offset] = size
        assert alloc.used_bytes == sum(live.values())
        assert alloc.blocks_in_use == len(live)
    for offset in list(live):
        alloc.release(offset)
    assert alloc.used_bytes == 0
    assert alloc.allocate(capacity) == 0


# --- Arena ----------------------------------------------------------------------------------


@pytest.fixture
def arena_name() -> str:
    name = segment_name(f"ut{os.getpid()}", "arena")
    yield name
    (SHM_DIR / name).unlink(missing_ok=True)


def test_arena_on_real_segment(arena_name: str) -> None:
    """Blocks of an arena are disjoint views of its segment that another mapping sees."""
    arena = Arena.create(arena_name, _pages(8) + 100)
    reader = SharedSegment.attach(arena_name)
    try:
        assert arena.name == arena_name
        assert arena.capacity == _pages(8)
        a = arena.allocate(3 * 4 * 100)
        b = arena.allocate(ALIGN + 4)
        assert a == Block(arena_name, 0, 1200)
        assert b == Block(arena_name, ALIGN, ALIGN + 4)
        assert (arena.used_bytes, arena.blocks_in_use) == (_pages(3), 2)
        arena.ndarray(a.offset, (3, 100), "float32")[:] = 2.5
        arena.ndarray(b.offset, (ALIGN + 4,), "uint8")[:] = 9
        seen_a = reader.ndarray(a.offset, (3, 100), "float32")
        seen_b = reader.ndarray(b.offset, (ALIGN + 4,), "uint8")
        assert (seen_a == 2.5).all() and (seen_b == 9).all()
        del seen_a, seen_b
        assert arena.allocate(_pages(6)) is None
        arena.release(a)
        with pytest.raises(KeyError):
            arena.release(a)
        c = arena.allocate(_pages(1))
        assert c is not None and c.offset == 0
        arena.release(b)
        arena.release(c)
        assert arena.used_bytes == 0
        assert arena.allocate(_pages(8)) == Block(arena_name, 0, _pages(8))
    finally:
        reader.close()
        arena.close()
    assert not (SHM_DIR / arena_name).exists()
    arena.close()


def test_arena_view_outside_segment_raises(arena_name: str) -> None:
    """An arena view past the end of its segment raises instead of reading foreign memory."""
    arena = Arena.create(arena_name, _pages(2))
    try:
        with pytest.raises(ValueError, match="outside segment"):
            arena.ndarray(_pages(2) - 4, (2,), np.float32)
    finally:
        arena.close()
