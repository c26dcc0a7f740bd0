"""The SyncTalk-2D 6-channel visual input built from a background frame and its crop rect."""
from __future__ import annotations

import json

import cv2
import numpy as np
import pytest

from pipeline.synctalk import visual_input
from tests.conftest import reference_file

RECT = (532, 210, 714, 392)  # a real rect of the reference avatar (182 px)


@pytest.fixture(scope="module")
def frame() -> np.ndarray:
    """A 1280x720 BGR frame: noise with a real face crop resized into the rect."""
    rng = np.random.default_rng(11)
    image = rng.integers(0, 256, (720, 1280, 3), dtype=np.uint8)
    crop = np.ascontiguousarray(np.load(reference_file("face_crops_328.npy"))[0, ..., ::-1])
    x1, y1, x2, y2 = RECT
    image[y1:y2, x1:x2] = cv2.resize(crop, (x2 - x1, y2 - y1), interpolation=cv2.INTER_AREA)
    return image


def _reference_inner(frame: np.ndarray, rect: tuple[int, int, int, int]) -> np.ndarray:
    """inference_328.py: cubic resize of the crop to 328, inner 320 (HWC uint8)."""
    x1, y1, x2, y2 = rect
    crop = cv2.resize(frame[y1:y2, x1:x2], (328, 328), interpolation=cv2.INTER_CUBIC)
    return crop[4:324, 4:324]


def _mask() -> np.ndarray:
    """1 where the masked copy keeps the pixel, 0 where cv2.rectangle((5,5,310,305)) blacks it out."""
    ones = np.ones((320, 320), np.uint8)
    cv2.rectangle(ones, (5, 5, 310, 305), 0, -1)
    return ones


def test_shape_dtype_range(frame: np.ndarray) -> None:
    """The input is [6,320,320] float32 in [0,1]."""
    out = visual_input(frame, RECT)
    assert out.shape == (6, 320, 320) and out.dtype == np.float32
    assert out.min() >= 0.0 and out.max() <= 1.0
    assert out[:3].max() > 0.9 and out[:3].min() < 0.1


def test_reference_channels_are_inner_320_of_cubic_328(frame: np.ndarray) -> None:
    """Channels 0-2 are the inner 320 of the cubic 328 resize, BGR order, divided by 255."""
    out = visual_input(frame, RECT)
    inner = _reference_inner(frame, RECT)
    np.testing.assert_allclose(out[:3], inner.transpose(2, 0, 1) / 255.0, rtol=0, atol=1e-7)
    np.testing.assert_array_equal(np.rint(out[:3] * 255).astype(np.uint8), inner.transpose(2, 0, 1))


def test_masked_channels_black_out_the_rectangle(frame: np.ndarray) -> None:
    """Channels 3-5 equal channels 0-2 except where cv2.rectangle((5,5,310,305)) draws, which is 0."""
    out = visual_input(frame, RECT)
    mask = _mask().astype(bool)
    assert 0 < (~mask).sum() < mask.size  # the rectangle blacks out part of the crop only
    assert not mask[5, 5] and not mask[309, 314] and mask[4, 4] and mask[310, 315] and mask[5, 315]
    for c in range(3):
        np.testing.assert_array_equal(out[3 + c][mask], out[c][mask])
        assert (out[3 + c][~mask] == 0).all()
    # where the reference is not black, masking made a difference
    assert (out[:3][:, ~mask] > 0).any()


def test_writes_into_given_array(frame: np.ndarray) -> None:
    """With `out`, the input is written in place (e.g. one slot of a batch) and returned."""
    batch = np.full((3, 6, 320, 320), -1.0, np.float32)
    result = visual_input(frame, RECT, out=batch[1])
    assert np.shares_memory(result, batch[1]) and result.shape == (6, 320, 320)
    np.testing.assert_array_equal(batch[1], visual_input(frame, RECT))
    assert (batch[0] == -1).all() and (batch[2] == -1).all()


def test_real_rects_each_give_their_own_crop(frame: np.ndarray) -> None:
    """Different real rects of the reference avatar give different inputs, each the reference crop."""
    rects = [tuple(r) for r in json.loads((reference_file("crop_rects_1280x720.json")).read_text())[:200:50]]
    outs = [visual_input(frame, r) for r in rects]
    for rect, out in zip(rects, outs, strict=True):
        np.testing.assert_array_equal(np.rint(out[:3] * 255).astype(np.uint8),
                                      _reference_inner(frame, rect).transpose(2, 0, 1))
    assert not np.array_equal(outs[0], outs[-1])


@pytest.mark.parametrize("rect", [(0, 0, 173, 189), (532, 210, 714, 392), (880, 320, 1280, 720)])
def test_bit_equal_to_the_reference_formula(rect: tuple[int, int, int, int]) -> None:
    """Every float, both halves, equals inference_328.py's own arithmetic (the inner 320 and
    its masked copy, HWC uint8 -> CHW, x * (1/255) in float64, cast to float32), whatever the
    byte values (noise covers all 256) and the rect."""
    frame = np.random.default_rng(5).integers(0, 256, (720, 1280, 3), dtype=np.uint8)
    inner = _reference_inner(frame, rect)
    masked = inner.copy()
    cv2.rectangle(masked, (5, 5, 310, 305), (0, 0, 0), -1)
    expected = np.concatenate([inner.transpose(2, 0, 1), masked.transpose(2, 0, 1)]) * (1 / 255.0)
    assert len(np.unique(inner)) == 256
    out = visual_input(frame, rect, np.full((6, 320, 320), np.nan, np.float32))
    np.testing.assert_array_equal(out.view(np.uint32), expected.astype(np.float32).view(np.uint32))
