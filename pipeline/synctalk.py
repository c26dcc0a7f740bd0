"""The SyncTalk-2D model contract: every number the roles and clients share.

One clock: 16 kHz audio, 25 video frames per second, so frame i shows samples
[640 i, 640 (i + 1)) and carries the media timestamp 40 i ms. The model sees the audio
encoder's features of ±8 frames around each frame (its look-ahead), computed from an 80-band
mel (n_fft 800, hop 200, 80 mel rows per second) in windows of 16 rows. The UNet takes
[B,6,320,320] (a 328 crop's inner 320 and a copy with the mouth blacked out) and
[B,32,16,16] features, and predicts [B,3,320,320] BGR in [0,1]. Every role imports this
module; none restates these numbers.
"""
from __future__ import annotations

import cv2
import numpy as np

# ---- the clock ---------------------------------------------------------------------------
SAMPLE_RATE = 16000                    # the model's audio rate (others are resampled)
VIDEO_FPS = 25
FRAME_SAMPLES = SAMPLE_RATE // VIDEO_FPS  # 640: one frame's audio
FRAME_US = 1_000_000 // VIDEO_FPS      # 40,000: one frame's media time
MIN_SAMPLE_RATE, MAX_SAMPLE_RATE = 8000, 192000  # rates a client may declare

# ---- the audio features ------------------------------------------------------------------
N_FFT, HOP, N_MELS = 800, 200, 80
MEL_FPS = SAMPLE_RATE // HOP           # 80 mel rows per second
MEL_STEP = 16                          # mel rows per encoder window
MEL_WINDOW_SHAPE = (1, N_MELS, MEL_STEP)
ENCODED_DIM = 512                      # the audio encoder's output per window
CONTEXT = 8                            # feature rows taken on each side of a frame
FRAME_FEATURE_SHAPE = (32, 16, 16)     # one frame's features ((2 * CONTEXT) x 512 floats)
FEATURE_BYTES = 32768                  # of float32 (the deprecated audio_features field)

# ---- the UNet ----------------------------------------------------------------------------
MAX_BATCH = 32                         # frames per request
VISUAL_SHAPE = (6, 320, 320)
AUDIO_SHAPE = FRAME_FEATURE_SHAPE
PREDICTION_SHAPE = (3, 320, 320)
VISUAL_BYTES = 6 * 320 * 320 * 4       # one frame's visual input, float32
PREDICTION_BYTES = 3 * 320 * 320 * 4   # one frame's prediction, float32

# ---- the face crop -----------------------------------------------------------------------
CROP = 328                             # the rect is resized to CROP x CROP ...
INNER = slice(4, 324)                  # ... and the model sees its inner 320 x 320
# The client's own call (inference_328.py), kept verbatim: what it blacks out is, by
# definition, the convention the model was trained with.
MASK_RECT = (5, 5, 310, 305)


MOUTH_SHAPE = (3, 320, 320)            # a frame's crop as the visual input holds it, uint8


def mouth_crop(frame: np.ndarray, rect: tuple[int, int, int, int],
               out: np.ndarray | None = None) -> np.ndarray:
    """[3,320,320] uint8 BGR planes of a frame's crop rect (x1, y1, x2, y2), as the
    SyncTalk-2D client cuts it: cubic resize to 328, the inner 320. The costly part of a
    visual input, and the same for every request showing this frame."""
    x1, y1, x2, y2 = rect
    crop = cv2.resize(frame[y1:y2, x1:x2], (CROP, CROP), interpolation=cv2.INTER_CUBIC)
    if out is None:
        out = np.empty(MOUTH_SHAPE, np.uint8)
    out[...] = crop[INNER, INNER].transpose(2, 0, 1)
    return out


def visual_input_of(mouth: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """[6,320,320] float32 of a mouth crop (`mouth_crop`): its planes / 255, stacked with a
    copy whose mouth region is black."""
    if out is None:
        out = np.empty(VISUAL_SHAPE, np.float32)
    # in float32: x / 255 rounded once is bit-equal to the reference's float64 x * (1/255)
    # cast to float32 for every byte (checked for all 256)
    np.divide(mouth, np.float32(255), out=out[:3], dtype=np.float32, casting="unsafe")
    # the masked copy: the same planes with the mouth rect black, as cv2.rectangle fills
    # a rect (x, y, w, h) with thickness -1
    out[3:] = out[:3]
    x, y, w, h = MASK_RECT
    out[3:, y:y + h, x:x + w] = 0
    return out


def visual_input(frame: np.ndarray, rect: tuple[int, int, int, int],
                 out: np.ndarray | None = None) -> np.ndarray:
    """[6,320,320] float32 for a BGR uint8 frame and its crop rect (x1, y1, x2, y2), as a
    client following the SyncTalk-2D convention builds it: crop, cubic resize
    to 328, inner 320, stacked with a copy whose mouth region is black; BGR / 255, CHW."""
    return visual_input_of(mouth_crop(frame, rect), out)


# ---- a stream's frames -------------------------------------------------------------------
# A stream's frames are those of the whole audio computed at once: frame i takes the
# feature rows P[i-8 .. i+7] with P[p] = f[max(p - 1, 0)] (the reference's duplicated first
# window), p < 0 giving zeros; window j starts at mel row int(80 j / 25). Frames are only
# computed once every window they use lies before the end of the audio (a flushed stream
# is padded with silence far enough for that), so the end clamp and the duplicated last
# window never apply and a slice of the audio gives exactly the whole audio's values.

MEL_EXACT_FROM = 3  # rows 0..2 of a slice's mel see its start (pre-emphasis, padding)


def stream_windows(first_frame: int, batch: int) -> tuple[int, int]:
    """The encoder windows [lo, hi) that frames first_frame .. first_frame+batch-1 use."""
    return max(0, first_frame - CONTEXT - 1), first_frame + batch + CONTEXT - 2


def stream_samples(first_frame: int, batch: int) -> tuple[int, int]:
    """The audio samples [lo, hi) those frames depend on; lo is a multiple of the hop."""
    lo, hi = stream_windows(first_frame, batch)
    first_row = int(MEL_FPS * lo / VIDEO_FPS)
    last_row = int(MEL_FPS * (hi - 1) / VIDEO_FPS) + MEL_STEP - 1
    slice_row = max(0, first_row - MEL_EXACT_FROM)
    return slice_row * HOP, last_row * HOP + N_FFT // 2
