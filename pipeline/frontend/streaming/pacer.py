"""The live clock's two parts: the speech queue (rendered speech frames, each placed at the
live frame it is to be shown at) and the pacer (frame after frame at its due time).

Frame n is due at the session's start + n x 40 ms on the wall clock and is always sent: the
speech frame queued for it, else an idle frame — the avatar's own background, walking forward
and back (ping-pong) through its frames. Each utterance is anchored to the live frame its
first frame will be shown at; every speech frame shows the background the walk is at when it
is due, so idle and speech frames join without a jump. A speech frame not ready when due is
replaced by an idle frame (counted as late; lips and audio stay in sync).
"""
from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import deque
from dataclasses import dataclass, field

from pipeline.config import StreamingConfig
from pipeline.frontend.capacity import Ticket
from pipeline.frontend.streaming.audio import StreamError
from pipeline.frontend.streaming.events import EventSink, FrameReady
from pipeline.frontend.streaming.render import SpeechRenderer
from pipeline.frontend.streaming.vad import VoiceActivity
from pipeline.protocol import BelowRealTime
from pipeline.synctalk import FRAME_SAMPLES, FRAME_US

log = logging.getLogger(__name__)

FRAME_S = FRAME_US / 1e6
SILENT = b""  # a queued speech frame whose window is silence: an idle frame is shown


def ping_pong(n: int, count: int) -> int:
    """The background frame of live frame n: 0, 1, ..., count-1, count-2, ..., 1, 0, 1, ..."""
    if count <= 1:
        return 0
    k = n % (2 * count - 2)
    return k if k < count else 2 * count - 2 - k


@dataclass(frozen=True)
class Anchor:
    """An utterance's place on the live clock: audio frame k is shown as live frame
    n0 + (k - k0)."""

    k0: int
    n0: int

    def live(self, k: int) -> int:
        return self.n0 + k - self.k0


class SpeechQueue:
    """Rendered speech frames by the live frame they are shown at. It is the live renderer's
    walk (which background each speech frame shows) and where its batches go."""

    def __init__(self, count: int, ticket: Ticket, silence: VoiceActivity | None) -> None:
        self.count = count              # the model's background frames
        self.ticket = ticket            # the session's admission: told what it renders
        self.silence = silence          # skip_silent_frames: silent speech shows idle
        self.anchor: Anchor | None = None
        self.frames: dict[int, bytes] = {}
        self.sent_up_to = -1            # the last live frame sent

    def begin(self, anchor: Anchor) -> None:
        self.anchor = anchor

    def background_indices(self, first: int, count: int) -> tuple[int, ...]:
        assert self.anchor is not None
        return tuple(ping_pong(self.anchor.live(k), self.count) for k in range(first, first + count))

    async def rendered(self, first: int, jpegs: list[bytes]) -> None:
        anchor = self.anchor
        if anchor is None:  # interrupted meanwhile
            return
        self.ticket.rendered(sum(1 for j in jpegs if j))
        for i, jpeg in enumerate(jpegs):
            k = first + i
            n = anchor.live(k)
            if n <= self.sent_up_to:
                continue  # its time has passed: an idle frame was sent (counted as late)
            silent = self.silence is not None and not self.silence.speaking_at(
                k * FRAME_SAMPLES + FRAME_SAMPLES // 2)
            self.frames[n] = SILENT if silent else jpeg

    def take(self, n: int) -> bytes | None:
        """The speech frame of live frame n (None: none rendered; SILENT: silence), now
        sent; anything queued for before it is gone."""
        jpeg = self.frames.pop(n, None)
        self.sent_up_to = n
        for stale in [m for m in self.frames if m <= n]:
            del self.frames[stale]
        return jpeg

    def ahead(self) -> bool:
        """Speech frames wait to be shown."""
        return any(n > self.sent_up_to for n in self.frames)

    def clear(self) -> int:
        """Drop every unshown speech frame and the utterance's anchor; how many were dropped."""
        dropped = sum(1 for n in self.frames if n > self.sent_up_to)
        self.frames.clear()
        self.anchor = None
        return dropped

    def due_speech(self, n: int, received: int) -> bool:
        """Live frame n shows audio the client has sent (`received` samples of the
        utterance's stream), so a speech frame should be ready for it."""
        anchor = self.anchor
        if anchor is None or n < anchor.n0:
            return False
        return (n - anchor.n0 + anchor.k0) * FRAME_SAMPLES < received


@dataclass
class LiveStats:
    speech: int = 0
    idle: int = 0
    late: int = 0                  # speech frames not ready when due (idle sent instead)
    recent_late: deque[float] = field(default_factory=lambda: deque(maxlen=512))


class Pacer:
    """Sends live frame after live frame at its due time, whatever happens to the speech."""

    def __init__(self, queue: SpeechQueue, idle: list[bytes], sink: EventSink,
                 settings: StreamingConfig, speech: SpeechRenderer) -> None:
        self.queue = queue
        self.speech = speech            # how much audio the client has sent
        self.idle = idle
        self.sink = sink
        self.settings = settings
        self.stats = LiveStats()
        self.start_mono = time.monotonic()
        self.start_epoch_us = time.time_ns() // 1000
        self.below_real_time = False

    def due_mono(self, n: int) -> float:
        return self.start_mono + n * FRAME_S

    def due_epoch_us(self, n: int) -> int:
        return self.start_epoch_us + n * FRAME_US

    def now_frame(self) -> int:
        """The live frame due now (or next)."""
        return max(self.queue.sent_up_to + 1,
                   math.ceil((time.monotonic() - self.start_mono) / FRAME_S))

    async def run(self) -> None:
        """Frame after frame at its due time. Raises StreamError when a send fails or a
        session below real time is to be closed."""
        n = 0
        while True:
            wait = self.due_mono(n) - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            jpeg = self.queue.take(n)
            if jpeg is None and self.queue.due_speech(n, self.speech.received):
                self.stats.late += 1
                self.stats.recent_late.append(time.monotonic())
            if not jpeg:  # nothing rendered for it, or silence: the walk shows itself
                self.stats.idle += 1
                await self.sink(FrameReady(n, self.idle[ping_pong(n, len(self.idle))], False,
                                           self.due_epoch_us(n)))
            else:
                self.stats.speech += 1
                await self.sink(FrameReady(n, jpeg, True, self.due_epoch_us(n)))
            await self._check_real_time()
            n += 1

    async def _check_real_time(self) -> None:
        """Half the frames of the last low_fps_grace_s late: below real time. Said once per
        episode; with streaming.close_below_real_time the session ends (1013)."""
        grace = self.settings.low_fps_grace_s
        now = time.monotonic()
        late = sum(t > now - grace for t in self.stats.recent_late)
        below = late >= grace / FRAME_S / 2
        if below and not self.below_real_time:
            self.below_real_time = True
            log.warning("live session %s below real time: %d late frames in %.0f s",
                        self.speech.client_id, late, grace)
            await self.sink(BelowRealTime(late, grace, self.settings.close_below_real_time))
            if self.settings.close_below_real_time:
                raise StreamError(f"below real time: {late} late frames in {grace:.0f} s")
        self.below_real_time = below
