"""Named POSIX shared-memory segments: create (owner), attach (readers), unlink, sweep.

Every segment name is `lipsync-<instance>-<creator pid>-<tag>`, so a start-up sweep can
remove the segments of dead creators, and nothing else. The stdlib resource_tracker is
kept out of it: on Python < 3.13 attaching registers the segment and the tracker then
unlinks it when the attaching process exits (CPython gh-82300), which would pull an
arena out from under its owner; and registering then unregistering at each open races
between processes that open one segment at once (the tracker counts two REGISTERs as one
and prints a KeyError traceback at the second UNREGISTER). So nothing is registered, as
3.13's track=False does. Lifetimes are ours: the owner unlinks on close, the sweep
reclaims what a killed owner left.
"""
from __future__ import annotations

import logging
import math
import os
import sys
import threading
from multiprocessing import resource_tracker
from multiprocessing.shared_memory import SharedMemory
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

PREFIX = "lipsync"
SHM_DIR = Path("/dev/shm")


def shm_space() -> tuple[int, int]:
    """Bytes of /dev/shm free (to an unprivileged writer) and in all."""
    stat = os.statvfs(SHM_DIR)
    return stat.f_bavail * stat.f_frsize, stat.f_blocks * stat.f_frsize


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists (a pid we may not signal still exists)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def segment_name(instance: str, tag: str, pid: int | None = None) -> str:
    """The name of a segment created by this process (or `pid`) for `instance`."""
    return f"{PREFIX}-{instance}-{os.getpid() if pid is None else pid}-{tag}"


def parse_name(name: str) -> tuple[str, int, str] | None:
    """(instance, creator pid, tag) of one of our segment names, or None if it is not ours."""
    parts = name.split("-", 3)
    if len(parts) != 4 or parts[0] != PREFIX or not parts[2].isdigit():
        return None
    return parts[1], int(parts[2]), parts[3]


def creator_pid(name: str) -> int | None:
    parsed = parse_name(name)
    return None if parsed is None else parsed[1]


_UNTRACKED = threading.Lock()  # one open at a time with the tracker's register stubbed


def _open(name: str, create: bool, size: int) -> SharedMemory:
    if sys.version_info >= (3, 13):
        return SharedMemory(name, create=create, size=size, track=False)  # type: ignore[call-arg]
    # SharedMemory registers through the module attribute, read at each open: stubbed for
    # this one call (nothing else of ours registers with the tracker while a role runs)
    with _UNTRACKED:
        register = resource_tracker.register
        resource_tracker.register = lambda name, rtype: None
        try:
            return SharedMemory(name, create=create, size=size)
        finally:
            resource_tracker.register = register


class SharedSegment:
    """One mapped segment. The creating process owns it and unlinks it on close()."""

    def __init__(self, shm: SharedMemory, owner: bool) -> None:
        self._shm: SharedMemory | None = shm
        self.name = shm.name
        self.size = shm.size
        self.owner = owner

    @classmethod
    def create(cls, name: str, size: int) -> SharedSegment:
        """Create and reserve `size` bytes; a full /dev/shm is an error here, not a SIGBUS later."""
        shm = _open(name, create=True, size=size)
        try:
            # tmpfs pages are allocated on first touch; reserve them now.
            os.posix_fallocate(shm._fd, 0, size)  # type: ignore[attr-defined]
        except OSError as exc:
            shm.close()
            (SHM_DIR / name).unlink(missing_ok=True)
            free, total = shm_space()
            raise MemoryError(f"cannot reserve {size} bytes of shared memory for {name}: "
                              f"{exc.strerror} (/dev/shm: {free // 2**20} MB free of "
                              f"{total // 2**20} MB)") from exc
        return cls(shm, owner=True)

    @classmethod
    def attach(cls, name: str) -> SharedSegment:
        return cls(_open(name, create=False, size=0), owner=False)

    @property
    def buf(self) -> memoryview:
        if self._shm is None:
            raise ValueError(f"segment {self.name} is closed")
        return self._shm.buf  # type: ignore[return-value]

    def ndarray(self, offset: int, shape: tuple[int, ...], dtype: str | np.dtype) -> np.ndarray:
        """A view (no copy) of the bytes at offset; raises if it would run past the end."""
        dt = np.dtype(dtype)
        count = math.prod(shape)
        if offset < 0 or offset + count * dt.itemsize > self.size:
            raise ValueError(f"view [{offset}, +{count * dt.itemsize}) outside segment "
                             f"{self.name} of {self.size} bytes")
        # frombuffer holds a buffer export on the mapping, so close() cannot unmap it
        # under a live view (np.ndarray(buffer=...) does not, and a later read segfaults)
        return np.frombuffer(self.buf, dtype=dt, count=count, offset=offset).reshape(shape)

    def close(self) -> None:
        """Unmap (and unlink, for the owner). Idempotent.

        Views handed out must be dropped first; one still alive keeps the mapping (and
        only the mapping) until it is collected.
        """
        shm, self._shm = self._shm, None
        if shm is None:
            return
        try:
            shm.close()
        except BufferError:
            # A view is still alive: drop our references and the descriptor; the mapping
            # is unmapped when the last view is collected.
            shm._buf = None  # type: ignore[attr-defined]
            shm._mmap = None  # type: ignore[attr-defined]
            if shm._fd >= 0:  # type: ignore[attr-defined]
                os.close(shm._fd)  # type: ignore[attr-defined]
                shm._fd = -1  # type: ignore[attr-defined]
        if self.owner:
            # by path, not shm.unlink(): that would unregister from the resource tracker
            # a segment we never left registered (the tracker then prints a KeyError)
            try:
                (SHM_DIR / self.name).unlink()
            except FileNotFoundError:
                pass


