"""Paste one predicted mouth crop into its background frame and encode the JPEG.

Modes (`composite_mode` of a model):
- synctalk (default, how SyncTalk-2D was trained): the background's rect is cubic-resized
  to 328x328, the 320x320 prediction replaces its [4:324, 4:324] interior, and the crop is
  cubic-resized back to the rect and pasted.
- stretch (the Go server): the prediction is stretched over the whole rect with the Go
  server's own bilinear formula (no half-pixel offset).
Pixel conversion as the reference: x255, clamp to [0, 255], truncate.

`composite_job` is the whole of a compositor's work on one CompositeJob (a few frames of a
request), pure but for the encoded backgrounds it keeps (tensors are read through the
`view` it is given): the compositor process and the in-process bench run the same function.
Only the JPEG segments around the rect are encoded per frame; the others are the
background's, encoded once (jpeg_splice.py): the JPEG is byte for byte the whole frame's.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable

import cv2
import numpy as np

from pipeline import messages as msg
from pipeline.compositor.jpeg_splice import BackgroundJpegs
from pipeline.runtime.logs import logging_request
from pipeline.shm.segment import SegmentGone
from pipeline.synctalk import CROP, INNER

log = logging.getLogger(__name__)

View = Callable[[msg.TensorRef], np.ndarray]  # a tensor in shared memory, read in place


def composite_job(job: msg.CompositeJob, view: View, compositor: int,
                  jpegs: BackgroundJpegs) -> list[bytes]:
    """What to send the frontend for one job: [FramesDone, JPEG, ...] (its frames, in order)
    or [FramesFailed]."""
    with logging_request(job.request_id):
        paste_ns = jpeg_ns = 0
        frames: list[bytes] = []
        try:
            predictions = None if job.predictions is None else view(job.predictions)
            for k, (ref, rect) in enumerate(zip(job.backgrounds, job.rects, strict=True)):
                jpeg, paste_took, encode_took = _frame_jpeg(
                    job, ref, view(ref), None if predictions is None else predictions[k], rect,
                    jpegs)
                frames.append(jpeg)
                paste_ns += paste_took
                jpeg_ns += encode_took
        except SegmentGone as exc:  # a dead frontend's arena, a dead worker's backgrounds:
            if exc.first:           # one line per segment, not a traceback per frame
                log.warning("%s: dropping the frames that use it", exc)
            return [_failed(job, len(frames), exc)]
        except Exception as exc:
            log.exception("compositing frame %d of request %d failed",
                          job.first_frame + len(frames), job.request_id)
            return [_failed(job, len(frames), exc)]
        header = msg.FramesDone(job.request_id, job.first_frame, compositor, paste_ns, jpeg_ns)
        return [msg.encode(header), *frames]


def _frame_jpeg(job: msg.CompositeJob, ref: msg.TensorRef, background: np.ndarray,
                prediction: np.ndarray | None, rect: tuple[int, int, int, int],
                jpegs: BackgroundJpegs) -> tuple[bytes, int, int]:
    """One frame's JPEG, and the ns its paste and its encoding took. Its own function so
    that what it pastes is freed before the next frame is made: with one such buffer alive
    at a time the allocator reuses it, with two it maps a fresh one per frame (~430 page
    faults a 720p frame, 40 % more CPU)."""
    key = (ref.segment, ref.offset, job.jpeg_quality)
    t0 = time.perf_counter_ns()
    if prediction is None:  # the background as it is: encoded once
        return jpegs.jpeg(key, background), 0, time.perf_counter_ns() - t0
    paste_ns = 0

    def draw(pixels: np.ndarray, rect_in: tuple[int, int, int, int]) -> np.ndarray:
        nonlocal paste_ns
        start = time.perf_counter_ns()
        pasted = paste(pixels, prediction, rect_in, job.mode)
        paste_ns += time.perf_counter_ns() - start
        return pasted

    jpeg = jpegs.frame(key, background, rect, draw)
    return jpeg, paste_ns, time.perf_counter_ns() - t0 - paste_ns


def _failed(job: msg.CompositeJob, made: int, exc: Exception) -> bytes:
    return msg.encode(msg.FramesFailed(
        job.request_id, job.first_frame,
        f"failed to composite frame {job.first_frame + made}: {exc}"))


def prediction_to_bgr(prediction: np.ndarray) -> np.ndarray:
    """[3,320,320] float BGR in [0,1] -> [320,320,3] uint8 (x255, clamp, truncate; NaN -> 0)."""
    scaled = np.multiply(prediction, np.float32(255.0), dtype=np.float32)
    # clip (-inf -> 0, +inf -> 255) keeps NaN, which then goes to 0: half the CPU of
    # fmax/fmin, which drop NaN themselves but have no fast loop (0.17 against 0.33 ms)
    np.clip(scaled, 0.0, 255.0, out=scaled)
    nan = np.isnan(scaled)
    if nan.any():
        scaled[nan] = 0.0
    planes = scaled.astype(np.uint8)    # truncates, as the reference; contiguous: fast
    return cv2.merge((planes[0], planes[1], planes[2]))  # CHW -> HWC


def go_bilinear_resize(image: np.ndarray, w: int, h: int) -> np.ndarray:
    """The Go server's bilinear resize of the prediction over the rect, reproduced exactly.

    Unlike cv2/PIL it has no half-pixel centre offset: source x = dx * (src_w / w), float32
    math, neighbours clamped to the last pixel, the result truncated to uint8.
    """
    src_h, src_w = image.shape[:2]
    f32 = np.float32
    sx = np.arange(w, dtype=f32) * (f32(src_w) / f32(w))
    sy = np.arange(h, dtype=f32) * (f32(src_h) / f32(h))
    x0, y0 = sx.astype(np.int64), sy.astype(np.int64)
    x1, y1 = np.minimum(x0 + 1, src_w - 1), np.minimum(y0 + 1, src_h - 1)
    fx = (sx - x0.astype(f32))[None, :, None]  # float32 throughout, as Go's float32 math
    fy = (sy - y0.astype(f32))[:, None, None]
    src = image.astype(np.float32)
    top = src[y0][:, x0] * (1 - fx) + src[y0][:, x1] * fx
    bottom = src[y1][:, x0] * (1 - fx) + src[y1][:, x1] * fx
    return (top * (1 - fy) + bottom * fy).astype(np.uint8)


def paste(background: np.ndarray, prediction: np.ndarray, rect: tuple[int, int, int, int],
          mode: str = "synctalk") -> np.ndarray:
    """A new frame: `background` (HxWx3 uint8, left untouched) with the prediction pasted."""
    x1, y1, x2, y2 = rect
    w, h = x2 - x1, y2 - y1
    mouth = prediction_to_bgr(prediction)
    frame = background.copy()
    if mode == "stretch":
        patch = go_bilinear_resize(mouth, w, h)
    else:
        crop = cv2.resize(background[y1:y2, x1:x2], (CROP, CROP), interpolation=cv2.INTER_CUBIC)
        crop[INNER, INNER] = mouth
        patch = cv2.resize(crop, (w, h), interpolation=cv2.INTER_CUBIC)
    frame[y1:y2, x1:x2] = patch
    return frame

