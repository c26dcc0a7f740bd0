"""How the engine picks the requests of one UNet run (batching.coalesce over its Inbox),
and how a coalesced run gathers and scatters through the staging batch; no processes."""
from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from pipeline import messages as msg
from pipeline.gpu_worker.batching import Inbox, StagingBatch, coalesce

REF = msg.TensorRef("seg", 0, (1,), "float32")


def _req(request_id: int, batch: int, model: str = "demo", live: bool = False) -> msg.InferRequest:
    return msg.InferRequest(request_id=request_id, worker_pid=0, model_id=model,
                            batch_size=batch, start_frame_idx=0, output=REF, visual=REF,
                            live=live)


def _ids(items: list) -> list[int]:
    return [i.request_id for i in items]


def _left(inbox: Inbox) -> list[object]:
    """Everything still in the inbox, in the order the engine would take it."""
    items = []
    while (item := inbox.next(time.monotonic())) is not None:
        items.append(item)
    return items


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
    assert _ids(_left(inbox)) == [3]  # the other model's request keeps its place


def test_a_request_that_does_not_fit_ends_the_run_and_goes_first_next() -> None:
    """A request of the model that would overflow the limit ends the run and leads the next."""
    inbox = _inbox(_req(2, 4), _req(3, 4), _req(4, 1))
    assert _ids(coalesce(_req(1, 4), inbox, 10, 0.0)) == [1, 2]
    # the next run starts from the request set aside, in its place
    first = inbox.next(time.monotonic())
    assert _ids(coalesce(first, inbox, 10, 0.0)) == [3, 4]  # type: ignore[arg-type]


def test_a_control_message_is_never_overtaken() -> None:
    """An Unload behind a request ends the search: later requests do not jump it."""
    unload = msg.UnloadModel(request_id=9, worker_pid=0, model_id="demo")
    inbox = _inbox(_req(2, 1), unload, _req(3, 1))
    assert _ids(coalesce(_req(1, 1), inbox, 16, 0.0)) == [1, 2]
    left = _left(inbox)
    assert left[0] == unload and _ids(left[1:]) == [3]


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


def test_the_inbox_serves_live_requests_first_and_the_rest_in_order() -> None:
    """A live session's requests are taken before anything queued earlier (control messages
    and batch requests keep their order among themselves); what a batch search sets aside
    keeps its place."""
    unload = msg.UnloadModel(request_id=9, worker_pid=0, model_id="other")
    inbox = _inbox(_req(1, 1), unload, _req(2, 1), _req(3, 1, live=True), _req(4, 1, live=True))
    assert inbox.depth() == 5
    first = inbox.next(time.monotonic())
    assert _ids([first]) == [3]  # type: ignore[list-item]
    set_aside = inbox.take(time.monotonic())  # the next live one, given back unused
    assert set_aside is not None
    inbox.give_back([set_aside])
    left = _left(inbox)
    assert _ids(left[:1]) == [4] and _ids(left[1:2]) == [1] and left[2] == unload
    assert _ids(left[3:]) == [2]
    assert inbox.next(time.monotonic() + 0.01) is None


def test_live_and_batch_requests_never_share_a_run() -> None:
    """A live request coalesces with the live requests of its model only: a batch request
    would make it wait for a bigger run."""
    inbox = _inbox(_req(2, 4), _req(3, 2, live=True), _req(4, 2, live=True))
    assert _ids(coalesce(_req(1, 2, live=True), inbox, 16, 0.0)) == [1, 3, 4]
    assert _ids(coalesce(inbox.next(time.monotonic()), inbox, 16, 0.0)) == [2]  # type: ignore[arg-type]


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


@pytest.mark.parametrize("dropped", [None, 1])
def test_visual_inputs_built_in_their_rows_are_gathered_in_place_or_moved_down(
        dropped: int | None) -> None:
    """Parts whose visual input was built in the staging batch's own rows: in place when
    every request of the run is there, moved down in order when one before them dropped
    out (its rows unused): the run sees each part's input either way."""
    rng = np.random.default_rng(1)
    staging = StagingBatch(8)
    sizes = (2, 3, 2)
    rows = staging.visual_rows(sizes)
    assert [r.shape[0] for r in rows] == list(sizes)
    assert rows[1].__array_interface__["data"][0] == \
        staging.visual[2:].__array_interface__["data"][0]
    inputs = [rng.random((b, 6, 320, 320), np.float32) for b in sizes]
    for r, v in zip(rows, inputs, strict=True):
        r[...] = v
    kept = [i for i in range(3) if i != dropped]
    features = [rng.random((sizes[i], 32, 16, 16), np.float32) for i in kept]
    outputs = [np.zeros((sizes[i], 3, 320, 320), np.float32) for i in kept]
    seen = []

    def unet(v: np.ndarray, a: np.ndarray, out: np.ndarray) -> None:
        seen.append(v.copy())
        out[...] = v[:, :3]

    staging.run(unet, [(rows[i], f, o) for i, f, o in zip(kept, features, outputs, strict=True)])
    np.testing.assert_array_equal(seen[0], np.concatenate([inputs[i] for i in kept]))
    for i, out in zip(kept, outputs, strict=True):
        np.testing.assert_array_equal(out, inputs[i][:, :3])


def test_a_wake_returns_the_waiting_reader_with_nothing() -> None:
    """Inbox.wake (the shell's stop): a reader waiting for an item with a far deadline
    returns None at once; the next wait waits again."""
    inbox = Inbox()
    threading.Timer(0.05, inbox.wake).start()
    t0 = time.monotonic()
    assert inbox.next(t0 + 30) is None
    assert time.monotonic() - t0 < 10
    inbox.put("item")
    assert inbox.next(time.monotonic() + 1) == "item"
    assert inbox.next(time.monotonic() + 0.05) is None  # timed out: no wake left over
