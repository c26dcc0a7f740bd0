"""Live mode: a continuous 25 fps video from the handshake to the close.

Frame n is due at the session's start + n × 40 ms on the wall clock and is always sent: a
speech frame when one was rendered for it, else an idle frame — the avatar's own
background, walking forward and back (ping-pong) through its frames, encoded to JPEG once
per model and shared by every session. Speech is rendered by the seed-mode session
(`StreamSession`) with hooks: each utterance is anchored to the live frame its first frame
will be shown at, far enough ahead for the model's look-ahead and a render; every speech
frame shows the background the walk is at when it is due, so idle and speech frames join
without a jump. A speech frame not ready when due is replaced by an idle frame (counted as
late; lips and audio stay in sync). An interrupt drops queued audio and unshown speech at
once; the walk goes on.
"""
from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import numpy as np

from pipeline.config import Config
from pipeline.frontend.capacity import FrameBudget
from pipeline.frontend.errors import Failed, Overloaded, Unavailable
from pipeline.frontend.router import Router
from pipeline.frontend.streaming.session import AudioDecoder, AudioFormat, Hooks, StreamError, StreamSession
from pipeline.frontend.streaming.vad import SpeechEvent, VoiceActivity
from pipeline.synctalk import FRAME_SAMPLES, FRAME_US, MAX_BATCH, SAMPLE_RATE, stream_samples

log = logging.getLogger(__name__)

FRAME_S = FRAME_US / 1e6
LOOKAHEAD_SAMPLES = stream_samples(100, 1)[1] - 100 * FRAME_SAMPLES  # beyond a frame's start
LIVE_FLUSH_TIMEOUT_S = 0.3  # live: audio that stops is treated as its utterance's end
IDLE_CHUNK = MAX_BATCH

SendLiveFrame = Callable[[int, bool, int, bytes], Awaitable[None]]  # index, speech, due, jpeg
SILENT = b""  # a queued speech frame whose window is silence: an idle frame is shown
EndSession = Callable[[int, str], Awaitable[None]]  # WebSocket close code, reason
SendStatus = Callable[[dict], Awaitable[None]]


def ping_pong(n: int, count: int) -> int:
    """The background frame of live frame n: 0, 1, ..., count-1, count-2, ..., 1, 0, 1, ..."""
    if count <= 1:
        return 0
    k = n % (2 * count - 2)
    return k if k < count else 2 * count - 2 - k


async def _quietly(send_status: SendStatus, status: dict) -> None:
    try:
        await send_status(status)
    except StreamError:
        pass  # the connection is going: its handler ends the session


class IdleFrames:
    """Each model's background frames as JPEGs, encoded once (by the compositors, through the
    worker that holds the model) and shared by every live session of the model."""

    def __init__(self, cfg: Config, router: Router) -> None:
        self.cfg = cfg
        self.router = router
        self._frames: dict[str, list[bytes]] = {}
        self._loading: dict[str, asyncio.Task[list[bytes]]] = {}

    async def get(self, model_id: str) -> list[bytes]:
        if model_id in self._frames:
            return self._frames[model_id]
        task = self._loading.get(model_id)
        if task is None:
            task = self._loading[model_id] = asyncio.create_task(self._encode(model_id))
        try:
            return await asyncio.shield(task)
        finally:
            if task.done():
                self._loading.pop(model_id, None)

    async def _encode(self, model_id: str) -> list[bytes]:
        count = self.cfg.models[model_id].num_frames
        frames: list[bytes] = []
        for start in range(0, count, IDLE_CHUNK):
            indices = tuple(range(start, min(count, start + IDLE_CHUNK)))
            frames += await self.router.backgrounds(model_id, indices,
                                                    self.cfg.server.request_timeout_s)
        self._frames[model_id] = frames
        log.info("idle frames of %s: %d JPEGs, %.1f MB", model_id, len(frames),
                 sum(map(len, frames)) / 2**20)
        return frames


@dataclass
class Anchor:
    """An utterance's place on the live clock: audio frame k is shown as live frame
    n0 + (k - k0)."""

    k0: int
    n0: int

    def live(self, k: int) -> int:
        return self.n0 + k - self.k0


@dataclass
class LiveStats:
    speech: int = 0
    idle: int = 0
    late: int = 0                  # speech frames not ready when due (idle sent instead)
    recent_late: deque[float] = field(default_factory=lambda: deque(maxlen=512))


