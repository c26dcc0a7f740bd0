"""The frame budget and the admission of stream sessions: tickets counted from admission to
release, silent sessions taking none of the budget, speech and expected speech taking it, the
client caps, and refusals that say what limits the box."""
from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from pipeline import messages as msg
from pipeline.config import parse_config
from pipeline.frontend.capacity import Admission, FrameBudget, Refused
from pipeline.frontend.inflight import InferResult


def admission(capacity_fps: float = 0.0, speech_share: float = 0.0, max_clients: int = 100,
              per_address: int = 0) -> Admission:
    cfg = parse_config({"streaming": {"capacity_fps": capacity_fps,
                                      "live_speech_share": speech_share,
                                      "max_clients": max_clients,
                                      "max_sessions_per_address": per_address},
                        "models": {}}, Path("."))
    return Admission(cfg, FrameBudget(cfg))


def rendered(frames: int, stage_ms_per_frame: float) -> InferResult:
    ns = int(stage_ms_per_frame * 1e6 * frames)
    done = msg.InferDone(request_id=0, gpu_id=0, queue_ns=0, audio_ns=ns, encoder_ns=0,
                         visual_ns=0, inference_ns=0, composite_start_ns=0, run_frames=frames)
    return InferResult([b""] * frames, done, 0, 0, 0, 0, 0)


def test_silent_live_sessions_take_none_of_the_budget() -> None:
    """A box that sustains 40 frames/s admits any number of sessions while none speaks,
    when no session is expected to speak (live_speech_share 0)."""
    a = admission(40)
    tickets = [a.admit("10.0.0.1", live=True) for _ in range(100)]
    assert a.live_sessions() == 100 and a.refused == 0
    for t in tickets:
        t.release()
    assert a.live_sessions() == 0


def test_an_utterance_under_way_leaves_room_only_for_what_is_left() -> None:
    """One session speaking (25 of 40 frames/s): a new session is refused, saying why and
    holding nothing."""
    a = admission(40)
    a.admit("a", live=True).speaking()
    with pytest.raises(Refused) as refused:
        a.admit("a", live=True)
    assert "25 of 40 fps in use" in str(refused.value)
    assert "streaming.capacity_fps: 40" in str(refused.value)
    assert a.refused == 1 and len(a.tickets) == 1


def test_an_interrupt_flood_reserves_one_utterance_at_most() -> None:
    """A session that begins an utterance 50 times (an interrupt after each) reserves 25
    frames/s, not 50 x 25; quiet (interrupted), it reserves nothing."""
    a = admission(100)
    ticket = a.admit("a", live=True)
    for _ in range(50):
        ticket.speaking()
    assert a.used_fps() == 25
    ticket.quiet()
    assert a.used_fps() == 0


def test_an_utterance_counts_its_own_rendered_frames_once() -> None:
    """A speaking session's frames already measured are not counted twice: its reservation
    covers only what the window does not show yet."""
    a = admission(100)
    ticket = a.admit("a", live=True)
    ticket.speaking()
    a.budget.observe(rendered(20, 1.0), live=True)  # 20 frames in the 2 s window: 10 frames/s
    ticket.rendered(20)
    assert a.used_fps() == pytest.approx(25.0)


def test_a_ticket_is_released_on_every_ending_and_only_once() -> None:
    """As a context manager the ticket goes with an exception too; releasing twice is
    harmless."""
    a = admission(40)
    with pytest.raises(RuntimeError):
        with a.admit("a", live=True):
            assert a.live_sessions() == 1
            raise RuntimeError("the session failed to start")
    assert a.live_sessions() == 0
    ticket = a.admit("a", live=False)
    ticket.release()
    ticket.release()
    assert len(a.tickets) == 0


def test_the_client_caps_count_every_transport_and_refuse_before_anything_is_held() -> None:
    """max_clients over all sessions, max_sessions_per_address per address; `check` (a
    WebSocket handshake) counts nothing."""
    a = admission(max_clients=3, per_address=2)
    a.admit("10.0.0.1", live=False)
    a.admit("10.0.0.1", live=True)
    assert a.check("10.0.0.1") == "2 sessions from this address (streaming.max_sessions_per_address)"
    assert a.check("10.0.0.2") is None and len(a.tickets) == 2
    a.admit("10.0.0.2", live=False)
    with pytest.raises(Refused, match="3 clients connected"):
        a.admit("10.0.0.3", live=False)
    assert len(a.tickets) == 3


