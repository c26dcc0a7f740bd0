"""Live mode: a continuous 25 fps video from the handshake to the close (a `Session`).

Composed of four parts, in the order a chunk of audio goes through them:
`LiveSession.feed` (a new utterance is anchored on the live clock: `_begin_utterance`) ->
the voice-activity detector (`vad.VoiceActivity`: speech start/end events) -> the speech
renderer (`render.SpeechRenderer`: frames rendered through the router, ahead of batch work,
on the backgrounds the live walk is at) -> the speech queue (`pacer.SpeechQueue`: each frame
placed at the live frame it is shown at) -> the pacer (`pacer.Pacer`: frame after frame at its
due time, speech or idle) -> the transport's sink. An interrupt drops queued audio and unshown
speech at once; the walk goes on.
"""
from __future__ import annotations

import asyncio
import logging
import math

import numpy as np

from pipeline.config import Config
from pipeline.frontend.capacity import Ticket
from pipeline.frontend.errors import Failed, Overloaded, Unavailable
from pipeline.frontend.streaming.audio import AudioFormat, StreamError
from pipeline.frontend.streaming.events import EventSink, SessionEnds
from pipeline.frontend.streaming.pacer import FRAME_S, Anchor, Pacer, SpeechQueue
from pipeline.frontend.streaming.render import FrameSource, SpeechRenderer, cancel_and_wait
from pipeline.frontend.streaming.session import clean_client_id
from pipeline.frontend.streaming.vad import SpeechEvent, VoiceActivity
from pipeline.protocol import Interrupted, SpeechEnd, SpeechStart
from pipeline.synctalk import FRAME_SAMPLES, MAX_BATCH, SAMPLE_RATE, stream_samples

log = logging.getLogger(__name__)

LOOKAHEAD_SAMPLES = stream_samples(100, 1)[1] - 100 * FRAME_SAMPLES  # beyond a frame's start
LIVE_FLUSH_TIMEOUT_S = 0.3  # live: audio that stops is treated as its utterance's end
IDLE_CHUNK = MAX_BATCH


class IdleFrames:
    """Each model's background frames as JPEGs, encoded once (by the compositors, through the
    worker that holds the model) and shared by every live session of the model."""

    def __init__(self, cfg: Config, router: FrameSource) -> None:
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
            frames += await self.router.background_jpegs(model_id, indices,
                                                    self.cfg.server.request_timeout_s)
        self._frames[model_id] = frames
        log.info("idle frames of %s: %d JPEGs, %.1f MB", model_id, len(frames),
                 sum(map(len, frames)) / 2**20)
        return frames


