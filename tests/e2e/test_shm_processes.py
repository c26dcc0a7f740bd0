"""Shared-memory segments across real processes: a spawned child attaches and writes back,
an attacher's exit unlinks nothing, a fresh process's lifecycle is silent."""
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
    SHM_DIR,
    SharedSegment,
    segment_name,
)

REPO = Path(__file__).resolve().parents[2]


def _exists(name: str) -> bool:
    return (SHM_DIR / name).exists()


def _fresh_python(code: str) -> subprocess.CompletedProcess[str]:
    """Run code in a new interpreter: its own resource_tracker, like a separately started role."""
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=60)


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
