"""The built-in demo avatar: background frames, crop rects and two small real ONNX graphs.

Everything here is generated, deterministically, so the server runs end to end with no
downloaded weights: `lipsync serve` on a fresh box builds the assets into `models_root` in
a few seconds and serves model "demo" with the same code paths a real SyncTalk-2D avatar
takes (mel → encoder ONNX → per-frame [32,16,16] → UNet ONNX → composite → JPEG).

Layout under `models_root` (the same one a real avatar uses):

    audio_encoder.onnx          mel_spectrogram [B,1,80,16] → audio_features [B,512]
    demo/unet.onnx              input [B,6,320,320], audio [B,32,16,16] → output [B,3,320,320]
    demo/crop_rects.json        one square [x1, y1, x2, y2] per frame (half-open)
    demo/frames/frame_0000.jpg  1280×720 backgrounds, JPEG quality 90
    demo/build.json             written last (inside the staging dir): version + frame count

The avatar is a drawn cartoon face that sways a few pixels (period 50 and 25 frames, so the
250-frame loop is seamless) with a big frame counter top-left, so a test can tell which
background came back. The crop rect follows the face exactly (same integer offset), so the
mouth sits at one fixed place in every 320×320 crop and the demo UNet can draw it there.

The demo UNet is not a neural network: it returns the reference face (input channels 0–2)
with an open mouth drawn in, as soft ellipses (lips, dark cavity, upper teeth) whose height
follows `openness = clip(UNET_GAIN * mean(audio[:, 14:18]), 0, 1)`. Channels 14–17 hold the
time rows 7 and 8 of the ±8-frame feature context, the rows of the frame itself. Zero
features give the reference face unchanged (the mask is multiplied by clip(height, 0, 1)).

The demo encoder maps each mel window to features proportional to its speech energy:
per mel bin relu((x + 4) / 8 - ENCODER_FLOOR) (a 1×1 Conv with bias, then Relu), averaged,
then a positive [8, 512] MatMul + Relu. The floor sits above the level of the pauses between
words in real speech, so the mouth closes in those pauses; silence (mel = -4) gives exactly 0.
Calibration on /work/shared/fixtures/reference/speech_16k.npy (20.9 s of speech): the window
means have median ≈ 0.08 and 95th percentile ≈ 0.18; UNET_GAIN = 6 opens the mouth fully
from ≈ 0.17 and leaves the quietest ~10 % of frames (pauses) within a pixel of closed.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import cv2
import numpy as np

from pipeline.shm.segment import pid_alive

if TYPE_CHECKING:
    import onnx

DEMO_MODEL_ID = "demo"
NUM_FRAMES = 250
FRAME_W, FRAME_H = 1280, 720
JPEG_QUALITY = 90

# Bump when anything generated changes, so stale builds are detected and rebuilt.
ASSET_VERSION = 1
_MANIFEST = "build.json"
_STAGING_PREFIX = ".demo-build-"

OPSET = 17
IR_VERSION = 8  # the IR of opset 17; every onnxruntime since 1.11 loads it
_PRODUCER = ("lipsync-server-demo", str(ASSET_VERSION))

# --- Face geometry (frame pixels). The face centre moves by _motion(index). -------------
FACE_CX, FACE_CY = 640, 330
FACE_AX, FACE_AY = 135, 175  # skin ellipse half-axes
MOUTH_DY = 95  # mouth line below the face centre
MOUTH_HALF_W = 34
CROP_SIZE = 192  # square crop rect side, like SyncTalk's 173–189 px for 1280×720
CROP_DY = 5  # crop top below the face centre (nose line); bottom is 22 px below the chin

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
FEATURE_DIM = 512

# The frame counter "#0042": drawn at COUNTER_ORIGIN, always inside COUNTER_BOX (x1, y1, x2, y2).
COUNTER_ORIGIN = (30, 110)
COUNTER_BOX = (20, 20, 340, 135)

_SKIN = (150, 190, 235)
_SKIN_SHADE = (120, 160, 210)
_HAIR = (40, 45, 60)
_LIP_LINE = (95, 90, 175)


@dataclass(frozen=True)
class DemoAssets:
    """Where the demo avatar's files live under one models root."""

    root: Path
    unet_path: Path
    background_dir: Path
    crop_rects_path: Path
    audio_encoder_path: Path


