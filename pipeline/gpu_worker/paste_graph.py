"""The compositor's paste as one ONNX graph over a batch, so it runs where the prediction is
(`compositor.device: gpu`: ONNX Runtime's CUDA provider; the CPU provider in the tests).

It computes what a compositor's `paste` computes, frame by frame:
- synctalk: the background's rect cubic-resized to 328x328, the 320x320 prediction placed at
  [4:324, 4:324], the crop cubic-resized back to the rect and pasted;
- stretch: the prediction stretched over the rect with the Go server's bilinear formula.
Pixels as the compositor converts them: x255, NaN -> 0, clamp to [0, 255], truncate.

Rects differ from frame to frame, so no resize has one shape for the batch. Every resize
is therefore laid out as gathers of source rows or columns at tap indices and a weighted
sum over the taps; the host computes the taps (`paste_feeds`: a few kB per frame, cached
per rect size), the graph only gathers, multiplies and adds. The rect's pixels are first
gathered into a window of the batch's largest rect (`Sh` x `Sw`), and the pasted window is
put back into the full frame by one more pair of gathers and a select. Only Gather,
Transpose, Reshape, Mul, ReduceSum, Round/Floor, Clip, Where and friends: every one has a
kernel on the CUDA provider, for uint8 as for float.

The cubic weights are OpenCV's (a = -0.75, half-pixel centres, replicated border), in
float32; OpenCV's own 8-bit resize (Intel IPP inside the wheels) rounds differently, so a
pixel may differ by one level: the unit tests hold the graph to >= 45 dB of the
compositor's paste. The stretch weights are the Go formula's, in the same float32
order of operations, so those frames are equal.
"""
from __future__ import annotations

from functools import lru_cache
from typing import TYPE_CHECKING

import numpy as np

from pipeline.synctalk import CROP, INNER, PREDICTION_SHAPE

if TYPE_CHECKING:
    import onnx

    from pipeline.networks.builder import GraphBuilder

Rect = tuple[int, int, int, int]
CUBIC_A = -0.75                 # OpenCV's INTER_CUBIC kernel
MOUTH = PREDICTION_SHAPE[1]     # 320
MODES = ("synctalk", "stretch")
OUTPUT = "frames_out"


# ---- taps: which source pixels, with which weights, make each output pixel --------------

@lru_cache(maxsize=512)
def cubic_taps(src: int, dst: int) -> tuple[np.ndarray, np.ndarray]:
    """OpenCV's cubic resize of `src` pixels to `dst`: ([dst,4] source indices, clamped to
    the edge, [dst,4] float32 weights)."""
    fx = ((np.arange(dst) + 0.5) * (src / dst) - 0.5).astype(np.float32)
    sx = np.floor(fx)
    x = (fx - sx).astype(np.float64)
    a = CUBIC_A
    c0 = ((a * (x + 1) - 5 * a) * (x + 1) + 8 * a) * (x + 1) - 4 * a
    c1 = ((a + 2) * x - (a + 3)) * x * x + 1
    c2 = ((a + 2) * (1 - x) - (a + 3)) * (1 - x) * (1 - x) + 1
    weights = np.stack([c0, c1, c2, 1 - c0 - c1 - c2], axis=1).astype(np.float32)
    index = np.clip(sx.astype(np.int64)[:, None] + np.arange(-1, 3), 0, src - 1)
    return _frozen(index), _frozen(weights)


@lru_cache(maxsize=512)
def go_bilinear_taps(src: int, dst: int) -> tuple[np.ndarray, np.ndarray]:
    """The Go server's bilinear stretch of `src` pixels to `dst` (no half-pixel offset,
    float32 math, the right neighbour clamped): ([dst,2] indices, [dst,2] weights)."""
    f32 = np.float32
    sx = np.arange(dst, dtype=f32) * (f32(src) / f32(dst))
    x0 = sx.astype(np.int64)
    fx = sx - x0.astype(f32)
    index = np.stack([x0, np.minimum(x0 + 1, src - 1)], axis=1)
    return _frozen(index), _frozen(np.stack([f32(1) - fx, fx], axis=1))


def _frozen(a: np.ndarray) -> np.ndarray:
    a.flags.writeable = False  # shared by every call through the cache
    return a


