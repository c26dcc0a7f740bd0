"""Named shared-memory segments: cross-process round trip, lifetimes, bounds, sweep, reader cache."""
from __future__ import annotations

import multiprocessing
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from pipeline.shm.segment import (
    PREFIX,
    SHM_DIR,
    SegmentCache,
    SharedSegment,
    creator_pid,
    list_segments,
    parse_name,
    segment_name,
    sweep_stale_segments,
)

REPO = Path(__file__).resolve().parents[2]




def _exists(name: str) -> bool:
    return (SHM_DIR / name).exists()


def _dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def _fresh_python(code: str) -> subprocess.CompletedProcess[str]:
    """Run code in a new interpreter: its own resource_tracker, like a separately started role."""
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=60)


def _mapped(name: str) -> bool:
    """Whether this process still has a mapping of /dev/shm/<name>."""
    return any(f"/dev/shm/{name}" in line for line in Path("/proc/self/maps").read_text().splitlines())


# --- names ---------------------------------------------------------------------------------


def test_segment_name_round_trips_through_parse_name() -> None:
    """segment_name carries prefix, instance, creator pid and tag; parse_name recovers them."""
    name = segment_name("inst_1", "arena")
    assert name == f"lipsync-inst_1-{os.getpid()}-arena"
    assert parse_name(name) == ("inst_1", os.getpid(), "arena")
    assert parse_name(segment_name("i", "bg-demo-x", pid=42)) == ("i", 42, "bg-demo-x")
    assert creator_pid(segment_name("i", "t", pid=7)) == 7


@pytest.mark.parametrize("name", [
    "other-inst-123-tag",       # another prefix
    "lipsync-inst-12a-tag",     # pid not numeric
    "lipsync-inst-123",         # no tag
    "lipsync",
    "lipsyncinst-123-tag",
    "lipsync-a-b-123-tag",      # an instance with '-' is not one of ours
])
def test_parse_name_rejects_foreign_names(name: str) -> None:
    """Names that are not `lipsync-<instance>-<pid>-<tag>` parse to None and have no creator pid."""
    assert parse_name(name) is None
    assert creator_pid(name) is None


# --- cross-process round trip ---------------------------------------------------------------


def _child_attach_check_write(name: str, result: multiprocessing.Queue) -> None:
    segment = SharedSegment.attach(name)
    seen = segment.ndarray(0, (1024,), "float32")
    ok = bool(np.array_equal(seen, np.arange(1024, dtype=np.float32)))
    del seen
    written = segment.ndarray(8192, (16, 16), "uint8")
    written[:] = np.arange(256, dtype=np.uint8).reshape(16, 16)
    del written
    result.put((ok, segment.owner, segment.size))
    segment.close()


def test_round_trip_across_spawned_process(instance: str) -> None:
    """A spawned child attaches by name, sees the parent's data and writes back what the parent reads."""
    name = segment_name(instance, "rt")
    owner = SharedSegment.create(name, 3 * 4096)
    try:
        owner.ndarray(0, (1024,), "float32")[:] = np.arange(1024, dtype=np.float32)
        ctx = multiprocessing.get_context("spawn")
        result = ctx.Queue()
        child = ctx.Process(target=_child_attach_check_write, args=(name, result))
        child.start()
        ok, child_owner, child_size = result.get(timeout=60)
        child.join(60)
        assert child.exitcode == 0
        assert ok, "the child did not see the parent's data"
        assert child_owner is False and child_size == 3 * 4096
        back = owner.ndarray(8192, (16, 16), "uint8")
        np.testing.assert_array_equal(back, np.arange(256, dtype=np.uint8).reshape(16, 16))
        del back
        assert _exists(name), "the child's exit removed the segment"
    finally:
        owner.close()
    assert not _exists(name)


def test_attacher_exit_does_not_unlink(instance: str) -> None:
    """An independently started attacher that exits leaves the segment (no resource_tracker unlink)."""
    name = segment_name(instance, "keep")
    owner = SharedSegment.create(name, 4096)
    try:
        owner.buf[0] = 7
        proc = _fresh_python(f"""
            from pipeline.shm.segment import SharedSegment
            s = SharedSegment.attach({name!r})
            assert s.buf[0] == 7
            s.buf[1] = 9
            s.close()
        """)
        assert proc.returncode == 0, proc.stderr
        assert _exists(name), "the attacher's resource_tracker unlinked the owner's segment"
        assert owner.buf[1] == 9
        again = SharedSegment.attach(name)
        assert again.buf[1] == 9
        again.close()
    finally:
        owner.close()


def test_plain_stdlib_attach_would_unlink(instance: str) -> None:
    """Control for the test above: a plain SharedMemory attach in a fresh process does unlink on exit."""
    name = segment_name(instance, "pitfall")
    owner = SharedSegment.create(name, 4096)
    try:
        proc = _fresh_python(f"""
            from multiprocessing.shared_memory import SharedMemory
            s = SharedMemory({name!r})
            s.close()
        """)
        assert proc.returncode == 0, proc.stderr
        assert not _exists(name), "stdlib behaviour changed: the pitfall test above proves nothing"
    finally:
        owner.close()


