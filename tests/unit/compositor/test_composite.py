"""Pasting a predicted mouth crop into its background (synctalk and stretch) and JPEG encoding."""
from __future__ import annotations

import json

import cv2
import numpy as np
import pytest

from pipeline.compositor.composite import go_bilinear_resize, paste, prediction_to_bgr
from pipeline.compositor.jpeg_splice import encode_jpeg
from tests.conftest import reference_file

H, W = 720, 1280
RECT = (500, 300, 692, 492)  # 192x192, the demo's crop size


def _constant_prediction(bgr: tuple[int, int, int]) -> np.ndarray:
    """A [3,320,320] prediction whose pixel conversion is exactly `bgr`."""
    pred = np.empty((3, 320, 320), np.float32)
    for c, v in enumerate(bgr):
        pred[c] = (v + 0.5) / 255.0
    return pred


def _noise_background(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (H, W, 3), dtype=np.uint8)


# --- pixel conversion -----------------------------------------------------------------------


@pytest.mark.parametrize("value, byte", [
    (0.5, 127), (0.8, 204), (0.0, 0), (1.0, 255), (0.999, 254), (0.0039, 0),
    (-0.2, 0), (-1e9, 0), (1.2, 255), (1e9, 255),
    (float("nan"), 0), (float("inf"), 255), (float("-inf"), 0),
])
def test_pixel_conversion(value: float, byte: int) -> None:
    """x255 then truncate (0.5->127, 0.8->204), clamp to [0, 255], NaN -> 0, as the reference."""
    pred = np.full((3, 320, 320), value, np.float32)
    out = prediction_to_bgr(pred)
    assert out.dtype == np.uint8 and out.shape == (320, 320, 3)
    assert (out == byte).all()


def test_pixel_conversion_of_mixed_values_is_each_values_own() -> None:
    """NaN and infinities scattered among ordinary values (float32 and float16) convert
    pixel by pixel as each does alone; the others are untouched by them."""
    rng = np.random.default_rng(3)
    pred = rng.normal(0.5, 0.8, (3, 320, 320)).astype(np.float32)
    pred.flat[::7], pred.flat[1::11], pred.flat[2::13] = np.nan, np.inf, -np.inf
    for p in (pred, pred.astype(np.float16)):
        with np.errstate(invalid="ignore"):
            scaled = p.astype(np.float32) * np.float32(255)
        expected = np.where(np.isnan(scaled), 0, np.clip(scaled, 0, 255)).astype(np.uint8)
        np.testing.assert_array_equal(prediction_to_bgr(p), expected.transpose(1, 2, 0))


def test_pixel_conversion_keeps_channel_order_and_layout() -> None:
    """Channel c of the CHW prediction becomes channel c of the HWC image, pixel for pixel."""
    rng = np.random.default_rng(1)
    pred = rng.random((3, 320, 320), dtype=np.float32)
    out = prediction_to_bgr(pred)
    np.testing.assert_array_equal(out, (pred.transpose(1, 2, 0) * 255).astype(np.uint8))
    assert out[7, 11, 2] == int(pred[2, 7, 11] * 255)


# --- paste ----------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["synctalk", "stretch"])
def test_outside_rect_untouched_and_input_unmodified(mode: str) -> None:
    """Pixels outside the rect are exactly the background's; the background passed in is not modified."""
    background = _noise_background()
    before = background.copy()
    frame = paste(background, _constant_prediction((1, 2, 3)), RECT, mode)
    np.testing.assert_array_equal(background, before)
    assert frame is not background and frame.shape == background.shape
    x1, y1, x2, y2 = RECT
    outside = np.ones((H, W), bool)
    outside[y1:y2, x1:x2] = False
    np.testing.assert_array_equal(frame[outside], background[outside])
    assert not np.array_equal(frame[y1:y2, x1:x2], background[y1:y2, x1:x2])


def test_stretch_constant_fills_rect() -> None:
    """Stretch mode with a constant prediction fills the whole rect, border included, with it."""
    colour = (200, 150, 100)
    frame = paste(_noise_background(), _constant_prediction(colour), RECT, "stretch")
    x1, y1, x2, y2 = RECT
    assert (frame[y1:y2, x1:x2] == colour).all()


def test_synctalk_keeps_thin_original_border() -> None:
    """Synctalk mode keeps the crop's 4/328 border (about 2 px at 192 px); the centre is the prediction."""
    original, colour = (10, 20, 30), (200, 150, 100)
    background = np.zeros((H, W, 3), np.uint8)
    background[:] = original
    frame = paste(background, _constant_prediction(colour), RECT, "synctalk")
    x1, y1, x2, y2 = RECT
    patch = frame[y1:y2, x1:x2].astype(int)
    # the centre, from 3 px in, is exactly the prediction
    assert (patch[3:-3, 3:-3] == colour).all()
    # the outer 2 px on each side are the original crop (cubic ringing: within 2 levels)
    for edge in (patch[:2], patch[-2:], patch[:, :2], patch[:, -2:]):
        assert np.abs(edge - original).max() <= 2
    # the third pixel is the transition, neither colour
    for line in (patch[2, 3:-3], patch[-3, 3:-3], patch[3:-3, 2], patch[3:-3, -3]):
        assert (np.abs(line - original).max(axis=-1) > 10).all()
        assert (np.abs(line - colour).max(axis=-1) > 10).all()


