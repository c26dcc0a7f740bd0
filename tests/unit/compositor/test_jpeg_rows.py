"""A frame's JPEG from its background's kept rows and the band around its mouth: byte for
byte the whole frame encoded at once, pixel for pixel a JPEG without restart markers, and
the kept backgrounds bounded by bytes."""
from __future__ import annotations

import cv2
import numpy as np
import pytest

from pipeline.compositor import jpeg_rows
from pipeline.compositor.composite import paste
from pipeline.compositor.jpeg_rows import MCU, BackgroundJpegs, band_rows, encode_rows

QUALITY = 75


def _background(height: int = 720, width: int = 1280, seed: int = 0) -> np.ndarray:
    """A camera-like frame: smoothed noise (its JPEG a few hundred KB at most)."""
    noise = np.random.default_rng(seed).integers(0, 256, (height, width, 3), np.uint8)
    return cv2.GaussianBlur(noise, (0, 0), 3)


PREDICTION = np.random.default_rng(1).random((3, 320, 320), dtype=np.float32)


def _draw(mode: str):
    return lambda pixels, rect: paste(pixels, PREDICTION, rect, mode)


@pytest.mark.parametrize("size, rect", [
    ((720, 1280), (540, 300, 740, 500)),    # mid-frame
    ((720, 1280), (0, 0, 200, 200)),        # the top rows
    ((720, 1280), (1000, 600, 1280, 720)),  # the bottom rows
    ((720, 1280), (500, 0, 700, 720)),      # every row
    ((720, 1280), (3, 17, 50, 31)),         # inside one MCU row
    ((715, 1283), (600, 700, 700, 715)),    # a last MCU row of 11 pixels, width not /16
    ((715, 1283), (540, 300, 740, 500)),
])
@pytest.mark.parametrize("mode", ["synctalk", "stretch"])
def test_a_joined_frame_is_the_whole_frame_encoded(size: tuple[int, int],
                                                   rect: tuple[int, int, int, int],
                                                   mode: str) -> None:
    """Encoded once, then from the kept rows: both times the bytes of the whole frame."""
    background = _background(*size)
    whole = encode_rows(paste(background, PREDICTION, rect, mode), QUALITY).joined()
    kept = BackgroundJpegs(64 * 2**20)
    for _ in range(2):
        assert kept.frame(("bg", 0, QUALITY), background, rect, _draw(mode)) == whole


def test_restart_markers_change_no_pixel() -> None:
    """Decoded, a frame written with a marker a row equals the same frame written without."""
    frame = paste(_background(), PREDICTION, (540, 300, 740, 500))
    plain = cv2.imencode(".jpg", frame, [cv2.IMWRITE_JPEG_QUALITY, QUALITY])[1]
    rows = encode_rows(frame, QUALITY)
    assert len(rows.rows) == 720 // MCU
    joined = np.frombuffer(rows.joined(), np.uint8)
    np.testing.assert_array_equal(cv2.imdecode(joined, cv2.IMREAD_COLOR),
                                  cv2.imdecode(plain, cv2.IMREAD_COLOR))
    assert len(joined) < len(plain) * 1.01  # 2 bytes and a partial byte a row


def test_a_kept_background_costs_only_its_band(monkeypatch: pytest.MonkeyPatch) -> None:
    """The first frame of a background encodes the background and the band; the next
    frames of it only their band: the MCU rows that hold the rect."""
    heights: list[int] = []
    real = jpeg_rows.encode_rows

    def counted(image: np.ndarray, quality: int) -> jpeg_rows.RowJpeg:
        heights.append(image.shape[0])
        return real(image, quality)

    monkeypatch.setattr(jpeg_rows, "encode_rows", counted)
    kept = BackgroundJpegs(64 * 2**20)
    rect = (540, 300, 740, 500)
    for _ in range(3):
        kept.frame(("bg", 0, QUALITY), _background(), rect, _draw("synctalk"))
    first, end = band_rows(rect, 720)
    assert (first, end) == (300 // 16, -(-500 // 16))
    assert heights == [720] + [(end - first) * MCU] * 3


def test_kept_backgrounds_stay_within_their_bytes_least_recently_used_out() -> None:
    """Past the budget the least recently used background goes; a background larger than
    the whole budget, or a budget of 0, keeps nothing (each frame encoded whole); a
    released segment's backgrounds go at once."""
    backgrounds = [_background(seed=s) for s in range(3)]
    size = encode_rows(backgrounds[0], QUALITY).nbytes
    kept = BackgroundJpegs(int(size * 2.5))
    for s in (0, 1, 0, 2):  # 0 used again before 2 comes: 1 is the one to go
        assert kept.background(("seg", s, QUALITY), backgrounds[s]) is not None
    assert list(kept.entries) == [("seg", 0, QUALITY), ("seg", 2, QUALITY)]
    assert kept.held == sum(e.nbytes for e in kept.entries.values()) <= kept.max_bytes
    kept.background(("other", 0, QUALITY), backgrounds[1])
    kept.forget("seg")
    assert list(kept.entries) == [("other", 0, QUALITY)]
    assert kept.held == kept.entries[("other", 0, QUALITY)].nbytes
    for budget in (0, size // 2):
        none_kept = BackgroundJpegs(budget)
        assert none_kept.background(("seg", 0, QUALITY), backgrounds[0]) is None
        whole = encode_rows(paste(backgrounds[0], PREDICTION, (540, 300, 740, 500)), QUALITY)
        assert none_kept.frame(("seg", 0, QUALITY), backgrounds[0], (540, 300, 740, 500),
                               _draw("synctalk")) == whole.joined()
        assert not none_kept.entries and none_kept.held == 0