def test_measured_rendering_counts_and_the_budget_follows_the_stage_costs() -> None:
    """Unmeasured: no limit. 10 ms of stage compute per frame on N cores: 0.85 N / 0.01
    frames/s; 2 s of live rendering at the budget leaves no room for a 25 frames/s session."""
    a = admission()
    b = a.budget
    assert b.budget_fps() == float("inf")
    a.admit("a", live=True).release()
    b.observe(rendered(8, 10.0))
    assert abs(b.budget_fps() - 0.85 * b.cores / 0.010) < 1e-6
    for _ in range(int(b.budget_fps() * 2.0) // 8 + 1):
        b.observe(rendered(8, 10.0), live=True)
    assert a.used_fps() >= b.budget_fps() - 25
    with pytest.raises(Refused):
        a.admit("a", live=True)


def test_batch_work_measures_the_cost_of_a_frame_but_takes_no_live_room() -> None:
    """Batch requests at full tilt: they measure the cost of a frame (and count in the CPU
    samples) but are not speech in use: live work goes first, batch takes what is left."""
    a = admission(100)
    for _ in range(50):
        a.budget.observe(rendered(8, 5.0))
    assert a.budget.frames == 400 and a.used_fps() == 0
    a.admit("a", live=True)


def test_a_warm_up_seeds_the_budget_but_is_no_speech_in_use() -> None:
    """A model's warm-up measures the stage costs (the budget is known before any session)
    without counting as frames rendered."""
    a = admission()
    a.budget.observe(rendered(1, 20.0), warmup=True)
    assert a.budget.budget_fps() == pytest.approx(0.85 * a.budget.cores / 0.020)
    assert a.used_fps() == 0 and a.budget.frames == 0


def test_each_open_session_counts_its_expected_speech() -> None:
    """live_speech_share 0.5 of 25 frames/s on a 100 frames/s box: 8 open sessions fit, the
    9th is refused though none speaks yet (they would all fall behind when they do); a
    session released frees its share."""
    a = admission(100, speech_share=0.5)
    tickets = [a.admit("a", live=True) for _ in range(8)]
    with pytest.raises(Refused) as refused:
        a.admit("a", live=True)
    assert "8 live x 12.5 fps expected of 100" in str(refused.value)
    assert a.snapshot()["live_sessions"] == 8 and a.snapshot()["expected_fps"] == 100.0
    tickets.pop().release()
    a.admit("a", live=True)


def test_what_the_rest_of_the_box_uses_is_not_in_the_budget() -> None:
    """2 cores; the roles spend 1 CPU s on 100 frames (10 ms each) while the box as a whole
    is busy 1.5 s: the other 0.5 cores are not the server's, so the budget is 0.85 × 1.5
    cores / 10 ms (127.5 frames/s), not 0.85 × 2 / 10 ms."""
    b = admission().budget
    b.cores = 2
    b.sample_cpu(0.0, 0.0, now=0.0)
    b.observe(rendered(100, 10.0))
    b.sample_cpu(1.0, 1.5, now=1.0)
    assert abs(b.budget_fps() - 127.5) < 1e-6
    assert b.snapshot()["other_cores"] == 0.5


def test_a_busy_moment_elsewhere_does_not_swing_the_budget() -> None:
    """After a minute of 0.2 other cores, 3 s of 1.8 move what the rest of the box takes by
    less than a fifth of the jump (smoothed over ~30 s), and it returns as the box calms."""
    b = admission().budget
    b.cores = 2
    t = 0.0
    b.sample_cpu(0.0, 0.0, now=t)
    box = 0.0
    for _ in range(60):
        t += 1.0
        box += 0.2
        b.sample_cpu(0.0, box, now=t)
    assert b.other_cores == pytest.approx(0.2)
    for _ in range(3):
        t += 1.0
        box += 1.8
        b.sample_cpu(0.0, box, now=t)
    assert b.other_cores is not None and 0.2 < b.other_cores < 0.2 + 1.6 / 5


@pytest.mark.parametrize("cores, others, ms, live", [(2, 1.5, 14.0, 1), (128, 99.9, 123.4, 512)])
def test_a_refusal_names_the_limit_and_fits_a_close_frame(cores: int, others: float, ms: float,
                                                          live: int) -> None:
    """The reason says the cores, the other use, the cost per frame and the setting that
    overrides the measurement, within the 123 bytes of a WebSocket close reason."""
    a = admission(speech_share=1.0)
    b = a.budget
    b.cores, b.other_cores, b.cpu_s_per_frame = cores, others, ms / 1e3
    tickets = []
    with pytest.raises(Refused) as refused:
        for _ in range(live * 1000):
            tickets.append(a.admit("a", live=True))
    reason = str(refused.value)
    assert f"{cores} cores, {others:.1f} busy elsewhere, {ms:.0f} ms/frame" in reason
    assert "streaming.capacity_fps" in reason and len(reason.encode()) <= 123, reason


def test_the_budget_samples_the_roles_by_its_own_task() -> None:
    """sample_forever reads the roles' CPU and the GPU flag from its inputs, once a second,
    by itself (not when someone looks at the statistics)."""
    import os

    b = admission().budget

    class Inputs:
        calls = 0

        def role_pids(self) -> list[int]:
            self.calls += 1
            return [os.getpid()]

        def cuda(self) -> bool:
            return True

    async def scenario() -> int:
        inputs = Inputs()
        task = asyncio.create_task(b.sample_forever(inputs))
        await asyncio.sleep(1.5)
        task.cancel()
        return inputs.calls

    assert asyncio.run(scenario()) == 2
    assert b.cuda and b._last_box is not None