def test_owner_lifecycle_in_fresh_process_is_silent(instance: str) -> None:
    """Create, attach and close in a fresh interpreter print nothing (no resource_tracker traceback)."""
    name = segment_name(instance, "quiet")
    proc = _fresh_python(f"""
        from pipeline.shm.segment import SharedSegment
        owner = SharedSegment.create({name!r}, 4096)
        reader = SharedSegment.attach({name!r})
        reader.close()
        owner.close()
    """)
    assert proc.returncode == 0, proc.stderr
    assert not _exists(name)
    assert proc.stderr == "", f"unexpected stderr:\n{proc.stderr}"


# --- lifetimes ------------------------------------------------------------------------------


def test_owner_close_unlinks_and_is_idempotent(instance: str) -> None:
    """The owner's close() removes the segment from /dev/shm; a second close() is a no-op."""
    name = segment_name(instance, "own")
    owner = SharedSegment.create(name, 4096)
    assert owner.owner and _exists(name)
    owner.close()
    assert not _exists(name)
    owner.close()
    with pytest.raises(ValueError, match="is closed"):
        _ = owner.buf
    with pytest.raises(FileNotFoundError):
        SharedSegment.attach(name)


def test_attacher_close_keeps_segment(instance: str) -> None:
    """An attacher's close() unmaps only; the segment and the owner's data stay."""
    name = segment_name(instance, "att")
    owner = SharedSegment.create(name, 4096)
    try:
        owner.buf[10] = 42
        reader = SharedSegment.attach(name)
        assert not reader.owner
        reader.close()
        reader.close()
        assert _exists(name)
        assert owner.buf[10] == 42
    finally:
        owner.close()


@pytest.mark.parametrize("role", ["owner", "attacher"])
def test_close_with_live_view(instance: str, role: str) -> None:
    """close() with a numpy view still alive keeps the mapping for the view (no crash on reading it)."""
    # In a fresh interpreter: if close() unmaps under a live view, reading it is a SIGSEGV,
    # which must fail this test, not kill the test run.
    name = segment_name(instance, "view")
    proc = _fresh_python(f"""
        import os
        from pipeline.shm.segment import SharedSegment
        owner = SharedSegment.create({name!r}, 4096)
        seg = owner if {role!r} == "owner" else SharedSegment.attach({name!r})
        view = seg.ndarray(0, (4,), "int32")
        view[:] = [1, 2, 3, 4]
        seg.close()
        print("unlinked" if not os.path.exists("/dev/shm/" + {name!r}) else "present", flush=True)
        print(view.tolist(), flush=True)
        owner.close()
    """)
    expected = "unlinked" if role == "owner" else "present"
    assert proc.returncode == 0, f"rc {proc.returncode}: {proc.stderr[-2000:]}"
    assert proc.stdout.split("\n")[:2] == [expected, "[1, 2, 3, 4]"]


def test_create_reserves_pages(instance: str) -> None:
    """create() allocates the tmpfs pages up front (posix_fallocate), so exhaustion fails early."""
    name = segment_name(instance, "res")
    size = 64 * 4096
    owner = SharedSegment.create(name, size)
    try:
        assert os.stat(SHM_DIR / name).st_blocks * 512 >= size
        assert owner.size == size
    finally:
        owner.close()


def test_create_existing_name_fails(instance: str) -> None:
    """Creating a name that exists raises instead of silently sharing the segment."""
    name = segment_name(instance, "dup")
    owner = SharedSegment.create(name, 4096)
    try:
        with pytest.raises(FileExistsError):
            SharedSegment.create(name, 4096)
        assert _exists(name)
    finally:
        owner.close()


def test_view_bounds_are_checked(instance: str) -> None:
    """ndarray() views inside the segment share its bytes; views running past either end raise."""
    name = segment_name(instance, "bounds")
    owner = SharedSegment.create(name, 4096)
    try:
        tail = owner.ndarray(4096 - 16, (4,), "float32")  # exactly up to the end
        tail[:] = 1.5
        assert np.frombuffer(owner.buf, np.float32, 4, 4096 - 16).tolist() == [1.5] * 4
        del tail
        with pytest.raises(ValueError, match="outside segment"):
            owner.ndarray(4096 - 12, (4,), "float32")
        with pytest.raises(ValueError, match="outside segment"):
            owner.ndarray(-4, (1,), "float32")
        with pytest.raises(ValueError, match="outside segment"):
            owner.ndarray(0, (2, 2049), "uint8")
    finally:
        owner.close()


# --- sweep ----------------------------------------------------------------------------------


