"""The mel spectrogram of the gpu_worker's audio path: samples (any rate, resampled to 16 kHz)
→ the SyncTalk-2D Python reference's normalised mel, matched to 1e-4 on every element.

Pure numpy (and soxr for resampling). The reference built its features with librosa; here
its Slaney mel filterbank is computed with librosa's formulas in numpy, lazily and once per
process (`warm_up()` builds it before the first request), bit-equal to
`librosa.filters.mel` (the unit tests compare them): librosa itself would import scipy and
numba for it, 1.2 s of CPU at every worker start. Its STFT is not used either: a numpy STFT
with the same window and padding is exact and takes about 3 ms for 10 s of audio.
Everything here is single-threaded and safe to call from any thread.

1. `resample_to_16k` — the request's `sample_rate` is honoured (the Go server ignored it);
   soxr band-limited resampling, quality 'HQ'.
2. `melspectrogram` — the SyncTalk-2D Python reference (`utils.melspectrogram`), matched to
   1e-4 on every element: pre-emphasis 0.97, 400 zeros of centre padding on each side,
   **periodic** Hann window of 800 (librosa's default; the Go server used the symmetric
   `np.hanning` form and was off by more than 1e-4 on about a third of the STFT values),
   |rfft| with n_fft 800 / hop 200, Slaney mel 80 bands 55–7600 Hz, dB with a 1e-5 floor
   minus 20, then clip(0.08·S + 4, ±4). Output is time-major [1 + n // 200, 80].
"""


from __future__ import annotations

import functools
import threading
from typing import NamedTuple

import numpy as np
import soxr
from numpy.lib.stride_tricks import sliding_window_view

from pipeline.synctalk import (
    HOP,
    MAX_SAMPLE_RATE,
    MIN_SAMPLE_RATE,
    N_FFT,
    N_MELS,
    SAMPLE_RATE,
)

MEL_FMIN, MEL_FMAX = 55.0, 7600.0
PREEMPHASIS = 0.97
SILENCE = -4.0  # the normalised value of a mel bin at the 1e-5 amplitude floor

_MIN_LEVEL = 1e-5  # reference: exp(-5 * ln 10), i.e. -100 dB
_REF_LEVEL_DB = 20.0
_STFT_BLOCK = 128  # mel frames per STFT block (1.6 s of audio)
_MAX_KEPT_SAMPLES = 60 * SAMPLE_RATE  # longest padded input whose buffer a thread keeps


@functools.cache
def _mel_basis() -> np.ndarray:
    """The reference's [80, 401] Slaney filterbank, float32 weights: `librosa.filters.mel(sr,
    n_fft, n_mels, fmin, fmax)` with its defaults (Slaney scale, Slaney area normalisation),
    computed the way librosa computes it, so equal to it bit for bit."""
    freqs = np.fft.rfftfreq(N_FFT, 1.0 / SAMPLE_RATE)
    edges = _mel_to_hz(np.linspace(_hz_to_mel(MEL_FMIN), _hz_to_mel(MEL_FMAX), N_MELS + 2))
    width = np.diff(edges)
    ramps = np.subtract.outer(edges, freqs)
    # band i: a triangle rising from edge i to edge i+1, falling to edge i+2
    rising, falling = -ramps[:-2] / width[:-1, None], ramps[2:] / width[1:, None]
    weights = np.maximum(0.0, np.minimum(rising, falling)).astype(np.float32)
    weights *= (2.0 / (edges[2:] - edges[:-2]))[:, None]  # each band's area the same
    return weights


# Slaney's mel scale (librosa's default, htk=False): linear below 1 kHz, logarithmic above
_MEL_HZ_STEP = 200.0 / 3       # Hz per mel below 1 kHz
_LOG_HZ = 1000.0
_LOG_MEL = _LOG_HZ / _MEL_HZ_STEP
_LOG_STEP = np.log(6.4) / 27.0  # ln of the frequency ratio per mel above 1 kHz


