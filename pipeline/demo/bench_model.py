"""The bench model: an ONNX UNet with SyncTalk-2D's architecture and size, for performance work.

SyncTalk-2D's `unet_328.py` Model(n_channels=6, mode="ave"), as its ONNX export runs it
(BatchNorm folded into the convolutions): a depthwise "inverted residual" (MobileNetV2)
encoder of five stride-2 stages 320 → 10, the audio branch (AudioConvAve: [32,16,16] →
[512,10,10]) concatenated at the bottleneck and fused, a decoder of five bilinear ×2
upsamplings with skip connections, a 1×1 output convolution and a sigmoid. Same inputs
and output as every avatar model: input [B,6,320,320], audio [B,32,16,16] → output
[B,3,320,320]. About 12.2 M parameters and 9.8 GFLOPs (multiply-adds ×2) per frame;
`model_stats` counts them from the graph.

The weights are deterministic (a fixed PCG64 seed, He-uniform scaled so activations stay
in range through the network); they produce no meaningful face. The model exists only to
make the server's throughput and latency measurable on the real network's cost.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from pipeline.demo import owned
from pipeline.demo.graphs import OPSET, _set_metadata
from pipeline.synctalk import AUDIO_SHAPE, PREDICTION_SHAPE, VISUAL_SHAPE

if TYPE_CHECKING:
    import onnx

BENCH_MODEL_ID = "bench"
CHANNELS = (32, 64, 128, 256, 512)  # unet_328.py's ch
EXPAND = 2                          # every InvertedResidual's expand_ratio
_SEED = 328


@dataclass
class _Graph:
    """Collects nodes and initializers while the network is laid out."""

    rng: np.random.Generator
    nodes: list = field(default_factory=list)
    inits: list = field(default_factory=list)
    count: int = 0

    def name(self, kind: str) -> str:
        self.count += 1
        return f"{kind}_{self.count}"

    def weight(self, name: str, shape: tuple[int, ...], fan_in: int, gain: float) -> str:
        from onnx import numpy_helper

        limit = gain * np.sqrt(6.0 / fan_in)
        values = (self.rng.random(shape) * 2.0 - 1.0) * limit
        self.inits.append(numpy_helper.from_array(values.astype(np.float32), name))
        return name

    def op(self, op_type: str, inputs: list[str], **attrs: Any) -> str:
        from onnx import helper

        out = self.name(op_type.lower())
        self.nodes.append(helper.make_node(op_type, inputs, [out], name=out, **attrs))
        return out

    def conv(self, x: str, cin: int, cout: int, k: int = 1, stride: int = 1, pad: int = 0,
             groups: int = 1, gain: float = 1.0) -> str:
        """A convolution with bias: Conv + BatchNorm of the PyTorch model, folded."""
        base = self.name("conv")
        w = self.weight(f"{base}.weight", (cout, cin // groups, k, k), cin // groups * k * k,
                        gain)
        b = self.weight(f"{base}.bias", (cout,), cout, 0.05)
        return self.op("Conv", [x, w, b], kernel_shape=[k, k], strides=[stride, stride],
                       pads=[pad] * 4, group=groups)

    def inverted_residual(self, x: str, cin: int, cout: int, stride: int, residual: bool) -> str:
        hidden = cin * EXPAND
        h = self.op("Relu", [self.conv(x, cin, hidden)])
        h = self.op("Relu", [self.conv(h, hidden, hidden, k=3, stride=stride, pad=1,
                                       groups=hidden)])
        # the projection of a residual block starts small, as a trained one is, so the sum
        # keeps the scale of its input through the deep stacks
        h = self.conv(h, hidden, cout, gain=0.5 if residual else 1.0)
        return self.op("Add", [x, h]) if residual else h

    def double_conv_dw(self, x: str, cin: int, cout: int, stride: int) -> str:
        x = self.inverted_residual(x, cin, cout, stride, residual=False)
        return self.inverted_residual(x, cout, cout, 1, residual=True)

    def up(self, x: str, skip: str, cin: int, cout: int) -> str:
        """Bilinear ×2 (align_corners), concatenated with the skip, then DoubleConvDW."""
        x = self.op("Resize", [x, "", self.upsample_scales()], mode="linear",
                    coordinate_transformation_mode="align_corners")
        return self.double_conv_dw(self.op("Concat", [x, skip], axis=1), cin, cout, 1)

    def upsample_scales(self) -> str:
        """The one [1, 1, 2, 2] constant every ×2 Resize shares."""
        from onnx import numpy_helper

        name = "upsample_scales"
        if not any(t.name == name for t in self.inits):
            self.inits.append(numpy_helper.from_array(np.array([1, 1, 2, 2], np.float32), name))
        return name


def build_bench_unet() -> onnx.ModelProto:
    """SyncTalk-2D's UNet (unet_328.py, "ave" audio branch) with deterministic weights."""
    import onnx
    from onnx import TensorProto, helper

    ch = CHANNELS
    g = _Graph(np.random.Generator(np.random.PCG64(_SEED)))
    x1 = g.inverted_residual("input", 6, ch[0], 1, residual=False)     # 32 × 320
    x2 = g.double_conv_dw(x1, ch[0], ch[0], 2)                          # 32 × 160
    x3 = g.double_conv_dw(x2, ch[0], ch[1], 2)                          # 64 × 80
    x4 = g.double_conv_dw(x3, ch[1], ch[2], 2)                          # 128 × 40
    x5 = g.double_conv_dw(x4, ch[2], ch[3], 2)                          # 256 × 20
    x6 = g.double_conv_dw(x5, ch[3], ch[4], 2)                          # 512 × 10

    a = g.inverted_residual("audio", ch[0], ch[1], 1, residual=False)   # 64 × 16
    a = g.inverted_residual(a, ch[1], ch[2], 1, residual=False)         # 128 × 16
    a = g.op("Relu", [g.conv(a, ch[2], ch[3], k=3, pad=1)])             # 256 × 16
    a = g.inverted_residual(a, ch[3], ch[3], 1, residual=True)
    a = g.op("Relu", [g.conv(a, ch[3], ch[4], k=3, stride=2, pad=3)])   # 512 × 10
    a = g.inverted_residual(a, ch[4], ch[4], 1, residual=True)
    a = g.inverted_residual(a, ch[4], ch[4], 1, residual=True)

    x = g.op("Concat", [x6, a], axis=1)                                 # 1024 × 10
    x = g.double_conv_dw(x, ch[4] * 2, ch[4], 1)
    x = g.double_conv_dw(x, ch[4], ch[3], 1)                            # 256 × 10
    x = g.up(x, x5, ch[4], ch[3] // 2)                                  # 128 × 20
    x = g.up(x, x4, ch[3], ch[2] // 2)                                  # 64 × 40
    x = g.up(x, x3, ch[2], ch[1] // 2)                                  # 32 × 80
    x = g.up(x, x2, ch[1], ch[0])                                       # 32 × 160
    x = g.up(x, x1, ch[1], ch[0] // 2)                                  # 16 × 320
    logits = g.conv(x, ch[0] // 2, 3)
    g.nodes.append(helper.make_node("Sigmoid", [logits], ["output"], name="output"))

    graph = helper.make_graph(
        g.nodes, "synctalk2d_unet_328_bench",
        inputs=[helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", *VISUAL_SHAPE]),
                helper.make_tensor_value_info("audio", TensorProto.FLOAT, ["batch", *AUDIO_SHAPE])],
        outputs=[helper.make_tensor_value_info("output", TensorProto.FLOAT,
                                               ["batch", *PREDICTION_SHAPE])],
        initializer=g.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.doc_string = ("Bench model: SyncTalk-2D unet_328 architecture (ave), deterministic "
                        "weights, for performance work only.")
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
