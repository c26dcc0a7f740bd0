"""The paste graph (compositor.device gpu) on ONNX Runtime's CPU provider computes the
compositor's paste: >= 45 dB for synctalk (OpenCV's own 8-bit cubic rounds a pixel a level
apart now and then), equal for stretch, the background untouched outside the rect."""
from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import cv2
import numpy as np
import onnxruntime as ort
import pytest

from pipeline.compositor.composite import paste
from pipeline.gpu_worker.avatar import find_frame
from pipeline.gpu_worker.paste_graph import OUTPUT, cubic_taps, paste_feeds, paste_graph
from pipeline.gpu_worker.precision import psnr_db
from pipeline.synctalk import visual_input

SAME_PASTE_DB = 45.0
H, W = 720, 1280
# SyncTalk-2D geometry on a 1280x720 frame (the bench model's): its 173x189 face crop, the
# demo's 192, rects larger than the 328 crop (downscaled), every frame edge, tiny ones
BENCH_RECTS = [(540, 300, 713, 489), (500, 300, 692, 492), (0, 0, 400, 360),
               (880, 360, 1280, 720), (3, 4, 4, 5), (10, 700, 15, 720), (0, 240, 1280, 480),
               (1276, 0, 1280, 3)]


@pytest.fixture(scope="module")
def sessions() -> Iterator[dict[str, ort.InferenceSession]]:
    yield {mode: ort.InferenceSession(paste_graph(mode).SerializeToString(),
                                      providers=["CPUExecutionProvider"])
           for mode in ("synctalk", "stretch")}


def _run(session: ort.InferenceSession, mode: str, backgrounds: np.ndarray, frames: list[int],
         rects: list[tuple[int, int, int, int]], prediction: np.ndarray) -> np.ndarray:
    (out,) = session.run([OUTPUT], {
        "backgrounds": backgrounds, "prediction": prediction,
        **paste_feeds(mode, frames, rects, backgrounds.shape[1], backgrounds.shape[2])})
    return out


def _check(mode: str, out: np.ndarray, backgrounds: np.ndarray, frames: list[int],
           rects: list[tuple[int, int, int, int]], prediction: np.ndarray) -> list[float]:
    worst = []
    for i, rect in enumerate(rects):
        expected = paste(backgrounds[frames[i]], prediction[i], rect, mode)
        x1, y1, x2, y2 = rect
        outside = np.ones(expected.shape[:2], bool)
        outside[y1:y2, x1:x2] = False
        np.testing.assert_array_equal(out[i][outside], backgrounds[frames[i]][outside])
        if mode == "stretch":
            np.testing.assert_array_equal(out[i], expected)
        worst.append(psnr_db(expected, out[i]))
        assert worst[-1] >= SAME_PASTE_DB, (mode, rect, worst[-1])
        assert np.abs(out[i].astype(int) - expected).max() <= 2, (mode, rect)
    return worst


def _predictions(n: int, seed: int) -> np.ndarray:
    """Sigmoid-like outputs, with the values the pixel conversion must clamp: out of range,
    NaN and infinities."""
    rng = np.random.default_rng(seed)
    pred = rng.random((n, 3, 320, 320), dtype=np.float32)
    pred[:, :, :4] = rng.normal(0.5, 0.6, (n, 3, 4, 320)).astype(np.float32)
    pred[:, 0, 100, 100:103] = [np.nan, np.inf, -np.inf]
    return pred


@pytest.mark.parametrize("mode", ["synctalk", "stretch"])
def test_bench_geometry_rects_of_every_size_and_edge_in_one_batch(
        sessions: dict[str, ort.InferenceSession], mode: str,
        record_property: pytest.RecordProperty) -> None:
    """One batch of 1280x720 frames whose rects differ in size (upscaled, downscaled, 1 px)
    and touch every frame edge: each frame is the compositor's paste (stretch: equal)."""
    rng = np.random.default_rng(3)
    backgrounds = cv2.GaussianBlur(rng.integers(0, 256, (3 * H, W, 3), np.uint8), (0, 0), 2)
    backgrounds = backgrounds.reshape(3, H, W, 3)
    frames = [i % 3 for i in range(len(BENCH_RECTS))]
    prediction = _predictions(len(BENCH_RECTS), seed=4)
    out = _run(sessions[mode], mode, backgrounds, frames, BENCH_RECTS, prediction)
    assert out.shape == (len(BENCH_RECTS), H, W, 3) and out.dtype == np.uint8
    record_property("worst_psnr_db", min(200.0, *_check(mode, out, backgrounds, frames,
                                                        BENCH_RECTS, prediction)))


@pytest.mark.parametrize("mode", ["synctalk", "stretch"])
def test_demo_avatar_frames_with_its_unet_predictions(
        sessions: dict[str, ort.InferenceSession], small_models_root: Path, mode: str,
        record_property: pytest.RecordProperty) -> None:
    """The demo avatar's own frames, crop rects and UNet predictions (mouth open): each
    pasted frame is the compositor's."""
    demo = small_models_root / "demo"
    indices = [0, 7, 13, 31]
    names = {p.name for p in (demo / "frames").iterdir()}
    backgrounds = np.stack([cv2.imread(str(find_frame(demo / "frames", i, names)))
                            for i in indices])
    rects = [tuple(json.loads((demo / "crop_rects.json").read_text())[i]) for i in indices]
    visual = np.stack([visual_input(backgrounds[k], rects[k]) for k in range(len(indices))])
    unet = ort.InferenceSession(str(demo / "unet.onnx"), providers=["CPUExecutionProvider"])
    audio = np.full((len(indices), 32, 16, 16), 0.2, np.float32)  # an open mouth
    (prediction,) = unet.run(None, {"input": visual, "audio": audio})
    frames = list(range(len(indices)))
    out = _run(sessions[mode], mode, backgrounds, frames, rects, prediction)  # type: ignore[arg-type]
    record_property("worst_psnr_db", min(200.0, *_check(mode, out, backgrounds, frames, rects,  # type: ignore[arg-type]
                                                        prediction)))


def test_cubic_taps_are_opencvs_kernel_with_replicated_edges() -> None:
    """The taps reproduce OpenCV's float cubic resize of a 1-D signal (a = -0.75,
    half-pixel centres, edge pixels repeated) to float precision."""
    signal = np.random.default_rng(5).random((1, 37)).astype(np.float32) * 255
    for dst in (5, 37, 100, 328):
        index, weights = cubic_taps(37, dst)
        expected = cv2.resize(signal, (dst, 1), interpolation=cv2.INTER_CUBIC)[0]
        np.testing.assert_allclose((signal[0][index] * weights).sum(1), expected, atol=2e-3)


@pytest.mark.parametrize("rect, error", [
    ((10, 10, 10, 20), "must be non-empty"), ((-1, 0, 10, 10), "inside the 1280x720"),
    ((1200, 700, 1281, 720), "inside the 1280x720")])
def test_bad_rects_are_refused_with_a_reason(rect: tuple[int, int, int, int], error: str) -> None:
    """An empty rect, or one outside the frame, is a clear error, not a wrong frame."""
    with pytest.raises(ValueError, match=error):
        paste_feeds("synctalk", [0], [rect], H, W)
    with pytest.raises(ValueError, match="one frame per rect"):
        paste_feeds("synctalk", [0, 1], [(0, 0, 5, 5)], H, W)
    with pytest.raises(ValueError, match="composite mode must be one of"):
        paste_feeds("bilinear", [0], [(0, 0, 5, 5)], H, W)
