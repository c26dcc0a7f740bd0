"""A live audio stream turned into lip-synced frames: the session behind the WebSocket
`/audio` endpoint, the StreamAudio RPC and InferenceService.ProcessAudio.

One clock: frame i shows audio sample i * 640 (40 ms at 16 kHz) and carries the media
timestamp i * 40 ms. Frame i is rendered as soon as every sample it depends on has arrived
(about 450 ms of look-ahead: the model sees +-8 frames of audio context), from a slice of
the stream's audio, so the frames equal those of the whole audio computed at once. A
flush pads the tail with silence and renders every remaining frame: N seconds of audio
give ceil(25 N) frames. A cancel drops queued audio and unsent frames and restarts the
clock.
"""
from __future__ import annotations

import asyncio
import logging
import math
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import numpy as np

from pipeline.config import Config
from pipeline.frontend.errors import Failed, Overloaded, Unavailable
from pipeline.frontend.router import Router
from pipeline.frontend.validation import ValidRequest
from pipeline.runtime.logs import request_id as log_request
from pipeline.synctalk import (
    FRAME_SAMPLES,
    FRAME_US,
    MAX_BATCH,
    MAX_SAMPLE_RATE,
    MIN_SAMPLE_RATE,
    SAMPLE_RATE,
    stream_samples,
)

log = logging.getLogger(__name__)

TAIL_FRAMES = 15             # silence after a flush: every frame's look-ahead lies inside
MAX_BACKLOG_S = 60.0         # audio received but not yet rendered, per session

SendFrame = Callable[[int, int, bytes], Awaitable[None]]
SendStatus = Callable[[dict], Awaitable[None]]


@dataclass
class Hooks:
    """How a live session takes over from the seed's behaviour (send each frame as soon as
    it is rendered, on the audio clock): where rendered frames go, which background each
    frame shows, and who else hears the audio (the voice-activity detector)."""

    deliver: Callable[[int, list[bytes]], Awaitable[None]] | None = None
    backgrounds: Callable[[int, int], tuple[int, ...]] | None = None
    on_audio: Callable[[np.ndarray, int], None] | None = None
    on_flush: Callable[[], None] | None = None  # the audio ended (asked, or it stopped coming)
    # frames [first, first + n) show silence: not rendered, delivered as empty frames
    silent: Callable[[int, int], bool] | None = None


MAX_CLIENT_ID = 128


def escape(text: str) -> str:
    """`text` with every control and non-ASCII character escaped: what a client sends
    never forges a log line."""
    return text.encode("unicode_escape").decode("ascii")


def clean_client_id(client_id: str) -> str:
    """A client's id as logged and echoed: escaped, at most MAX_CLIENT_ID characters (a
    generated UUID when it sent none)."""
    return escape(client_id)[:MAX_CLIENT_ID] if client_id else str(uuid.uuid4())


async def cancel_and_wait(task: asyncio.Task[None]) -> None:
    """Cancel `task` and wait until it has ended, cancelling again should code it awaits
    swallow a cancellation (a third-party library, or a Python 3.11 wait_for race)."""
    while not task.done():
        task.cancel()
        await asyncio.wait({task}, timeout=1.0)
    if not task.cancelled() and task.exception() is not None:
        log.error("stream task failed: %s", task.exception())


class StreamError(Exception):
    """The session cannot go on; str() is the message sent to the client."""


@dataclass(frozen=True)
class AudioFormat:
    encoding: str = "s16le"      # s16le | f32le, mono
    sample_rate: int = SAMPLE_RATE

    def __post_init__(self) -> None:
        if self.encoding not in ("s16le", "f32le"):
            raise StreamError(f"unsupported audio format {self.encoding!r} (s16le or f32le)")
        if not MIN_SAMPLE_RATE <= self.sample_rate <= MAX_SAMPLE_RATE:
            raise StreamError(f"unsupported sample rate {self.sample_rate} "
                              f"({MIN_SAMPLE_RATE}-{MAX_SAMPLE_RATE} Hz)")


class AudioDecoder:
    """Bytes of any message size -> float32 16 kHz samples (partial samples carried over,
    other rates resampled by one soxr stream, so chunk edges leave no trace)."""

    def __init__(self, fmt: AudioFormat) -> None:
        self.fmt = fmt
        self._width = 2 if fmt.encoding == "s16le" else 4
        self._carry = b""
        self._resampler = None
        if fmt.sample_rate != SAMPLE_RATE:
            import soxr

            self._resampler = soxr.ResampleStream(fmt.sample_rate, SAMPLE_RATE, 1,
                                                  dtype="float32", quality="HQ")

    def decode(self, data: bytes, last: bool = False) -> np.ndarray:
        data = self._carry + data
        whole = len(data) - len(data) % self._width
        self._carry = data[whole:]
        if self.fmt.encoding == "s16le":
            samples = np.frombuffer(data[:whole], "<i2").astype(np.float32) / 32768.0
        else:
            samples = np.frombuffer(data[:whole], "<f4").astype(np.float32)
            if not np.isfinite(samples).all():
                raise StreamError("audio contains NaN or Inf values")
        if self._resampler is not None:
            samples = self._resampler.resample_chunk(samples, last=last)
        return samples


