"""`lipsync bench --stream`: S concurrent WebSocket `/audio` sessions, each sending T seconds
of speech-like s16le 16 kHz audio at real-time pace, and what a live client sees.

Each session connects to `ws://HOST:PORT/audio?model=ID` (header `X-Client-ID: bench-<i>`),
waits for "ready", then (all sessions together) sends one chunk of `chunk_ms` audio per
`chunk_ms`, chunk k at t0 + k * chunk_ms on the monotonic clock (no drift from send times),
then {"type": "flush"}, and reads until {"type": "flushed"}. Per session:

- frames: frame messages received; N seconds of audio must give ceil(25 N).
- fps (delivered): (frames - 1) / (t_last - t_first), arrival times of the first and last
  frame: frames - 1 intervals over the span they took. The flush renders the last ~11
  frames (their 450 ms look-ahead is the flush's silence) in one burst, so a server that
  keeps up shows about 25 * T / (T - 0.45): 25.6 fps for T = 20 s, 29 for T = 3 s.
- live_fps: the same rate over the frames rendered from live audio only (those whose every
  sample was sent before the flush), without that burst: about 25 when the server keeps up.
- first_frame_latency_ms: t(first frame) - t(first audio chunk sent). It includes the
  model's look-ahead: frame 0 needs the first 450 ms of audio.
- p99_gap_ms: p99 of the gaps between consecutive frame arrivals.
- latency_ms_p99 (frame latency): arrival of frame i - send time of the chunk that
  completed the last sample frame i needs (`stream_samples(i, 1)[1]`, exclusive end, on the
  stream clock); for a frame whose last sample lies beyond the audio sent (rendered by the
  flush) the flush's send time. This is the server's own delay, look-ahead excluded.
  The flush's ~11 frames are 2 % of 20 s of frames and come as one batch, so on T <= 20 s
  the p99 is in practice the flush's latency; live_latency_ms_p99 (frames rendered from
  live audio) and flush_latency_ms_max (frames rendered by the flush) tell them apart.
  Sessions are started together and so flush together: the worst case for that batch.
- holds_25fps: every frame received and fps >= 24.5. The 2 % tolerance covers timing
  noise only: the rate is taken between two single arrivals, each jittered by the
  server's batching and by this client's event-loop wake-ups on a loaded machine (tens of
  ms), while a server that cannot keep up falls behind by an amount growing with T.

The client runs in this process, on the same machine as a server it starts itself.
"""
from __future__ import annotations

import asyncio
import json
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import pairwise
from typing import Any
from urllib.parse import quote

import numpy as np
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from pipeline.bench.figures import ops_stats, percentile
from pipeline.client import parse_frame_message, speech_like_audio, websocket_options
from pipeline.synctalk import FRAME_SAMPLES, FRAME_US, stream_samples

SAMPLE_RATE = 16000
FPS = 25
HOLD_FPS = 24.5               # holds_25fps threshold (see the module docstring)
CONNECT_RETRY_S = 10.0        # a server just started may answer Health before /audio listens


# ---- figures (pure: unit-tested on synthetic timestamps) ---------------------------------

def frame_need(index: int) -> int:
    """The stream sample (exclusive end) frame `index` needs before it can be rendered."""
    return stream_samples(index, 1)[1]