def test_synctalk_differs_from_stretch() -> None:
    """The two modes are different pastes of the same prediction (border and scale)."""
    background = _noise_background(3)
    pred = np.random.default_rng(4).random((3, 320, 320), dtype=np.float32)
    a = paste(background, pred, RECT, "synctalk")
    b = paste(background, pred, RECT, "stretch")
    assert not np.array_equal(a, b)


def test_real_face_crops_golden() -> None:
    """Real crops pasted (synctalk) at real rects equal the crop cubic-resized, within 1 level inside."""
    crops = np.load(reference_file("face_crops_328.npy"))[..., ::-1]  # RGB -> BGR
    rects = json.loads((reference_file("crop_rects_1280x720.json")).read_text())
    background = _noise_background(5)
    for i, crop in enumerate(crops):
        crop = np.ascontiguousarray(crop)
        x1, y1, x2, y2 = rects[i * 100]
        pred = crop[4:324, 4:324].transpose(2, 0, 1).astype(np.float32) / 255.0
        frame = paste(background, pred, (x1, y1, x2, y2), "synctalk")
        expected = cv2.resize(crop, (x2 - x1, y2 - y1), interpolation=cv2.INTER_CUBIC)
        diff = np.abs(frame[y1:y2, x1:x2].astype(int) - expected)
        assert diff[3:-3, 3:-3].max() <= 1, f"crop {i}"
        assert diff[3:-3, 3:-3].mean() < 0.05, f"crop {i}"
        # the outermost pixel ring comes from the (noise) background, not from the crop
        assert diff[0].mean() > 20


# --- JPEG -----------------------------------------------------------------------------------


def test_jpeg_round_trip() -> None:
    """encode_jpeg gives a JPEG that decodes to the frame's size, close to the frame; quality matters."""
    crops = np.load(reference_file("face_crops_328.npy"))[..., ::-1]
    frame = np.zeros((H, W, 3), np.uint8)
    frame[:] = (90, 120, 150)
    frame[100:428, 200:528] = crops[0]
    jpeg = encode_jpeg(frame, 75)
    assert isinstance(jpeg, bytes) and jpeg[:2] == b"\xff\xd8" and jpeg[-2:] == b"\xff\xd9"
    decoded = cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR)
    assert decoded.shape == (H, W, 3)
    assert np.abs(decoded.astype(int) - frame).mean() < 3
    assert len(encode_jpeg(frame, 95)) > len(jpeg) > len(encode_jpeg(frame, 30))


def _go_resize_loop(image: np.ndarray, w: int, h: int) -> np.ndarray:
    """The Go server's bilinear resize, transliterated pixel by pixel (float32 math, truncation)."""
    src_h, src_w = image.shape[:2]
    out = np.zeros((h, w, image.shape[2]), np.uint8)
    scale_x, scale_y = np.float32(src_w) / np.float32(w), np.float32(src_h) / np.float32(h)
    for dy in range(h):
        sy = np.float32(dy) * scale_y
        y0 = int(sy)
        y1, fy = min(y0 + 1, src_h - 1), np.float32(sy - y0)
        for dx in range(w):
            sx = np.float32(dx) * scale_x
            x0 = int(sx)
            x1, fx = min(x0 + 1, src_w - 1), np.float32(sx - x0)
            c00, c10 = image[y0, x0].astype(np.float32), image[y0, x1].astype(np.float32)
            c01, c11 = image[y1, x0].astype(np.float32), image[y1, x1].astype(np.float32)
            v = (c00 * (1 - fx) + c10 * fx) * (1 - fy) + (c01 * (1 - fx) + c11 * fx) * fy
            out[dy, dx] = v.astype(np.uint8)
    return out


@pytest.mark.parametrize("w, h", [(192, 192), (173, 189), (400, 330), (50, 37)])
def test_go_bilinear_resize_matches_the_go_formula(w: int, h: int) -> None:
    """Stretch mode's resize equals the Go server's per-pixel formula exactly (no offset)."""
    image = np.random.default_rng(w * h).integers(0, 256, (320, 320, 3), dtype=np.uint8)
    np.testing.assert_array_equal(go_bilinear_resize(image, w, h), _go_resize_loop(image, w, h))


def test_go_bilinear_has_no_half_pixel_offset() -> None:
    """The Go resize differs from cv2's half-pixel-centred bilinear (why it is hand-written)."""
    image = np.random.default_rng(1).integers(0, 256, (320, 320, 3), dtype=np.uint8)
    ours = go_bilinear_resize(image, 192, 192).astype(int)
    theirs = cv2.resize(image, (192, 192), interpolation=cv2.INTER_LINEAR).astype(int)
    assert np.abs(ours - theirs).mean() > 5
    # and pixel (0, 0) is exactly the source's (0, 0): sx = sy = 0
    np.testing.assert_array_equal(ours[0, 0], image[0, 0])


def test_go_bilinear_centre_of_a_two_by_two() -> None:
    """The Go tests' case: the centre between 0 and 255 interpolates to 127 (truncated)."""
    image = np.array([[[0] * 3, [255] * 3], [[0] * 3, [255] * 3]], np.uint8)
    out = go_bilinear_resize(image, 4, 4)
    assert out[0, 0, 0] == 0 and out[0, 1, 0] == 127  # sx = 0.5 -> 127.5 -> 127
