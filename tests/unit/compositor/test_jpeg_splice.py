"""A frame's JPEG from its background's kept segments and the patch around its mouth:
byte for byte the whole frame encoded at once, pixel for pixel a JPEG without restart
markers, and the kept backgrounds bounded by bytes."""
from __future__ import annotations

import cv2
import numpy as np
import pytest

from pipeline.compositor import jpeg_splice
from pipeline.compositor.composite import paste
from pipeline.compositor.jpeg_splice import (
    MCU,
    BackgroundJpegs,
    encode_jpeg,
    encode_segmented,
    patch_region,
    restart_interval,
)

QUALITY = 75


def _background(height: int = 720, width: int = 1280, seed: int = 0) -> np.ndarray:
    """A camera-like frame: smoothed noise (its JPEG a few hundred KB at most)."""
    noise = np.random.default_rng(seed).integers(0, 256, (height, width, 3), np.uint8)
    return cv2.GaussianBlur(noise, (0, 0), 3)


PREDICTION = np.random.default_rng(1).random((3, 320, 320), dtype=np.float32)


def _draw(mode: str):
    return lambda pixels, rect: paste(pixels, PREDICTION, rect, mode)


@pytest.mark.parametrize("width, interval", [
    (1280, 8), (1920, 8), (640, 8), (720, 5), (1283, 81), (1296, 81), (48, 3), (16, 1)])
def test_a_segment_divides_a_row_and_is_as_wide_as_allowed(width: int, interval: int) -> None:
    """128 pixels where a row of MCUs divides so (720p, 1080p); otherwise the widest that
    divides it, or a whole row when that would be under 64 pixels."""
    assert restart_interval(width) == interval
    assert -(-width // MCU) % interval == 0


@pytest.mark.parametrize("size, rect", [
    ((720, 1280), (540, 300, 740, 500)),    # mid-frame
    ((720, 1280), (0, 0, 200, 200)),        # the top left corner
    ((720, 1280), (1000, 600, 1280, 720)),  # the bottom right corner
    ((720, 1280), (500, 0, 700, 720)),      # every row
    ((720, 1280), (0, 300, 1280, 400)),     # every column
    ((720, 1280), (3, 17, 50, 31)),         # inside one segment
    ((720, 1280), (127, 100, 129, 140)),    # across a segment's edge by a pixel
    ((715, 1283), (600, 700, 700, 715)),    # a last row of 11 pixels; whole rows a segment
    ((715, 1283), (540, 300, 740, 500)),
    ((724, 1288), (1200, 700, 1288, 724)),  # 81 MCUs a row: no 64-pixel divisor either
    ((360, 720), (600, 200, 720, 360)),     # 45 MCUs a row: 5 a segment, the right edge
])
@pytest.mark.parametrize("mode", ["synctalk", "stretch"])
def test_a_spliced_frame_is_the_whole_frame_encoded(size: tuple[int, int],
                                                    rect: tuple[int, int, int, int],
                                                    mode: str) -> None:
    """Encoded once, then from the kept segments: both times the bytes of the whole frame."""
    background = _background(*size)
    whole = encode_jpeg(paste(background, PREDICTION, rect, mode), QUALITY)
    kept = BackgroundJpegs(64 * 2**20)
    for _ in range(2):
        assert kept.frame(("bg", 0, QUALITY), background, rect, _draw(mode)) == whole


def test_restart_markers_change_no_pixel() -> None:
    """Decoded, a frame written with a marker every 128 pixels equals the same frame
    written without; the markers cost a few percent of its bytes."""
    frame = paste(_background(), PREDICTION, (540, 300, 740, 500))
    plain = cv2.imencode(".jpg", frame, [cv2.IMWRITE_JPEG_QUALITY, QUALITY])[1]
    segmented = encode_segmented(frame, QUALITY, restart_interval(1280))
    assert (len(segmented.segments), segmented.columns) == (45 * 10, 10)
    spliced = np.frombuffer(segmented.joined(), np.uint8)
    np.testing.assert_array_equal(cv2.imdecode(spliced, cv2.IMREAD_COLOR),
                                  cv2.imdecode(plain, cv2.IMREAD_COLOR))
    assert len(spliced) < len(plain) * 1.05


def test_a_kept_background_costs_only_its_patch(monkeypatch: pytest.MonkeyPatch) -> None:
    """The first frame of a background encodes the background and the patch; the next
    frames of it only their patch: the segments that hold the rect."""
    shapes: list[tuple[int, ...]] = []
    real = jpeg_splice.encode_segmented

    def counted(image: np.ndarray, quality: int, interval: int) -> jpeg_splice.SegmentedJpeg:
        shapes.append(image.shape[:2])
        return real(image, quality, interval)

    monkeypatch.setattr(jpeg_splice, "encode_segmented", counted)
    kept = BackgroundJpegs(64 * 2**20)
    rect = (540, 300, 740, 500)
    for _ in range(3):
        kept.frame(("bg", 0, QUALITY), _background(), rect, _draw("synctalk"))
    assert patch_region(rect, 720, 1280) == (300 // 16, -(-500 // 16), 540 // 128, -(-740 // 128))
    patch = ((-(-500 // 16) - 300 // 16) * MCU, (-(-740 // 128) - 540 // 128) * 128)
    assert shapes == [(720, 1280)] + [patch] * 3 and patch == (224, 256)


def test_kept_backgrounds_stay_within_their_bytes_least_recently_used_out() -> None:
    """Past the budget the least recently used background goes; a background larger than
    the whole budget, or a budget of 0, keeps nothing (each frame encoded whole); a
    released segment's backgrounds go at once."""
    backgrounds = [_background(seed=s) for s in range(3)]
    size = encode_segmented(backgrounds[0], QUALITY, restart_interval(1280)).nbytes
    kept = BackgroundJpegs(int(size * 2.5))
    for s in (0, 1, 0, 2):  # 0 used again before 2 comes: 1 is the one to go
        assert kept.background(("seg", s, QUALITY), backgrounds[s]) is not None
    assert list(kept.entries) == [("seg", 0, QUALITY), ("seg", 2, QUALITY)]
    assert kept.held == sum(e.nbytes for e in kept.entries.values()) <= kept.max_bytes
    assert kept.jpeg(("other", 0, QUALITY), backgrounds[1]) == encode_jpeg(backgrounds[1], QUALITY)
    kept.forget("seg")
    assert list(kept.entries) == [("other", 0, QUALITY)]
    assert kept.held == kept.entries[("other", 0, QUALITY)].nbytes
    rect = (540, 300, 740, 500)
    for budget in (0, size // 2):
        none_kept = BackgroundJpegs(budget)
        assert none_kept.background(("seg", 0, QUALITY), backgrounds[0]) is None
        assert none_kept.jpeg(("seg", 0, QUALITY), backgrounds[0]) == \
            encode_jpeg(backgrounds[0], QUALITY)
        assert none_kept.frame(("seg", 0, QUALITY), backgrounds[0], rect, _draw("synctalk")) \
            == encode_jpeg(paste(backgrounds[0], PREDICTION, rect), QUALITY)
        assert not none_kept.entries and none_kept.held == 0
