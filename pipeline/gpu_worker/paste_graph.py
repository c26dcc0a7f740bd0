"""The compositor's paste as one ONNX graph over a batch, so it runs where the prediction is
(`compositor.device: gpu`: ONNX Runtime's CUDA provider; the CPU provider in the tests).

It computes what a compositor's `paste` computes, frame by frame:
- synctalk: the background's rect cubic-resized to 328x328, the 320x320 prediction placed at
  [4:324, 4:324], the crop cubic-resized back to the rect and pasted;
- stretch: the prediction stretched over the rect with the Go server's bilinear formula.
Pixels as the compositor converts them: x255, NaN -> 0, clamp to [0, 255], truncate.

Rects differ from frame to frame, so no resize has one shape for the batch. Each frame's
rect is gathered into a window of the batch's largest rect size (`Sh` x `Sw`, placed
inside the frame over the rect), and every resize is laid out as one gather of source
pixels or rows per tap, times the tap's weight, added up: the host computes the taps
(`paste_feeds`: a few kB per frame, cached per rect size), the graph only gathers,
multiplies and adds (no reduction, no transpose of a frame). The pasted window goes back
into a copy of the background frame by one ScatterND. Only Gather, Mul, Add, Concat,
Slice, Round/Floor, Clip, Cast, Where, ScatterND and friends: every one has a kernel on
the CUDA provider, and the GPU suite checks that every node runs there.

The cubic weights are OpenCV's (a = -0.75, half-pixel centres, replicated border), in
float32; OpenCV's own 8-bit resize (Intel IPP inside the wheels) rounds differently, so a
pixel may differ by one level: the unit tests hold the graph to >= 45 dB of the
compositor's paste. The stretch weights are the Go formula's, in the same float32
order of operations, so those frames are equal.
"""
from __future__ import annotations

from collections.abc import Sequence
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


def _resize_taps(mode: str, src: int, dst: int, offset: int,
                 size: int) -> tuple[np.ndarray, np.ndarray]:
    """Taps of the paste's resize to `dst` pixels placed at `offset` in `size` outputs (the
    others weigh 0: the window's background shows there)."""
    index, weights = cubic_taps(src, dst) if mode == "synctalk" else go_bilinear_taps(src, dst)
    pad = ((offset, size - dst - offset), (0, 0))
    return np.pad(index, pad), np.pad(weights, pad)


