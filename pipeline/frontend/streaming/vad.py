"""Speech start and end on a stream's audio: WebRTC's voice-activity detector (a small C
library, webrtcvad-wheels) on 30 ms windows, with hysteresis so that a syllable's gap does
not end speech and a click does not start it.

Speech starts at the first voiced window of a run of START_WINDOWS voiced windows out of the
last START_OF; it ends after END_MS of unvoiced windows, at the end of the last voiced one.
Positions are stream samples (16 kHz), so a session maps them to frame indices.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import numpy as np
import webrtcvad

from pipeline.synctalk import SAMPLE_RATE

WINDOW = SAMPLE_RATE * 30 // 1000   # 480 samples: one decision
START_WINDOWS, START_OF = 3, 4      # 3 voiced of the last 4 (90 of 120 ms) start speech
END_MS = 300                        # this long unvoiced ends it
AGGRESSIVENESS = 2                  # 0 (lenient) .. 3 (strict)


@dataclass(frozen=True)
class SpeechEvent:
    kind: str    # "speech_start" | "speech_end"
    sample: int  # stream sample where it happens


class VoiceActivity:
    """Feed 16 kHz float32 samples in order; get the speech starts and ends they reveal."""

    def __init__(self, aggressiveness: int = AGGRESSIVENESS) -> None:
        self._vad = webrtcvad.Vad(aggressiveness)
        self._carry = np.zeros(0, np.float32)
        self._position = 0                    # stream sample of _carry[0]
        self._recent: deque[tuple[int, bool]] = deque(maxlen=START_OF)
        self._end_windows = END_MS * SAMPLE_RATE // 1000 // WINDOW
        self._unvoiced = 0
        self._last_voiced_end = 0
        self.speaking = False
        self.intervals: list[tuple[int, int | None]] = []  # speech [start, end) so far

    def feed(self, samples: np.ndarray) -> list[SpeechEvent]:
        audio = np.concatenate([self._carry, samples]) if len(self._carry) else samples
        whole = len(audio) - len(audio) % WINDOW
        pcm = (np.clip(audio[:whole], -1.0, 1.0) * 32767).astype("<i2").tobytes()
        events: list[SpeechEvent] = []
        for i in range(whole // WINDOW):
            start = self._position + i * WINDOW
            voiced = self._vad.is_speech(pcm[2 * i * WINDOW: 2 * (i + 1) * WINDOW], SAMPLE_RATE)
            event = self._decide(start, voiced)
            if event is not None:
                events.append(event)
        self._carry = audio[whole:].copy()
        self._position += whole
        return events

    def _decide(self, start: int, voiced: bool) -> SpeechEvent | None:
        self._recent.append((start, voiced))
        if voiced:
            self._unvoiced = 0
            self._last_voiced_end = start + WINDOW
        else:
            self._unvoiced += 1
        if not self.speaking and sum(v for _, v in self._recent) >= START_WINDOWS:
            self.speaking = True
            first = next(s for s, v in self._recent if v)
            self.intervals.append((first, None))
            return SpeechEvent("speech_start", first)
        if self.speaking and self._unvoiced >= self._end_windows:
            return self.end()
        return None

    def end(self) -> SpeechEvent | None:
        """Speech ends now if it is going on (the stream was flushed, interrupted, closed)."""
        if not self.speaking:
            return None
        self.speaking = False
        self._recent.clear()
        start, _ = self.intervals[-1]
        self.intervals[-1] = (start, self._last_voiced_end)
        return SpeechEvent("speech_end", self._last_voiced_end)

    def reset(self) -> None:
        """Forget the audio so far (an interrupt): what comes next starts a new stream
        position at `position`."""
        self._carry = np.zeros(0, np.float32)
        self._recent.clear()
        self._unvoiced = 0
        self.speaking = False

    def restart_at(self, position: int) -> None:
        self.reset()
        self._position = position

    def speaking_at(self, sample: int) -> bool:
        """Whether `sample` lies in speech (as decided so far: an open interval counts)."""
        for start, end in reversed(self.intervals):
            if start <= sample and (end is None or sample < end):
                return True
            if end is not None and end <= sample:
                return False
        return False
