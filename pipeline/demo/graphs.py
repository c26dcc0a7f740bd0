"""The demo avatar's two small real ONNX graphs: the UNet and the audio encoder.

The demo UNet is not a neural network: it returns the reference face (input channels 0–2)
with an open mouth drawn in, as soft ellipses (lips, dark cavity, upper teeth) whose height
follows `openness = clip(UNET_GAIN * mean(audio[:, 14:18]), 0, 1)`. Channels 14–17 hold the
time rows 7 and 8 of the ±8-frame feature context, the rows of the frame itself. Zero
features give the reference face unchanged (the mask is multiplied by clip(height, 0, 1)).

The demo encoder maps each mel window to features proportional to its speech energy:
per mel bin relu((x + 4) / 8 - ENCODER_FLOOR) (a 1×1 Conv with bias, then Relu), averaged,
then a positive [8, 512] MatMul + Relu. The floor sits above the level of the pauses between
words in real speech, so the mouth closes in those pauses; silence (mel = -4) gives exactly 0.
Calibration on the reference speech fixture (20.9 s of speech): the window means have
median ≈ 0.08 and 95th percentile ≈ 0.18; UNET_GAIN = 6 opens the mouth fully from ≈ 0.17
and leaves the quietest ~10 % of frames (pauses) within a pixel of closed.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from pipeline.demo.frames import CROP_DY, CROP_SIZE, MOUTH_DY, MOUTH_HALF_W
from pipeline.synctalk import (
    AUDIO_SHAPE,
    CROP,
    ENCODED_DIM,
    INNER,
    MEL_WINDOW_SHAPE,
    PREDICTION_SHAPE,
    VISUAL_SHAPE,
)

if TYPE_CHECKING:
    import onnx

# Bump when anything generated changes, so stale builds are detected and rebuilt.
ASSET_VERSION = 1
OPSET = 17
IR_VERSION = 8  # the IR of opset 17; every onnxruntime since 1.11 loads it
_PRODUCER = ("lipsync-server-demo", str(ASSET_VERSION))

# --- Demo UNet (320×320 crop pixels) ----------------------------------------------------
UNET_GAIN = 6.0  # openness = clip(UNET_GAIN * mean(audio[:, 14:18]), 0, 1)
MOUTH_RY_MAX = 28.0  # vertical half-axis of the cavity when fully open
_JAW_DROP = 0.35  # the cavity centre moves down by this fraction of its half-height
_LIP_WIDTH = 5.0  # lip ring thickness around the cavity
_TEETH_LINE = 0.6  # teeth cover the cavity above centre - this fraction of half-height
_EDGE_SHARPNESS = 1.5  # sigmoid slope per pixel: a 2–3 px anti-aliased edge
_LIP_BGR = (0.36, 0.33, 0.72)
_CAVITY_BGR = (0.10, 0.07, 0.28)
_TEETH_BGR = (0.90, 0.93, 0.95)

# --- Demo encoder ----------------------------------------------------------------------
ENCODER_FLOOR = 0.15  # normalised mel level (0 = -4 silence, 1 = +4) counted as no speech
_ENCODER_HIDDEN = 8

# The frame counter "#0042": drawn at COUNTER_ORIGIN, always inside COUNTER_BOX (x1, y1, x2, y2).


def _crop320(offset_px: float) -> float:
    """A face-relative frame offset (px from the crop's x1/y1) in 320-crop pixel coordinates.

    The crop is the rect resized to 328 (cv2 maps pixel centres: dst = (src+0.5)·s − 0.5)
    and cut at [4:324].
    """
    return (offset_px + 0.5) * CROP / CROP_SIZE - 0.5 - INNER.start


def mouth_centre_320() -> tuple[float, float]:
    """(x, y) of the closed mouth in the UNet's 320×320 crop; the same in every frame."""
    return _crop320(CROP_SIZE // 2), _crop320(MOUTH_DY - CROP_DY)


def _set_metadata(model: onnx.ModelProto) -> None:
    model.ir_version = IR_VERSION
    model.producer_name, model.producer_version = _PRODUCER
    model.model_version = ASSET_VERSION


def _f32(name: str, value: np.ndarray | float | list[float]) -> onnx.TensorProto:
    from onnx import numpy_helper

    return numpy_helper.from_array(np.asarray(value, dtype=np.float32), name)


def _i64(name: str, value: list[int]) -> onnx.TensorProto:
    from onnx import numpy_helper

    return numpy_helper.from_array(np.asarray(value, dtype=np.int64), name)


def build_unet_model() -> onnx.ModelProto:
    """The demo UNet: the reference face with a mouth drawn open by the audio features."""
    import onnx
    from onnx import TensorProto, helper

    mx, my0 = mouth_centre_320()
    rx = MOUTH_HALF_W * CROP / CROP_SIZE
    xs = np.arange(320, dtype=np.float64)
    xn = (xs - mx) / rx
    # Height of the unit ellipse at each column (0 outside) and a column mask for the tips.
    half_h = np.sqrt(np.clip(1.0 - xn**2, 0.0, None))
    lip_rx = rx + _LIP_WIDTH
    lip_half_h = np.sqrt(np.clip(1.0 - ((xs - mx) / lip_rx) ** 2, 0.0, None))
    cols = 1.0 / (1.0 + np.exp(-_EDGE_SHARPNESS * (rx - np.abs(xs - mx))))
    lip_cols = 1.0 / (1.0 + np.exp(-_EDGE_SHARPNESS * (lip_rx - np.abs(xs - mx))))

    inits = [
        _i64("ch_start", [0]), _i64("ch_end", [3]), _i64("ch_axis", [1]),
        _i64("row_start", [14]), _i64("row_end", [18]),
        _f32("zero", 0.0), _f32("one", 1.0),
        _f32("gain", UNET_GAIN), _f32("ry_max", MOUTH_RY_MAX),
        _f32("my0", my0), _f32("jaw_drop", _JAW_DROP),
        _f32("lip_width", _LIP_WIDTH), _f32("teeth_line", _TEETH_LINE),
        _f32("sharpness", _EDGE_SHARPNESS),
        _f32("grid_y", np.arange(320, dtype=np.float32).reshape(1, 1, 320, 1)),
        _f32("half_h", half_h.reshape(1, 1, 1, 320)),
        _f32("lip_half_h", lip_half_h.reshape(1, 1, 1, 320)),
        _f32("cols", cols.reshape(1, 1, 1, 320)),
        _f32("lip_cols", lip_cols.reshape(1, 1, 1, 320)),
        _f32("lip_bgr", np.reshape(_LIP_BGR, (1, 3, 1, 1))),
        _f32("cavity_bgr", np.reshape(_CAVITY_BGR, (1, 3, 1, 1))),
        _f32("teeth_bgr", np.reshape(_TEETH_BGR, (1, 3, 1, 1))),
    ]  # fmt: skip

    def node(op: str, inputs: list[str], output: str, **attrs: Any) -> onnx.NodeProto:
        return helper.make_node(op, inputs, [output], name=output, **attrs)

    nodes = [
        # Reference face, and openness from the frame's own feature rows (7 and 8).
        node("Slice", ["input", "ch_start", "ch_end", "ch_axis"], "ref_raw"),
        node("Clip", ["ref_raw", "zero", "one"], "ref"),
        node("Slice", ["audio", "row_start", "row_end", "ch_axis"], "own_rows"),
        node("ReduceMean", ["own_rows"], "level", axes=[1, 2, 3], keepdims=1),
        node("Mul", ["level", "gain"], "level_gained"),
        node("Clip", ["level_gained", "zero", "one"], "openness"),
        node("Mul", ["openness", "ry_max"], "ry"),  # [B,1,1,1]
        # Multiplying every mask by clip(ry, 0, 1) makes a closed mouth an exact no-op.
        node("Clip", ["ry", "zero", "one"], "gate"),
        node("Mul", ["ry", "jaw_drop"], "drop"),
        node("Add", ["my0", "drop"], "my"),
        node("Sub", ["grid_y", "my"], "dy"),
        node("Abs", ["dy"], "abs_dy"),  # [B,1,320,1]
        # Cavity: inside where |y - my| < ry * half_h(x).
        node("Mul", ["ry", "half_h"], "cavity_h"),  # [B,1,1,320]
        node("Sub", ["cavity_h", "abs_dy"], "cavity_d"),  # [B,1,320,320]
        node("Mul", ["cavity_d", "sharpness"], "cavity_s"),
        node("Sigmoid", ["cavity_s"], "cavity_soft"),
        node("Mul", ["cavity_soft", "cols"], "cavity_cols"),
        node("Mul", ["cavity_cols", "gate"], "cavity"),
        # Lips: the same ellipse grown by the lip width.
        node("Add", ["ry", "lip_width"], "lip_ry"),
        node("Mul", ["lip_ry", "lip_half_h"], "lip_h"),
        node("Sub", ["lip_h", "abs_dy"], "lip_d"),
        node("Mul", ["lip_d", "sharpness"], "lip_s"),
        node("Sigmoid", ["lip_s"], "lip_soft"),
        node("Mul", ["lip_soft", "lip_cols"], "lip_cols_m"),
        node("Mul", ["lip_cols_m", "gate"], "lip"),
        # Upper teeth: the part of the cavity above my - teeth_line * ry.
        node("Mul", ["ry", "teeth_line"], "teeth_off"),
        node("Sub", ["my", "teeth_off"], "teeth_y"),
        node("Sub", ["teeth_y", "grid_y"], "teeth_d"),
        node("Mul", ["teeth_d", "sharpness"], "teeth_s"),
        node("Sigmoid", ["teeth_s"], "teeth_rows"),
        node("Mul", ["cavity", "teeth_rows"], "teeth"),
        # Paint lips, then cavity, then teeth over the reference.
        node("Sub", ["lip_bgr", "ref"], "lip_delta"),
        node("Mul", ["lip", "lip_delta"], "lip_paint"),
        node("Add", ["ref", "lip_paint"], "with_lips"),
        node("Sub", ["cavity_bgr", "with_lips"], "cavity_delta"),
        node("Mul", ["cavity", "cavity_delta"], "cavity_paint"),
        node("Add", ["with_lips", "cavity_paint"], "with_cavity"),
        node("Sub", ["teeth_bgr", "with_cavity"], "teeth_delta"),
        node("Mul", ["teeth", "teeth_delta"], "teeth_paint"),
        node("Add", ["with_cavity", "teeth_paint"], "painted"),
        node("Clip", ["painted", "zero", "one"], "output"),
    ]
    graph = helper.make_graph(
        nodes,
        "demo_unet",
        inputs=[
            helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", *VISUAL_SHAPE]),
            helper.make_tensor_value_info("audio", TensorProto.FLOAT, ["batch", *AUDIO_SHAPE]),
        ],
        outputs=[
            helper.make_tensor_value_info("output", TensorProto.FLOAT, ["batch", *PREDICTION_SHAPE])
        ],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.doc_string = "Demo lip-sync UNet: reference face with an audio-driven drawn mouth."
    _set_metadata(model)
    onnx.checker.check_model(model)
    return model


def _weyl(n: int, offset: int) -> np.ndarray:
    """n deterministic values in [0.5, 1.5): a golden-ratio sequence, no RNG version drift."""
    k = np.arange(offset, offset + n, dtype=np.float64)
    return 0.5 + np.mod(k * 0.6180339887498949, 1.0)


def build_audio_encoder_model() -> onnx.ModelProto:
    """The demo audio encoder: features proportional to the window's speech energy."""
    import onnx
    from onnx import TensorProto, helper

    conv_w = _weyl(_ENCODER_HIDDEN, 1)
    proj = _weyl(_ENCODER_HIDDEN * ENCODED_DIM, 101).reshape(_ENCODER_HIDDEN, ENCODED_DIM)
    # Scale so that mean(features) == mean over the window of relu(level - floor).
    proj /= float((conv_w @ proj).mean())

    inits = [
        _f32("four", 4.0),
        _f32("eight", 8.0),
        _f32("conv_w", conv_w.reshape(_ENCODER_HIDDEN, 1, 1, 1)),
        _f32("conv_b", -conv_w * ENCODER_FLOOR),
        _f32("proj", proj),
    ]
    nodes = [
        helper.make_node("Add", ["mel_spectrogram", "four"], ["shifted"], name="shifted"),
        helper.make_node("Div", ["shifted", "eight"], ["level"], name="level"),  # silence → 0
        helper.make_node("Conv", ["level", "conv_w", "conv_b"], ["hidden"], name="hidden",
                         kernel_shape=[1, 1]),
        helper.make_node("Relu", ["hidden"], ["speech"], name="speech"),
        helper.make_node("ReduceMean", ["speech"], ["pooled"], name="pooled", axes=[2, 3],
                         keepdims=0),
        helper.make_node("MatMul", ["pooled", "proj"], ["projected"], name="projected"),
        helper.make_node("Relu", ["projected"], ["audio_features"], name="audio_features"),
    ]
    graph = helper.make_graph(
        nodes,
        "demo_audio_encoder",
        inputs=[
            helper.make_tensor_value_info(
                "mel_spectrogram", TensorProto.FLOAT, ["batch", *MEL_WINDOW_SHAPE]
            )
        ],
        outputs=[
            helper.make_tensor_value_info("audio_features", TensorProto.FLOAT, ["batch", ENCODED_DIM])
        ],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.doc_string = "Demo audio encoder: mel window → 512 features tracking speech energy."
    _set_metadata(model)
    onnx.checker.check_model(model)
    return model

