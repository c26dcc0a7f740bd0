"""An avatar's background frames and crop rectangles, decoded once into shared memory.

The gpu_worker that loads a model creates the model's background segment; every
compositor maps it and reads frames in place (one copy per machine, not per process).
The worker also keeps each frame's mouth crop (`synctalk.mouth_crop`: the cubic resize of
its rect, as uint8 planes, 307 KB a frame) in its own memory, cut once at load: a request's
visual input is then a division and a copy per frame, not a resize of the frame as well
(0.16 against 0.41 ms a frame on the benchmark VM).
"""
from __future__ import annotations

import json
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from pipeline.config import ModelConfig
from pipeline.messages import TensorRef
from pipeline.shm.segment import SharedSegment
from pipeline.synctalk import MOUTH_SHAPE, mouth_crop, visual_input_of

# The original loader's search order (extension first, then zero-padded then plain index),
# then the other formats OpenCV decodes.
FRAME_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")
FRAME_PATTERNS = ("frame_{:04d}{}", "frame_{:d}{}")


class AvatarError(Exception):
    """A model's backgrounds or crop rects cannot be loaded (message names the file)."""


def load_crop_rects(path: Path) -> np.ndarray:
    """The crop rects file: a JSON list of [x1, y1, x2, y2] ints -> int32 [N,4]."""
    try:
        data = json.loads(path.read_text())
    except OSError as exc:
        raise AvatarError(f"failed to load crop rects: failed to read crop rects file: "
                          f"{path}: {exc.strerror}") from exc
    except json.JSONDecodeError as exc:
        raise AvatarError(f"failed to load crop rects: failed to parse crop rects JSON: "
                          f"{path}: {exc}") from exc
    ok = isinstance(data, list) and len(data) > 0 and all(
        isinstance(r, list) and len(r) == 4 and all(isinstance(v, int) for v in r) for r in data)
    if not ok:
        raise AvatarError(f"failed to load crop rects: {path}: expected a non-empty JSON list "
                          "of [x1, y1, x2, y2] integer lists")
    rects = np.asarray(data, dtype=np.int32)
    bad = np.flatnonzero((rects[:, 2] <= rects[:, 0]) | (rects[:, 3] <= rects[:, 1]))
    if len(bad):
        raise AvatarError(f"failed to load crop rects: {path}: rect {int(bad[0])} "
                          f"{rects[bad[0]].tolist()} is empty (need x2 > x1 and y2 > y1)")
    return rects


def find_frame(background_dir: Path, index: int, names: set[str]) -> Path:
    for ext in FRAME_EXTENSIONS:
        for pattern in FRAME_PATTERNS:
            name = pattern.format(index, ext)
            if name in names:
                return background_dir / name
    raise AvatarError(f"failed to load backgrounds: background frame {index} not found in "
                      f"{background_dir}")


def _decode(path: Path) -> np.ndarray:
    frame = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if frame is None:
        raise AvatarError(f"failed to load backgrounds: cannot decode {path}")
    return frame


def clipped_rect(rect: np.ndarray, width: int, height: int) -> tuple[int, int, int, int]:
    """A crop rect clipped to the frame, never empty."""
    x1, y1, x2, y2 = (int(v) for v in rect)
    x1, x2 = max(0, min(x1, width - 1)), max(1, min(x2, width))
    y1, y2 = max(0, min(y1, height - 1)), max(1, min(y2, height))
    return x1, y1, max(x2, x1 + 1), max(y2, y1 + 1)


@dataclass
class Avatar:
    """Decoded backgrounds ([N,H,W,3] uint8 BGR in `segment`), crop rects, and each
    frame's mouth crop ([N,3,320,320] uint8, this process's own memory)."""

    segment: SharedSegment
    num_frames: int
    height: int
    width: int
    rects: np.ndarray
    mouths: np.ndarray

    @property
    def nbytes(self) -> int:
        return self.segment.size + self.mouths.nbytes

    def frames(self) -> np.ndarray:
        return self.segment.ndarray(0, (self.num_frames, self.height, self.width, 3), "uint8")

    def background_ref(self, frame_index: int) -> TensorRef:
        """Background of output frame `frame_index`; frame indices wrap modulo the count."""
        i = frame_index % self.num_frames
        size = self.height * self.width * 3
        return TensorRef(self.segment.name, i * size, (self.height, self.width, 3), "uint8")

    def rect(self, frame_index: int) -> tuple[int, int, int, int]:
        """Crop rect of output frame `frame_index` (wrapping with its background), clipped."""
        return clipped_rect(self.rects[frame_index % self.num_frames], self.width, self.height)

    def visual_inputs(self, indices: Sequence[int], out: np.ndarray) -> np.ndarray:
        """The UNet's visual input for the output frames of these background indices,
        built from the avatar's own frames exactly as a SyncTalk-2D client builds it."""
        for i, index in enumerate(indices):
            visual_input_of(self.mouths[index % self.num_frames], out=out[i])
        return out

    def close(self) -> None:
        self.segment.close()


def load_avatar(model: ModelConfig, segment_name: str, threads: int | None = None) -> Avatar:
    """Decode `num_frames` backgrounds (in parallel) into a new shared segment."""
    rects = load_crop_rects(model.crop_rects_path)
    if len(rects) < model.num_frames:
        raise AvatarError(f"failed to load crop rects: {model.crop_rects_path} has {len(rects)} "
                          f"rects for num_frames {model.num_frames} (one per frame needed)")
    try:
        names = set(os.listdir(model.background_dir))
    except OSError as exc:
        raise AvatarError(f"failed to load backgrounds: background directory "
                          f"'{model.background_dir}': {exc.strerror}") from exc
    paths = [find_frame(model.background_dir, i, names) for i in range(model.num_frames)]
    first = _decode(paths[0])
    height, width = first.shape[:2]
    segment = SharedSegment.create(segment_name, model.num_frames * height * width * 3)
    mouths = np.empty((model.num_frames, *MOUTH_SHAPE), np.uint8)
    try:
        frames = segment.ndarray(0, (model.num_frames, height, width, 3), "uint8")
        frames[0] = first
        mouth_crop(first, clipped_rect(rects[0], width, height), out=mouths[0])

        def decode_into(i: int) -> None:
            frame = _decode(paths[i])
            if frame.shape[:2] != (height, width):
                raise AvatarError(f"failed to load backgrounds: {paths[i]} is "
                                  f"{frame.shape[1]}x{frame.shape[0]}, frame 0 is {width}x{height}")
            frames[i] = frame
            mouth_crop(frame, clipped_rect(rects[i], width, height), out=mouths[i])

        # cv2 decodes without the GIL: threads scale with cores
        with ThreadPoolExecutor(threads or min(8, os.cpu_count() or 1)) as pool:
            list(pool.map(decode_into, range(1, model.num_frames)))
    except BaseException:
        segment.close()
        raise
    return Avatar(segment, model.num_frames, height, width, rects, mouths)