def _hz_to_mel(hz: float) -> float:
    if hz < _LOG_HZ:
        return hz / _MEL_HZ_STEP
    return float(_LOG_MEL + np.log(hz / _LOG_HZ) / _LOG_STEP)


def _mel_to_hz(mels: np.ndarray) -> np.ndarray:
    hz = _MEL_HZ_STEP * mels
    log = mels >= _LOG_MEL
    hz[log] = _LOG_HZ * np.exp(_LOG_STEP * (mels[log] - _LOG_MEL))
    return hz


class _SparseMel(NamedTuple):
    bins: np.ndarray  # FFT bin of each weight, band after band
    weights: np.ndarray  # float64 weights, same order
    starts: np.ndarray  # offset of each band's first weight (np.add.reduceat segments)


@functools.cache
def _mel_projection() -> _SparseMel:
    """The filterbank as contiguous per-band bin ranges (739 weights instead of 32080)."""
    # Why not `magnitude @ basis`: OpenBLAS threads that matmul, and on a busy host its
    # threads spin against the compositor and ONNX Runtime (measured on a loaded 2-core
    # host: the projection for 10 s of audio went from ~1 ms to 8 ms, the whole mel of
    # 0.64 s from 0.2 ms to 20 ms). The banded sum is single-threaded numpy and costs about
    # the same as single-threaded BLAS.
    # The reference multiplies the float32 weights in float64 (its spectrum is complex128
    # because lfilter upcasts), so the weights are widened, not recomputed.
    basis = _mel_basis().astype(np.float64)
    bins: list[np.ndarray] = []
    weights: list[np.ndarray] = []
    for band in basis:
        nonzero = np.flatnonzero(band)
        # A band without weights would make reduceat return a neighbour's value; give it
        # one zero weight instead (does not happen for these parameters, kept for safety).
        lo, hi = (int(nonzero[0]), int(nonzero[-1]) + 1) if nonzero.size else (0, 1)
        bins.append(np.arange(lo, hi))
        weights.append(band[lo:hi])
    sizes = np.array([b.size for b in bins])
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    return _SparseMel(np.concatenate(bins), np.concatenate(weights), starts)


@functools.cache
def _hann_periodic() -> np.ndarray:
    # Denominator N, not N-1: scipy.signal.get_window('hann', 800, fftbins=True), which is
    # what librosa.stft uses by default. The symmetric form fails the 1e-4 tolerance.
    i = np.arange(N_FFT, dtype=np.float64)
    return 0.5 - 0.5 * np.cos(2.0 * np.pi * i / N_FFT)


def warm_up() -> None:
    """Build the filterbank and run a tiny mel so the first request pays nothing extra."""
    melspectrogram(np.zeros(N_FFT, dtype=np.float32))


def resample_to_16k(samples: np.ndarray, sample_rate: int) -> np.ndarray:
    """float32 mono samples at `sample_rate` → float32 at 16 kHz (identity at 16 kHz)."""
    x = np.asarray(samples, dtype=np.float32)
    if x.ndim != 1:
        raise ValueError(f"Audio must be mono (1-D samples), got shape {x.shape}")
    if isinstance(sample_rate, bool) or int(sample_rate) != sample_rate:
        raise ValueError(f"sample_rate must be an integer, got {sample_rate!r}")
    rate = int(sample_rate)
    if not MIN_SAMPLE_RATE <= rate <= MAX_SAMPLE_RATE:
        raise ValueError(
            f"Unsupported sample_rate {rate} Hz: must be between "
            f"{MIN_SAMPLE_RATE} and {MAX_SAMPLE_RATE} Hz"
        )
    if rate == SAMPLE_RATE or x.size == 0:
        return x
    return np.asarray(soxr.resample(x, rate, SAMPLE_RATE, quality="HQ"), dtype=np.float32)


