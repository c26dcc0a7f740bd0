"""pipeline.integrations.live: the server's JPEGs as pixels (FrameDecoder, at the avatar's size
or scaled while decoded), the live endpoint's URL."""
from __future__ import annotations

import cv2
import numpy as np
import pytest

from pipeline.integrations.live import FrameDecoder, live_url


@pytest.fixture(scope="module")
def frame() -> tuple[np.ndarray, bytes]:
    """A 320x240 BGR picture (a gradient with a red square) and its JPEG."""
    y, x = np.mgrid[0:240, 0:320]
    bgr = np.stack([x % 256, y % 256, (x + y) % 256], axis=2).astype(np.uint8)
    bgr[40:120, 60:160] = (0, 0, 255)
    return bgr, cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, 95])[1].tobytes()


def test_rgb_and_rgba_at_the_avatars_size(frame) -> None:
    """RGB: the picture with its channels in RGB order; RGBA: the same with an opaque alpha."""
    bgr, jpeg = frame
    rgb, rgba = FrameDecoder("RGB")(jpeg), FrameDecoder("RGBA")(jpeg)
    assert rgb.shape == (240, 320, 3) and rgba.shape == (240, 320, 4)
    assert tuple(rgb[80, 100]) == pytest.approx((255, 0, 0), abs=8)
    assert np.array_equal(rgba[..., :3], rgb) and (rgba[..., 3] == 255).all()
    assert np.abs(rgb[..., ::-1].astype(int) - bgr).mean() < 3


@pytest.mark.parametrize("size", [(160, 120), (80, 60), (200, 150)])
def test_frames_come_at_the_size_asked(frame, size: tuple[int, int]) -> None:
    """Every frame at `size` (a half and a quarter scaled while decoded, other sizes resized),
    close to the picture scaled down."""
    bgr, jpeg = frame
    decode = FrameDecoder("RGB", size)
    expected = cv2.resize(bgr, size, interpolation=cv2.INTER_AREA)[..., ::-1].astype(int)
    for _ in range(3):  # the first decode learns the factor, the next ones use it
        image = decode(jpeg)
        assert image.shape == (size[1], size[0], 3)
        assert np.abs(image.astype(int) - expected).mean() < 6


def test_a_frame_that_is_not_a_jpeg_is_a_clear_error() -> None:
    """Bytes that do not decode: ValueError saying so."""
    with pytest.raises(ValueError, match="not a JPEG"):
        FrameDecoder("RGB")(b"LSF1 garbage")



def test_the_live_endpoint_under_a_websocket_base() -> None:
    """ws:// and wss:// bases (with or without /audio) give the live endpoint with the model;
    anything else is refused."""
    assert live_url("ws://h:8080", None) == "ws://h:8080/audio?mode=live"
    assert live_url("wss://h/x/audio", "anna") == "wss://h/x/audio?mode=live&model=anna"
    with pytest.raises(ValueError, match="not a WebSocket URL"):
        live_url("h:8080", None)