class SegmentGone(FileNotFoundError):
    """A segment that no longer exists: its creator unlinked it, or died and was swept.
    `first`: this cache had not met its absence before (say so once, not per use)."""

    def __init__(self, name: str, first: bool) -> None:
        super().__init__(f"shared-memory segment {name} is gone (its creator released it "
                         "or exited)")
        self.name, self.first = name, first


class SegmentCache:
    """Reader side: attach segments by name on first use and keep them mapped."""

    MAX_GONE = 1024  # names remembered as gone (each names a dead creator's pid: few)

    def __init__(self) -> None:
        self._segments: dict[str, SharedSegment] = {}
        self._gone: set[str] = set()

    def get(self, name: str) -> SharedSegment:
        """The segment, attached on first use; SegmentGone when it no longer exists."""
        segment = self._segments.get(name)
        if segment is None:
            self._forget_replaced(name)
            try:
                segment = self._segments[name] = SharedSegment.attach(name)
            except FileNotFoundError:
                first = name not in self._gone
                if len(self._gone) >= self.MAX_GONE:
                    self._gone.clear()
                self._gone.add(name)
                raise SegmentGone(name, first) from None
        return segment

    def _forget_replaced(self, name: str) -> None:
        """A new creator of the same instance and tag means the old one is gone: unmap it,
        or its pages would stay alive in /dev/shm for as long as we live."""
        parsed = parse_name(name)
        if parsed is None:
            return
        instance, _, tag = parsed
        for old in list(self._segments):
            other = parse_name(old)
            if other is not None and (other[0], other[2]) == (instance, tag):
                self.forget(old)

    def ndarray(self, name: str, offset: int, shape: tuple[int, ...], dtype: str) -> np.ndarray:
        return self.get(name).ndarray(offset, shape, dtype)

    def forget(self, name: str) -> None:
        """Unmap a segment its owner has released (or that belonged to a dead owner)."""
        segment = self._segments.pop(name, None)
        if segment is not None:
            segment.close()

    def forget_dead(self) -> list[str]:
        """Unmap every segment whose creator has died or that has been unlinked: a deleted
        segment lives on while anyone maps it, so a dead frontend's arena would hold its
        memory hostage from the successor that needs the room. Call this periodically."""
        dead = [name for name in self._segments
                if not (SHM_DIR / name).exists()
                or ((pid := creator_pid(name)) is not None and not pid_alive(pid))]
        for name in dead:
            self.forget(name)
        if dead:
            log.info("unmapped %d segment(s) of dead or finished owners: %s", len(dead),
                     ", ".join(dead))
        return dead

    def close(self) -> None:
        for name in list(self._segments):
            self.forget(name)



def list_segments(instance: str | None = None) -> list[str]:
    """Our segment names in /dev/shm (of one instance, or all)."""
    prefix = f"{PREFIX}-{instance}-" if instance else f"{PREFIX}-"
    try:
        return sorted(p.name for p in SHM_DIR.iterdir() if p.name.startswith(prefix))
    except FileNotFoundError:
        return []


def sweep_stale_segments(instance: str | None = None, pids: set[int] | None = None,
                         private_to: str | None = None) -> list[str]:
    """Unlink our segments whose creator is dead (or is one of `pids`, known dead): of
    `instance`, or of every process-private instance `<private_to><creator pid>` (a bench's
    in-process engine, whose instance no later process shares), or of all instances."""
    removed = []
    for name in list_segments(instance):
        parsed = parse_name(name)
        if parsed is None:
            continue
        owner, pid, _ = parsed
        if private_to is not None and owner != f"{private_to}{pid}":
            continue
        dead = pid in pids if pids is not None else not pid_alive(pid)
        if not dead:
            continue
        try:
            (SHM_DIR / name).unlink()
            removed.append(name)
        except FileNotFoundError:
            pass
    if removed:
        log.info("removed %d stale shared-memory segment(s): %s", len(removed), ", ".join(removed))
    return removed
