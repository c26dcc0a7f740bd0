"""Crop rectangles from a SyncTalk-2D dataset's landmarks, by SyncTalk-2D's own rule.

Each frame's `landmarks/<i>.lms` holds 98 lines "x y" (the WFLW order). SyncTalk-2D's
inference reads them as float32, casts to int32 (truncating toward zero) and takes
x1 = lms[1].x, y1 = lms[52].y, x2 = lms[31].x, y2 = y1 + (x2 - x1): a square of the lower
face. The same rectangle is what it cropped while training, so it is what the model expects.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

LANDMARKS = 98
_X1, _Y1, _X2 = 1, 52, 31  # the landmarks the crop rule reads


class LandmarkError(Exception):
    """A frame's landmarks or rectangle cannot be used; the message names the frame."""


def read_landmarks(path: Path, frame: int) -> np.ndarray:
    """The [98, 2] landmarks of `frame` as SyncTalk-2D reads them (float32, then int32)."""
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        raise LandmarkError(f"frame {frame} has no landmarks ({path} is missing)") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise LandmarkError(f"frame {frame}: cannot read {path}: {exc}") from None
    try:
        points = np.array([line.split() for line in text.splitlines() if line.strip()],
                          dtype=np.float32)
    except ValueError:
        points = np.zeros((0,), np.float32)  # ragged or not numbers: the check below says so
    if points.shape != (LANDMARKS, 2) or not np.isfinite(points).all() \
            or np.abs(points).max() >= 2**31:
        raise LandmarkError(f"frame {frame}: {path} must hold {LANDMARKS} lines of two numbers "
                            "\"x y\"")
    return points.astype(np.int32)


def crop_rect(landmarks: np.ndarray) -> tuple[int, int, int, int]:
    """(x1, y1, x2, y2) of a frame's [98, 2] int32 landmarks, by SyncTalk-2D's rule."""
    x1, y1, x2 = int(landmarks[_X1, 0]), int(landmarks[_Y1, 1]), int(landmarks[_X2, 0])
    return x1, y1, x2, y1 + (x2 - x1)


def smooth(rects: np.ndarray, window: int) -> np.ndarray:
    """A centred moving average of the rectangles over `window` frames (fewer at the ends),
    truncated to int32 as the rule is; window 1 leaves them as they are."""
    if window <= 1:
        return rects
    values = rects.astype(np.float64)
    cumulative = np.concatenate([np.zeros((1, 4)), np.cumsum(values, axis=0)])
    n = len(rects)
    lo = np.clip(np.arange(n) - window // 2, 0, n)
    hi = np.clip(np.arange(n) + (window - 1 - window // 2) + 1, 0, n)
    means = (cumulative[hi] - cumulative[lo]) / (hi - lo)[:, None]
    return means.astype(np.int32)


def crop_rects(landmark_paths: list[Path], frame_sizes: list[tuple[int, int]],
               window: int = 1) -> np.ndarray:
    """[N, 4] int32 rectangles of frames 0..N-1 (smoothed over `window` frames), each checked
    to lie inside its (width, height) frame and to be non-empty."""
    rects = np.array([crop_rect(read_landmarks(path, i)) for i, path in enumerate(landmark_paths)],
                     dtype=np.int32).reshape(-1, 4)
    rects = smooth(rects, window)
    for i, ((x1, y1, x2, y2), (width, height)) in enumerate(zip(rects.tolist(), frame_sizes,
                                                                strict=True)):
        if not (0 <= x1 < x2 <= width and 0 <= y1 < y2 <= height):
            raise LandmarkError(
                f"frame {i}: its crop rectangle [{x1}, {y1}, {x2}, {y2}] (from "
                f"{landmark_paths[i]}) does not lie inside the {width}x{height} frame")
    return rects
