"""Which of the audio we sent a live frame shows: the bookkeeping that lets an avatar service
hand each frame's audio downstream together with the frame (no sockets, no clock: tests drive it).

The server's clock: stream frame k shows the 16 kHz samples [640 k, 640 (k + 1)) of the audio
sent since the session began (or since the last interrupt), and an utterance's frames are shown
on consecutive live frames, stream frame k as live frame k + anchor. The frame header carries the
live index only, so the anchor is learnt from the first speech frame of audio not yet shown: it
shows the first stream frame whose audio has not gone out. The audio of every stream frame up to
the one a live frame shows goes out with that frame, so a speech frame the server could not render
in time (an idle frame goes in its place) still takes its audio along and the sound never stops.

The first speech frame cannot tell when the server rendered an utterance's first frames too late
(idle frames went in their place): the server's `speech_start` status can. It names the live
frame that shows a speech onset, and `onsets.SpeechOnsets` finds the same onset in the samples we
sent; when the two put the anchor earlier than the first speech frame does, the late frames'
audio goes out with the idle frames that stood in for them.

Two rules keep the server's stream and ours aligned frame for frame: audio is sent to the server
resampled to 16 kHz, a run of audio is padded with silence to a whole frame before it is flushed
(the server renders a flushed partial frame with silence), and a pause in the audio ends its run
before the server's own flush timeout would (0.3 s in live mode). The audio handed back is the
audio as it came (its own rate, not the 16 kHz copy).
"""
from __future__ import annotations

import math
from collections import deque

import numpy as np
import soxr

from pipeline.integrations.onsets import SpeechOnsets

SERVER_RATE = 16000
SERVER_FRAME = 640          # 16 kHz samples per frame (40 ms)
FPS = 25


def frame_samples(rate: int) -> int:
    """Samples of one 40 ms frame at `rate` (ValueError unless a whole number)."""
    if rate <= 0 or rate % FPS:
        raise ValueError(f"unsupported sample rate {rate}: a multiple of {FPS} Hz is needed "
                         "(40 ms must be a whole number of samples)")
    return rate // FPS


def pcm16(samples: np.ndarray) -> bytes:
    """float32 in [-1, 1] -> s16le bytes."""
    return (np.clip(samples, -1.0, 1.0) * 32767.0).astype("<i2").tobytes()


