"""The bench model: an ONNX UNet with SyncTalk-2D's architecture and size, for performance work.

SyncTalk-2D's `unet_328.py` Model(n_channels=6, mode="ave"), as its ONNX export runs it
(BatchNorm folded into the convolutions): a depthwise "inverted residual" (MobileNetV2)
encoder of five stride-2 stages 320 → 10, the audio branch (AudioConvAve: [32,16,16] →
[512,10,10]) concatenated at the bottleneck and fused, a decoder of five bilinear ×2
upsamplings with skip connections, a 1×1 output convolution and a sigmoid. Same inputs
and output as every avatar model: input [B,6,320,320], audio [B,32,16,16] → output
[B,3,320,320]. About 12.2 M parameters and 9.8 GFLOPs (multiply-adds ×2) per frame;
`model_stats` counts them from the graph. The layout is the one `lipsync import-synctalk`
builds a trained checkpoint with (pipeline/networks/synctalk2d.py).

The weights are deterministic (a fixed PCG64 seed, He-uniform scaled so activations stay
in range through the network); they produce no meaningful face. The model exists only to
make the server's throughput and latency measurable on the real network's cost.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from pipeline.demo import owned
from pipeline.demo.graphs import _set_metadata
from pipeline.networks.builder import RandomWeights
from pipeline.networks.synctalk2d import build_unet

if TYPE_CHECKING:
    import onnx

BENCH_MODEL_ID = "bench"
_SEED = 328


def build_bench_unet() -> onnx.ModelProto:
    """SyncTalk-2D's UNet (unet_328.py, "ave" audio branch) with deterministic weights."""
    import onnx

    model = build_unet(RandomWeights(np.random.Generator(np.random.PCG64(_SEED))),
                       "synctalk2d_unet_328_bench",
                       doc=("Bench model: SyncTalk-2D unet_328 architecture (ave), deterministic "
                            "weights, for performance work only."))
    _set_metadata(model)
    onnx.checker.check_model(model)
    return model


def model_stats(model: onnx.ModelProto) -> dict[str, float]:
    """Parameters and GFLOPs (2 × multiply-adds of Conv, per frame) of a 320×320 UNet graph."""
    from onnx import numpy_helper, shape_inference

    params = sum(int(np.prod(t.dims)) for t in model.graph.initializer
                 if t.name.endswith((".weight", ".bias")))
    inferred = shape_inference.infer_shapes(_with_batch_one(model))
    shapes = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim]
              for v in [*inferred.graph.value_info, *inferred.graph.output]}
    weights = {t.name: numpy_helper.to_array(t).shape for t in model.graph.initializer}
    macs = 0
    for node in model.graph.node:
        if node.op_type == "Conv":
            cout, cin_per_group, kh, kw = weights[node.input[1]]
            _, _, oh, ow = shapes[node.output[0]]
            macs += cout * cin_per_group * kh * kw * oh * ow
    return {"params_m": params / 1e6, "gflops_per_frame": 2 * macs / 1e9}


def _with_batch_one(model: onnx.ModelProto) -> onnx.ModelProto:
    import onnx

    fixed = onnx.ModelProto()
    fixed.CopyFrom(model)
    for value in fixed.graph.input:
        value.type.tensor_type.shape.dim[0].dim_value = 1
    return fixed


def bench_model_path(models_root: Path) -> Path:
    """Where `lipsync demo-assets --bench-model` puts the bench UNet."""
    return Path(models_root) / BENCH_MODEL_ID / "unet.onnx"


def write_bench_model(path: Path) -> Path:
    """Write the bench UNet to `path` (atomically, recorded in the build.json beside it);
    returns the path. DemoAssetsError when a file the server did not write is there."""
    data = build_bench_unet().SerializeToString()
    recorded = owned.read_manifest(path.parent).get("files", {})
    if os.path.lexists(path) and not owned.matches(path, recorded.get(path.name)) and not (
            path.is_file() and path.stat().st_size == len(data) and path.read_bytes() == data):
        raise owned.DemoAssetsError(f"{path} was not written by lipsync: not replacing it "
                                    "with the bench model; move it away")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(data)
    tmp.replace(path)
    owned.write_manifest(path.parent, {"model": BENCH_MODEL_ID}, [path])
    return path
