"""How the engine picks the requests of one UNet run (batching.coalesce over its Inbox),
and how a coalesced run gathers and scatters through the staging batch; no processes."""
from __future__ import annotations

import threading
import time

import numpy as np

from pipeline import messages as msg
from pipeline.gpu_worker.batching import Inbox, StagingBatch, coalesce

REF = msg.TensorRef("seg", 0, (1,), "float32")


def _req(request_id: int, batch: int, model: str = "demo") -> msg.InferRequest:
    return msg.InferRequest(request_id=request_id, worker_pid=0, model_id=model,
                            batch_size=batch, start_frame_idx=0, output=REF, visual=REF)


def _ids(items: list) -> list[int]:
    return [i.request_id for i in items]


def _inbox(*items: object) -> Inbox:
    inbox = Inbox()
    for item in items:
        inbox.put(item)
    return inbox


def test_queued_requests_of_the_model_join_up_to_the_frame_limit() -> None:
    """Requests of the first one's model join the run up to the frame limit; others stay."""
    inbox = _inbox(_req(2, 4), _req(3, 8, "other"), _req(4, 4), _req(5, 1), _req(6, 2))
    run = coalesce(_req(1, 4), inbox, 16, 0.0)
    assert _ids(run) == [1, 2, 4, 5, 6] and sum(r.batch_size for r in run) == 15
    assert _ids(list(inbox.backlog)) == [3]  # the other model's request keeps its place


def test_a_request_that_does_not_fit_ends_the_run_and_goes_first_next() -> None:
    """A request of the model that would overflow the limit ends the run and leads the next."""
    inbox = _inbox(_req(2, 4), _req(3, 4), _req(4, 1))
    assert _ids(coalesce(_req(1, 4), inbox, 10, 0.0)) == [1, 2]
    assert _ids(list(inbox.backlog)) == [3]
    # the next run starts from the backlog, in order, then the queue
    first = inbox.next(time.monotonic())
    assert _ids(coalesce(first, inbox, 10, 0.0)) == [3, 4]  # type: ignore[arg-type]


def test_a_control_message_is_never_overtaken() -> None:
    """An Unload behind a request ends the search: later requests do not jump it."""
    unload = msg.UnloadModel(request_id=9, worker_pid=0, model_id="demo")
    inbox = _inbox(_req(2, 1), unload, _req(3, 1))
    assert _ids(coalesce(_req(1, 1), inbox, 16, 0.0)) == [1, 2]
    assert list(inbox.backlog) == [unload]
    assert inbox.queue.get_nowait().request_id == 3  # type: ignore[attr-defined]


def test_the_queue_delay_waits_for_late_requests_and_no_longer() -> None:
    """With a delay, a run waits for a late request until the delay runs out; with 0, it
    takes only what is queued."""
    inbox = Inbox()
    threading.Timer(0.1, lambda: inbox.put(_req(2, 1))).start()
    t0 = time.monotonic()
    run = coalesce(_req(1, 1), inbox, 16, 0.3)
    waited = time.monotonic() - t0
    assert _ids(run) == [1, 2]
    assert 0.25 <= waited < 2.0  # it kept waiting for more until the delay ran out

    queued = _inbox(_req(2, 1))
    assert _ids(coalesce(_req(1, 1), queued, 16, 0.0)) == [1, 2]  # 0: what is already queued


def test_a_full_first_request_runs_alone_without_waiting() -> None:
    """A request that fills the frame limit by itself takes nothing and never waits."""
    inbox = _inbox(_req(2, 1))
    t0 = time.monotonic()
    assert _ids(coalesce(_req(1, 8), inbox, 8, 5.0)) == [1]
    assert time.monotonic() - t0 < 1.0
    assert inbox.depth() == 1


def test_inbox_serves_the_backlog_before_the_queue() -> None:
    """Items set aside by a batch search come back first, in their order."""
    inbox = _inbox(_req(3, 1))
    inbox.backlog.extend([_req(1, 1), _req(2, 1)])
    assert inbox.depth() == 3
    got = [inbox.next(time.monotonic()) for _ in range(3)]
    assert _ids(got) == [1, 2, 3]
    assert inbox.next(time.monotonic() + 0.01) is None


def test_staging_gathers_runs_once_and_scatters_each_part_back() -> None:
    """A coalesced run sees the parts' rows in order, and each output gets its own rows."""
    rng = np.random.default_rng(0)
    sizes = (2, 3, 1)
    visual = [rng.random((b, 6, 320, 320), np.float32) for b in sizes]
    features = [rng.random((b, 32, 16, 16), np.float32) for b in sizes]
    outputs = [np.zeros((b, 3, 320, 320), np.float32) for b in sizes]
    calls = []

    def unet(v: np.ndarray, a: np.ndarray, out: np.ndarray) -> None:
        calls.append((v.copy(), a.copy()))
        out[...] = v[:, :3] + a.mean(axis=(1, 2, 3))[:, None, None, None]

    StagingBatch(8).run(unet, list(zip(visual, features, outputs, strict=True)))
    assert len(calls) == 1 and calls[0][0].shape == (6, 6, 320, 320)
    np.testing.assert_array_equal(calls[0][0], np.concatenate(visual))
    np.testing.assert_array_equal(calls[0][1], np.concatenate(features))
    for v, a, out in zip(visual, features, outputs, strict=True):
        np.testing.assert_allclose(out, v[:, :3] + a.mean(axis=(1, 2, 3))[:, None, None, None])