class AudioTimeline:
    """The audio of one stream, frame by frame: what to send the server, and what goes out
    with each live frame."""

    def __init__(self, rate: int) -> None:
        self.rate = rate
        self.per_frame = frame_samples(rate)
        self.onsets = SpeechOnsets()
        self.reset()

    def reset(self) -> None:
        """A new stream (the session began, was interrupted, or is new after a reconnect)."""
        self.next_frame = 0                     # the stream frame the next samples fill
        self.tail = np.zeros(0, np.int16)       # source samples of next_frame so far
        self.pending: dict[int, bytes] = {}     # stream frame -> its source audio, not out yet
        self.segment_ends: deque[int] = deque() # last stream frame of each ended segment
        self.anchor: int | None = None          # live frame - stream frame, while known
        self.hints: deque[tuple[int, int]] = deque()  # (stream frame of an onset, its anchor)
        self.onsets.reset()
        self._resampler: soxr.ResampleStream | None = None
        self._run_source = 0                    # source samples of the run (since the last pad)
        self._run_sent = 0                      # 16 kHz samples sent of the run

    @property
    def idle(self) -> bool:
        """Every sample taken has gone out, and the stream ends on a frame boundary."""
        return not self.pending and not len(self.tail) and self._resampler is None

    @property
    def open_run(self) -> bool:
        """Audio was added since the last pad."""
        return self._resampler is not None

    def add(self, samples: np.ndarray) -> bytes:
        """Take int16 mono samples at `rate`; returns the s16le 16 kHz bytes to send."""
        if not len(samples):
            return b""
        data = np.concatenate([self.tail, samples.astype(np.int16, copy=False)])
        whole = len(data) // self.per_frame
        for j in range(whole):
            self.pending[self.next_frame + j] = \
                data[j * self.per_frame:(j + 1) * self.per_frame].tobytes()
        self.next_frame += whole
        self.tail = data[whole * self.per_frame:]
        if self._resampler is None:
            self._resampler = soxr.ResampleStream(self.rate, SERVER_RATE, 1, dtype="float32")
            self._run_source = self._run_sent = 0
        resampled = self._resampler.resample_chunk(samples.astype(np.float32) / 32768.0)
        self._run_source += len(samples)
        self._run_sent += len(resampled)
        return self._sent(pcm16(resampled))

    def _sent(self, pcm: bytes) -> bytes:
        self.onsets.feed(pcm)
        return pcm

    def pad(self) -> bytes:
        """End the run: its last frame filled with silence. Returns the 16 kHz bytes that bring
        what the server has of the run to exactly its frames (send them, then flush)."""
        if self._resampler is None:
            return b""
        rest = self._resampler.resample_chunk(np.zeros(0, np.float32), last=True)
        if len(self.tail):
            padded = np.concatenate([self.tail, np.zeros(self.per_frame - len(self.tail), np.int16)])
            self.pending[self.next_frame] = padded.tobytes()
            self.next_frame += 1
            self.tail = np.zeros(0, np.int16)
        frames = math.ceil(self._run_source / self.per_frame)
        missing = frames * SERVER_FRAME - self._run_sent - len(rest)
        rest = np.concatenate([rest, np.zeros(missing, np.float32)]) if missing >= 0 \
            else rest[:missing]
        self._resampler = None
        sent = self._sent(pcm16(rest))
        self.onsets.end()  # the flush that follows ends speech on the server too
        return sent

    def end_segment(self) -> bool:
        """The speaker's turn is over (pad first). True when all its audio is out already."""
        if not self.pending:
            return True
        self.segment_ends.append(self.next_frame - 1)
        return False

    def speech_started(self, live_frame: int) -> None:
        """The server's `speech_start`: live frame `live_frame` shows the next onset."""
        if self.onsets.onsets:
            frame = self.onsets.onsets.popleft() // SERVER_FRAME
            self.hints.append((frame, live_frame - frame))

    def _learn_anchor(self, live_frame: int, speech: bool) -> None:
        first = min(self.pending)
        while self.hints and self.hints[0][0] < first:  # an onset already shown
            self.hints.popleft()
        hinted = self.hints[0][1] if self.hints else None
        if hinted is not None and hinted > live_frame - first and speech:
            self.hints.clear()  # not this utterance's onset: the detectors disagreed
            hinted = None
        if speech:
            seen = live_frame - first
            # late first frames only ever make the first speech frame come later
            self.anchor = hinted if hinted is not None and hinted < seen - 1 else seen
        elif hinted is not None and live_frame - hinted >= first:
            self.anchor = hinted  # this idle frame stands in for a speech frame not ready

    def shown(self, live_frame: int, speech: bool) -> tuple[bytes, int]:
        """Live frame `live_frame` goes out: the audio to hand downstream with it, and how many
        segments ended with that audio."""
        if self.anchor is None and self.pending:
            self._learn_anchor(live_frame, speech)
        if self.anchor is None:
            return b"", 0
        last = live_frame - self.anchor
        out = [self.pending.pop(k) for k in sorted(k for k in self.pending if k <= last)]
        ended = 0
        while self.segment_ends and self.segment_ends[0] <= last:
            self.segment_ends.popleft()
            ended += 1
        if not self.pending and not len(self.tail):
            # all out, on a frame boundary: the next audio may start an utterance of its own,
            # anchored anew by the server (learnt again from its first speech frame)
            self.anchor = None
        return b"".join(out), ended

    def take_all(self) -> tuple[bytes, int]:
        """Everything not out yet (the server is gone: the audio goes on without lips)."""
        self.pad()
        out = b"".join(self.pending[k] for k in sorted(self.pending))
        ended = len(self.segment_ends)
        self.reset()
        return out, ended
