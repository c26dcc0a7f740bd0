"""`lipsync bench --stream --live`: S live sessions (`/audio?mode=live`) on one server, as
talking-avatar clients use them, and what each sees.

Every session receives a continuous 25 fps video from its handshake. A fraction
`--speaking` of the sessions speaks at any time: each speaks for that fraction of every
PERIOD_S (utterances of speech-like audio sent at real-time pace in 40 ms messages, then
{"type": "flush"}), the sessions' phases spread evenly over the period; in between it sends
nothing, as a TTS that waits for the next sentence. `--speaking 0`: idle sessions only,
`--speaking 1`: every session speaks all the time. With `--interrupts N` one more session
speaks for INTERRUPT_SPEAK_S and barges in ({"type": "interrupt"}), N times.

Per session (arrival times on this machine's clocks; a server on the same machine shares
the wall clock the frames' due times are written in):

- fps: frames delivered per second over the run, (frames - 1) / (last - first arrival);
- idle_frames, speech_frames; missed_speech: speech frames the flushed utterances should
  have given and did not (the server sends an idle frame when a speech frame is not ready
  on time, and counts it late);
- first_speech_ms: per utterance, the first speech frame's arrival after the utterance's
  first audio message was sent. It includes the model's look-ahead (a frame needs 450 ms
  of audio after its own) and the session's anchoring of the utterance on the live clock;
- jitter_ms: per frame, how much later than its due time it arrived, beyond the session's
  smallest such delay (which absorbs any offset between the two machines' clocks); p99;
- interrupts (the interrupting session): ack_ms, the interrupt's send to its
  {"type": "interrupted"}; stop_ms, the interrupt's send to the last speech frame that
  arrived after it (0 when none did): the promise is no speech frame later than 100 ms;
- holds_25fps: fps >= 24.5, at most 2 % of the speech frames missed, no error.
"""
from __future__ import annotations

import asyncio
import json
import math
import time
from typing import Any

from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed, InvalidStatus

from pipeline.bench.figures import role_cpu_seconds
from pipeline.bench.live_figures import Frame, Interrupt, LiveLog, aggregate
from pipeline.bench.stream_load import open_socket, pcm_s16le
from pipeline.client import parse_frame_message
from pipeline.synctalk import SAMPLE_RATE, VIDEO_FPS

PERIOD_S = 4.0              # a speaking session speaks `speaking` of every period
CHUNK_S = 0.04              # one audio message: 40 ms
INTERRUPT_SPEAK_S = 1.2     # the interrupting session speaks this long, then interrupts
INTERRUPT_PAUSE_S = 0.4     # and waits this long before its next utterance
TAIL_S = 2.0                # after the last utterance: its last frames are still coming


# ---- the plan of a run -------------------------------------------------------------------

def utterance_plan(session: int, sessions: int, speaking: float, seconds: float,
                   period_s: float = PERIOD_S) -> list[tuple[float, float]]:
    """(start, length) in seconds from the run's start of each utterance of a session that
    speaks `speaking` of every period, phases spread evenly over the sessions."""
    if speaking <= 0:
        return []
    if speaking >= 1:
        return [(0.0, seconds)]
    length = speaking * period_s
    phase = (session / sessions) * period_s
    plan = []
    start = phase - period_s if phase > 0 else 0.0
    while start < seconds:
        begin, end = max(0.0, start), min(seconds, start + length)
        if end - begin >= CHUNK_S:
            plan.append((begin, end - begin))
        start += period_s
    return plan


# ---- the client --------------------------------------------------------------------------

async def _receive(ws: ClientConnection, log: LiveLog) -> None:
    try:
        async for message in ws:
            now = time.monotonic()
            if isinstance(message, bytes):
                frame = parse_frame_message(message)
                if log.frames and frame.index != log.frames[-1].index + 1:
                    log.errors.append(f"frame {frame.index} after {log.frames[-1].index}")
                log.frames.append(Frame(now, frame.index, frame.speech, frame.due_epoch_us))
                continue
            status = json.loads(message)
            log.statuses.append((now, status))
            if status.get("type") == "error":
                log.errors.append(f"server error: {status.get('message')}")
            elif status.get("type") == "interrupted" and log.interrupts \
                    and log.interrupts[-1].acked is None:
                log.interrupts[-1].acked = now
    except ConnectionClosed as exc:
        if exc.rcvd is None or exc.rcvd.code != 1000:
            log.errors.append(f"connection closed: {exc}")


async def _speak(ws: ClientConnection, pcm: bytes, start: float) -> None:
    """`pcm` at real-time pace from the monotonic time `start`, 40 ms a message."""
    step = round(CHUNK_S * SAMPLE_RATE) * 2
    for k in range(math.ceil(len(pcm) / step)):
        delay = start + k * CHUNK_S - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        await ws.send(pcm[k * step:(k + 1) * step])
    await asyncio.sleep(max(0.0, start + len(pcm) / 2 / 16000 - time.monotonic()))


def continuous_pcm(plan: list[tuple[float, float]], seconds: float, seed: int) -> bytes:
    """`seconds` of audio: speech in the plan's utterances, digital silence between them."""
    pcm = bytearray(2 * round(seconds * 16000))
    for k, (offset, length) in enumerate(plan):
        speech = pcm_s16le(length, seed=seed + k)
        at = 2 * round(offset * 16000)
        pcm[at:at + len(speech)] = speech[:len(pcm) - at]
    return bytes(pcm)