class LiveSession:
    """One live client (a `Session`). Its admission ticket counts its speech."""

    def __init__(self, cfg: Config, router: FrameSource, idle: IdleFrames, ticket: Ticket,
                 client_id: str, model_id: str, fmt: AudioFormat, sink: EventSink) -> None:
        if model_id not in cfg.models:
            raise StreamError(f"Model '{model_id}' not found in configuration")
        self.cfg = cfg
        self.idle_frames = idle
        self.ticket = ticket
        self.client_id = clean_client_id(client_id)
        self.model_id = model_id
        self.fmt = fmt
        self.sink = sink
        self.vad = VoiceActivity()
        silence = self.vad if cfg.streaming.skip_silent_frames else None
        self.queue = SpeechQueue(cfg.models[model_id].num_frames, ticket, silence)
        self.speech = SpeechRenderer(
            cfg, router, self.client_id, model_id, fmt, walk=self.queue, out=self.queue,
            sink=sink, flush_timeout_s=min(cfg.streaming.flush_timeout_s, LIVE_FLUSH_TIMEOUT_S),
            live=True, silence=silence)
        self.pacer: Pacer | None = None
        self._pacing: asyncio.Task[None] | None = None

    # ---- from the transport ------------------------------------------------------------

    async def start(self) -> None:
        try:
            frames = await self.idle_frames.get(self.model_id)
        except (Failed, Overloaded, Unavailable, TimeoutError) as exc:
            raise StreamError(f"idle frames of {self.model_id}: {exc or type(exc).__name__}") from exc
        self.queue.count = len(frames)
        self.speech.start()
        # the clock starts with the video: frame 0 is due now, not when the session was made
        # (the model's idle frames may have been encoded meanwhile)
        self.pacer = Pacer(self.queue, frames, self.sink, self.cfg.streaming, self.speech)
        self._pacing = asyncio.create_task(self._pace(self.pacer))

    async def feed(self, data: bytes) -> None:
        # a new utterance: the first audio of the session or since an interrupt (even while a
        # batch from before the interrupt still renders: its result is dropped), or audio
        # after every frame of the last utterance was rendered and shown
        if self.queue.anchor is None or (self.speech.caught_up and not self.queue.ahead()):
            self._begin_utterance(self.fmt.seconds(len(data)))
        await self._hear(self.speech.feed(data))

    async def flush(self) -> None:
        tail = self.speech.flush()
        if tail is not None:
            await self._hear(tail)
            await self._speech_ended()

    async def wait_flushed(self) -> None:
        """Until a flush is rendered and its frames shown (or the session failed)."""
        await self.speech.wait_flushed()
        while self.queue.ahead() and self._pacing is not None and not self._pacing.done():
            await asyncio.sleep(FRAME_S)

    async def interrupt(self) -> None:
        """Queued audio and unshown speech frames are dropped now; the results of renders in
        flight are discarded when they come; idle frames go on."""
        dropped = self.speech.drop() + self.queue.clear()
        self.ticket.quiet()
        await self._speech_ended()
        self.vad.restart_at(0)
        await self.sink(Interrupted(self.queue.sent_up_to + 1, dropped))

    async def cancel(self) -> None:
        """A live session's cancel is an interrupt: the video goes on."""
        await self.interrupt()

    async def finish_batch(self, timeout: float) -> None:
        await self.speech.finish_batch(timeout)

    async def close(self) -> None:
        if self._pacing is not None:
            await cancel_and_wait(self._pacing)
            self._pacing = None
        await self.speech.close()

    @property
    def error(self) -> str | None:
        return self.speech.error

    @property
    def frames_sent(self) -> int:
        return 0 if self.pacer is None else self.pacer.stats.speech + self.pacer.stats.idle

    # ---- speech, anchored on the live clock ---------------------------------------------

    def _begin_utterance(self, seconds_in_hand: float) -> None:
        """A new utterance: its first frame is shown once the audio its look-ahead needs can
        have arrived (at real-time pace, beyond what this message brings) and a batch been
        rendered (the session's measured render time, twice)."""
        missing = max(0.0, LOOKAHEAD_SAMPLES / SAMPLE_RATE - seconds_in_hand)
        delay = math.ceil((missing + 2 * self.speech.render_s) / FRAME_S) + 1
        now = self.pacer.now_frame() if self.pacer is not None else 0
        self.queue.begin(Anchor(self.speech.next_frame, now + delay))
        self.ticket.speaking()

    async def _hear(self, samples: np.ndarray) -> None:
        """The audio as it comes: speech events, aligned to live frames."""
        for event in self.vad.feed(samples):
            await self._event(event)

    async def _speech_ended(self) -> None:
        event = self.vad.end()
        if event is not None:
            await self._event(event)

    async def _event(self, event: SpeechEvent) -> None:
        k = event.sample // FRAME_SAMPLES
        anchor = self.queue.anchor
        n = anchor.live(k) if anchor is not None else \
            (self.pacer.now_frame() if self.pacer is not None else 0)
        status = SpeechStart(n) if event.kind == "speech_start" else SpeechEnd(n)
        try:
            await self.sink(status)
        except StreamError:
            pass  # the connection is going: its handler ends the session

    async def _pace(self, pacer: Pacer) -> None:
        """The pacer's task: a send that fails (the client is gone or stopped reading) or a
        session below real time that is to be closed ends the session."""
        try:
            await pacer.run()
        except StreamError as exc:
            await self.sink(SessionEnds(1013 if pacer.below_real_time else 1011, str(exc)))
