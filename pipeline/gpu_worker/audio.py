"""Audio features of the gpu_worker: the mel (`mel.py`) → encoder windows → per-frame tensors.

The stages after the mel, in the order the worker calls them:

3. `mel_windows` — the Python reference window count `int((M - 16) / 80 * 25) + 2` (Go
   encoded two fewer) and start `int(80 * j / 25)` with the reference end clamp. A mel
   shorter than 16 rows (audio under ~0.2 s) is first padded with silence (-4) to 16 rows
   so that every length works; the reference would raise there.
4. `frame_features` — P = [f0, f0, f1 … f_{N-1}, f_{N-1}]; frame i takes rows P[i-8 .. i+7]
   with the clean rule (rows outside P are zeros), flattened and reshaped C-order to
   [32, 16, 16]. Go's overflow (more than 16 zero rows written past the end of P, a panic
   on the last frame of large batches) is not reproduced: any batch size and any
   number of encoded windows, including none, gives a well-formed tensor.
5. `replicated_features` — the deprecated `audio_features` path: one [32,16,16] tensor
   copied to every frame of the batch.
"""


from __future__ import annotations

from collections.abc import Callable

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from pipeline.gpu_worker.mel import SILENCE, melspectrogram
from pipeline.synctalk import (
    CONTEXT,
    ENCODED_DIM,
    FEATURE_BYTES,
    FRAME_FEATURE_SHAPE,
    HOP,
    MEL_FPS,
    MEL_STEP,
    N_MELS,
    VIDEO_FPS,
    stream_samples,
    stream_windows,
)


def _effective_mel_frames(num_mel_frames: int) -> int:
    # mel_windows pads a short mel to MEL_STEP rows; the count and the starts must agree.
    return max(int(num_mel_frames), MEL_STEP)


def window_count(num_mel_frames: int) -> int:
    """Number of encoder windows for a mel of M rows: the Python reference's data_len.

    M < 16 counts as 16 (mel_windows pads it), so the count is never below 2.
    """
    m = _effective_mel_frames(num_mel_frames)
    # Exactly the reference float expression: it truncates a few exact integers
    # (M = 384 gives 114.99999999999999 → 116 windows, not 117); matching it keeps window
    # j aligned with the reference's feature j.
    return int((m - MEL_STEP) / float(MEL_FPS) * float(VIDEO_FPS)) + 2


def window_start(j: int, num_mel_frames: int) -> int:
    """First mel row of window j: int(80 j / 25), clamped so the window ends at M."""
    m = _effective_mel_frames(num_mel_frames)
    start = (MEL_FPS * j) // VIDEO_FPS  # integer form of int(80. * (j / 25.)); equal for all j
    return m - MEL_STEP if start + MEL_STEP > m else start


