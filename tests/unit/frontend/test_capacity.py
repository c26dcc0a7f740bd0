"""The frame budget behind live admission: silent sessions take none of it, speech does."""
from __future__ import annotations

from pathlib import Path

from pipeline import messages as msg
from pipeline.config import parse_config
from pipeline.frontend.capacity import FrameBudget
from pipeline.frontend.inflight import InferResult


def budget(capacity_fps: float = 0.0, speech_share: float = 0.0) -> FrameBudget:
    cfg = parse_config({"streaming": {"capacity_fps": capacity_fps,
                                      "live_speech_share": speech_share}, "models": {}}, Path("."))
    return FrameBudget(cfg)


class Session:
    """What the budget holds of a live session: a reference, weakly."""


def rendered(frames: int, stage_ms_per_frame: float) -> InferResult:
    ns = int(stage_ms_per_frame * 1e6 * frames)
    done = msg.InferDone(request_id=0, gpu_id=0, queue_ns=0, audio_ns=ns, encoder_ns=0,
                         visual_ns=0, inference_ns=0, composite_start_ns=0, run_frames=frames)
    return InferResult([b""] * frames, done, 0, 0, 0, 0, 0)


def test_silent_live_sessions_take_none_of_the_budget() -> None:
    """A box that sustains 40 frames/s admits any number of sessions while none speaks,
    when no session is expected to speak (live_speech_share 0)."""
    b = budget(40)
    assert all(b.admit_live() is None for _ in range(100))
    assert b.refused == 0


def test_an_utterance_under_way_leaves_room_only_for_what_is_left() -> None:
    """One session speaking (25 of 40 frames/s): a new session is refused, saying why."""
    b = budget(40)
    assert b.admit_live() is None
    b.speaking()
    reason = b.admit_live()
    assert reason is not None and "capacity" in reason and "25 of 40" in reason
    assert b.refused == 1


def test_measured_rendering_counts_and_the_budget_follows_the_stage_costs() -> None:
    """Unmeasured: no limit. 10 ms of stage compute per frame on N cores: 0.85 N / 0.01
    frames/s; 2 s of rendering at the budget leaves no room for a 25 frames/s session."""
    b = budget()
    assert b.budget_fps() == float("inf") and b.admit_live() is None
    b.observe(rendered(8, 10.0))
    assert abs(b.budget_fps() - 0.85 * b.cores / 0.010) < 1e-6
    per_window = int(b.budget_fps() * 2.0)
    for _ in range(per_window // 8 + 1):
        b.observe(rendered(8, 10.0))
    assert b.used_fps() >= b.budget_fps() - 25
    assert b.admit_live() is not None


def test_each_open_session_counts_its_expected_speech() -> None:
    """live_speech_share 0.5 of 25 frames/s on a 100 frames/s box: 8 open sessions fit, the
    9th is refused though none speaks yet (they would all fall behind when they do); a
    session closed, or gone without saying so, frees its share."""
    b = budget(100, speech_share=0.5)
    sessions = []
    for _ in range(8):
        assert b.admit_live() is None
        sessions.append(Session())
        b.opened(sessions[-1])
    reason = b.admit_live()
    assert reason is not None and "8 live sessions" in reason and "12.5" in reason
    assert b.snapshot()["live_sessions"] == 8 and b.snapshot()["expected_fps"] == 100.0
    b.closed(sessions.pop())
    assert b.admit_live() is None
    sessions.pop()  # dropped without closed(): the budget holds it weakly
    assert b.snapshot()["live_sessions"] == 6


def test_what_the_rest_of_the_box_uses_is_not_in_the_budget() -> None:
    """2 cores; the roles spend 1 CPU s on 100 frames (10 ms each) while the box as a whole
    is busy 1.5 s: the other 0.5 cores are not the server's, so the budget is 0.85 × 1.5
    cores / 10 ms (127.5 frames/s), not 0.85 × 2 / 10 ms."""
    b = budget()
    b.cores = 2
    b.sample_cpu(0.0, 0.0, now=0.0)
    b.observe(rendered(100, 10.0))
    b.sample_cpu(1.0, 1.5, now=1.0)
    assert abs(b.budget_fps() - 127.5) < 1e-6
    assert b.snapshot()["other_cores"] == 0.5
