"""Where the server will say speech starts in the audio we send it: the same decision its
voice-activity detector makes (WebRTC's VAD, aggressiveness 2, on 30 ms windows of the 16 kHz
stream from sample 0; speech starts at the first voiced window of 3 voiced out of the last 4,
and ends after 300 ms unvoiced or at a flush), run on the very samples we send.

The live frame header says which live frame shows but not which audio; the server's
`speech_start` status names the live frame showing a speech onset. Matched with the onset
computed here, it gives an utterance's anchor even when its first speech frames came too late
to be rendered (idle frames went instead), which the first speech frame alone cannot tell.
"""
from __future__ import annotations

from collections import deque

import webrtcvad

WINDOW = 480                 # 30 ms at 16 kHz
START_WINDOWS, START_OF = 3, 4
END_WINDOWS = 300 // 30
AGGRESSIVENESS = 2


class SpeechOnsets:
    """Feed the s16le 16 kHz bytes sent; `onsets` collects the stream samples where the
    server's detector will put each speech start."""

    def __init__(self) -> None:
        self._vad = webrtcvad.Vad(AGGRESSIVENESS)
        self.reset()

    def reset(self) -> None:
        """A new stream (sample 0): the session began or was interrupted."""
        self._carry = b""
        self._position = 0
        self._recent: deque[tuple[int, bool]] = deque(maxlen=START_OF)
        self._unvoiced = 0
        self.speaking = False
        self.onsets: deque[int] = deque()

    def feed(self, pcm: bytes) -> None:
        data = self._carry + pcm
        whole = len(data) - len(data) % (2 * WINDOW)
        for i in range(0, whole, 2 * WINDOW):
            self._decide(self._position, self._vad.is_speech(data[i:i + 2 * WINDOW], 16000))
            self._position += WINDOW
        self._carry = data[whole:]

    def end(self) -> None:
        """A flush: speech ends (the server's detector forgets its recent windows too)."""
        self.speaking = False
        self._recent.clear()

    def _decide(self, start: int, voiced: bool) -> None:
        self._recent.append((start, voiced))
        self._unvoiced = 0 if voiced else self._unvoiced + 1
        if not self.speaking and sum(v for _, v in self._recent) >= START_WINDOWS:
            self.speaking = True
            self.onsets.append(next(s for s, v in self._recent if v))
        elif self.speaking and self._unvoiced >= END_WINDOWS:
            self.end()
