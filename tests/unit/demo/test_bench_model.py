"""The bench model: SyncTalk-2D's UNet architecture and size, deterministic, a real ONNX
graph that ONNX Runtime runs with the avatar contract."""
from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest

from pipeline.demo.bench_model import build_bench_unet, model_stats
from pipeline.gpu_worker.unet import load_unet


@pytest.fixture(scope="module")
def model():
    return build_bench_unet()


def test_size_is_synctalk_2ds(model) -> None:
    """About 12.2 M parameters and 9.8 GFLOPs per 320x320 frame (counted from the graph)."""
    stats = model_stats(model)
    assert 12.0 <= stats["params_m"] <= 12.4, stats
    assert 9.6 <= stats["gflops_per_frame"] <= 10.0, stats
    ops = {node.op_type for node in model.graph.node}
    assert {"Conv", "Relu", "Add", "Concat", "Resize", "Sigmoid"} <= ops
    depthwise = [n for n in model.graph.node if n.op_type == "Conv"
                 and next(a.i for a in n.attribute if a.name == "group") > 1]
    assert len(depthwise) == 30  # one per inverted residual: inc 1, down 10, audio 5, fuse 4, up 10


def test_weights_are_deterministic(model) -> None:
    assert build_bench_unet().SerializeToString() == model.SerializeToString()


def test_runs_with_the_avatar_contract_and_batches_exactly(tmp_path, model) -> None:
    path = tmp_path / "unet.onnx"
    path.write_bytes(model.SerializeToString())
    unet = load_unet(path, "cpu")
    assert (unet.visual_name, unet.audio_name, unet.output_name) == ("input", "audio", "output")
    rng = np.random.default_rng(0)
    visual = rng.random((2, 6, 320, 320), dtype=np.float32)
    audio = rng.random((2, 32, 16, 16), dtype=np.float32)
    out = np.empty((2, 3, 320, 320), np.float32)
    unet.run(visual, audio, out)
    assert np.isfinite(out).all() and 0.0 <= out.min() and out.max() <= 1.0 + 1e-6
    assert out[0].std() > 0.01  # not a constant image
    single = np.empty((1, 3, 320, 320), np.float32)
    unet.run(visual[1:], audio[1:], single)
    np.testing.assert_array_equal(single[0], out[1])  # a frame does not depend on its batch
    assert isinstance(unet.session, ort.InferenceSession)
