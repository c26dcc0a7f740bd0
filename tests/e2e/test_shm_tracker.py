"""Shared-memory segments opened by several processes at once, as the roles do: the stdlib
resource tracker they share is kept out of it (pipeline/shm/segment.py)."""
from __future__ import annotations

import time

import pytest

from pipeline.shm.segment import SharedSegment, segment_name


def _attach_and_close(name: str, times: int, start: object) -> None:
    start.wait()  # type: ignore[attr-defined]  # all at once
    for _ in range(times):
        SharedSegment.attach(name).close()


def test_processes_attaching_at_once_leave_the_resource_tracker_quiet(
        instance: str, capfd: pytest.CaptureFixture[str]) -> None:
    """Four processes attach one segment at the same moments (the compositors and the
    worker meeting a new arena): the stdlib resource tracker they share prints no error.
    On Python < 3.13 each open registered and unregistered the segment, and two processes'
    REGISTERs counted once, so the second UNREGISTER printed a KeyError traceback into the
    server's log."""
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    seg = SharedSegment.create(segment_name(instance, "attachrace"), 4096)
    start = ctx.Barrier(4)
    procs = [ctx.Process(target=_attach_and_close, args=(seg.name, 300, start)) for _ in range(4)]
    try:
        for p in procs:
            p.start()
        for p in procs:
            p.join(60)
            assert p.exitcode == 0
    finally:
        seg.close()
    time.sleep(0.5)  # the tracker reads its pipe
    err = capfd.readouterr().err
    assert "KeyError" not in err, err[-2000:]
