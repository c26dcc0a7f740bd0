"""The gpu_worker's process shell, the parts that need no socket: IO threads that fail
loudly, the death announcement, what heartbeats carry, jobs keyed for the link thread."""
from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pipeline import messages as msg
from pipeline.config import load_config
from pipeline.gpu_worker.engine import JOBS, ConfigMismatch
from pipeline.gpu_worker.proc import JOB_KEY, GpuWorkerProc
from pipeline.runtime.process import failure_reason, role_down
from tests.conftest import write_config


class FakeSocket:
    """Records what is sent on it."""

    def __init__(self) -> None:
        self.sent: list[bytes] = []

    def send(self, data: bytes, flags: int = 0) -> None:
        self.sent.append(data)


@pytest.fixture
def shell(tmp_path: Path, small_models_root: Path, instance: str) -> Iterator[GpuWorkerProc]:
    cfg = load_config(write_config(tmp_path / "config.yaml", small_models_root, **{
        "runtime.instance": instance, "gpus.intra_op_threads": 1}))
    proc = GpuWorkerProc(cfg, 0, "cpu")
    yield proc
    proc.loader.shutdown()
    proc.engine.close()


def test_an_io_thread_that_raises_stops_the_worker(shell: GpuWorkerProc) -> None:
    """A failing IO thread sets stop and is remembered as the failure to announce."""
    stop = threading.Event()

    def broken(stop: threading.Event) -> None:
        raise OSError("socket gone")

    thread = shell._thread("sender", stop, broken)
    thread.start()
    thread.join(5)
    assert stop.is_set()
    name, exc = shell.failure  # type: ignore[misc]
    assert name == "sender" and str(exc) == "socket gone"


def test_the_announcement_names_the_role_and_the_cause() -> None:
    """The RoleDown a worker sends (Readiness.down) carries its index and pid and the
    reason: a config mismatch (a RoleError) in its own words, any other error with its
    type."""
    downs = [role_down("gpu_worker 0", os.getpid(), failure_reason(exc))
             for exc in (ConfigMismatch("configs differ"), KeyError("x"))]
    assert [(d.role, d.index, d.reason) for d in downs] == [
        ("gpu_worker", 0, "configs differ"), ("gpu_worker", 0, "KeyError: 'x'")]
    assert all(d.pid == os.getpid() for d in downs)


def test_a_heartbeat_says_what_the_worker_holds_and_hands_out(shell: GpuWorkerProc) -> None:
    """One beat: models held, inbox depth, and the link thread's picture of the
    compositors, without touching the engine's or the link's live state."""
    sock, stop = FakeSocket(), threading.Event()
    stop.set()  # one beat, then out
    shell.cache.loaded = {"demo": 123}
    shell.inbox.put(object())
    link = msg.CompositorLink(index=1, pid=42, credits=2, held=1, handed=9, alive=True)
    shell.link_view = ([link], 3, 5)
    shell._beat(sock, stop)  # type: ignore[arg-type]
    (data,) = sock.sent
    beat: Any = msg.frontend_decoder.decode(data)
    assert isinstance(beat, msg.Heartbeat) and (beat.role, beat.index, beat.gpu_id) == ("gpu_worker", 0, 0)
    assert beat.loaded_models == {"demo": 123} and beat.queue_depth == 1
    assert (beat.compositors, beat.jobs_waiting, beat.jobs_redispatched) == ([link], 3, 5)
    assert beat.device_memory_used_bytes > 0


def test_jobs_go_to_the_link_thread_with_their_key(shell: GpuWorkerProc) -> None:
    """A CompositeJob is queued as [key, job] (the link thread tracks it by key); other
    messages as one frame."""
    ref = msg.TensorRef("s", 0, (2, 3, 320, 320), "float32")
    background = msg.TensorRef("b", 0, (720, 1280, 3), "uint8")
    job = msg.CompositeJob(request_id=77, first_frame=5, predictions=ref,
                           backgrounds=(background, background), rects=((0, 0, 1, 1),) * 2,
                           mode="synctalk", jpeg_quality=75)
    shell._post(JOBS, job)
    shell._post("frontend", msg.InferFailed(1, "x"))
    (target, frames), (_, single) = shell.outbox.get_nowait(), shell.outbox.get_nowait()
    assert target == JOBS and JOB_KEY.unpack(frames[0]) == (77, 5, False)
    assert msg.compositor_decoder.decode(frames[1]) == job and len(single) == 1