def demo_asset_paths(root: Path) -> DemoAssets:
    """The demo's file paths under `root`; touches nothing on disk."""
    root = Path(root)
    model_dir = root / DEMO_MODEL_ID
    return DemoAssets(
        root=root,
        unet_path=model_dir / "unet.onnx",
        background_dir=model_dir / "frames",
        crop_rects_path=model_dir / "crop_rects.json",
        audio_encoder_path=root / "audio_encoder.onnx",
    )


def _frame_name(index: int) -> str:
    return f"frame_{index:04d}.jpg"


def demo_assets_present(root: Path, num_frames: int = NUM_FRAMES) -> bool:
    """True when a complete build of this asset version with `num_frames` frames is there."""
    paths = demo_asset_paths(root)
    try:
        manifest = json.loads((paths.unet_path.parent / _MANIFEST).read_text())
    except (OSError, ValueError):
        return False
    if manifest != {"version": ASSET_VERSION, "num_frames": num_frames}:
        return False
    files = [paths.unet_path, paths.crop_rects_path, paths.audio_encoder_path]
    files += [paths.background_dir / _frame_name(i) for i in range(num_frames)]
    return all(p.is_file() for p in files)


def build_demo_assets(
    root: Path,
    num_frames: int = NUM_FRAMES,
    force: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> DemoAssets:
    """Write the demo avatar and both graphs under `root`; a no-op when already complete.

    The avatar directory is staged in a sibling temp dir and renamed into place last, so an
    interrupted build leaves no `demo/` (or the previous one) and is rebuilt next time.
    `progress(done, total)` is called after each frame is written.
    """
    if num_frames < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}")
    paths = demo_asset_paths(root)
    if not force and demo_assets_present(paths.root, num_frames):
        return paths
    paths.root.mkdir(parents=True, exist_ok=True)
    _remove_dead_staging_dirs(paths.root)

    staging = Path(tempfile.mkdtemp(prefix=f"{_STAGING_PREFIX}{os.getpid()}-", dir=paths.root))
    try:
        frames_dir = staging / paths.background_dir.name
        frames_dir.mkdir()
        _write_frames(frames_dir, num_frames, progress)
        rects = [list(demo_crop_rect(i)) for i in range(num_frames)]
        (staging / paths.crop_rects_path.name).write_text(json.dumps(rects))
        (staging / paths.unet_path.name).write_bytes(build_unet_model().SerializeToString())
        (staging / _MANIFEST).write_text(
            json.dumps({"version": ASSET_VERSION, "num_frames": num_frames})
        )

        encoder_tmp = staging / paths.audio_encoder_path.name
        encoder_tmp.write_bytes(build_audio_encoder_model().SerializeToString())
        os.replace(encoder_tmp, paths.audio_encoder_path)

        model_dir = paths.unet_path.parent
        if model_dir.exists():
            shutil.rmtree(model_dir)
        os.rename(staging, model_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return paths


def _remove_dead_staging_dirs(root: Path) -> None:
    """Remove staging dirs left by builds whose process died; a live builder's dir stays."""
    for stale in root.glob(f"{_STAGING_PREFIX}*"):
        pid_text = stale.name[len(_STAGING_PREFIX) :].split("-", 1)[0]
        if pid_text.isdigit() and not pid_alive(int(pid_text)):
            shutil.rmtree(stale, ignore_errors=True)



def _write_frames(
    frames_dir: Path, num_frames: int, progress: Callable[[int, int], None] | None
) -> None:
    def write(index: int) -> None:
        ok, jpeg = cv2.imencode(
            ".jpg", draw_background_frame(index), [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY]
        )
        if not ok:
            raise RuntimeError(f"JPEG encoding of demo frame {index} failed")
        (frames_dir / _frame_name(index)).write_bytes(jpeg.tobytes())

    # Drawing and encoding release the GIL, so threads use every core.
    workers = max(1, min(8, os.cpu_count() or 1))
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="demo-frames") as pool:
        for done, _ in enumerate(pool.map(write, range(num_frames)), start=1):
            if progress is not None:
                progress(done, num_frames)


