"""The figures of `lipsync bench --stream --live` (pure: unit-tested on synthetic logs): what
each live session saw, per session and together, and the table a run prints. What each
figure means: pipeline/bench/live_load.py's docstring."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from pipeline.bench.figures import percentile
from pipeline.bench.stream_load import HOLD_FPS

MAX_MISSED = 0.02           # holds_25fps: at most this share of speech frames missed


@dataclass
class Frame:
    arrived: float          # monotonic seconds
    index: int
    speech: bool
    due_epoch_us: int


@dataclass
class Interrupt:
    sent: float
    acked: float | None = None


@dataclass
class LiveLog:
    session: int
    epoch_offset: float                     # time.time() - time.monotonic() on this client
    frames: list[Frame] = field(default_factory=list)
    utterances: list[tuple[float, float]] = field(default_factory=list)  # (first send, flush)
    interrupts: list[Interrupt] = field(default_factory=list)
    expected_speech: int = 0                # frames of the flushed utterances' audio
    statuses: list[tuple[float, dict[str, Any]]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    refused: str = ""


def jitter_ms(log: LiveLog) -> list[float]:
    """Per frame: arrival after its due time, beyond the session's smallest such delay."""
    late = [(f.arrived + log.epoch_offset) * 1e3 - f.due_epoch_us / 1e3 for f in log.frames]
    floor = min(late, default=0.0)
    return [x - floor for x in late]


def first_speech_ms(log: LiveLog) -> list[float]:
    """Per utterance: its first speech frame's arrival after its first audio was sent."""
    starts = [start for start, _ in log.utterances]
    out = []
    for k, start in enumerate(starts):
        until = starts[k + 1] if k + 1 < len(starts) else math.inf
        first = next((f.arrived for f in log.frames
                      if f.speech and start <= f.arrived < until), None)
        if first is not None:
            out.append((first - start) * 1e3)
    return out


def interrupt_ms(log: LiveLog) -> tuple[list[float], list[float]]:
    """(ack_ms, stop_ms) of every interrupt (module docstring): the speech frames after an
    interrupt are those before the next utterance's first audio."""
    acks, stops = [], []
    for it in log.interrupts:
        until = min((start for start, _ in log.utterances if start > it.sent), default=math.inf)
        if it.acked is not None:
            acks.append((it.acked - it.sent) * 1e3)
        after = [f.arrived for f in log.frames if f.speech and it.sent < f.arrived < until]
        stops.append((max(after) - it.sent) * 1e3 if after else 0.0)
    return acks, stops


def summarize(log: LiveLog) -> dict[str, Any]:
    times = [f.arrived for f in log.frames]
    span = times[-1] - times[0] if len(times) > 1 else 0.0
    fps = (len(times) - 1) / span if span > 0 else 0.0
    speech = sum(f.speech for f in log.frames)
    missed = max(0, log.expected_speech - speech) if not log.interrupts else 0
    first, jitter = first_speech_ms(log), jitter_ms(log)
    acks, stops = interrupt_ms(log)
    out: dict[str, Any] = {
        "session": log.session, "frames": len(log.frames), "fps": round(fps, 2),
        "idle_frames": len(log.frames) - speech, "speech_frames": speech,
        "utterances": len(log.utterances), "missed_speech": missed,
        "first_speech_ms_p50": round(percentile(first, 50), 1),
        "first_speech_ms_p99": round(percentile(first, 99), 1),
        "jitter_ms_p99": round(percentile(jitter, 99), 1),
        "holds_25fps": bool(log.frames) and not log.errors and not log.refused
        and fps >= HOLD_FPS and missed <= MAX_MISSED * max(1, log.expected_speech),
        "refused": log.refused, "errors": list(log.errors),
    }
    if log.interrupts:
        out.update(interrupts=len(log.interrupts),
                   interrupt_ack_ms_p50=round(percentile(acks, 50), 1),
                   interrupt_ack_ms_p99=round(percentile(acks, 99), 1),
                   interrupt_stop_ms_p50=round(percentile(stops, 50), 1),
                   interrupt_stop_ms_p99=round(percentile(stops, 99), 1))
    return out


