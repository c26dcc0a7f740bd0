"""One live session of the server (`/audio?mode=live`) as an avatar service of an agent
framework uses it: the agent's speech audio in; out, every 40 ms, the avatar's frame decoded
to pixels with the audio that frame shows (`AvatarFrame`). The Pipecat service and the LiveKit
worker are thin shells around it.

- Frames come at the server's pace (25 fps on its wall clock, idle frames between utterances)
  and go out as they come, each with its own audio (`timeline.AudioTimeline`), so a transport
  that plays what it is given in order keeps lips and sound together.
- An interrupt drops the audio not shown yet at once; until the server confirms it, speech
  frames still on their way are replaced by the last idle frame, so nothing of the interrupted
  utterance is seen or heard after the interrupt.
- A lost server (closed, refused, or silent for `SILENT_S`) is reported through `on_error`
  once per outage and reconnected with backoff; meanwhile the last frame is repeated at 25 fps
  and the audio taken goes out with it at real-time pace, so the agent is heard all the same.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Literal
from urllib.parse import urlencode, urlsplit

import cv2
import numpy as np
import soxr
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import WebSocketException

from pipeline.client import parse_frame_message, websocket_options
from pipeline.integrations.timeline import AudioTimeline

log = logging.getLogger(__name__)

FRAME_S = 0.04
GAP_S = 0.2            # no audio for this long ends the run (the server flushes at 0.3 s)
SEND_EVERY_S = 0.02    # audio is sent at most this often (the server limits messages per second)
SILENT_S = 2.0         # no message for this long: the connection is taken as lost
CONNECT_TIMEOUT_S = 10.0
BACKOFF_S = (0.5, 1.0, 2.0, 4.0)

ImageFormat = Literal["RGB", "RGBA"]


@dataclass(frozen=True)
class AvatarFrame:
    """A frame to show now, and the audio (s16le mono at `sample_rate`) to play with it."""

    index: int              # the server's live frame index (restarts after a reconnect)
    speech: bool            # a speech frame (False: idle, or the last frame held)
    image: np.ndarray | None  # height x width x 3 (RGB) or 4 (RGBA), uint8; None only
                              # while the server was never reached (no frame to show yet)
    audio: bytes
    sample_rate: int
    segments_ended: int     # speaker turns whose last audio goes out with this frame
    received: float = 0.0   # time.monotonic() when its message came (0: a held frame)


@dataclass
class SessionRecord:
    """What a session's owner may want to look at afterwards (benchmarks, tests)."""

    interrupt_acks: list[float] = field(default_factory=list)  # s from interrupt to its answer
    speech_starts: list[int] = field(default_factory=list)     # the server's VAD: live frames
    reconnects: int = 0


OnFrame = Callable[[AvatarFrame], Awaitable[None]]
OnError = Callable[[str], Awaitable[None]]


def live_url(url: str, model: str | None) -> str:
    """The live-mode endpoint under a server's WebSocket base (`ws://host:port`, `wss://…`)."""
    parts = urlsplit(url)
    if parts.scheme not in ("ws", "wss"):
        raise ValueError(f"not a WebSocket URL: {url!r} (ws://host:port or wss://host:port)")
    path = parts.path.rstrip("/")
    path = path if path.endswith("/audio") else path + "/audio"
    query = {"mode": "live", **({"model": model} if model else {})}
    return f"{parts.scheme}://{parts.netloc}{path}?{urlencode(query)}"


# JPEG's DCT scaling: decoding at a half, quarter or eighth of the size costs a fraction of a
# full decode (and of a full decode followed by a resize)
REDUCED = {2: cv2.IMREAD_REDUCED_COLOR_2, 4: cv2.IMREAD_REDUCED_COLOR_4, 8: cv2.IMREAD_REDUCED_COLOR_8}


class FrameDecoder:
    """A server's JPEG -> RGB or RGBA pixels, at the avatar's size or at `size` (width, height):
    scaled while decoding when `size` is a half, a quarter or an eighth of the avatar's."""

    def __init__(self, image_format: ImageFormat, size: tuple[int, int] | None = None) -> None:
        self.size = size
        self._to = cv2.COLOR_BGR2RGB if image_format == "RGB" else cv2.COLOR_BGR2RGBA
        # RGB in full straight from the decoder; otherwise BGR, converted after
        self._flag = cv2.IMREAD_COLOR_RGB if image_format == "RGB" else cv2.IMREAD_COLOR
        self._factor_known = size is None

    def __call__(self, jpeg: bytes) -> np.ndarray:
        image = cv2.imdecode(np.frombuffer(jpeg, np.uint8), self._flag)
        if image is None:
            raise ValueError("the server sent a frame that is not a JPEG")
        bgr = self._flag != cv2.IMREAD_COLOR_RGB
        if self.size is not None and (image.shape[1], image.shape[0]) != self.size:
            if not self._factor_known:  # the first frame, decoded in full, tells the factor
                self._factor_known = True
                width, height = self.size
                factor = image.shape[1] // width
                if factor in REDUCED and (width * factor, height * factor) == image.shape[1::-1]:
                    self._flag = REDUCED[factor]
            image = cv2.resize(image, self.size, interpolation=cv2.INTER_AREA)
        return cv2.cvtColor(image, self._to) if bgr else image


