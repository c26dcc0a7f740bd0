"""SyncTalk-2D's two networks, laid out as ONNX graphs with BatchNorm folded into the
convolutions: the UNet of `unet_328.py` (Model(6, "ave")) and the audio encoder of
`utils.py` (AudioEncoder's `audio_encoder` Sequential).

The UNet: a depthwise "inverted residual" (MobileNetV2) encoder of five stride-2 stages
320 → 10, the "ave" audio branch (AudioConvAve: [32,16,16] → [512,10,10]) concatenated at
the bottleneck and fused, a decoder of five bilinear ×2 upsamplings (align_corners) with
skip connections, a 1×1 output convolution and a sigmoid: [B,6,320,320] + [B,32,16,16] →
[B,3,320,320]. The encoder: thirteen Conv2d + BatchNorm + ReLU blocks (some residual) from a
[B,1,80,16] mel window to [B,512].

Every convolution names the state-dict keys it is made of, so one layout builds the bench
model (random weights) and an imported training run (its weights, every key and shape
checked).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from pipeline.networks.builder import ArchitectureError, ConvKey, GraphBuilder, StateDictWeights
from pipeline.synctalk import (
    AUDIO_SHAPE,
    ENCODED_DIM,
    MEL_WINDOW_SHAPE,
    PREDICTION_SHAPE,
    VISUAL_SHAPE,
)

if TYPE_CHECKING:
    import onnx

    from pipeline.networks.builder import WeightSource

CHANNELS = (32, 64, 128, 256, 512)  # unet_328.py's ch
EXPAND = 2                          # every InvertedResidual's expand_ratio
UNET = "SyncTalk-2D unet_328 ('ave' audio mode)"
ENCODER = "SyncTalk-2D's audio encoder (audio_visual_encoder.pth)"

# The audio encoder's blocks: (cin, cout, kernel, stride, padding, residual)
_ENCODER_BLOCKS: tuple[tuple[int, int, int, int | tuple[int, int], int, bool], ...] = (
    (1, 32, 3, 1, 1, False), (32, 32, 3, 1, 1, True), (32, 32, 3, 1, 1, True),
    (32, 64, 3, (3, 1), 1, False), (64, 64, 3, 1, 1, True), (64, 64, 3, 1, 1, True),
    (64, 128, 3, 3, 1, False), (128, 128, 3, 1, 1, True), (128, 128, 3, 1, 1, True),
    (128, 256, 3, (3, 2), 1, False), (256, 256, 3, 1, 1, True),
    (256, 512, 3, 1, 0, False), (512, 512, 1, 1, 0, False),
)
# The first audio-branch convolution tells SyncTalk-2D's audio modes apart (ave and hubert
# share every shape: hubert differs only in a stride, and in the features it is trained on).
_AUDIO_MODES = {(2 * 32, 32, 1, 1): "ave", (2 * 256, 256, 1, 1): "wenet",
                (2 * 12, 12, 1, 1): "whisper"}


def _inverted_residual(g: GraphBuilder, x: str, name: str, cin: int, cout: int, stride: int,
                       residual: bool) -> str:
    hidden = cin * EXPAND
    h = g.op("Relu", [g.conv(x, ConvKey(f"{name}.conv.0", f"{name}.conv.1"), cin, hidden)])
    h = g.op("Relu", [g.conv(h, ConvKey(f"{name}.conv.3", f"{name}.conv.4"), hidden, hidden,
                             k=3, stride=stride, pad=1, groups=hidden)])
    # random weights: the projection of a residual block starts small, as a trained one
    # is, so the sum keeps the scale of its input through the deep stacks
    h = g.conv(h, ConvKey(f"{name}.conv.6", f"{name}.conv.7"), hidden, cout,
               gain=0.5 if residual else 1.0)
    return g.op("Add", [x, h]) if residual else h


def _double_conv_dw(g: GraphBuilder, x: str, name: str, cin: int, cout: int, stride: int) -> str:
    x = _inverted_residual(g, x, f"{name}.double_conv.0", cin, cout, stride, residual=False)
    return _inverted_residual(g, x, f"{name}.double_conv.1", cout, cout, 1, residual=True)


def _up(g: GraphBuilder, x: str, skip: str, name: str, cin: int, cout: int) -> str:
    """Bilinear ×2 (align_corners), concatenated with the skip, then DoubleConvDW."""
    scales = g.constant("upsample_scales", np.array([1, 1, 2, 2], np.float32))
    x = g.op("Resize", [x, "", scales], mode="linear",
             coordinate_transformation_mode="align_corners")
    return _double_conv_dw(g, g.op("Concat", [x, skip], axis=1), f"{name}.conv", cin, cout, 1)


def build_unet(weights: WeightSource, graph_name: str, doc: str) -> onnx.ModelProto:
    """unet_328.py's Model(6, "ave") with `weights`; inputs "input" and "audio", output
    "output"."""
    from onnx import TensorProto, helper

    ch = CHANNELS
    g = GraphBuilder(weights)
    x1 = _inverted_residual(g, "input", "inc.inconv.0", 6, ch[0], 1, residual=False)  # 32 × 320
    x2 = _double_conv_dw(g, x1, "down1.maxpool_conv.0", ch[0], ch[0], 2)      # 32 × 160
    x3 = _double_conv_dw(g, x2, "down2.maxpool_conv.0", ch[0], ch[1], 2)      # 64 × 80
    x4 = _double_conv_dw(g, x3, "down3.maxpool_conv.0", ch[1], ch[2], 2)      # 128 × 40
    x5 = _double_conv_dw(g, x4, "down4.maxpool_conv.0", ch[2], ch[3], 2)      # 256 × 20
    x6 = _double_conv_dw(g, x5, "down5.maxpool_conv.0", ch[3], ch[4], 2)      # 512 × 10

    a = _inverted_residual(g, "audio", "audio_model.conv1", ch[0], ch[1], 1, False)  # 64 × 16
    a = _inverted_residual(g, a, "audio_model.conv2", ch[1], ch[2], 1, False)        # 128 × 16
    a = g.op("Relu", [g.conv(a, ConvKey("audio_model.conv3", "audio_model.bn3", bias=True),
                             ch[2], ch[3], k=3, pad=1)])                             # 256 × 16
    a = _inverted_residual(g, a, "audio_model.conv4", ch[3], ch[3], 1, True)
    a = g.op("Relu", [g.conv(a, ConvKey("audio_model.conv5", "audio_model.bn5", bias=True),
                             ch[3], ch[4], k=3, stride=2, pad=3)])                   # 512 × 10
    a = _inverted_residual(g, a, "audio_model.conv6", ch[4], ch[4], 1, True)
    a = _inverted_residual(g, a, "audio_model.conv7", ch[4], ch[4], 1, True)

    x = g.op("Concat", [x6, a], axis=1)                                       # 1024 × 10
    x = _double_conv_dw(g, x, "fuse_conv.0", ch[4] * 2, ch[4], 1)
    x = _double_conv_dw(g, x, "fuse_conv.1", ch[4], ch[3], 1)                 # 256 × 10
    x = _up(g, x, x5, "up1", ch[4], ch[3] // 2)                               # 128 × 20
    x = _up(g, x, x4, "up2", ch[3], ch[2] // 2)                               # 64 × 40
    x = _up(g, x, x3, "up3", ch[2], ch[1] // 2)                               # 32 × 80
    x = _up(g, x, x2, "up4", ch[1], ch[0])                                    # 32 × 160
    x = _up(g, x, x1, "up5", ch[1], ch[0] // 2)                               # 16 × 320
    logits = g.conv(x, ConvKey("outc.conv", bias=True), ch[0] // 2, 3)
    g.nodes.append(helper.make_node("Sigmoid", [logits], ["output"], name="output"))
    return g.model(
        graph_name,
        inputs=[helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", *VISUAL_SHAPE]),
                helper.make_tensor_value_info("audio", TensorProto.FLOAT, ["batch", *AUDIO_SHAPE])],
        outputs=[helper.make_tensor_value_info("output", TensorProto.FLOAT,
                                               ["batch", *PREDICTION_SHAPE])],
        doc=doc)


def build_audio_encoder(weights: WeightSource, graph_name: str, doc: str) -> onnx.ModelProto:
    """The audio encoder with `weights`: "mel_spectrogram" [B,1,80,16] → "audio_features"
    [B,512]."""
    from onnx import TensorProto, helper

    g = GraphBuilder(weights)
    x = "mel_spectrogram"
    for i, (cin, cout, k, stride, pad, residual) in enumerate(_ENCODER_BLOCKS):
        y = g.conv(x, ConvKey(f"{i}.conv_block.0", f"{i}.conv_block.1", bias=True), cin, cout,
                   k=k, stride=stride, pad=pad)
        x = g.op("Relu", [g.op("Add", [y, x]) if residual else y])
    g.nodes.append(helper.make_node("Flatten", [x], ["audio_features"], name="audio_features",
                                    axis=1))
    return g.model(
        graph_name,
        inputs=[helper.make_tensor_value_info("mel_spectrogram", TensorProto.FLOAT,
                                              ["batch", *MEL_WINDOW_SHAPE])],
        outputs=[helper.make_tensor_value_info("audio_features", TensorProto.FLOAT,
                                               ["batch", ENCODED_DIM])],
        doc=doc)


def audio_mode(tensors: dict[str, np.ndarray]) -> str | None:
    """The SyncTalk-2D audio mode a UNet state dict was built for ("ave" also for hubert,
    whose shapes are the same), or None when it has no audio branch we know."""
    first = tensors.get("audio_model.conv1.conv.0.weight")
    return None if first is None else _AUDIO_MODES.get(tuple(first.shape))


def unet_from_state_dict(tensors: dict[str, np.ndarray], doc: str) -> onnx.ModelProto:
    """The UNet ONNX of a trained unet_328 "ave" state dict; ArchitectureError names the
    first key that does not fit (another audio mode is named as such)."""
    if tensors and all(k[:1].isdigit() and ".conv_block." in k for k in tensors):
        raise ArchitectureError(f"this is an audio encoder's state dict, not {UNET}")
    mode = audio_mode(tensors)
    if mode not in (None, "ave"):
        raise ArchitectureError(f"a '{mode}' checkpoint (audio_model.conv1 takes "
                                f"{tensors['audio_model.conv1.conv.0.weight'].shape[1]} "
                                f"channels): only {UNET} is served")
    weights = StateDictWeights(tensors, UNET)
    model = build_unet(weights, "synctalk2d_unet_328", doc)
    weights.check_all_used()
    return model


def encoder_from_state_dict(tensors: dict[str, np.ndarray], doc: str) -> onnx.ModelProto:
    """The audio encoder ONNX of a trained encoder state dict (keys "0.conv_block.0.weight",
    ..., with or without the "audio_encoder." prefix)."""
    if tensors and all(k.startswith("audio_encoder.") for k in tensors):
        tensors = {k[len("audio_encoder."):]: v for k, v in tensors.items()}
    if any(k.startswith(("inc.", "audio_model.")) for k in tensors):
        raise ArchitectureError(f"this is a UNet's state dict, not {ENCODER}")
    weights = StateDictWeights(tensors, ENCODER)
    model = build_audio_encoder(weights, "synctalk2d_audio_encoder", doc)
    weights.check_all_used()
    return model
