"""Named shared-memory segments: cross-process round trip, lifetimes, bounds, sweep, reader cache."""
from __future__ import annotations

import os
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

REPO = Path(__file__).resolve().parents[3]


def _exists(name: str) -> bool:
    return (SHM_DIR / name).exists()


def _dead_pid() -> int:
    """A pid no process can have: one above the kernel's pid_max."""
    return int(Path("/proc/sys/kernel/pid_max").read_text()) + 1


def _mapped(name: str) -> bool:
    """Whether this process still has a mapping of /dev/shm/<name>."""
    return any(f"/dev/shm/{name}" in line for line in Path("/proc/self/maps").read_text().splitlines())


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


def test_a_gone_segment_is_reported_first_once(instance: str) -> None:
    """A segment that was unlinked (its creator died) raises SegmentGone, a FileNotFoundError
    that says whether this cache meets its absence for the first time."""
    from pipeline.shm.segment import SegmentGone

    name = segment_name(instance, "arena")
    SharedSegment.create(name, 4096).close()  # created and unlinked
    cache = SegmentCache()
    firsts = []
    for _ in range(3):
        with pytest.raises(SegmentGone) as gone:
            cache.get(name)
        assert isinstance(gone.value, FileNotFoundError) and gone.value.name == name
        firsts.append(gone.value.first)
    assert firsts == [True, False, False]


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