class _Scratch(threading.local):
    """Per-thread work buffers of the STFT, reused from call to call.

    Fresh multi-megabyte temporaries come from mmap and are returned on free, so every
    call page-faulted them in again: half of the mel's time was minor faults (10 s of
    audio: 5.3 ms with ~1200 faults per call, 2.9 ms without).
    """

    def __init__(self) -> None:
        self.padded = np.empty(0, dtype=np.float64)
        self.windowed = np.empty((_STFT_BLOCK, N_FFT), dtype=np.float64)
        self.magnitude = np.empty((_STFT_BLOCK, N_FFT // 2 + 1), dtype=np.float64)
        self.gathered = np.empty((_STFT_BLOCK, 0), dtype=np.float64)  # sized on first use
        self.mel = np.empty((_STFT_BLOCK, N_MELS), dtype=np.float64)

    def gathered_buffer(self, weights: int) -> np.ndarray:
        # Sized lazily: asking the projection here would build the filterbank at import.
        if self.gathered.shape[1] != weights:
            self.gathered = np.empty((_STFT_BLOCK, weights), dtype=np.float64)
        return self.gathered

    def padded_buffer(self, size: int) -> np.ndarray:
        if size > _MAX_KEPT_SAMPLES:
            return np.empty(size, dtype=np.float64)  # rare long audio: don't hold it forever
        if self.padded.size < size:
            self.padded = np.empty(size, dtype=np.float64)
        return self.padded[:size]


_scratch = _Scratch()


def melspectrogram(samples: np.ndarray, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """Normalised log-mel, float32 [1 + n // 200, 80], time-major, values in [-4, 4]."""
    if sample_rate != SAMPLE_RATE:
        samples = resample_to_16k(samples, sample_rate)
    x = np.asarray(samples)
    if x.ndim != 1:
        raise ValueError(f"Audio must be mono (1-D samples), got shape {x.shape}")
    n = x.size
    pad = N_FFT // 2
    scratch = _scratch

    # float64 throughout, as the reference runs (lfilter upcasts): the result is ~1e-7 from
    # it, where float32 math lands at ~1.5e-5, uncomfortably close to the 1e-4 contract.
    # Pre-emphasis goes straight into the centre of the zero-padded buffer, computed as
    # lfilter([1, -0.97], [1], x) does: y[i] = x[i] + (-0.97)·x[i-1], in float64.
    padded = scratch.padded_buffer(n + 2 * pad)
    padded[:pad] = 0.0
    padded[pad + n :] = 0.0
    body = padded[pad : pad + n]
    if n:
        body[0] = x[0]
        np.multiply(x[:-1], -PREEMPHASIS, out=body[1:], dtype=np.float64)
        np.add(body[1:], x[1:], out=body[1:], dtype=np.float64)

    frames = sliding_window_view(padded, N_FFT)[::HOP]  # [1 + n // 200, 800], a view
    window, projection = _hann_periodic(), _mel_projection()
    gathered_buffer = scratch.gathered_buffer(projection.bins.size)
    out = np.empty((frames.shape[0], N_MELS), dtype=np.float32)
    # Blocks of frames keep the working set (~3 MB) in cache and in the reused buffers.
    for a in range(0, frames.shape[0], _STFT_BLOCK):
        block = frames[a : a + _STFT_BLOCK]
        k = block.shape[0]
        windowed = np.multiply(block, window, out=scratch.windowed[:k])
        magnitude = np.abs(np.fft.rfft(windowed, axis=1), out=scratch.magnitude[:k])
        gathered = np.take(
            magnitude, projection.bins, axis=1, out=gathered_buffer[:k], mode="clip"
        )
        gathered *= projection.weights
        mel = np.add.reduceat(gathered, projection.starts, axis=1, out=scratch.mel[:k])
        # dB and normalisation in place, in the reference's order of operations:
        # S = 20·log10(max(1e-5, mel)) - 20;  clip(8·((S + 100) / 100) - 4, -4, 4).
        np.maximum(mel, _MIN_LEVEL, out=mel)
        np.log10(mel, out=mel)
        mel *= 20.0
        mel -= _REF_LEVEL_DB
        mel += 100.0
        mel /= 100.0
        mel *= 8.0
        mel -= 4.0
        np.clip(mel, -4.0, 4.0, out=mel)
        out[a : a + k] = mel
    return out