# --- Background frames --------------------------------------------------------------------


def _motion(index: int) -> tuple[int, int]:
    """Integer head offset of frame `index`: a slow sway and a faster bob, periodic in 50."""
    phase = 2.0 * math.pi * (index % 50) / 50.0
    dx = round(6.0 * math.sin(phase))
    dy = round(3.0 * math.sin(2.0 * phase + 0.7))
    return int(dx), int(dy)


def _face_centre(index: int) -> tuple[int, int]:
    dx, dy = _motion(index)
    return FACE_CX + dx, FACE_CY + dy


def demo_crop_rect(index: int) -> tuple[int, int, int, int]:
    """[x1, y1, x2, y2] (half-open, square) of the face's lower half in frame `index`."""
    cx, cy = _face_centre(index)
    x1 = cx - CROP_SIZE // 2
    y1 = cy + CROP_DY
    return x1, y1, x1 + CROP_SIZE, y1 + CROP_SIZE


@cache
def _backdrop() -> np.ndarray:
    """The static part of every frame: gradient wall, a window, a shelf, the shoulders."""
    ys = np.linspace(0.0, 1.0, FRAME_H, dtype=np.float32)[:, None, None]
    xs = np.linspace(0.0, 1.0, FRAME_W, dtype=np.float32)[None, :, None]
    top = np.array([190, 170, 150], np.float32)  # BGR: a soft blue-grey wall
    bottom = np.array([120, 110, 100], np.float32)
    img = top + (bottom - top) * ys - 25.0 * (xs - 0.5) ** 2
    img = np.clip(np.rint(img), 0, 255).astype(np.uint8)

    # A window on the right and a shelf on the left, so the scene is not a flat card.
    cv2.rectangle(img, (960, 90), (1180, 330), (235, 215, 190), -1)
    cv2.rectangle(img, (960, 90), (1180, 330), (90, 80, 70), 8)
    cv2.line(img, (1070, 90), (1070, 330), (90, 80, 70), 6)
    cv2.line(img, (960, 210), (1180, 210), (90, 80, 70), 6)
    cv2.rectangle(img, (60, 430), (330, 448), (60, 90, 120), -1)
    for i, colour in enumerate([(60, 60, 170), (150, 110, 40), (50, 140, 60), (40, 140, 200)]):
        cv2.rectangle(img, (80 + 50 * i, 340 + 12 * (i % 2)), (118 + 50 * i, 430), colour, -1)

    # Shoulders and shirt.
    cv2.ellipse(img, (FACE_CX, 760), (330, 190), 0, 180, 360, (110, 70, 40), -1, cv2.LINE_AA)
    cv2.ellipse(img, (FACE_CX, 585), (60, 28), 0, 0, 180, (90, 55, 30), -1, cv2.LINE_AA)
    img.setflags(write=False)
    return img