def mel_windows(mel: np.ndarray) -> np.ndarray:
    """All encoder inputs of a request, [N, 1, 80, 16] float32, window j = mel[s_j:s_j+16].T.

    A mel with fewer than 16 rows is padded at the end with silence (-4) to 16 rows first,
    which yields 2 windows; the reference has no answer for such short audio.
    """
    mel = np.asarray(mel, dtype=np.float32)
    if mel.ndim != 2 or mel.shape[1] != N_MELS:
        raise ValueError(f"mel must be [M, {N_MELS}], got shape {mel.shape}")
    m = mel.shape[0]
    if m < MEL_STEP:
        mel = np.concatenate([mel, np.full((MEL_STEP - m, N_MELS), SILENCE, np.float32)])
        m = MEL_STEP
    count = window_count(m)
    j = np.arange(count, dtype=np.int64)
    starts = np.minimum((MEL_FPS * j) // VIDEO_FPS, m - MEL_STEP)
    # view[s, mel_bin, t] = mel[s + t, mel_bin]: already the transposed [80, 16] window.
    view = sliding_window_view(mel, MEL_STEP, axis=0)
    return np.ascontiguousarray(view[starts][:, None, :, :])


def frame_features(
    encoded: np.ndarray,
    batch_size: int,
    first_frame: int = 0,
    out: np.ndarray | None = None,
) -> np.ndarray:
    """Per-frame UNet audio input [B, 32, 16, 16] float32 from encoder outputs [N, 512].

    Frame i (absolute, i = first_frame .. first_frame + B - 1) takes rows P[i-8 .. i+7] of
    P = [f0, f0, f1 … f_{N-1}, f_{N-1}]; rows outside P are zeros. Computing a long audio
    batch by batch with `first_frame` gives the same frames as computing it all at once.
    """
    if batch_size < 0:
        raise ValueError(f"batch_size must be >= 0, got {batch_size}")
    if first_frame < 0:
        raise ValueError(f"first_frame must be >= 0, got {first_frame}")
    enc = np.asarray(encoded, dtype=np.float32)
    if enc.size == 0:
        enc = enc.reshape(0, ENCODED_DIM)
    if enc.ndim != 2 or enc.shape[1] != ENCODED_DIM:
        raise ValueError(f"encoded must be [N, {ENCODED_DIM}], got shape {enc.shape}")

    shape = (batch_size, *FRAME_FEATURE_SHAPE)
    if out is None:
        out = np.empty(shape, dtype=np.float32)
    elif out.shape != shape or out.dtype != np.float32 or not out.flags.c_contiguous:
        raise ValueError(
            f"out must be a C-contiguous float32 array of shape {shape}, "
            f"got {out.dtype} {out.shape}"
        )
    if batch_size == 0:
        return out
    n = enc.shape[0]
    rows = out.reshape(batch_size, 2 * CONTEXT, ENCODED_DIM)  # a view: [B, 16, 512]
    if n == 0:
        rows[...] = 0.0
        return out

    # P is never materialised: P[p] = enc[clip(p - 1, 0, N - 1)] for 0 <= p < N + 2, which
    # keeps the cost proportional to the batch, not to the length of the audio so far.
    p = (
        np.arange(first_frame, first_frame + batch_size, dtype=np.int64)[:, None]
        + np.arange(-CONTEXT, CONTEXT, dtype=np.int64)[None, :]
    )  # [B, 16]
    # mode="clip" (indices are in range already) lets take write into `out` unbuffered.
    np.take(enc, np.clip(p - 1, 0, n - 1), axis=0, out=rows, mode="clip")
    rows[(p < 0) | (p >= n + 2)] = 0.0
    return out


def request_features(encode: Callable[[np.ndarray], np.ndarray], samples: np.ndarray,
                     sample_rate: int, batch_size: int) -> np.ndarray:
    """[B,32,16,16] features of a request's whole audio: mel, every window through
    `encode` in one call, per-frame assembly (the InferBatchComposite audio stage)."""
    return frame_features(encode(mel_windows(melspectrogram(samples, sample_rate))), batch_size)


def replicated_features(feature_bytes: bytes | memoryview, batch_size: int) -> np.ndarray:
    """Deprecated path: one frame's [32,16,16] float32 LE tensor copied to [B, 32, 16, 16]."""
    n = memoryview(feature_bytes).nbytes
    if n != FEATURE_BYTES:
        raise ValueError(
            f"Invalid audio features size: got {n} bytes, expected {FEATURE_BYTES} bytes"
        )
    if batch_size < 0:
        raise ValueError(f"batch_size must be >= 0, got {batch_size}")
    frame = np.frombuffer(feature_bytes, dtype="<f4").reshape(FRAME_FEATURE_SHAPE)
    return np.broadcast_to(frame.astype(np.float32), (batch_size, *FRAME_FEATURE_SHAPE)).copy()


# ---------------------------------------------------------------- streaming

def stream_frame_features(
    encode: Callable[[np.ndarray], np.ndarray],
    samples: np.ndarray,
    offset: int,
    first_frame: int,
    batch: int,
) -> np.ndarray:
    """[B,32,16,16] features of frames first_frame.. of a stream, from 16 kHz `samples`
    that start at sample `offset` of the stream and cover stream_samples(first_frame, B).

    Equal to frame_features of the whole stream for these frames (see above).
    """
    need_lo, need_hi = stream_samples(first_frame, batch)
    if offset % HOP or offset > need_lo or offset + len(samples) < need_hi:
        raise ValueError(f"stream audio [{offset}, {offset + len(samples)}) does not cover "
                         f"[{need_lo}, {need_hi}) hop-aligned")
    mel = melspectrogram(samples[need_lo - offset : need_hi - offset])
    lo, hi = stream_windows(first_frame, batch)
    starts = np.array([int(MEL_FPS * j / VIDEO_FPS) for j in range(lo, hi)]) - need_lo // HOP
    windows = sliding_window_view(mel, MEL_STEP, axis=0)[starts]  # [J, 80, 16]
    encoded = encode(np.ascontiguousarray(windows[:, None], dtype=np.float32))
    # frame i, row r (0..15): P[i - 8 + r] = f[max(i - 9 + r, 0)], zero where i - 8 + r < 0
    p = np.arange(first_frame, first_frame + batch)[:, None] - CONTEXT + np.arange(2 * CONTEXT)
    rows = encoded[np.maximum(p - 1, 0) - lo]
    rows[p < 0] = 0.0
    return rows.reshape(batch, *FRAME_FEATURE_SHAPE)