async def _connect(url: str, log: LiveLog) -> ClientConnection | None:
    """A live session opened and admitted (its "ready" status read), else None with the
    refusal (HTTP 503 at the handshake, 1013 after it) or the error in `log`."""
    try:
        ws = await open_socket(url, f"bench-live-{log.session}")
    except Exception as exc:
        # 503: full (max_clients, max_sessions_per_address), a refusal like 1013
        if isinstance(exc, InvalidStatus) and exc.response.status_code == 503:
            log.refused = f"HTTP 503: {exc.response.body.decode(errors='replace').strip()}"
        else:
            log.errors.append(f"connect failed: {type(exc).__name__}: {exc}")
        return None
    try:
        first = json.loads(await ws.recv())
    except ConnectionClosed as exc:
        if exc.rcvd is not None and exc.rcvd.code == 1013:
            log.refused = exc.rcvd.reason
        else:
            log.errors.append(f"connection closed: {exc}")
        return None
    if first.get("type") == "error":  # refused after the upgrade: the reason, then 1013
        await ws.wait_closed()
        if ws.close_code == 1013:
            log.refused = first.get("message", "")
        else:
            log.errors.append(f"server error: {first.get('message')}")
        return None
    log.statuses.append((time.monotonic(), first))
    return ws


async def _session(ws: ClientConnection, log: LiveLog, plan: list[tuple[float, float]],
                   interrupts: int, t0: float, end: float, seconds: float,
                   silence_between: bool) -> None:
    receiver = asyncio.create_task(_receive(ws, log))
    try:
        if interrupts:
            start = t0
            for n in range(interrupts):
                pcm = pcm_s16le(INTERRUPT_SPEAK_S, seed=1000 + n)
                log.utterances.append((max(start, time.monotonic()), math.nan))
                await _speak(ws, pcm, start)
                log.interrupts.append(Interrupt(time.monotonic()))
                await ws.send(json.dumps({"type": "interrupt"}))
                start = time.monotonic() + INTERRUPT_PAUSE_S
        if silence_between and plan:  # one stream all along, its pauses sent as silence
            log.utterances = [(t0 + offset, math.nan) for offset, _ in plan]
            await _speak(ws, continuous_pcm(plan, seconds, log.session * 100), t0)
            await ws.send(json.dumps({"type": "flush"}))
            log.expected_speech = sum(math.ceil(length * VIDEO_FPS) for _, length in plan)
            plan = []
        for k, (offset, length) in enumerate(plan):
            if receiver.done():
                break
            start = t0 + offset
            await asyncio.sleep(max(0.0, start - time.monotonic()))
            log.utterances.append((time.monotonic(), math.nan))
            await _speak(ws, pcm_s16le(length, seed=log.session * 100 + k), start)
            await ws.send(json.dumps({"type": "flush"}))
            log.utterances[-1] = (log.utterances[-1][0], time.monotonic())
            log.expected_speech += math.ceil(length * VIDEO_FPS)
        await asyncio.sleep(max(0.0, end - time.monotonic()))
    except ConnectionClosed:
        pass  # the receiver says why
    finally:
        await ws.close()
        await asyncio.gather(receiver, return_exceptions=True)


async def drive_live(url: str, sessions: int, seconds: float, speaking: float,
                     interrupts: int = 0, silence_between: bool = False) -> list[LiveLog]:
    """`sessions` live sessions (plus one that interrupts, with `interrupts`) for `seconds`
    (longer when the interrupts need it); their logs. `silence_between`: a speaking
    session streams all along, its pauses sent as silent audio (a call, not a TTS)."""
    offset = time.time() - time.monotonic()
    run_s = max(seconds, interrupts * (INTERRUPT_SPEAK_S + INTERRUPT_PAUSE_S + 0.1))
    logs = [LiveLog(i, offset) for i in range(sessions + (1 if interrupts else 0))]
    sockets = await asyncio.gather(*(_connect(url, log) for log in logs))
    # the utterances staggered over the sessions admitted: `speaking` of them speak at once
    opened = list(zip(logs, sockets, strict=True))
    speakers = [log.session for log, ws in opened if ws and log.session < sessions]
    t0 = time.monotonic() + 1.0   # every session connected and showing idle frames first
    end = t0 + run_s + TAIL_S
    await asyncio.gather(*(
        _session(ws, log, utterance_plan(speakers.index(log.session), len(speakers), speaking,
                                         seconds) if log.session in speakers else [],
                 interrupts if log.session == sessions else 0, t0, end, seconds,
                 silence_between)
        for log, ws in opened if ws is not None))
    return logs


def run_live(url: str, sessions: int, seconds: float, speaking: float, interrupts: int,
             ops_endpoint: str | None, silence_between: bool = False) -> dict[str, Any]:
    """One live run: its figures, and the CPU seconds per second of every server process."""
    cpu0, t0 = role_cpu_seconds(ops_endpoint), time.monotonic()
    logs = asyncio.run(drive_live(url, sessions, seconds, speaking, interrupts,
                                  silence_between))
    cpu1, wall = role_cpu_seconds(ops_endpoint), time.monotonic() - t0
    result = aggregate(logs)
    # the sessions asked for; the interrupting one, when there is one, comes on top
    result.update(mode="live", sessions=sessions, interrupting=1 if interrupts else 0,
                  seconds=seconds, speaking=speaking, silence_between=silence_between,
                  cpu_per_s={role: round((cpu1[role] - cpu0[role]) / wall, 3)
                             for role in cpu1 if role in cpu0 and role != "client"})
    return result


