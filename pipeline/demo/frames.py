"""The demo avatar's background frames: a drawn cartoon face that sways a few pixels
(period 50 and 25 frames, so the 250-frame loop is seamless) with a big frame counter
top-left, so a test can tell which background came back, and the crop rect that follows
the face exactly (same integer offset), so the mouth sits at one fixed place in every
320×320 crop."""
from __future__ import annotations

import math
from functools import cache

import cv2
import numpy as np

FRAME_W, FRAME_H = 1280, 720

# --- Face geometry (frame pixels). The face centre moves by _motion(index). -------------
FACE_CX, FACE_CY = 640, 330
FACE_AX, FACE_AY = 135, 175  # skin ellipse half-axes
MOUTH_DY = 95  # mouth line below the face centre
MOUTH_HALF_W = 34
CROP_SIZE = 192  # square crop rect side, like SyncTalk's 173–189 px for 1280×720
CROP_DY = 5  # crop top below the face centre (nose line); bottom is 22 px below the chin

COUNTER_ORIGIN = (30, 110)
COUNTER_BOX = (20, 20, 340, 135)

_SKIN = (150, 190, 235)
_SKIN_SHADE = (120, 160, 210)
_HAIR = (40, 45, 60)
_LIP_LINE = (95, 90, 175)




def _motion(index: int) -> tuple[int, int]:
    """Integer head offset of frame `index`: a slow sway and a faster bob, periodic in 50."""
    phase = 2.0 * math.pi * (index % 50) / 50.0
    dx = round(6.0 * math.sin(phase))
    dy = round(3.0 * math.sin(2.0 * phase + 0.7))
    return int(dx), int(dy)


def _face_centre(index: int) -> tuple[int, int]:
    dx, dy = _motion(index)
    return FACE_CX + dx, FACE_CY + dy


def demo_crop_rect(index: int) -> tuple[int, int, int, int]:
    """[x1, y1, x2, y2] (half-open, square) of the face's lower half in frame `index`."""
    cx, cy = _face_centre(index)
    x1 = cx - CROP_SIZE // 2
    y1 = cy + CROP_DY
    return x1, y1, x1 + CROP_SIZE, y1 + CROP_SIZE


@cache
def _backdrop() -> np.ndarray:
    """The static part of every frame: gradient wall, a window, a shelf, the shoulders."""
    ys = np.linspace(0.0, 1.0, FRAME_H, dtype=np.float32)[:, None, None]
    xs = np.linspace(0.0, 1.0, FRAME_W, dtype=np.float32)[None, :, None]
    top = np.array([190, 170, 150], np.float32)  # BGR: a soft blue-grey wall
    bottom = np.array([120, 110, 100], np.float32)
    img = top + (bottom - top) * ys - 25.0 * (xs - 0.5) ** 2
    img = np.clip(np.rint(img), 0, 255).astype(np.uint8)

    # A window on the right and a shelf on the left, so the scene is not a flat card.
    cv2.rectangle(img, (960, 90), (1180, 330), (235, 215, 190), -1)
    cv2.rectangle(img, (960, 90), (1180, 330), (90, 80, 70), 8)
    cv2.line(img, (1070, 90), (1070, 330), (90, 80, 70), 6)
    cv2.line(img, (960, 210), (1180, 210), (90, 80, 70), 6)
    cv2.rectangle(img, (60, 430), (330, 448), (60, 90, 120), -1)
    for i, colour in enumerate([(60, 60, 170), (150, 110, 40), (50, 140, 60), (40, 140, 200)]):
        cv2.rectangle(img, (80 + 50 * i, 340 + 12 * (i % 2)), (118 + 50 * i, 430), colour, -1)

    # Shoulders and shirt.
    cv2.ellipse(img, (FACE_CX, 760), (330, 190), 0, 180, 360, (110, 70, 40), -1, cv2.LINE_AA)
    cv2.ellipse(img, (FACE_CX, 585), (60, 28), 0, 0, 180, (90, 55, 30), -1, cv2.LINE_AA)
    img.setflags(write=False)
    return img


def draw_background_frame(index: int) -> np.ndarray:
    """Frame `index` as drawn (H×W×3 uint8 BGR), before JPEG encoding."""
    img = _backdrop().copy()
    cx, cy = _face_centre(index)
    aa = cv2.LINE_AA

    # Neck, hair behind the head, ears, face.
    cv2.rectangle(img, (cx - 48, cy + 120), (cx + 48, 600), _SKIN_SHADE, -1)
    cv2.ellipse(img, (cx, cy - 30), (FACE_AX + 18, FACE_AY - 5), 0, 180, 360, _HAIR, -1, aa)
    for side in (-1, 1):
        ear = (cx + side * (FACE_AX - 4), cy + 5)
        cv2.ellipse(img, ear, (20, 34), 0, 0, 360, _SKIN_SHADE, -1, aa)
    cv2.ellipse(img, (cx, cy), (FACE_AX, FACE_AY), 0, 0, 360, _SKIN, -1, aa)
    cv2.ellipse(img, (cx, cy - 92), (FACE_AX - 6, 88), 0, 180, 360, _HAIR, -1, aa)

    # Eyes (with a blink twice per 250-frame loop), brows.
    blink = (index % 125) in (60, 61, 62)
    for side in (-1, 1):
        ex, ey = cx + side * 50, cy - 35
        cv2.line(img, (ex - side * 20, ey - 33), (ex + side * 24, ey - 38), _HAIR, 6, aa)
        if blink:
            cv2.line(img, (ex - 22, ey), (ex + 22, ey), (60, 70, 90), 3, aa)
            continue
        cv2.ellipse(img, (ex, ey), (24, 14), 0, 0, 360, (245, 245, 245), -1, aa)
        cv2.circle(img, (ex, ey), 10, (40, 70, 110), -1, aa)
        cv2.circle(img, (ex, ey), 5, (15, 15, 15), -1, aa)
        cv2.circle(img, (ex + 3, ey - 4), 2, (255, 255, 255), -1, aa)

    # Nose and a closed, neutral mouth line (the UNet draws the open mouth over it).
    cv2.line(img, (cx, cy - 5), (cx - 8, cy + 22), _SKIN_SHADE, 3, aa)
    cv2.ellipse(img, (cx, cy + 24), (16, 8), 0, 0, 180, _SKIN_SHADE, 3, aa)
    cv2.ellipse(img, (cx, cy + MOUTH_DY - 3), (MOUTH_HALF_W - 7, 4), 0, 25, 155, _LIP_LINE, 3, aa)
    for side in (-1, 1):
        cv2.circle(img, (cx + side * 78, cy + 50), 18, (140, 165, 240), -1, aa)

    # Frame counter, large enough that any two frames differ clearly in this corner.
    text = f"#{index:04d}"
    font = cv2.FONT_HERSHEY_SIMPLEX
    cv2.putText(img, text, COUNTER_ORIGIN, font, 3.0, (30, 30, 30), 14, aa)
    cv2.putText(img, text, COUNTER_ORIGIN, font, 3.0, (255, 255, 255), 6, aa)
    return img


