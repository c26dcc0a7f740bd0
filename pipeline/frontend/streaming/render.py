"""The speech renderer: a stream's audio in, its frames rendered as soon as they can be.

One clock: frame i shows audio sample i * 640 (40 ms at 16 kHz) and carries the media
timestamp i * 40 ms. Frame i is rendered as soon as every sample it depends on has arrived
(about 450 ms of look-ahead: the model sees +-8 frames of audio context), from a slice of
the stream's audio, so the frames equal those of the whole audio computed at once. A flush
pads the tail with silence and renders every remaining frame: N seconds of audio give
ceil(25 N) frames. A drop (cancel, interrupt) forgets queued audio and discards renders in
flight, and restarts the clock.

The renderer is composed with two parts its session chooses: a `Walk` (which background
frame each frame shows: the audio clock's own, or a live session's walk) and a `FrameOut`
(where rendered batches go: straight to the client, or a live session's speech queue).
"""
from __future__ import annotations

import asyncio
import logging
import math
import time
from typing import Protocol

import numpy as np

from pipeline.config import Config
from pipeline.frontend.errors import Failed, Overloaded, Unavailable
from pipeline.frontend.inflight import InferResult
from pipeline.frontend.models import Lease
from pipeline.frontend.streaming.audio import AudioBuffer, AudioDecoder, AudioFormat, StreamError
from pipeline.frontend.streaming.events import EventSink
from pipeline.frontend.streaming.vad import VoiceActivity
from pipeline.frontend.validation import InferInput
from pipeline.protocol import Error, Flushed
from pipeline.runtime.logs import request_id as log_request
from pipeline.synctalk import FRAME_SAMPLES, MAX_BATCH, SAMPLE_RATE, stream_samples

log = logging.getLogger(__name__)

RENDER_EWMA = 0.3            # of a batch's render time (a live session anchors by it)
TAIL_FRAMES = 15             # silence after a flush: every frame's look-ahead lies inside
MAX_BACKLOG_S = 60.0         # audio received but not yet rendered, per session


class FrameSource(Protocol):
    """Where a stream's frames are rendered (the router: the same path as a gRPC request)."""

    async def infer(self, req: InferInput, timeout: float) -> tuple[InferResult, Lease]: ...

    async def background_jpegs(self, model_id: str, indices: tuple[int, ...],
                          timeout: float) -> list[bytes]: ...


class Walk(Protocol):
    def background_indices(self, first: int, count: int) -> tuple[int, ...]:
        """The background frame of frames [first, first + count) (() : frame k shows
        background k, the audio clock's own)."""


class FrameOut(Protocol):
    async def rendered(self, first: int, jpegs: list[bytes]) -> None:
        """Frames [first, first + len(jpegs)) are rendered (b"" for a frame of silence that
        was not rendered)."""


class AudioClock:
    """The audio mode's walk: frame k shows background k."""

    def background_indices(self, first: int, count: int) -> tuple[int, ...]:
        return ()


async def cancel_and_wait(task: asyncio.Task[None]) -> None:
    """Cancel `task` and wait until it has ended, cancelling again should code it awaits
    swallow a cancellation (a third-party library, or a Python 3.11 wait_for race)."""
    while not task.done():
        task.cancel()
        await asyncio.wait({task}, timeout=1.0)
    if not task.cancelled() and task.exception() is not None:
        log.error("stream task failed: %s", task.exception())