def test_sweep_removes_only_dead_creators(instance: str) -> None:
    """The sweep unlinks segments of dead creator pids; live ones and foreign names stay."""
    dead = _dead_pid()
    stale = SharedSegment.create(segment_name(instance, "stale", pid=dead), 4096)
    stale_tagged = SharedSegment.create(segment_name(instance, "bg-demo", pid=dead), 4096)
    live = SharedSegment.create(segment_name(instance, "live"), 4096)
    foreign = [SharedSegment.create(f"{instance}-{dead}-x", 4096),              # not our prefix
               SharedSegment.create(f"{PREFIX}-{instance}-p{dead}-x", 4096)]  # unparseable pid
    other_instance = SharedSegment.create(segment_name(f"{instance}o", "stale", pid=dead), 4096)
    try:
        assert set(list_segments(instance)) == {stale.name, stale_tagged.name, live.name,
                                                f"{PREFIX}-{instance}-p{dead}-x"}
        removed = sweep_stale_segments(instance)
        assert sorted(removed) == sorted([stale.name, stale_tagged.name])
        assert not _exists(stale.name) and not _exists(stale_tagged.name)
        assert _exists(live.name)
        assert all(_exists(s.name) for s in foreign)
        assert _exists(other_instance.name), "a sweep of one instance touched another"
        assert sweep_stale_segments(instance) == []
    finally:
        for seg in [stale, stale_tagged, live, *foreign, other_instance]:
            seg.close()


def test_sweep_with_known_dead_pids(instance: str) -> None:
    """Given pids known dead, the sweep removes exactly their segments, alive or not."""
    mine = SharedSegment.create(segment_name(instance, "a"), 4096)
    other = SharedSegment.create(segment_name(instance, "b", pid=_dead_pid()), 4096)
    try:
        assert sweep_stale_segments(instance, pids={os.getpid()}) == [mine.name]
        assert not _exists(mine.name) and _exists(other.name)
    finally:
        mine.close()
        other.close()


# --- reader cache ---------------------------------------------------------------------------


def test_cache_attaches_lazily_and_reuses(instance: str) -> None:
    """SegmentCache maps a segment on first use and returns the same mapping afterwards."""
    name = segment_name(instance, "arena")
    owner = SharedSegment.create(name, 4096)
    cache = SegmentCache()
    try:
        owner.ndarray(0, (3,), "int16")[:] = [5, 6, 7]
        first = cache.get(name)
        assert first is cache.get(name)
        assert not first.owner
        assert cache.ndarray(name, 0, (3,), "int16").tolist() == [5, 6, 7]
        with pytest.raises(FileNotFoundError):
            cache.get(segment_name(instance, "missing"))
    finally:
        cache.close()
        owner.close()


def test_cache_replaces_segment_of_new_creator(instance: str) -> None:
    """A segment of the same instance+tag from another pid replaces the old one, whose mapping is dropped."""
    old_name = segment_name(instance, "bg", pid=_dead_pid())
    new_name = segment_name(instance, "bg")
    other_tag = segment_name(instance, "arena")
    old_owner = SharedSegment.create(old_name, 4096)
    new_owner = SharedSegment.create(new_name, 4096)
    other_owner = SharedSegment.create(other_tag, 4096)
    cache = SegmentCache()
    try:
        old = cache.get(old_name)
        other = cache.get(other_tag)
        old_owner.close()  # the old creator is gone; only the cache still maps its pages
        assert _mapped(old_name)
        new = cache.get(new_name)
        assert not _mapped(old_name), "the replaced segment is still mapped"
        with pytest.raises(ValueError, match="is closed"):
            _ = old.buf
        assert cache.get(other_tag) is other, "a different tag was dropped"
        assert cache.get(new_name) is new
    finally:
        cache.close()
        for seg in (old_owner, new_owner, other_owner):
            seg.close()


def test_cache_forget_dead_and_close(instance: str) -> None:
    """forget_dead() unmaps the segments of dead creators and unlinked ones only, never
    unlinking anything; close() unmaps everything."""
    dead = _dead_pid()
    a = SharedSegment.create(segment_name(instance, "a", pid=dead), 4096)
    b = SharedSegment.create(segment_name(instance, "b"), 4096)
    c = SharedSegment.create(segment_name(instance, "c"), 4096)
    cache = SegmentCache()
    try:
        seg_a, seg_b, seg_c = cache.get(a.name), cache.get(b.name), cache.get(c.name)
        c.close()  # its owner unlinked it: only the cache still maps its pages
        assert _mapped(c.name)
        assert sorted(cache.forget_dead()) == sorted([a.name, c.name])
        for gone in (seg_a, seg_c):
            with pytest.raises(ValueError):
                _ = gone.buf
        assert not _mapped(c.name)
        assert cache.get(b.name) is seg_b
        assert _exists(a.name) and _exists(b.name), "a reader unlinked a segment"
        cache.close()
        with pytest.raises(ValueError):
            _ = seg_b.buf
    finally:
        cache.close()
        a.close()
        b.close()