def paste_feeds(mode: str, frames: Sequence[int], rects: Sequence[Rect], height: int,
                width: int) -> dict[str, np.ndarray]:
    """The graph's per-batch inputs for output frames on these backgrounds (indices into the
    model's frames) with these rects (clipped to a frame of height x width, non-empty),
    besides `backgrounds` and `prediction`."""
    if mode not in MODES:
        raise ValueError(f"composite mode must be one of {MODES}, got {mode!r}")
    b = len(rects)
    r = np.asarray(rects, np.int64).reshape(b, 4)
    x1, y1, x2, y2 = r.T
    w, h = x2 - x1, y2 - y1
    if b == 0 or len(frames) != b or (w < 1).any() or (h < 1).any() or (x1 < 0).any() \
            or (y1 < 0).any() or (x2 > width).any() or (y2 > height).any():
        raise ValueError(f"one frame per rect; rects must be non-empty and inside the "
                         f"{width}x{height} frame")
    # the window: the batch's largest rect size, placed inside the frame over each rect
    sw, sh = int(w.max()), int(h.max())
    ox, oy = np.minimum(x1, width - sw), np.minimum(y1, height - sh)
    dx, dy = x1 - ox, y1 - oy                            # the rect inside its window
    src = CROP if mode == "synctalk" else MOUTH
    batch = np.arange(b)
    frame = np.asarray(frames, np.int64)
    rows, cols = oy[:, None] + np.arange(sh), ox[:, None] + np.arange(sw)  # [B,Sh], [B,Sw]
    feeds: dict[str, np.ndarray] = {
        "frames": frame,
        # flat pixel indices of the window in the backgrounds viewed as [N*H*W, 3]
        "window_rows": ((frame[:, None] * height + rows) * width)[:, :, None],
        "window_cols": cols[:, None, :],
        # where the pasted window goes: ScatterND's (batch, row, column)
        "batch_ids": batch.reshape(b, 1, 1, 1),
        "scatter_rows": rows[:, :, None, None], "scatter_cols": cols[:, None, :, None],
        "inside_y": _span(dy, h, sh)[:, :, None, None],
        "inside_x": np.repeat(_span(dx, w, sw)[:, None, :, None], 3, axis=3),
        "window_range": np.arange(sw).reshape(1, 1, sw),
    }
    # every resize pass is a gather at flat pixel indices, row part + column part per tap:
    # along x, [B,n,1] row starts + [K,B,1,m'] tap columns; along y, [K,B,n',1] tap rows'
    # starts + [1,1,m] columns
    if mode == "synctalk":
        crop_x = [cubic_taps(int(n), CROP) for n in w]
        crop_y = [cubic_taps(int(n), CROP) for n in h]
        feeds["window_row_starts"] = ((batch[:, None] * sh + np.arange(sh)) * sw)[:, :, None]
        feeds["crop_x"] = _taps_first(dx[:, None, None] + np.stack([t[0] for t in crop_x]))[:, :, None]
        feeds["crop_x_w"] = _per_channel(_taps_first(np.stack([t[1] for t in crop_x]))[:, :, None])
        feeds["crop_y"] = _taps_first((batch[:, None, None] * sh + dy[:, None, None]
                                       + np.stack([t[0] for t in crop_y])) * CROP)[..., None]
        feeds["crop_y_w"] = _taps_first(np.stack([t[1] for t in crop_y]))[..., None, None]
    paste_x = [_resize_taps(mode, src, int(n), int(d), sw) for n, d in zip(w, dx, strict=True)]
    paste_y = [_resize_taps(mode, src, int(n), int(d), sh) for n, d in zip(h, dy, strict=True)]
    feeds["source_row_starts"] = ((batch[:, None] * src + np.arange(src)) * src)[:, :, None]
    feeds["paste_x"] = _taps_first(np.stack([t[0] for t in paste_x]))[:, :, None]
    feeds["paste_x_w"] = _per_channel(_taps_first(np.stack([t[1] for t in paste_x]))[:, :, None])
    feeds["paste_y"] = _taps_first((batch[:, None, None] * src
                                    + np.stack([t[0] for t in paste_y])) * sw)[..., None]
    feeds["paste_y_w"] = _taps_first(np.stack([t[1] for t in paste_y]))[..., None, None]
    return {k: np.ascontiguousarray(v) for k, v in feeds.items()}


def _span(start: np.ndarray, length: np.ndarray, size: int) -> np.ndarray:
    """[B, size] float32: 1 on [start, start + length) of each row, else 0."""
    at = np.arange(size)
    return ((at >= start[:, None]) & (at < (start + length)[:, None])).astype(np.float32)


def _per_channel(weights: np.ndarray) -> np.ndarray:
    """[..., m] -> [..., m, 3]: a weight per pixel's channel, so the products it meets are
    of one shape in their last two axes (ONNX Runtime's CPU kernels are fast for those)."""
    return np.repeat(weights[..., None], 3, axis=-1)


def _taps_first(a: np.ndarray) -> np.ndarray:
    """[B, n, K] -> [K, B, n]: the graph takes one tap at a time."""
    return np.moveaxis(a, 2, 0)


# ---- the graph ---------------------------------------------------------------------------

def _pixels(g: GraphBuilder, x: str) -> str:
    """x [..., 3] -> [n, 3]: one row per pixel, for gathers at flat pixel indices (a constant
    shape: no shape arithmetic in the graph, which ONNX Runtime would place on the CPU)."""
    return g.op("Reshape", [x, g.constant("pixel_rows", np.array([-1, 3]))])


