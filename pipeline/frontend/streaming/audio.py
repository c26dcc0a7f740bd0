"""A stream's audio as it arrives: the format a client declares, the decoder to 16 kHz
float32, and the buffer of samples not rendered yet.

Both cost time linear in what a client sends, whatever its message sizes: a message of ten
thousand tiny chunks is appended chunk by chunk into a buffer that grows by doubling, never by
concatenating the whole backlog per chunk.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pipeline.synctalk import MAX_SAMPLE_RATE, MIN_SAMPLE_RATE, SAMPLE_RATE


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

    @property
    def width(self) -> int:
        """Bytes per sample."""
        return 2 if self.encoding == "s16le" else 4

    def seconds(self, nbytes: int) -> float:
        return nbytes / self.width / self.sample_rate


class AudioDecoder:
    """Bytes of any message size -> float32 16 kHz samples (partial samples carried over,
    other rates resampled by one soxr stream, so chunk edges leave no trace)."""

    def __init__(self, fmt: AudioFormat) -> None:
        self.fmt = fmt
        self._carry = b""
        self._resampler = None
        if fmt.sample_rate != SAMPLE_RATE:
            import soxr

            self._resampler = soxr.ResampleStream(fmt.sample_rate, SAMPLE_RATE, 1,
                                                  dtype="float32", quality="HQ")

    def decode(self, data: bytes, last: bool = False) -> np.ndarray:
        width = self.fmt.width
        if self._carry:
            data = self._carry + data
        whole = len(data) - len(data) % width
        self._carry = bytes(data[whole:])
        if self.fmt.encoding == "s16le":
            samples = np.frombuffer(data, "<i2", whole // 2).astype(np.float32) / 32768.0
        else:
            samples = np.frombuffer(data, "<f4", whole // 4).astype(np.float32)
            if not np.isfinite(samples).all():
                raise StreamError("audio contains NaN or Inf values")
        if self._resampler is not None:
            samples = self._resampler.resample_chunk(samples, last=last)
        return samples


class AudioBuffer:
    """The stream's samples from `offset` (a stream sample index) to `end`: appended in
    amortised constant time per sample, the rendered past dropped as it goes."""

    def __init__(self) -> None:
        self._data = np.zeros(1 << 14, np.float32)
        self._start = 0           # index in _data of stream sample `offset`
        self._end = 0
        self.offset = 0

    @property
    def end(self) -> int:
        """The stream sample after the last one held."""
        return self.offset + self._end - self._start

    def append(self, samples: np.ndarray) -> None:
        n = len(samples)
        if self._end + n > len(self._data):
            kept = self._end - self._start
            grown = np.zeros(max(2 * len(self._data), 2 * (kept + n)), np.float32)
            grown[:kept] = self._data[self._start:self._end]
            self._data, self._start, self._end = grown, 0, kept
        self._data[self._end:self._end + n] = samples
        self._end += n

    def pad_to(self, total: int) -> None:
        """Silence up to stream sample `total` (a flush's tail)."""
        if total > self.end:
            self.append(np.zeros(total - self.end, np.float32))

    def truncate(self, total: int) -> None:
        """Forget the samples from stream sample `total` on (a flush's silence, once
        audio that came after it is to take its place)."""
        self._end = self._start + max(0, total - self.offset)

    def copy(self, lo: int, hi: int) -> np.ndarray:
        """Stream samples [lo, hi), as a copy of their own (the buffer may move on while a
        render waits)."""
        return self._data[self._start + lo - self.offset:self._start + hi - self.offset].copy()

    def drop_before(self, sample: int) -> None:
        """The samples before stream sample `sample` are needed no more."""
        n = min(max(0, sample - self.offset), self._end - self._start)
        self._start += n
        self.offset += n

    def clear(self) -> None:
        """Nothing received: the next sample is stream sample 0 (a cancel)."""
        self._start = self._end = self.offset = 0