class LiveSession:
    """One live client. The transport calls feed / flush / interrupt / close; frames and
    status messages go out through its callbacks."""

    def __init__(self, cfg: Config, router: Router, idle: IdleFrames, budget: FrameBudget,
                 client_id: str, model_id: str, fmt: AudioFormat, send_frame: SendLiveFrame,
                 send_status: SendStatus, end: EndSession) -> None:
        self.cfg = cfg
        self.idle_frames = idle
        self.budget = budget
        budget.opened(self)                       # its expected speech counts until closed
        self.model_id = model_id
        self.count = cfg.models[model_id].num_frames
        self.send_frame = send_frame
        self.send_status = send_status
        self.end = end                            # the transport closes the session
        self.vad = VoiceActivity()
        self.skip_silent = cfg.streaming.skip_silent_frames
        self.fmt = fmt
        self.speech = StreamSession(
            cfg, router, client_id, model_id, fmt, self._never, send_status,
            min(cfg.streaming.flush_timeout_s, LIVE_FLUSH_TIMEOUT_S),
            Hooks(deliver=self._deliver, backgrounds=self._backgrounds, on_audio=self._heard,
                  on_flush=self._speech_ended,
                  silent=self._silent if cfg.streaming.skip_silent_frames else None))
        self.client_id = self.speech.client_id
        self.start_mono = time.monotonic()
        self.start_epoch_us = time.time_ns() // 1000
        self.anchor: Anchor | None = None
        self.queue: dict[int, bytes] = {}         # live frame -> speech JPEG (or SILENT)
        self.stats = LiveStats()
        self.render_s = 0.15                      # EWMA of a batch's render time
        self._sent_up_to = -1                     # the last live frame sent
        self._pacer: asyncio.Task[None] | None = None
        self._shown = asyncio.Event()             # the pacer sent a frame
        self.below_real_time = False

    async def _never(self, *_: object) -> None:
        raise AssertionError("a live session delivers through its pacer")

    # ---- the live clock ----------------------------------------------------------------

    def due_mono(self, n: int) -> float:
        return self.start_mono + n * FRAME_S

    def due_epoch_us(self, n: int) -> int:
        return self.start_epoch_us + n * FRAME_US

    def now_frame(self) -> int:
        """The live frame due now (or next)."""
        return max(self._sent_up_to + 1, math.ceil((time.monotonic() - self.start_mono) / FRAME_S))

    # ---- from the transport ------------------------------------------------------------

    async def start(self) -> None:
        try:
            frames = await self.idle_frames.get(self.model_id)
        except (Failed, Overloaded, Unavailable, TimeoutError) as exc:
            raise StreamError(f"idle frames of {self.model_id}: {exc or type(exc).__name__}") from exc
        self.count = len(frames)
        await self.speech.start()
        # the clock starts with the video: frame 0 is due now, not when the session was made
        # (the model's idle frames may have been encoded meanwhile)
        self.start_mono = time.monotonic()
        self.start_epoch_us = time.time_ns() // 1000
        self._pacer = asyncio.create_task(self._pace(frames))

    async def feed(self, data: bytes) -> None:
        # a new utterance: the first audio of the session or since an interrupt (even while a
        # batch from before the interrupt still renders: its result is dropped), or audio
        # after every frame of the last utterance was rendered and shown
        if self.anchor is None or (self.speech.caught_up and not self.queue_ahead()):
            width = 2 if self.fmt.encoding == "s16le" else 4
            self._anchor(len(data) / width / self.fmt.sample_rate)
        await self.speech.feed(data)

    async def flush(self) -> None:
        await self.speech.flush()

    async def wait_flushed(self) -> None:
        """Until a flush is rendered and its frames shown (or the session failed)."""
        await self.speech.wait_flushed()
        while self.queue_ahead() and self._pacer is not None and not self._pacer.done():
            self._shown.clear()
            await self._shown.wait()

    async def interrupt(self) -> None:
        """Queued audio and unshown speech frames are dropped now; the results of renders in
        flight are discarded when they come; idle frames go on."""
        dropped = self.speech.drop() + sum(1 for n in self.queue if n > self._sent_up_to)
        self.queue.clear()
        self.anchor = None
        self._speech_ended()
        self.vad.restart_at(0)
        await self.send_status({"type": "interrupted", "frame": self._sent_up_to + 1,
                                "dropped_frames": dropped})

    async def close(self) -> None:
        self.budget.closed(self)
        if self._pacer is not None:
            self._pacer.cancel()
            await asyncio.gather(self._pacer, return_exceptions=True)
            self._pacer = None
        await self.speech.close()

    async def finish_batch(self, timeout: float) -> None:
        await self.speech.finish_batch(timeout)

    @property
    def rendering(self) -> bool:
        return self.speech.rendering

    @property
    def decoder(self) -> AudioDecoder:
        return self.speech.decoder

    @property
    def frames_sent(self) -> int:
        return self.stats.speech + self.stats.idle

    async def cancel(self) -> None:
        """A live session's cancel is an interrupt: the video goes on."""
        await self.interrupt()

    @property
    def error(self) -> str | None:
        return self.speech.error

    def queue_ahead(self) -> bool:
        """Speech frames wait to be shown."""
        return any(n > self._sent_up_to for n in self.queue)

    # ---- speech, anchored on the live clock ---------------------------------------------

    def _anchor(self, seconds_in_hand: float) -> None:
        """A new utterance: its first frame is shown once the audio its look-ahead needs can
        have arrived (at real-time pace, beyond what this message brings) and a batch been
        rendered (the session's measured render time, twice)."""
        missing = max(0.0, LOOKAHEAD_SAMPLES / SAMPLE_RATE - seconds_in_hand)
        delay = math.ceil((missing + 2 * self.render_s) / FRAME_S) + 1
        self.anchor = Anchor(self.speech.next_frame, self.now_frame() + delay)
        self.budget.speaking()

    def _backgrounds(self, first: int, batch: int) -> tuple[int, ...]:
        assert self.anchor is not None
        return tuple(ping_pong(self.anchor.live(k), self.count) for k in range(first, first + batch))

    def _silent(self, first: int, count: int) -> bool:
        """Every frame of the batch shows silence (skip_silent_frames: it is not rendered)."""
        return not any(self.vad.speaking_at(k * FRAME_SAMPLES + FRAME_SAMPLES // 2)
                       for k in range(first, first + count))

    async def _deliver(self, first: int, jpegs: list[bytes]) -> None:
        anchor = self.anchor
        if anchor is None:  # interrupted meanwhile
            return
        for i, jpeg in enumerate(jpegs):
            k = first + i
            n = anchor.live(k)
            if n <= self._sent_up_to:
                continue  # its time has passed: an idle frame was sent (counted as late)
            silent = self.skip_silent and self._silent(k, 1)
            self.queue[n] = SILENT if silent else jpeg

    def _heard(self, samples: np.ndarray, start: int) -> None:
        """The audio of the stream as it comes: speech events, aligned to live frames."""
        for event in self.vad.feed(samples):
            self._event(event)

    def _event(self, event: SpeechEvent) -> None:
        k = event.sample // FRAME_SAMPLES
        n = self.anchor.live(k) if self.anchor is not None else self.now_frame()
        asyncio.get_running_loop().create_task(
            _quietly(self.send_status, {"type": event.kind, "frame": n}))

    def _speech_ended(self) -> None:
        event = self.vad.end()
        if event is not None:
            self._event(event)

    # ---- the pacer ---------------------------------------------------------------------

    async def _pace(self, idle: list[bytes]) -> None:
        """Frame after frame at its due time, whatever happens to the speech; a send that
        fails (the client is gone or stopped reading) or a session below real time that is
        to be closed ends it."""
        try:
            await self._frames(idle)
        except StreamError as exc:
            await self.end(1013 if self.below_real_time else 1011, str(exc))

    async def _frames(self, idle: list[bytes]) -> None:
        n = 0
        while True:
            wait = self.due_mono(n) - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            jpeg = self.queue.pop(n, None)
            if jpeg is None and self._due_speech(n):
                self._late(n)
            if not jpeg:  # nothing rendered for it, or silence: the walk shows itself
                self.stats.idle += 1
                await self.send_frame(n, False, self.due_epoch_us(n), idle[ping_pong(n, self.count)])
            else:
                self.stats.speech += 1
                await self.send_frame(n, True, self.due_epoch_us(n), jpeg)
            self._sent_up_to = n
            for stale in [m for m in self.queue if m <= n]:
                del self.queue[stale]
            self._shown.set()
            self._check_real_time()
            n += 1

    def _due_speech(self, n: int) -> bool:
        """Frame n shows audio the client has sent (so a speech frame should be ready)."""
        anchor = self.anchor
        if anchor is None or n < anchor.n0:
            return False
        k = n - anchor.n0 + anchor.k0
        return k * FRAME_SAMPLES < self.speech.received

    def _late(self, n: int) -> None:
        self.stats.late += 1
        self.stats.recent_late.append(time.monotonic())

    def _check_real_time(self) -> None:
        """Half the frames of the last low_fps_grace_s late: below real time. Said once per
        episode; with streaming.close_below_real_time the session ends (1013)."""
        grace = self.cfg.streaming.low_fps_grace_s
        now = time.monotonic()
        late = sum(t > now - grace for t in self.stats.recent_late)
        below = late >= grace / FRAME_S / 2
        if below and not self.below_real_time:
            self.below_real_time = True
            log.warning("live session %s below real time: %d late frames in %.0f s",
                        self.client_id, late, grace)
            status = {"type": "below_real_time", "late_frames": late, "window_s": grace,
                      "closing": self.cfg.streaming.close_below_real_time}
            asyncio.get_running_loop().create_task(_quietly(self.send_status, status))
            if self.cfg.streaming.close_below_real_time:
                raise StreamError(f"below real time: {late} late frames in {grace:.0f} s")
        self.below_real_time = below