def draw_background_frame(index: int) -> np.ndarray:
    """Frame `index` as drawn (H×W×3 uint8 BGR), before JPEG encoding."""
    img = _backdrop().copy()
    cx, cy = _face_centre(index)
    aa = cv2.LINE_AA

    # Neck, hair behind the head, ears, face.
    cv2.rectangle(img, (cx - 48, cy + 120), (cx + 48, 600), _SKIN_SHADE, -1)
    cv2.ellipse(img, (cx, cy - 30), (FACE_AX + 18, FACE_AY - 5), 0, 180, 360, _HAIR, -1, aa)
    for side in (-1, 1):
        ear = (cx + side * (FACE_AX - 4), cy + 5)
        cv2.ellipse(img, ear, (20, 34), 0, 0, 360, _SKIN_SHADE, -1, aa)
    cv2.ellipse(img, (cx, cy), (FACE_AX, FACE_AY), 0, 0, 360, _SKIN, -1, aa)
    cv2.ellipse(img, (cx, cy - 92), (FACE_AX - 6, 88), 0, 180, 360, _HAIR, -1, aa)

    # Eyes (with a blink twice per 250-frame loop), brows.
    blink = (index % 125) in (60, 61, 62)
    for side in (-1, 1):
        ex, ey = cx + side * 50, cy - 35
        cv2.line(img, (ex - side * 20, ey - 33), (ex + side * 24, ey - 38), _HAIR, 6, aa)
        if blink:
            cv2.line(img, (ex - 22, ey), (ex + 22, ey), (60, 70, 90), 3, aa)
            continue
        cv2.ellipse(img, (ex, ey), (24, 14), 0, 0, 360, (245, 245, 245), -1, aa)
        cv2.circle(img, (ex, ey), 10, (40, 70, 110), -1, aa)
        cv2.circle(img, (ex, ey), 5, (15, 15, 15), -1, aa)
        cv2.circle(img, (ex + 3, ey - 4), 2, (255, 255, 255), -1, aa)

    # Nose and a closed, neutral mouth line (the UNet draws the open mouth over it).
    cv2.line(img, (cx, cy - 5), (cx - 8, cy + 22), _SKIN_SHADE, 3, aa)
    cv2.ellipse(img, (cx, cy + 24), (16, 8), 0, 0, 180, _SKIN_SHADE, 3, aa)
    cv2.ellipse(img, (cx, cy + MOUTH_DY - 3), (MOUTH_HALF_W - 7, 4), 0, 25, 155, _LIP_LINE, 3, aa)
    for side in (-1, 1):
        cv2.circle(img, (cx + side * 78, cy + 50), 18, (140, 165, 240), -1, aa)

    # Frame counter, large enough that any two frames differ clearly in this corner.
    text = f"#{index:04d}"
    font = cv2.FONT_HERSHEY_SIMPLEX
    cv2.putText(img, text, COUNTER_ORIGIN, font, 3.0, (30, 30, 30), 14, aa)
    cv2.putText(img, text, COUNTER_ORIGIN, font, 3.0, (255, 255, 255), 6, aa)
    return img


# --- ONNX graphs ----------------------------------------------------------------------------


def _crop320(offset_px: float) -> float:
    """A face-relative frame offset (px from the crop's x1/y1) in 320-crop pixel coordinates.

    The crop is the rect resized to 328 (cv2 maps pixel centres: dst = (src+0.5)·s − 0.5)
    and cut at [4:324].
    """
    return (offset_px + 0.5) * 328.0 / CROP_SIZE - 0.5 - 4.0


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
    rx = MOUTH_HALF_W * 328.0 / CROP_SIZE
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
            helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 6, 320, 320]),
            helper.make_tensor_value_info("audio", TensorProto.FLOAT, ["batch", 32, 16, 16]),
        ],
        outputs=[
            helper.make_tensor_value_info("output", TensorProto.FLOAT, ["batch", 3, 320, 320])
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
    proj = _weyl(_ENCODER_HIDDEN * FEATURE_DIM, 101).reshape(_ENCODER_HIDDEN, FEATURE_DIM)
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
                         kernel_shape=[1, 1]),  # fmt: skip
        helper.make_node("Relu", ["hidden"], ["speech"], name="speech"),
        helper.make_node("ReduceMean", ["speech"], ["pooled"], name="pooled", axes=[2, 3],
                         keepdims=0),  # fmt: skip
        helper.make_node("MatMul", ["pooled", "proj"], ["projected"], name="projected"),
        helper.make_node("Relu", ["projected"], ["audio_features"], name="audio_features"),
    ]
    graph = helper.make_graph(
        nodes,
        "demo_audio_encoder",
        inputs=[
            helper.make_tensor_value_info(
                "mel_spectrogram", TensorProto.FLOAT, ["batch", 1, 80, 16]
            )
        ],
        outputs=[
            helper.make_tensor_value_info("audio_features", TensorProto.FLOAT, ["batch", 512])
        ],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.doc_string = "Demo audio encoder: mel window → 512 features tracking speech energy."
    _set_metadata(model)
    onnx.checker.check_model(model)
    return model