class LiveAvatar:
    """See the module's docstring. start() once, then push_audio / end_segment / interrupt
    from the agent, close() at the end; frames arrive through `on_frame`."""

    def __init__(self, url: str, *, model: str | None = None, token: str | None = None,
                 sample_rate: int, image_format: ImageFormat = "RGB",
                 size: tuple[int, int] | None = None, on_frame: OnFrame, on_error: OnError,
                 record: SessionRecord | None = None) -> None:
        self.url = live_url(url, model)
        self.options = websocket_options()
        if token:
            self.options["additional_headers"] = {"Authorization": f"Bearer {token}"}
        self.timeline = AudioTimeline(sample_rate)
        self.on_frame, self.on_error = on_frame, on_error
        self._decode = FrameDecoder(image_format, size)
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="jpeg")  # keeps frames in order
        self._ws: ClientConnection | None = None
        self._outbox: list[bytes | str] = []     # audio (bytes) and control messages (str)
        self._wake = asyncio.Event()
        self._send_lock = asyncio.Lock()        # one message at a time, in order
        self._generation = 0                    # bumped by an interrupt: older audio is not sent
        self._last_audio = 0.0
        self._awaiting_ack = False
        self._interrupted_at = 0.0
        self.record = record or SessionRecord()
        self._held: np.ndarray | None = None    # the last idle frame
        self._tasks: list[asyncio.Task[None]] = []
        self._holding: asyncio.Task[None] | None = None   # _hold, while the server is away
        self._leftover: tuple[bytes, int] = (b"", 0)
        self._closed = False

    # ---- from the agent ---------------------------------------------------------------

    async def start(self) -> None:
        self._tasks = [asyncio.create_task(self._run()), asyncio.create_task(self._send())]

    async def push_audio(self, pcm: bytes, sample_rate: int, channels: int = 1) -> None:
        """Speech to be shown: s16le PCM at any rate and channel count."""
        samples = np.frombuffer(pcm[: len(pcm) - len(pcm) % (2 * channels)], "<i2")
        if channels > 1:
            samples = samples.reshape(-1, channels).mean(axis=1).astype(np.int16)
        if sample_rate != self.timeline.rate:
            samples = soxr.resample(samples, sample_rate, self.timeline.rate)
        self._last_audio = time.monotonic()
        self._queue(self.timeline.add(samples))

    async def end_segment(self) -> bool:
        """The speaker's turn ended. True when its audio is all out already (else the frame
        that takes its last audio says so: `segments_ended`)."""
        self._end_run()
        return self.timeline.end_segment()

    async def interrupt(self) -> None:
        """Drop the audio not shown yet and stop the utterance on the server."""
        self.timeline.reset()
        self._outbox.clear()
        self._generation += 1
        ws = self._ws
        if ws is None:
            return
        self._awaiting_ack = True
        self._interrupted_at = time.monotonic()
        async with self._send_lock:  # after the message being sent, before any audio of before
            with contextlib.suppress(WebSocketException):
                await ws.send(json.dumps({"type": "interrupt"}))

    async def drain(self, timeout_s: float = 5.0) -> None:
        """Until the audio taken has all gone out with its frames (a graceful end), at most the
        audio's own length plus `timeout_s`."""
        self._end_run()
        deadline = time.monotonic() + len(self.timeline.pending) * FRAME_S + timeout_s
        while not self.timeline.idle and time.monotonic() < deadline:
            await asyncio.sleep(FRAME_S)

    async def close(self) -> None:
        """End the session (idempotent)."""
        self._closed = True
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        if self._ws is not None:
            await self._ws.close()
            self._ws = None
        self._pool.shutdown(wait=False)

    # ---- to the server ----------------------------------------------------------------

    def _queue(self, message: bytes) -> None:
        if message and self._ws is not None:
            self._outbox.append(message)
            self._wake.set()

    def _end_run(self) -> None:
        if self.timeline.open_run:
            self._queue(self.timeline.pad())
            if self._ws is not None:
                self._outbox.append(json.dumps({"type": "flush"}))
                self._wake.set()

    async def _send(self) -> None:
        """The outbox in order, audio coalesced into one message per SEND_EVERY_S; a pause in
        the audio ends its run before the server's flush timeout would."""
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(GAP_S / 4):
                    await self._wake.wait()
            self._wake.clear()
            if self.timeline.open_run and time.monotonic() - self._last_audio >= GAP_S:
                self._end_run()
            ws, batch, self._outbox = self._ws, self._outbox, []
            if ws is None or not batch:
                continue
            generation = self._generation
            messages: list[bytes | str] = []
            for item in batch:  # consecutive audio as one message
                if isinstance(item, bytes) and messages and isinstance(messages[-1], bytes):
                    messages[-1] += item
                else:
                    messages.append(item)
            try:
                async with self._send_lock:
                    for message in messages:
                        if generation != self._generation:
                            break  # interrupted meanwhile: this audio is dropped
                        await ws.send(message)
            except WebSocketException:
                continue  # the receiver sees the connection end and reconnects
            await asyncio.sleep(SEND_EVERY_S)

    # ---- from the server --------------------------------------------------------------

    async def _run(self) -> None:
        failures = 0
        try:
            while not self._closed:
                reason = "connection closed"
                try:
                    async with connect(self.url, open_timeout=CONNECT_TIMEOUT_S, max_size=2**26,
                                       **self.options) as ws:  # type: ignore[arg-type]
                        async with asyncio.timeout(CONNECT_TIMEOUT_S):
                            ready = json.loads(await ws.recv())
                        if ready.get("type") != "ready":
                            raise ConnectionError(f"unexpected first message {ready}")
                        if self._holding is not None:
                            self.record.reconnects += 1
                        await self._stop_holding()
                        failures = 0
                        await self._serve(ws)
                except (OSError, WebSocketException, TimeoutError, ValueError) as exc:
                    reason = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
                except Exception as exc:  # a bug costs this connection, never the pipeline
                    log.exception("live session %s failed", self.url)
                    reason = f"internal error: {exc!r}"
                finally:
                    self._ws = None
                if self._closed:
                    return
                if failures == 0:
                    log.warning("lipsync server %s lost (%s); reconnecting", self.url, reason)
                    await self.on_error(f"lipsync server {self.url} lost ({reason}); reconnecting")
                if self._holding is None:
                    self._holding = asyncio.create_task(self._hold())
                await asyncio.sleep(BACKOFF_S[min(failures, len(BACKOFF_S) - 1)])
                failures += 1
        finally:
            await self._stop_holding()

    async def _serve(self, ws: ClientConnection) -> None:
        self._ws = ws
        await self._resume()
        loop = asyncio.get_running_loop()
        while True:
            async with asyncio.timeout(SILENT_S):
                message = await ws.recv()
            if isinstance(message, str):
                await self._status(json.loads(message))
                continue
            received = time.monotonic()
            frame = parse_frame_message(message)
            if frame.speech and self._awaiting_ack:  # of the interrupted utterance: not shown
                if self._held is None:
                    continue
                image, audio, ended = self._held, b"", 0
                speech = False
            else:
                image = await loop.run_in_executor(self._pool, self._decode, frame.jpeg)
                if not frame.speech:
                    self._held = image
                audio, ended = self.timeline.shown(frame.index, frame.speech)
                speech = frame.speech
            await self.on_frame(AvatarFrame(frame.index, speech, image, audio,
                                            self.timeline.rate, ended, received))

    async def _status(self, status: dict) -> None:
        kind = status.get("type")
        if kind == "interrupted" and self._awaiting_ack:
            self._awaiting_ack = False
            self.record.interrupt_acks.append(time.monotonic() - self._interrupted_at)
        elif kind == "speech_start" and not self._awaiting_ack:
            self.record.speech_starts.append(int(status.get("frame", -1)))
            self.timeline.speech_started(int(status.get("frame", -1)))
        elif kind == "error":
            await self.on_error(f"lipsync server: {status.get('message')}")

    async def _hold(self) -> None:
        """While the server is away: the last frame every 40 ms, with the audio taken (so it
        is heard at its pace); what is left when the server is back is sent to it again."""
        audio, ended = b"", 0
        per_frame = 2 * self.timeline.per_frame
        start, n = time.monotonic(), 0
        try:
            while True:
                more, more_ended = self.timeline.take_all()
                audio, ended = audio + more, ended + more_ended
                chunk, audio = audio[:per_frame], audio[per_frame:]
                last, ended = (ended, 0) if not audio else (0, ended)
                if self._held is not None or chunk or last:
                    await self.on_frame(AvatarFrame(-1, False, self._held, chunk,
                                                    self.timeline.rate, last))
                n += 1
                await asyncio.sleep(max(0.0, start + n * FRAME_S - time.monotonic()))
        finally:
            self._leftover = (audio, ended)

    async def _stop_holding(self) -> None:
        if self._holding is not None:
            self._holding.cancel()
            await asyncio.gather(self._holding, return_exceptions=True)
            self._holding = None

    async def _resume(self) -> None:
        """A new session is a new stream: the audio not out yet goes to it from the start."""
        audio, ended = self._leftover
        self._leftover = (b"", 0)
        more, more_ended = self.timeline.take_all()
        audio, ended = audio + more, ended + more_ended
        self._awaiting_ack = False
        if audio:
            self._queue(self.timeline.add(np.frombuffer(audio, "<i2")))
            if ended:
                self._end_run()
                self.timeline.segment_ends.extend([self.timeline.next_frame - 1] * ended)
        elif ended:
            await self.on_frame(AvatarFrame(-1, False, self._held, b"", self.timeline.rate, ended))