def _tap(g: GraphBuilder, taps: str, k: int) -> str:
    """Tap k of a [K, ...] taps or weights input."""
    return g.op("Gather", [taps, g.constant(f"tap{k}", np.array(k))], axis=0)


def _resample(g: GraphBuilder, source: str, rows: str, cols: str, weights: str,
              k_taps: int, per_tap: str) -> str:
    """out[b, i, j] = sum over k of weights[k] * the source pixel at flat index
    rows[...] + cols[...] (`per_tap` names which of the two holds the K taps); added tap
    after tap: elementwise kernels, no reduction (fast on every provider), in the float
    order of the formulas copied."""
    pixels = _pixels(g, source)
    total = ""
    for k in range(k_taps):
        index = g.op("Add", [_tap(g, rows, k) if per_tap == rows else rows,
                             _tap(g, cols, k) if per_tap == cols else cols])
        term = g.op("Mul", [g.op("Gather", [pixels, index], axis=0), _tap(g, weights, k)])
        total = term if not total else g.op("Add", [total, term])
    return total


def _to_pixels(g: GraphBuilder, x: str, rounding: str) -> str:
    return g.op("Clip", [g.op(rounding, [x]), g.constant("zero", np.array(0, np.float32)),
                         g.constant("u8max", np.array(255, np.float32))])


def _slice(g: GraphBuilder, x: str, axis: int, start: int, stop: int) -> str:
    return g.op("Slice", [x, g.constant(f"at{start}", np.array([start])),
                          g.constant(f"at{stop}", np.array([stop])),
                          g.constant(f"axis{axis}", np.array([axis]))])