class SpeechRenderer:
    def __init__(self, cfg: Config, router: FrameSource, client_id: str, model_id: str,
                 fmt: AudioFormat, walk: Walk, out: FrameOut, sink: EventSink,
                 flush_timeout_s: float, live: bool = False,
                 silence: VoiceActivity | None = None) -> None:
        self.cfg = cfg
        self.router = router
        self.client_id = client_id
        self.model_id = model_id
        self.decoder = AudioDecoder(fmt)
        self.walk = walk
        self.out = out
        self.sink = sink
        self.flush_timeout_s = flush_timeout_s
        self.live = live                      # its requests go ahead of batch work
        self.silence = silence                # skip frames this detector calls silence
        self.audio = AudioBuffer()
        self.received = 0                     # stream samples received (after resampling)
        self.next_frame = 0                   # the next frame to render
        self.final_frames: int | None = None  # set by a flush: render up to here, then report
        self.chunks = 0                       # audio messages since the last batch
        self.last_audio = time.monotonic()
        self.render_s = 0.15                  # a batch's render time, measured as it goes
        self._after_flush: list[np.ndarray] = []
        self._generation = 0                  # bumped by a drop: results of before are dropped
        self._rendering = False
        self._draining = False                # render no new batch (server shutting down)
        self._settled = asyncio.Event()       # a flush was rendered, or the renderer failed
        self._ended = False
        self._wake = asyncio.Event()
        self._runner: asyncio.Task[None] | None = None
        self.error: str | None = None

    # ---- audio in ----------------------------------------------------------------------

    def start(self) -> None:
        self._runner = asyncio.create_task(self._run())

    def feed(self, data: bytes) -> np.ndarray:
        """Decode and queue `data`; the 16 kHz samples it gave."""
        self._check_running()
        samples = self.decoder.decode(data)
        backlog = (self.received + len(samples) - self.next_frame * FRAME_SAMPLES) / SAMPLE_RATE
        if backlog > MAX_BACKLOG_S:
            raise StreamError(f"audio backlog over {MAX_BACKLOG_S:.0f} s: the client sends "
                              "faster than frames can be rendered")
        self.chunks += 1
        self.last_audio = time.monotonic()
        if self.final_frames is not None:  # a flush is rendering: this audio comes after it
            self._after_flush.append(samples)
        else:
            self._append(samples)
        return samples

    def _append(self, samples: np.ndarray) -> None:
        self.audio.append(samples)
        self.received += len(samples)
        self._wake.set()

    def flush(self) -> np.ndarray | None:
        """Pad with silence and render every remaining frame (reported by "flushed"); the
        decoder's tail samples (None: a flush is already under way)."""
        self._check_running()
        if self.final_frames is not None:
            return None  # one flush at a time; it already covers everything received
        tail = self.decoder.decode(b"", last=True)
        self._append(tail)
        frames = math.ceil(self.received / FRAME_SAMPLES)
        self.audio.pad_to((frames + TAIL_FRAMES) * FRAME_SAMPLES)
        self.final_frames = frames
        self._wake.set()
        return tail

    def drop(self) -> int:
        """Drop queued audio, and the results of renders in flight when they come; the next
        audio starts a new clock. The frames dropped (not rendered yet)."""
        dropped = self.pending_frames()
        self.audio.clear()
        self.received = self.next_frame = self.chunks = 0
        self.final_frames = None
        self._after_flush.clear()
        self.decoder = AudioDecoder(self.decoder.fmt)
        self._generation += 1
        self._wake.set()
        return dropped

    @property
    def caught_up(self) -> bool:
        """Every frame of the audio received is rendered and nothing is being rendered:
        the next audio starts an utterance of its own (a live session anchors it)."""
        return (not self._rendering and self.final_frames is None
                and self.received <= self.next_frame * FRAME_SAMPLES)

    @property
    def rendering(self) -> bool:
        """A batch is being rendered or handed on (what a drain waits for)."""
        return self._rendering

    def pending_frames(self) -> int:
        """Frames of the audio received not rendered yet."""
        return max(0, math.ceil(self.received / FRAME_SAMPLES) - self.next_frame)

    # ---- lifecycle ---------------------------------------------------------------------

    async def finish_batch(self, timeout: float) -> None:
        """Start no new batch; wait up to `timeout` for the one being rendered to be handed
        on (a drain: the client keeps every frame rendered, then the session is closed)."""
        self._draining = True
        self._wake.set()
        if self._runner is not None:
            await asyncio.wait({self._runner}, timeout=max(0.0, timeout))

    async def close(self) -> None:
        if self._runner is not None:
            await cancel_and_wait(self._runner)
            self._runner = None

    async def wait_flushed(self) -> None:
        """Until a flush has been rendered (or the renderer failed or ended)."""
        while self.final_frames is not None and self.error is None and not self._ended:
            self._settled.clear()
            await self._settled.wait()
        if self.error is not None:
            raise StreamError(self.error)

    def _check_running(self) -> None:
        if self.error is not None:
            raise StreamError(self.error)

    # ---- rendering ---------------------------------------------------------------------

    def ready_frames(self) -> int:
        """Frames whose every sample has arrived (or, after a flush, all of them)."""
        if self.final_frames is not None:
            return self.final_frames
        # frame i needs samples up to stream_samples(i, 1)[1]; solve for the largest i
        n = self.next_frame
        while stream_samples(n, 1)[1] <= self.received:
            n += 1
        return n

    def _until_flush_timeout(self) -> float | None:
        """Seconds until audio left unrendered is flushed (None: there is none)."""
        if self.final_frames is not None or self.received <= self.next_frame * FRAME_SAMPLES:
            return None
        return max(0.0, self.last_audio + self.flush_timeout_s - time.monotonic())

    async def _run(self) -> None:
        log_request.set(f"client:{self.client_id}")
        try:
            while not self._draining:
                # asyncio.timeout, not wait_for: on Python 3.11 wait_for swallows a
                # cancellation that races with the event being set, and this loop would
                # then never end (a session that outlives its connection)
                try:
                    async with asyncio.timeout(self._until_flush_timeout()):
                        await self._wake.wait()
                except TimeoutError:
                    pass
                self._wake.clear()
                if self._until_flush_timeout() == 0.0:
                    log.info("flush timeout: client=%s", self.client_id)
                    self.flush()
                while not self._draining and (ready := self.ready_frames()) > self.next_frame:
                    await self._render(min(MAX_BATCH, ready - self.next_frame))
                if self.final_frames is not None and self.next_frame >= self.final_frames:
                    await self.sink(Flushed(self.final_frames))
                    self._flush_done()
                    self._settled.set()
        except asyncio.CancelledError:
            raise
        except StreamError as exc:
            self.error = str(exc)
        except Exception as exc:  # a bug costs this session, never the frontend
            log.exception("stream of client %s failed", self.client_id)
            self.error = f"internal error: {exc}"
        finally:
            self._ended = True
            self._settled.set()
        if self.error is not None:
            log.error("inference request failed: client=%s: %s", self.client_id, self.error)
            try:
                await self.sink(Error(self.error))
            except Exception:
                pass

    def _flush_done(self) -> None:
        """A flush's silence was look-ahead only: audio received since replaces it."""
        self.audio.truncate(self.received)
        self.final_frames = None
        self.decoder = AudioDecoder(self.decoder.fmt)  # its tail was drained by the flush
        for samples in self._after_flush:
            self._append(samples)
        self._after_flush.clear()

    async def _render(self, batch: int) -> None:
        self._rendering = True
        try:
            await self._render_batch(batch)
        finally:
            self._rendering = False

    async def _render_batch(self, batch: int) -> None:
        first = self.next_frame
        generation = self._generation
        log.info("batch ready: client=%s, chunks=%d", self.client_id, self.chunks)
        if self.silence is not None and self._silent(first, batch):
            jpegs = [b""] * batch  # silence: the live session shows idle frames, no UNet run
        else:
            lo, hi = stream_samples(first, batch)
            hi = min(hi, self.audio.end)
            request = InferInput.stream_batch(
                self.model_id, first, batch, self.audio.copy(lo, hi), stream_offset=lo,
                background_indices=self.walk.background_indices(first, batch), live=self.live)
            started = time.monotonic()
            try:
                result, _ = await self.router.infer(request, self.cfg.server.request_timeout_s)
            except (Failed, Overloaded, Unavailable, TimeoutError) as exc:
                raise StreamError(f"inference request failed: {exc or type(exc).__name__}") from exc
            jpegs = result.frames
            self.render_s += RENDER_EWMA * (time.monotonic() - started - self.render_s)
            log.info("batch sent to inference server: client=%s, chunks=%d", self.client_id,
                     self.chunks)
        self.chunks = 0
        if generation != self._generation:  # dropped meanwhile: these frames go too
            return
        self.next_frame = first + batch
        await self.out.rendered(first, jpegs)
        # keep only what the next frames can still need
        self.audio.drop_before(stream_samples(self.next_frame, 1)[0])

    def _silent(self, first: int, count: int) -> bool:
        """Every frame of the batch shows silence (skip_silent_frames: it is not rendered)."""
        assert self.silence is not None
        return not any(self.silence.speaking_at(k * FRAME_SAMPLES + FRAME_SAMPLES // 2)
                       for k in range(first, first + count))