class StreamSession:
    """One client's stream. feed()/flush()/cancel() from the transport; frames and status
    messages go out through the transport's callbacks, in order."""

    def __init__(self, cfg: Config, router: Router, client_id: str, model_id: str,
                 fmt: AudioFormat, send_frame: SendFrame, send_status: SendStatus,
                 flush_timeout_s: float = 2.0, hooks: Hooks | None = None) -> None:
        if model_id not in cfg.models:
            raise StreamError(f"Model '{model_id}' not found in configuration")
        self.cfg = cfg
        self.router = router
        self.client_id = clean_client_id(client_id)
        self.model_id = model_id
        self.decoder = AudioDecoder(fmt)
        self.send_frame = send_frame
        self.send_status = send_status
        self.flush_timeout_s = flush_timeout_s
        self.hooks = hooks or Hooks()
        self.audio = np.zeros(0, np.float32)  # the stream's samples from `offset` on
        self.offset = 0                       # stream sample index of audio[0]
        self.received = 0                     # stream samples received (after resampling)
        self.next_frame = 0                   # the next frame to render
        self.final_frames: int | None = None  # set by a flush: render up to here, then report
        self.chunks = 0                       # audio messages since the last batch
        self.frames_sent = 0
        self.last_audio = time.monotonic()
        self._after_flush: list[np.ndarray] = []
        self._generation = 0                  # bumped by cancel: results of before are dropped
        self._rendering = False
        self._draining = False                # render no new batch (server shutting down)
        self._settled = asyncio.Event()       # a flush was rendered, or the session failed
        self._ended = False
        self._wake = asyncio.Event()
        self._runner: asyncio.Task[None] | None = None
        self.error: str | None = None

    # ---- from the transport ------------------------------------------------------------

    async def start(self) -> None:
        self._runner = asyncio.create_task(self._run())

    async def feed(self, data: bytes) -> None:
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
            return
        self._append(samples)

    def _append(self, samples: np.ndarray) -> None:
        if self.hooks.on_audio is not None:
            self.hooks.on_audio(samples, self.received)
        self.audio = np.concatenate([self.audio, samples])
        self.received += len(samples)
        self._wake.set()

    @property
    def caught_up(self) -> bool:
        """Every frame of the audio received is rendered and nothing is being rendered:
        the next audio starts an utterance of its own (a live session anchors it)."""
        return (not self._rendering and self.final_frames is None
                and self.received <= self.next_frame * FRAME_SAMPLES)

    def pending_frames(self) -> int:
        """Frames of the audio received not rendered yet."""
        return max(0, math.ceil(self.received / FRAME_SAMPLES) - self.next_frame)

    async def flush(self) -> None:
        """Pad with silence and render every remaining frame (reported by 'flushed')."""
        self._check_running()
        if self.final_frames is not None:
            return  # one flush at a time; it already covers everything received
        tail = self.decoder.decode(b"", last=True)
        if self.hooks.on_audio is not None and len(tail):
            self.hooks.on_audio(tail, self.received)
        if self.hooks.on_flush is not None:
            self.hooks.on_flush()
        self.audio = np.concatenate([self.audio, tail])
        self.received += len(tail)
        frames = math.ceil(self.received / FRAME_SAMPLES)
        padded = (frames + TAIL_FRAMES) * FRAME_SAMPLES
        self.audio = np.concatenate([self.audio, np.zeros(padded - self.received, np.float32)])
        self.final_frames = frames
        self._wake.set()

    async def cancel(self) -> None:
        """Drop queued audio and unsent frames; the next audio starts a new clock."""
        await self.send_status({"type": "cancelled", "dropped_frames": self.drop()})

    async def interrupt(self) -> None:
        """Barge-in: as a cancel, answered once with the frame the stream is at."""
        frame = self.next_frame
        await self.send_status({"type": "interrupted", "frame": frame,
                                "dropped_frames": self.drop()})

    def drop(self) -> int:
        """Drop queued audio, and the results of renders in flight when they come; the next
        audio starts a new clock. The frames dropped (not rendered yet)."""
        dropped = self.pending_frames()
        self.audio = np.zeros(0, np.float32)
        self.offset = self.received = self.next_frame = self.chunks = 0
        self.final_frames = None
        self._after_flush.clear()
        self.decoder = AudioDecoder(self.decoder.fmt)
        self._generation += 1
        self._wake.set()
        return dropped

    async def finish_batch(self, timeout: float) -> None:
        """Start no new batch; wait up to `timeout` for the one being rendered to be sent
        (a drain: the client keeps every frame rendered, then the session is closed)."""
        self._draining = True
        self._wake.set()
        if self._runner is not None:
            await asyncio.wait({self._runner}, timeout=max(0.0, timeout))

    async def close(self) -> None:
        if self._runner is not None:
            await cancel_and_wait(self._runner)
            self._runner = None

    async def wait_flushed(self) -> None:
        """Until a flush has been rendered (or the session failed or ended)."""
        while self.final_frames is not None and self.error is None and not self._ended:
            self._settled.clear()
            await self._settled.wait()
        if self.error is not None:
            raise StreamError(self.error)

    # ---- rendering -------------------------------------------------------------------

    def _check_running(self) -> None:
        if self.error is not None:
            raise StreamError(self.error)

    def _flush_done(self) -> None:
        """A flush's silence was look-ahead only: audio received since replaces it."""
        self.audio = self.audio[: self.received - self.offset]
        self.final_frames = None
        self.decoder = AudioDecoder(self.decoder.fmt)  # its tail was drained by the flush
        for samples in self._after_flush:
            self._append(samples)
        self._after_flush.clear()

    def ready_frames(self) -> int:
        """Frames whose every sample has arrived (or, after a flush, all of them)."""
        if self.final_frames is not None:
            return self.final_frames
        # frame i needs samples up to stream_samples(i, 1)[1]; solve for the largest i
        n = self.next_frame
        while stream_samples(n, 1)[1] <= self.received:
            n += 1
        return n

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
                    await self.flush()
                while not self._draining and (ready := self.ready_frames()) > self.next_frame:
                    await self._render(min(MAX_BATCH, ready - self.next_frame))
                if self.final_frames is not None and self.next_frame >= self.final_frames:
                    await self.send_status({"type": "flushed", "frames": self.final_frames})
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
                await self.send_status({"type": "error", "message": self.error})
            except Exception:
                pass

    def _until_flush_timeout(self) -> float | None:
        """Seconds until audio left unrendered is flushed (None: there is none)."""
        if self.final_frames is not None or self.received <= self.next_frame * FRAME_SAMPLES:
            return None
        return max(0.0, self.last_audio + self.flush_timeout_s - time.monotonic())

    @property
    def rendering(self) -> bool:
        """A batch is being rendered or sent (what a drain waits for)."""
        return self._rendering

    async def _render(self, batch: int) -> None:
        self._rendering = True
        try:
            await self._render_batch(batch)
        finally:
            self._rendering = False

    async def _render_batch(self, batch: int) -> None:
        first = self.next_frame
        lo, hi = stream_samples(first, batch)
        hi = min(hi, self.offset + len(self.audio))
        log.info("batch ready: client=%s, chunks=%d", self.client_id, self.chunks)
        generation = self._generation
        if self.hooks.silent is not None and self.hooks.silent(first, batch):
            frames = [b""] * batch  # silence: the live session shows idle frames, no UNet run
        else:
            backgrounds = self.hooks.backgrounds(first, batch) if self.hooks.backgrounds else ()
            request = ValidRequest(
                model_id=self.model_id, batch_size=batch, start_frame_idx=first, visual=None,
                audio=self.audio[lo - self.offset : hi - self.offset], sample_rate=SAMPLE_RATE,
                features=None, stream_offset=lo, backgrounds=backgrounds)
            try:
                result, _ = await self.router.infer(request, self.cfg.server.request_timeout_s)
            except (Failed, Overloaded, Unavailable, TimeoutError) as exc:
                raise StreamError(f"inference request failed: {exc or type(exc).__name__}") from exc
            frames = result.frames
            log.info("batch sent to inference server: client=%s, chunks=%d", self.client_id,
                     self.chunks)
        self.chunks = 0
        if generation != self._generation:  # cancelled meanwhile: these frames are dropped
            return
        self.next_frame = first + batch
        if self.hooks.deliver is not None:
            await self.hooks.deliver(first, frames)
        else:
            for i, jpeg in enumerate(frames):
                if generation != self._generation:  # cancelled while sending: no more
                    return
                await self.send_frame(first + i, (first + i) * FRAME_US, jpeg)
        self.frames_sent += batch
        # keep only what the next frames can still need
        keep_from = stream_samples(self.next_frame, 1)[0]
        if keep_from > self.offset:
            self.audio = self.audio[keep_from - self.offset:]
            self.offset = keep_from
