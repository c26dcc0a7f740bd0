"""compositor.device gpu's worker-side compositing, here on its CPU test path (ONNX Runtime's
CPU provider, nvImageCodec's CPU encoder): the JPEG settings it asks for, frames equal to the
compositors' within JPEG loss, and the refusals of a box that cannot run it."""
from __future__ import annotations

import cv2
import numpy as np
import pytest

from pipeline.compositor.composite import paste
from pipeline.compositor.jpeg_splice import encode_jpeg
from pipeline.gpu_worker.device_compositor import (
    DeviceCompositor,
    DeviceError,
    JpegEncoder,
    unavailable,
)
from pipeline.gpu_worker.precision import psnr_db

pytest.importorskip("nvidia.nvimgcodec", reason="nvImageCodec is not installed (the test extra has it)")

SAME_FRAME_DB = 45.0
H, W = 720, 1280


def _decode(jpeg: bytes) -> np.ndarray:
    frame = cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR)
    assert frame is not None, "not a JPEG"
    return frame


def _segments(jpeg: bytes) -> dict[int, bytes]:
    """The JPEG's marker segments up to the scan: {marker: payload} (the first of each)."""
    found: dict[int, bytes] = {}
    i = 2
    while i + 4 <= len(jpeg) and jpeg[i] == 0xFF and jpeg[i + 1] != 0xDA:
        length = int.from_bytes(jpeg[i + 2:i + 4], "big")
        found.setdefault(jpeg[i + 1], jpeg[i + 4:i + 2 + length])
        i += 2 + length
    return found


def _sampling(jpeg: bytes) -> list[tuple[int, int]]:
    """(horizontal, vertical) sampling factors of each component, from the frame header."""
    sof = _segments(jpeg)[0xC0]
    return [(sof[7 + 3 * k] >> 4, sof[7 + 3 * k] & 15) for k in range(sof[5])]


def _colour_blocks() -> np.ndarray:
    """A 1280x720 frame of flat BGR blocks and a gradient: colour order and quality show."""
    frame = np.zeros((H, W, 3), np.uint8)
    frame[:, :400] = (255, 0, 0)
    frame[:, 400:800] = (0, 200, 0)
    frame[:, 800:] = (30, 60, 220)
    frame[600:] = np.linspace(0, 255, W, dtype=np.uint8)[None, :, None]
    return frame


@pytest.mark.parametrize("quality", [50, 75, 90])
def test_the_encoder_sets_quality_and_4_2_0_chroma_and_keeps_bgr(quality: int) -> None:
    """nvImageCodec's JPEG has the quantisation tables of OpenCV's at the same quality, 4:2:0
    chroma (luma 2x2, chroma 1x1) whatever its defaults, and decodes to the BGR frame given."""
    frame = _colour_blocks()
    (jpeg,) = JpegEncoder(on_gpu=False, quality=quality).encode([frame])
    reference = encode_jpeg(frame, quality)
    assert _sampling(jpeg) == [(2, 2), (1, 1), (1, 1)] == _sampling(reference)
    assert _segments(jpeg)[0xDB] == _segments(reference)[0xDB]
    decoded = _decode(jpeg)
    for x, colour in ((200, (255, 0, 0)), (600, (0, 200, 0)), (1000, (30, 60, 220))):
        assert np.abs(decoded[300, x].astype(int) - colour).max() <= 4, (x, decoded[300, x])
    assert psnr_db(_decode(reference), decoded) >= SAME_FRAME_DB


@pytest.fixture
def on_cpu(monkeypatch: pytest.MonkeyPatch) -> DeviceCompositor:
    """The worker's device compositor in its CPU test mode (passed its self-check)."""
    monkeypatch.setenv("LIPSYNC_GPU_TESTS_ON_CPU", "1")
    return DeviceCompositor.create("cpu", 75)


@pytest.mark.parametrize("mode", ["synctalk", "stretch"])
def test_frames_equal_the_compositors_within_jpeg_loss(on_cpu: DeviceCompositor, mode: str) -> None:
    """A batch pasted and encoded by the device compositor decodes to the compositors' frames
    (paste + OpenCV JPEG at the same quality) to >= 45 dB, each frame on its background."""
    rng = np.random.default_rng(7)
    backgrounds = cv2.GaussianBlur(rng.integers(0, 256, (4 * H, W, 3), np.uint8), (0, 0), 3)
    backgrounds = backgrounds.reshape(4, H, W, 3)
    uploaded = on_cpu.upload(backgrounds)
    assert np.shares_memory(uploaded.value, backgrounds)  # on the CPU: read in place
    frames, rects = [3, 0, 2], [(500, 300, 692, 492), (0, 0, 400, 360), (1100, 520, 1280, 720)]
    prediction = rng.random((3, 3, 320, 320), dtype=np.float32)
    done = on_cpu.composite(uploaded, frames, rects, prediction, mode)
    assert len(done.jpegs) == 3 and done.paste_ns > 0 and done.jpeg_ns > 0
    for i, jpeg in enumerate(done.jpegs):
        expected = _decode(encode_jpeg(paste(backgrounds[frames[i]], prediction[i], rects[i], mode), 75))
        assert psnr_db(expected, _decode(jpeg)) >= SAME_FRAME_DB, (mode, i)


def test_a_box_without_cuda_is_refused_by_name(monkeypatch: pytest.MonkeyPatch) -> None:
    """compositor.device gpu with CPU workers fails at start saying why and what to set;
    only the explicit test mode runs it on the CPU."""
    monkeypatch.delenv("LIPSYNC_GPU_TESTS_ON_CPU", raising=False)
    for provider in ("cpu", "openvino"):
        reason = unavailable(provider)  # type: ignore[arg-type]
        assert reason is not None and f"run on the {provider} provider" in reason
        assert "set compositor.device: cpu" in reason
        with pytest.raises(DeviceError, match="needs the CUDA provider"):
            DeviceCompositor.create(provider, 75)  # type: ignore[arg-type]
    monkeypatch.setenv("LIPSYNC_GPU_TESTS_ON_CPU", "1")
    assert unavailable("cpu") is None
