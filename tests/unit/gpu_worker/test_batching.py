"""How the gpu_worker picks the requests of one UNet run (GpuWorker._coalesce and
frame_limited_runs), on a real worker object with its queue; no processes."""
from __future__ import annotations

import time
from pathlib import Path

import pytest

from pipeline import messages as msg
from pipeline.config import load_config
from pipeline.gpu_worker.worker import GpuWorker, frame_limited_runs
from tests.conftest import write_config

REF = msg.TensorRef("seg", 0, (1,), "float32")


def _req(request_id: int, batch: int, model: str = "demo") -> msg.InferRequest:
    return msg.InferRequest(request_id=request_id, worker_pid=0, model_id=model,
                            batch_size=batch, start_frame_idx=0, output=REF, visual=REF)


@pytest.fixture
def worker(tmp_path: Path, models_root: Path):
    def make(max_frames: int = 16, delay_ms: float = 0.0) -> GpuWorker:
        cfg = load_config(write_config(tmp_path / "config.yaml", models_root,
                                       **{"batching.max_batch_frames": max_frames,
                                          "batching.max_queue_delay_ms": delay_ms}))
        return GpuWorker(cfg, 0, "cpu")
    return make


def _ids(items: list) -> list[int]:
    return [i.request_id for i in items]


def test_queued_requests_of_the_model_join_up_to_the_frame_limit(worker) -> None:
    w = worker(max_frames=16)
    for item in (_req(2, 4), _req(3, 8, "other"), _req(4, 4), _req(5, 1), _req(6, 2)):
        w.inbox.put(item)
    run = w._coalesce(_req(1, 4))
    assert _ids(run) == [1, 2, 4, 5, 6] and sum(r.batch_size for r in run) == 15
    assert _ids(list(w.backlog)) == [3]  # the other model's request keeps its place


def test_a_request_that_does_not_fit_ends_the_run_and_goes_first_next(worker) -> None:
    w = worker(max_frames=10)
    for item in (_req(2, 4), _req(3, 4), _req(4, 1)):
        w.inbox.put(item)
    assert _ids(w._coalesce(_req(1, 4))) == [1, 2]
    assert _ids(list(w.backlog)) == [3]
    # the next run starts from the backlog, in order, then the inbox
    assert _ids(w._coalesce(w.backlog.popleft())) == [3, 4]


def test_a_control_message_is_never_overtaken(worker) -> None:
    w = worker()
    unload = msg.UnloadModel(request_id=9, worker_pid=0, model_id="demo")
    for item in (_req(2, 1), unload, _req(3, 1)):
        w.inbox.put(item)
    assert _ids(w._coalesce(_req(1, 1))) == [1, 2]
    assert list(w.backlog) == [unload]
    assert w.inbox.get_nowait().request_id == 3


def test_the_queue_delay_waits_for_late_requests_and_no_longer(worker) -> None:
    import threading

    w = worker(delay_ms=300)
    threading.Timer(0.1, lambda: w.inbox.put(_req(2, 1))).start()
    t0 = time.monotonic()
    run = w._coalesce(_req(1, 1))
    waited = time.monotonic() - t0
    assert _ids(run) == [1, 2]
    assert 0.25 <= waited < 2.0  # it kept waiting for more until the delay ran out

    w0 = worker(delay_ms=0)
    w0.inbox.put(_req(2, 1))
    assert _ids(w0._coalesce(_req(1, 1))) == [1, 2]  # 0: what is already queued


def test_frame_limited_runs_keep_order_and_limit() -> None:
    reqs = [_req(i, b) for i, b in enumerate([3, 5, 8, 32, 1, 1], start=1)]
    runs = [_ids(r) for r in frame_limited_runs(reqs, 8)]
    assert runs == [[1, 2], [3], [4], [5, 6]]  # a request over the limit runs alone