def aggregate(logs: list[LiveLog]) -> dict[str, Any]:
    """Every session together; interrupt figures over every interrupt."""
    served = [log for log in logs if not log.refused]
    per = [summarize(log) for log in logs]
    first = [x for log in served for x in first_speech_ms(log)]
    jitter = [x for log in served for x in jitter_ms(log)]
    acks = [x for log in served for x in interrupt_ms(log)[0]]
    stops = [x for log in served for x in interrupt_ms(log)[1]]
    held = [s for s in per if not s["refused"]]
    return {
        "sessions": len(logs), "refused": len(logs) - len(served),
        "min_fps": min((s["fps"] for s in held), default=0.0),
        "idle_frames": sum(s["idle_frames"] for s in held),
        "speech_frames": sum(s["speech_frames"] for s in held),
        "missed_speech": sum(s["missed_speech"] for s in held),
        "first_speech_ms_p50": round(percentile(first, 50), 1),
        "first_speech_ms_p99": round(percentile(first, 99), 1),
        "jitter_ms_p99": round(percentile(jitter, 99), 1),
        "interrupts": len(stops),
        "interrupt_ack_ms_p50": round(percentile(acks, 50), 1),
        "interrupt_ack_ms_p99": round(percentile(acks, 99), 1),
        "interrupt_stop_ms_p50": round(percentile(stops, 50), 1),
        "interrupt_stop_ms_p99": round(percentile(stops, 99), 1),
        "all_hold_25fps": bool(held) and all(s["holds_25fps"] for s in held),
        "errors": sum(len(s["errors"]) for s in per),
        "per_session": per,
    }



def table(result: dict[str, Any]) -> str:
    lines = [f"{result['sessions']} live sessions"
             + (" (and one that interrupts)" if result.get("interrupting") else "")
             + f", {result['seconds']} s, speaking {result['speaking']:.0%} of the time; "
             f"{result['refused']} refused",
             f"{'session':>7} {'frames':>6} {'fps':>6} {'idle':>5} {'speech':>6} "
             f"{'missed':>6} {'first p50':>9} {'first p99':>9} {'jitter p99':>10}  holds"]
    for s in result["per_session"]:
        if s["refused"]:
            lines.append(f"{s['session']:>7} refused: {s['refused']}")
            continue
        lines.append(f"{s['session']:>7} {s['frames']:>6} {s['fps']:>6.2f} "
                     f"{s['idle_frames']:>5} {s['speech_frames']:>6} {s['missed_speech']:>6} "
                     f"{s['first_speech_ms_p50']:>9.1f} {s['first_speech_ms_p99']:>9.1f} "
                     f"{s['jitter_ms_p99']:>10.1f}  {'yes' if s['holds_25fps'] else 'NO'}")
        lines.extend(f"        error: {e}" for e in s["errors"])
    if result["interrupts"]:
        lines.append(f"interrupts {result['interrupts']}: acknowledged p50 "
                     f"{result['interrupt_ack_ms_p50']} ms p99 {result['interrupt_ack_ms_p99']} "
                     f"ms; last speech frame after it p50 {result['interrupt_stop_ms_p50']} ms "
                     f"p99 {result['interrupt_stop_ms_p99']} ms")
    lines.append(f"min fps {result['min_fps']}  first speech frame p50 "
                 f"{result['first_speech_ms_p50']} ms p99 {result['first_speech_ms_p99']} ms  "
                 f"jitter p99 {result['jitter_ms_p99']} ms  every session holds 25 fps: "
                 f"{'yes' if result['all_hold_25fps'] else 'NO'}")
    if result.get("cpu_per_s"):
        cpu = result["cpu_per_s"]
        lines.append(f"server CPU s per s: {sum(cpu.values()):.3f} (" + "  ".join(
            f"{k} {v}" for k, v in sorted(cpu.items())) + ")")
    return "\n".join(lines)
