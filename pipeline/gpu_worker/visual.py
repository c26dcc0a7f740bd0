"""The SyncTalk-2D visual input of one frame, as a client following the convention builds it
(reference-pipeline.md §2): crop the rect, cubic resize to 328, take the inner 320, and
stack it with a copy whose mouth region is blacked out; BGR / 255, CHW.
"""
from __future__ import annotations

import cv2
import numpy as np

CROP = 328
INNER = slice(4, 324)
# The client's own call (inference_328.py), kept verbatim: what it blacks out is, by
# definition, the convention the model was trained with.
MASK_RECT = (5, 5, 310, 305)


def visual_input(frame: np.ndarray, rect: tuple[int, int, int, int],
                 out: np.ndarray | None = None) -> np.ndarray:
    """[6,320,320] float32 for a BGR uint8 frame and its crop rect (x1, y1, x2, y2)."""
    x1, y1, x2, y2 = rect
    crop = cv2.resize(frame[y1:y2, x1:x2], (CROP, CROP), interpolation=cv2.INTER_CUBIC)
    ref = crop[INNER, INNER]
    masked = ref.copy()
    cv2.rectangle(masked, MASK_RECT, (0, 0, 0), -1)
    if out is None:
        out = np.empty((6, 320, 320), np.float32)
    np.multiply(ref.transpose(2, 0, 1), 1 / 255.0, out=out[:3], casting="unsafe")
    np.multiply(masked.transpose(2, 0, 1), 1 / 255.0, out=out[3:], casting="unsafe")
    return out