def completing_chunk(need: int, chunk_samples: int) -> int:
    """Index of the chunk that completes samples [0, need): chunk k holds
    [k * chunk_samples, (k + 1) * chunk_samples)."""
    return max(0, -(-need // chunk_samples) - 1)


def frame_latencies_ms(arrivals: Sequence[tuple[int, float]], send_times: Sequence[float],
                       chunk_samples: int, total_samples: int,
                       flush_time: float | None) -> list[float]:
    """Per received frame (index, arrival time): arrival - send time of the chunk that
    completed its last needed sample, or the flush's send time when that sample lies
    beyond the audio sent. Frames with no reference time (not possible from a correct
    server) are left out."""
    out = []
    for index, arrived in arrivals:
        need = frame_need(index)
        k = completing_chunk(need, chunk_samples)
        if need <= total_samples and k < len(send_times):
            ref = send_times[k]
        elif flush_time is not None:
            ref = flush_time
        else:
            continue
        out.append((arrived - ref) * 1e3)
    return out


@dataclass
class SessionLog:
    """What one session saw, in monotonic seconds."""
    session: int
    total_samples: int
    chunk_samples: int
    send_times: list[float] = field(default_factory=list)
    flush_time: float | None = None
    arrivals: list[tuple[int, float]] = field(default_factory=list)   # (frame index, time)
    errors: list[str] = field(default_factory=list)
    flushed: bool = False

    @property
    def expected_frames(self) -> int:
        return math.ceil(self.total_samples / FRAME_SAMPLES)


def summarize(log: SessionLog) -> dict[str, object]:
    """The per-session figures of the module docstring."""
    frames = len(log.arrivals)
    times = [t for _, t in log.arrivals]
    span = times[-1] - times[0] if frames > 1 else 0.0
    fps = (frames - 1) / span if span > 0 else 0.0
    live_arrivals = [(i, t) for i, t in log.arrivals if frame_need(i) <= log.total_samples]
    tail_arrivals = [(i, t) for i, t in log.arrivals if frame_need(i) > log.total_samples]
    live_span = live_arrivals[-1][1] - live_arrivals[0][1] if len(live_arrivals) > 1 else 0.0
    live_fps = (len(live_arrivals) - 1) / live_span if live_span > 0 else 0.0
    gaps = [(b - a) * 1e3 for a, b in pairwise(times)]

    def lat(arrivals: list[tuple[int, float]]) -> list[float]:
        return frame_latencies_ms(arrivals, log.send_times, log.chunk_samples,
                                  log.total_samples, log.flush_time)

    latencies, live_latencies, tail_latencies = (
        lat(log.arrivals), lat(live_arrivals), lat(tail_arrivals))
    first = (times[0] - log.send_times[0]) * 1e3 if frames and log.send_times else 0.0
    complete = frames == log.expected_frames and log.flushed
    return {
        "session": log.session,
        "client_id": f"bench-{log.session}",
        "frames": frames,
        "expected_frames": log.expected_frames,
        "fps": round(fps, 2),
        "live_fps": round(live_fps, 2),
        "first_frame_latency_ms": round(first, 1),
        "p99_gap_ms": round(percentile(gaps, 99), 1),
        "max_gap_ms": round(max(gaps, default=0.0), 1),
        "latency_ms_min": round(min(latencies, default=0.0), 1),
        "latency_ms_p50": round(percentile(latencies, 50), 1),
        "latency_ms_p99": round(percentile(latencies, 99), 1),
        "latency_ms_max": round(max(latencies, default=0.0), 1),
        "live_latency_ms_p99": round(percentile(live_latencies, 99), 1),
        "flush_latency_ms_max": round(max(tail_latencies, default=0.0), 1),
        "holds_25fps": bool(complete and fps >= HOLD_FPS and not log.errors),
        "errors": list(log.errors),
    }


def aggregate(per_session: list[dict], sessions: int, seconds: float,
              chunk_ms: float) -> dict[str, object]:
    return {
        "sessions": sessions,
        "seconds": seconds,
        "per_session": per_session,
        "min_fps": min((s["fps"] for s in per_session), default=0.0),
        "max_p99_latency_ms": max((s["latency_ms_p99"] for s in per_session), default=0.0),
        "max_p99_gap_ms": max((s["p99_gap_ms"] for s in per_session), default=0.0),
        "all_hold_25fps": bool(per_session) and all(s["holds_25fps"] for s in per_session),
        "chunk_ms": chunk_ms,
        "min_live_fps": min((s["live_fps"] for s in per_session), default=0.0),
        "max_first_frame_latency_ms": max((s["first_frame_latency_ms"] for s in per_session),
                                          default=0.0),
        "max_live_p99_latency_ms": max((s["live_latency_ms_p99"] for s in per_session),
                                       default=0.0),
        "max_flush_latency_ms": max((s["flush_latency_ms_max"] for s in per_session),
                                    default=0.0),
        "errors": sum(len(s["errors"]) for s in per_session),
    }


# ---- the client --------------------------------------------------------------------------

def pcm_s16le(seconds: float, seed: int) -> bytes:
    """`seconds` of speech-like audio as s16le 16 kHz mono bytes."""
    audio = speech_like_audio(seconds, SAMPLE_RATE, seed=seed)
    return (np.clip(audio, -1.0, 1.0) * 32767).astype("<i2").tobytes()


async def open_socket(url: str, client_id: str) -> ClientConnection:
    """A WebSocket session of ours (token, CA), retried while the server is not listening yet."""
    deadline = time.monotonic() + CONNECT_RETRY_S
    while True:
        try:
            options = websocket_options()
            headers = {"X-Client-ID": client_id, **options.pop("additional_headers", {})}  # type: ignore[dict-item]
            return await connect(url, additional_headers=headers, compression=None,
                                 max_size=None, proxy=None, open_timeout=30,
                                 ping_interval=None, **options)  # type: ignore[arg-type]
        except OSError:  # refused: not listening yet
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.2)


async def _open(url: str, log: SessionLog):
    """Connect and read "ready"; None (with the error logged) when that fails."""
    try:
        ws = await open_socket(url, f"bench-{log.session}")
    except Exception as exc:
        log.errors.append(f"connect failed: {type(exc).__name__}: {exc}")
        return None
    try:
        status = json.loads(await asyncio.wait_for(ws.recv(), 30))
        if status.get("type") != "ready":
            raise ValueError(f"expected ready, got {status}")
    except Exception as exc:
        log.errors.append(f"no ready message: {type(exc).__name__}: {exc}")
        await ws.close()
        return None
    return ws


async def _receive(ws, log: SessionLog) -> None:
    """Frames and status messages until "flushed" (or the connection ends)."""
    try:
        async for message in ws:
            arrived = time.monotonic()
            if isinstance(message, bytes):
                frame = parse_frame_message(message)
                index, pts_us = frame.index, frame.pts_us
                expected = len(log.arrivals)
                if index != expected or pts_us != index * FRAME_US:
                    log.errors.append(f"frame {index} (pts {pts_us} us) arrived where frame "
                                      f"{expected} was due")
                log.arrivals.append((index, arrived))
                continue
            status = json.loads(message)
            if status.get("type") == "error":
                log.errors.append(f"server error: {status.get('message')}")
            elif status.get("type") == "flushed":
                log.flushed = True
                if status.get("frames") != log.expected_frames:
                    log.errors.append(f"flushed reports {status.get('frames')} frames, "
                                      f"expected {log.expected_frames}")
                return
    except ConnectionClosed as exc:
        log.errors.append(f"connection closed: {exc}")
        return
    log.errors.append("connection closed before 'flushed'")


async def _stream(ws, log: SessionLog, pcm: bytes, chunk_s: float, t0: float,
                  timeout_s: float) -> None:
    """Send chunk k at t0 + k * chunk_s, then flush, and wait for "flushed"."""
    receiver = asyncio.create_task(_receive(ws, log))
    step = log.chunk_samples * 2
    try:
        for k in range(math.ceil(len(pcm) / step)):
            delay = t0 + k * chunk_s - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            if receiver.done():  # the server ended the session
                break
            log.send_times.append(time.monotonic())
            await ws.send(pcm[k * step:(k + 1) * step])
        if not receiver.done():
            log.flush_time = time.monotonic()
            await ws.send(json.dumps({"type": "flush"}))
        await asyncio.wait_for(asyncio.shield(receiver), timeout_s)
    except TimeoutError:
        log.errors.append(f"no 'flushed' within {timeout_s:.0f} s of the flush")
    except Exception as exc:
        log.errors.append(f"{type(exc).__name__}: {exc}")
    finally:
        receiver.cancel()
        await asyncio.gather(receiver, return_exceptions=True)
        await ws.close()


async def drive_stream(url: str, sessions: int, seconds: float,
                       chunk_ms: float = 40.0) -> list[SessionLog]:
    """Run `sessions` concurrent sessions against `url`; their logs."""
    chunk_samples = round(SAMPLE_RATE * chunk_ms / 1000)
    total = int(seconds * SAMPLE_RATE)
    logs = [SessionLog(i, total, chunk_samples) for i in range(sessions)]
    pcms = [pcm_s16le(seconds, seed=i) for i in range(sessions)]
    # everyone connected and ready first, then all start on one clock
    conns = await asyncio.gather(*(_open(url, log) for log in logs))
    t0 = time.monotonic() + 0.05
    timeout_s = max(30.0, 2 * seconds)
    await asyncio.gather(*(_stream(ws, log, pcm, chunk_samples / SAMPLE_RATE, t0, timeout_s)
                           for ws, log, pcm in zip(conns, logs, pcms, strict=True) if ws is not None))
    return logs


def stream_url(address: str, model: str) -> str:
    base = address if address.startswith(("ws://", "wss://")) else f"ws://{address}"
    return f"{base.rstrip('/')}/audio?model={quote(model)}"


def table(result: dict[str, Any]) -> str:
    head = (f"{'session':>7} {'frames':>9} {'fps':>6} {'live':>6} {'first ms':>9} "
            f"{'p99 gap':>8} {'lat p50':>8} {'lat p99':>8} {'live p99':>8} {'flush':>8}  holds")
    lines = [f"{result['sessions']} sessions x {result['seconds']} s of audio, "
             f"{result['chunk_ms']} ms chunks at real-time pace", head]
    for s in result["per_session"]:
        lines.append(f"{s['session']:>7} {s['frames']:>4}/{s['expected_frames']:<4} "
                     f"{s['fps']:>6.2f} {s['live_fps']:>6.2f} {s['first_frame_latency_ms']:>9.1f} "
                     f"{s['p99_gap_ms']:>8.1f} {s['latency_ms_p50']:>8.1f} "
                     f"{s['latency_ms_p99']:>8.1f} {s['live_latency_ms_p99']:>8.1f} "
                     f"{s['flush_latency_ms_max']:>8.1f}  "
                     f"{'yes' if s['holds_25fps'] else 'NO'}")
        lines.extend(f"        error: {e}" for e in s["errors"])
    lines.append("latencies in ms; live p99: frames from live audio; flush: the slowest "
                 "frame the flush rendered")
    lines.append(f"min fps {result['min_fps']}  max p99 frame latency "
                 f"{result['max_p99_latency_ms']} ms  max p99 gap {result['max_p99_gap_ms']} ms  "
                 f"errors {result['errors']}  every session holds 25 fps: "
                 f"{'yes' if result['all_hold_25fps'] else 'NO'}")
    return "\n".join(lines)


def overall(logs: list[SessionLog]) -> dict[str, float]:
    """Every session together: frames/s over the run and frame latency percentiles."""
    latencies = [lat for log in logs for lat in frame_latencies_ms(
        log.arrivals, log.send_times, log.chunk_samples, log.total_samples, log.flush_time)]
    arrivals = [t for log in logs for _, t in log.arrivals]
    starts = [log.send_times[0] for log in logs if log.send_times]
    span = max(arrivals) - min(starts) if arrivals and starts else 0.0
    return {"fps": round(len(arrivals) / span, 2) if span > 0 else 0.0,
            "p50_ms": round(percentile(latencies, 50), 1),
            "p95_ms": round(percentile(latencies, 95), 1),
            "p99_ms": round(percentile(latencies, 99), 1)}


def server_stages(ops_endpoint: str | None, model: str) -> dict[str, tuple[int, int]]:
    """The server's stage counters of `model` ({stage: (count, ns)}), from its ops socket;
    empty when the socket does not answer."""
    stats = ops_stats(ops_endpoint) or {}
    stages = stats.get("models", {}).get(model, {}).get("stages", {})
    return {name: (v["count"], v["ns"]) for name, v in stages.items()}


def stage_ms(before: dict[str, tuple[int, int]],
             after: dict[str, tuple[int, int]]) -> dict[str, float]:
    """Mean ms per stage over what the server counted between two `server_stages`."""
    means = {}
    for stage, (count, ns) in after.items():
        count0, ns0 = before.get(stage, (0, 0))
        if count > count0:
            means[stage] = round((ns - ns0) / 1e6 / (count - count0), 2)
    return means


def run_seed(url: str, sessions: int, seconds: float, chunk_ms: float, model: str,
             ops_endpoint: str | None) -> dict[str, Any]:
    """One run of `sessions` seed-mode sessions: the figures of the module docstring, and
    the server's mean stage times over the run."""
    before = server_stages(ops_endpoint, model)
    logs = asyncio.run(drive_stream(url, sessions, seconds, chunk_ms))
    after = server_stages(ops_endpoint, model)
    result = aggregate([summarize(log) for log in logs], sessions, seconds, chunk_ms)
    result.update(overall(logs))
    result["stage_ms"] = stage_ms(before, after)
    result["mode"] = "audio-driven"
    return result