def _resize_taps(mode: str, src: int, dst: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Taps of the paste's resize to `dst` pixels, padded to `size` outputs (weight 0)."""
    index, weights = cubic_taps(src, dst) if mode == "synctalk" else go_bilinear_taps(src, dst)
    pad = ((0, size - dst), (0, 0))
    return np.pad(index, pad), np.pad(weights, pad)


def paste_feeds(mode: str, rects: list[Rect], height: int,
                width: int) -> dict[str, np.ndarray]:
    """The graph's per-batch inputs for frames with these rects (clipped to a frame of
    height x width, non-empty), besides `backgrounds`, `frames` and `prediction`."""
    if mode not in MODES:
        raise ValueError(f"composite mode must be one of {MODES}, got {mode!r}")
    b = len(rects)
    r = np.asarray(rects, np.int64).reshape(b, 4)
    x1, y1, x2, y2 = r.T
    w, h = x2 - x1, y2 - y1
    if b == 0 or (w < 1).any() or (h < 1).any() or (x1 < 0).any() or (y1 < 0).any() \
            or (x2 > width).any() or (y2 > height).any():
        raise ValueError(f"rects must be non-empty and inside the {width}x{height} frame")
    sw, sh = int(w.max()), int(h.max())
    src = CROP if mode == "synctalk" else MOUTH
    base = np.arange(b)[:, None]
    feeds: dict[str, np.ndarray] = {}
    if mode == "synctalk":
        # the rect's pixels into the window (rows/columns past the rect repeat its last one)
        feeds["window_rows"] = base * height + y1[:, None] + np.minimum(np.arange(sh), h[:, None] - 1)
        feeds["window_cols"] = base * width + x1[:, None] + np.minimum(np.arange(sw), w[:, None] - 1)
        crop_x = [cubic_taps(int(n), CROP) for n in w]
        crop_y = [cubic_taps(int(n), CROP) for n in h]
        feeds["crop_x"] = base[:, :, None] * sw + np.stack([t[0] for t in crop_x])
        feeds["crop_x_w"] = np.stack([t[1] for t in crop_x])[..., None, None]
        feeds["crop_y"] = base[:, :, None] * sh + np.stack([t[0] for t in crop_y])
        feeds["crop_y_w"] = np.stack([t[1] for t in crop_y])[..., None, None]
    paste_x = [_resize_taps(mode, src, int(n), sw) for n in w]
    paste_y = [_resize_taps(mode, src, int(n), sh) for n in h]
    feeds["paste_x"] = base[:, :, None] * src + np.stack([t[0] for t in paste_x])
    feeds["paste_x_w"] = np.stack([t[1] for t in paste_x])[..., None, None]
    feeds["paste_y"] = base[:, :, None] * src + np.stack([t[0] for t in paste_y])
    feeds["paste_y_w"] = np.stack([t[1] for t in paste_y])[..., None, None]
    # back into the frame: frame pixel (y, x) reads window pixel (y - y1, x - x1) in the rect
    xs, ys = np.arange(width), np.arange(height)
    feeds["place_x"] = base * sw + np.clip(xs - x1[:, None], 0, sw - 1)
    feeds["place_y"] = base * sh + np.clip(ys - y1[:, None], 0, sh - 1)
    feeds["inside_x"] = ((xs >= x1[:, None]) & (xs < x2[:, None]))[:, None, :, None]
    feeds["inside_y"] = ((ys >= y1[:, None]) & (ys < y2[:, None]))[:, :, None, None]
    return {k: np.ascontiguousarray(v) for k, v in feeds.items()}


# ---- the graph ---------------------------------------------------------------------------

def _merge01(g: GraphBuilder, x: str) -> str:
    """x [a, b, ...] -> [a*b, ...], so a Gather on axis 0 takes per-batch indices
    (offset by batch * b on the host)."""
    tail = g.op("Slice", [g.op("Shape", [x]), g.constant("two", np.array([2])),
                          g.constant("big", np.array([2**62]))])
    return g.op("Reshape", [x, g.op("Concat", [g.constant("minus_one", np.array([-1])), tail],
                                    axis=0)])


def _swap12(g: GraphBuilder, x: str) -> str:
    return g.op("Transpose", [x], perm=[0, 2, 1, 3])


def _resample(g: GraphBuilder, source: str, taps: str, weights: str) -> str:
    """source [B, n, m, 3]: out[b, i, :, :] = sum_k weights[b,i,k] * source[b, taps[b,i,k]]."""
    gathered = g.op("Gather", [_merge01(g, source), taps], axis=0)  # [B, dst, K, m, 3]
    return g.op("ReduceSum", [g.op("Mul", [gathered, weights]), g.constant("axis2", np.array([2]))],
                keepdims=0)


def _to_pixels(g: GraphBuilder, x: str, rounding: str) -> str:
    return g.op("Clip", [g.op(rounding, [x]), g.constant("zero", np.array(0, np.float32)),
                         g.constant("u8max", np.array(255, np.float32))])


def paste_graph(mode: str) -> onnx.ModelProto:
    """The batch paste of `mode`: backgrounds [N,H,W,3] uint8 (all of a model's frames),
    frames [B] int64 (which background each output frame is on), prediction [B,3,320,320]
    float32 and the `paste_feeds` -> frames_out [B,H,W,3] uint8."""
    from onnx import TensorProto, checker, helper

    from pipeline.networks.builder import GraphBuilder

    if mode not in MODES:
        raise ValueError(f"composite mode must be one of {MODES}, got {mode!r}")
    g = GraphBuilder()
    bg = g.op("Gather", ["backgrounds", "frames"], axis=0)                     # [B,H,W,3] u8
    # the prediction as the compositor converts it, HWC
    scaled = g.op("Mul", ["prediction", g.constant("u8scale", np.array(255, np.float32))])
    finite = g.op("Where", [g.op("IsNaN", [scaled]), g.constant("zero", np.array(0, np.float32)), scaled])
    mouth = g.op("Transpose", [_to_pixels(g, finite, "Floor")], perm=[0, 2, 3, 1])  # [B,320,320,3]
    if mode == "synctalk":
        window = g.op("Gather", [_merge01(g, bg), "window_rows"], axis=0)        # [B,Sh,W,3]
        window = g.op("Gather", [_merge01(g, _swap12(g, window)), "window_cols"], axis=0)
        window = g.op("Cast", [window], to=TensorProto.FLOAT)                    # [B,Sw,Sh,3]
        crop = _resample(g, window, "crop_x", "crop_x_w")                        # [B,328,Sh,3]
        crop = _resample(g, _swap12(g, crop), "crop_y", "crop_y_w")              # [B,328,328,3]
        crop = _to_pixels(g, crop, "Round")
        border = INNER.start
        placed = g.op("Pad", [mouth, g.constant("inner_pads", np.array(
            [0, border, border, 0, 0, CROP - INNER.stop, CROP - INNER.stop, 0]))])
        inner = np.zeros((1, CROP, CROP, 1), bool)
        inner[:, INNER, INNER] = True
        source = g.op("Where", [g.constant("inner", inner), placed, crop])       # [B,328,328,3]
    else:
        source = mouth
    patch = _resample(g, _swap12(g, source), "paste_x", "paste_x_w")             # [B,Sw,S,3]
    patch = _resample(g, _swap12(g, patch), "paste_y", "paste_y_w")              # [B,Sh,Sw,3]
    patch = g.op("Cast", [_to_pixels(g, patch, "Round" if mode == "synctalk" else "Floor")],
                 to=TensorProto.UINT8)
    full = g.op("Gather", [_merge01(g, _swap12(g, patch)), "place_x"], axis=0)   # [B,W,Sh,3]
    full = g.op("Gather", [_merge01(g, _swap12(g, full)), "place_y"], axis=0)    # [B,H,W,3]
    inside = g.op("And", ["inside_y", "inside_x"])                               # [B,H,W,1]
    g.nodes.append(helper.make_node("Where", [inside, full, bg], [OUTPUT], name=OUTPUT))

    def tensor(name: str, kind: int, shape: list[str | int]) -> onnx.ValueInfoProto:
        return helper.make_tensor_value_info(name, kind, shape)

    i64, f32, u8 = TensorProto.INT64, TensorProto.FLOAT, TensorProto.UINT8
    inputs = [tensor("backgrounds", u8, ["N", "H", "W", 3]), tensor("frames", i64, ["B"]),
              tensor("prediction", f32, ["B", *PREDICTION_SHAPE])]
    if mode == "synctalk":
        inputs += [tensor("window_rows", i64, ["B", "Sh"]), tensor("window_cols", i64, ["B", "Sw"]),
                   tensor("crop_x", i64, ["B", CROP, 4]), tensor("crop_x_w", f32, ["B", CROP, 4, 1, 1]),
                   tensor("crop_y", i64, ["B", CROP, 4]), tensor("crop_y_w", f32, ["B", CROP, 4, 1, 1])]
    taps = 4 if mode == "synctalk" else 2
    inputs += [tensor("paste_x", i64, ["B", "Sw", taps]),
               tensor("paste_x_w", f32, ["B", "Sw", taps, 1, 1]),
               tensor("paste_y", i64, ["B", "Sh", taps]),
               tensor("paste_y_w", f32, ["B", "Sh", taps, 1, 1]),
               tensor("place_x", i64, ["B", "W"]), tensor("place_y", i64, ["B", "H"]),
               tensor("inside_x", TensorProto.BOOL, ["B", 1, "W", 1]),
               tensor("inside_y", TensorProto.BOOL, ["B", "H", 1, 1])]
    model = g.model(f"paste_{mode}", inputs, [tensor(OUTPUT, u8, ["B", "H", "W", 3])],
                    doc=f"lipsync: the compositor's {mode} paste over a batch of frames")
    model.producer_name = "lipsync-server-paste"
    checker.check_model(model)
    return model