def paste_graph(mode: str) -> onnx.ModelProto:
    """The batch paste of `mode`: backgrounds [N,H,W,3] uint8 (all of a model's frames),
    prediction [B,3,320,320] float32 and the `paste_feeds` -> frames_out [B,H,W,3] uint8."""
    from onnx import TensorProto, checker, helper

    from pipeline.networks.builder import GraphBuilder

    if mode not in MODES:
        raise ValueError(f"composite mode must be one of {MODES}, got {mode!r}")
    g = GraphBuilder()
    # the window over each rect, from the backgrounds as they are (uint8)
    window_u8 = g.op("Gather", [_pixels(g, "backgrounds"),
                                g.op("Add", ["window_rows", "window_cols"])], axis=0)  # [B,Sh,Sw,3]
    # the prediction as the compositor converts it, HWC
    scaled = g.op("Mul", ["prediction", g.constant("u8scale", np.array(255, np.float32))])
    finite = g.op("Where", [g.op("IsNaN", [scaled]), g.constant("zero", np.array(0, np.float32)),
                            scaled])
    mouth = g.op("Transpose", [_to_pixels(g, finite, "Floor")], perm=[0, 2, 3, 1])  # [B,320,320,3]
    if mode == "synctalk":
        window = g.op("Cast", [window_u8], to=TensorProto.FLOAT)
        crop = _resample(g, window, "window_row_starts", "crop_x", "crop_x_w", 4, "crop_x")
        crop = _resample(g, crop, "crop_y", g.constant("crop_range", np.arange(CROP).reshape(1, 1, CROP)),
                         "crop_y_w", 4, "crop_y")                                  # [B,328,328,3]
        crop = _to_pixels(g, crop, "Round")
        a, z = INNER.start, INNER.stop
        middle = _slice(g, crop, 1, a, z)
        middle = g.op("Concat", [_slice(g, middle, 2, 0, a), mouth, _slice(g, middle, 2, z, CROP)],
                      axis=2)
        source = g.op("Concat", [_slice(g, crop, 1, 0, a), middle, _slice(g, crop, 1, z, CROP)],
                      axis=1)                                                  # [B,328,328,3]
    else:
        source = mouth
    taps, src = (4, CROP) if mode == "synctalk" else (2, MOUTH)
    patch = _resample(g, source, "source_row_starts", "paste_x", "paste_x_w", taps, "paste_x")
    patch = _resample(g, patch, "paste_y", "window_range", "paste_y_w", taps, "paste_y")  # [B,Sh,Sw,3]
    # the rect's pixels pasted (the patch is 0 outside the rect: its taps weigh 0 there), the
    # rest of the window as it was
    inside = g.op("Mul", ["inside_y", "inside_x"])                              # [B,Sh,Sw,3]
    outside = g.op("Sub", [g.constant("one_f", np.array(1, np.float32)), inside])
    if mode != "synctalk":
        window = g.op("Cast", [window_u8], to=TensorProto.FLOAT)
    patch = g.op("Add", [patch, g.op("Mul", [window, outside])])
    pasted = g.op("Cast", [_to_pixels(g, patch, "Round" if mode == "synctalk" else "Floor")],
                  to=TensorProto.UINT8)
    # ScatterND's (batch, row, column) of each window pixel, broadcast by adding zeros
    zero_rows = g.op("Mul", ["scatter_rows", g.constant("zero_i", np.array(0))])   # [B,Sh,1,1]
    zero_cols = g.op("Mul", ["scatter_cols", g.constant("zero_i", np.array(0))])   # [B,1,Sw,1]
    where = g.op("Concat", [g.op("Add", [g.op("Add", ["batch_ids", zero_rows]), zero_cols]),
                            g.op("Add", ["scatter_rows", zero_cols]),
                            g.op("Add", ["scatter_cols", zero_rows])], axis=3)     # [B,Sh,Sw,3]
    frames = g.op("Gather", ["backgrounds", "frames"], axis=0)                  # [B,H,W,3]
    g.nodes.append(helper.make_node("ScatterND", [frames, where, pasted], [OUTPUT], name=OUTPUT))

    def tensor(name: str, kind: int, shape: list[str | int]) -> onnx.ValueInfoProto:
        return helper.make_tensor_value_info(name, kind, shape)

    i64, f32, u8 = TensorProto.INT64, TensorProto.FLOAT, TensorProto.UINT8
    inputs = [tensor("backgrounds", u8, ["N", "H", "W", 3]),
              tensor("prediction", f32, ["B", *PREDICTION_SHAPE]),
              tensor("frames", i64, ["B"]),
              tensor("window_rows", i64, ["B", "Sh", 1]), tensor("window_cols", i64, ["B", 1, "Sw"]),
              tensor("batch_ids", i64, ["B", 1, 1, 1]),
              tensor("scatter_rows", i64, ["B", "Sh", 1, 1]),
              tensor("scatter_cols", i64, ["B", 1, "Sw", 1]),
              tensor("inside_y", f32, ["B", "Sh", 1, 1]),
              tensor("inside_x", f32, ["B", 1, "Sw", 3]),
              tensor("window_range", i64, [1, 1, "Sw"])]
    if mode == "synctalk":
        inputs += [tensor("window_row_starts", i64, ["B", "Sh", 1]),
                   tensor("crop_x", i64, [4, "B", 1, CROP]),
                   tensor("crop_x_w", f32, [4, "B", 1, CROP, 3]),
                   tensor("crop_y", i64, [4, "B", CROP, 1]),
                   tensor("crop_y_w", f32, [4, "B", CROP, 1, 1])]
    inputs += [tensor("source_row_starts", i64, ["B", src, 1]),
               tensor("paste_x", i64, [taps, "B", 1, "Sw"]),
               tensor("paste_x_w", f32, [taps, "B", 1, "Sw", 3]),
               tensor("paste_y", i64, [taps, "B", "Sh", 1]),
               tensor("paste_y_w", f32, [taps, "B", "Sh", 1, 1])]
    model = g.model(f"paste_{mode}", inputs, [tensor(OUTPUT, u8, ["B", "H", "W", 3])],
                    doc=f"lipsync: the compositor's {mode} paste over a batch of frames")
    model.producer_name = "lipsync-server-paste"
    checker.check_model(model)
    return model
