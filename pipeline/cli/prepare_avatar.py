"""`lipsync prepare-avatar`: turn an avatar's source video and crop rects into the files a
model entry of config.yaml points at.

The original Go server extracted frames on first use, as `frame_%06d.jpg`, a name its own
loader never looked for. This writes `frame_%04d.jpg` (the loader's
first pattern; frame 12345 is `frame_12345.jpg` either way) at the original extractor's JPEG
quality, checks the rects against the frames before the server ever sees them, and prints the
config block to paste.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

import cv2
import numpy as np
import yaml

from pipeline.gpu_worker.avatar import AvatarError, load_crop_rects
from pipeline.runtime.files import copy_atomic, new_dir

PROG = "lipsync prepare-avatar"
FRAME_NAME = "frame_{:04d}.jpg"  # the loader's first pattern (pipeline/gpu_worker/avatar.py)
DEFAULT_JPEG_QUALITY = 95        # the original's OpenCV extractor


class PrepareError(Exception):
    """The avatar cannot be prepared; the message says why and names the file."""


def prepare_avatar(video: Path, crop_rects: Path, out: Path, model_id: str | None = None,
                   jpeg_quality: int = DEFAULT_JPEG_QUALITY, num_frames: int | None = None,
                   progress: bool = True, force: bool = False) -> str:
    """Extract `video`'s frames into `out`/frames, copy the rects beside them, and return the
    config block (a `models:` entry) for the result.

    Nothing under `out` changes unless every check passes: frames are written to a temporary
    sibling directory and renamed into place at the end. `force` replaces existing frames.
    """
    video, crop_rects, out = Path(video).resolve(), Path(crop_rects).resolve(), Path(out).resolve()
    model_id = out.name if model_id is None else model_id
    if not model_id.strip():
        raise PrepareError("model id must not be empty")
    if not 0 <= jpeg_quality <= 100:
        raise PrepareError(f"--jpeg-quality must be 0-100, got {jpeg_quality}")
    if num_frames is not None and num_frames < 1:
        raise PrepareError(f"--num-frames must be >= 1, got {num_frames}")
    if not video.is_file():
        raise PrepareError(f"video not found: {video}")
    try:
        rects = load_crop_rects(crop_rects)
    except AvatarError as exc:
        raise PrepareError(str(exc)) from exc
    frames_dir = out / "frames"
    _check_output(out, frames_dir, force)

    capture = cv2.VideoCapture(str(video))
    try:
        if not capture.isOpened():
            raise PrepareError(f"cannot open video {video}: not a format OpenCV can read")
        created = not out.exists()
        try:
            out.mkdir(parents=True, exist_ok=True)
            staging = new_dir(out, ".frames-")
        except OSError as exc:
            raise PrepareError(f"cannot create output directory {out}: {exc.strerror}") from exc
        installed = False
        try:
            count = _extract(capture, video, staging, rects, crop_rects, jpeg_quality,
                             num_frames, progress)
            if len(rects) > count:
                print(f"{PROG}: warning: {crop_rects} has {len(rects)} rects for {count} "
                      f"frames; the first {count} are used", file=sys.stderr)
            _install(staging, frames_dir, crop_rects, out / "crop_rects.json")
            installed = True
        finally:
            shutil.rmtree(staging, ignore_errors=True)
            if created and not installed:
                shutil.rmtree(out, ignore_errors=True)  # ours, and holds nothing else
    finally:
        capture.release()
    return config_block(model_id, frames_dir, out / "crop_rects.json", video, count)


def _check_output(out: Path, frames_dir: Path, force: bool) -> None:
    if out.exists() and not out.is_dir():
        raise PrepareError(f"output {out} exists and is not a directory")
    if frames_dir.exists() or frames_dir.is_symlink():
        if not frames_dir.is_dir():
            raise PrepareError(f"{frames_dir} exists and is not a directory")
        held = len(os.listdir(frames_dir))
        if held and not force:
            raise PrepareError(f"{frames_dir} already holds {held} files; "
                               "use --force to replace them")


def _extract(capture: cv2.VideoCapture, video: Path, staging: Path, rects: np.ndarray,
             crop_rects: Path, jpeg_quality: int, num_frames: int | None,
             progress: bool) -> int:
    """Write frames 0.. into `staging`; returns how many. Checks rects against them as it goes."""
    from tqdm import tqdm

    known = int(capture.get(cv2.CAP_PROP_FRAME_COUNT))
    total = known if known > 0 else None
    if num_frames is not None and total is not None:
        total = min(total, num_frames)
    params = [cv2.IMWRITE_JPEG_QUALITY, jpeg_quality]
    count = 0
    with tqdm(total=total, desc="extracting frames", unit="frame",
              disable=None if progress else True) as bar:
        while num_frames is None or count < num_frames:
            ok, frame = capture.read()
            if not ok:
                break
            if count == 0:
                _check_rects_inside(rects, crop_rects, frame.shape[1], frame.shape[0])
            if count >= len(rects):
                # Count the rest without decoding, so the message says how many are needed.
                frames = count + 1 + sum(1 for _ in iter(capture.grab, False))
                raise PrepareError(
                    f"{crop_rects} has {len(rects)} rects but {video} has {frames} frames "
                    f"(one rect per frame needed; --num-frames {len(rects)} uses the first "
                    f"{len(rects)} frames)")
            path = staging / FRAME_NAME.format(count)
            try:
                written = cv2.imwrite(str(path), frame, params)
            except cv2.error as exc:
                raise PrepareError(f"cannot write frame {count} to {path}: {exc}") from exc
            if not written:
                raise PrepareError(f"cannot write frame {count} to {path}")
            count += 1
            bar.update(1)
    if count == 0:
        raise PrepareError(f"video {video} has no frames OpenCV can decode")
    if num_frames is not None and count < num_frames:
        raise PrepareError(f"--num-frames {num_frames}: {video} has only {count} frames")
    return count


def _check_rects_inside(rects: np.ndarray, crop_rects: Path, width: int, height: int) -> None:
    outside = ((rects[:, 0] < 0) | (rects[:, 1] < 0)
               | (rects[:, 2] > width) | (rects[:, 3] > height))
    bad = np.flatnonzero(outside)
    if len(bad):
        i = int(bad[0])
        raise PrepareError(f"{crop_rects}: rect {i} {rects[i].tolist()} lies outside the "
                           f"{width}x{height} frame (need 0 <= x1, 0 <= y1, x2 <= {width}, "
                           f"y2 <= {height})")


def _install(staging: Path, frames_dir: Path, crop_rects: Path, rects_dest: Path) -> None:
    """Move the staged frames into place and copy the rects; each step is a rename."""
    out = frames_dir.parent
    try:
        if crop_rects != rects_dest:
            copy_atomic(crop_rects, rects_dest)
        old = None
        if frames_dir.exists() or frames_dir.is_symlink():
            # Keep the old frames until the new ones are in place (force was checked).
            old = new_dir(out, ".frames-old-")
            os.replace(frames_dir, old / "frames")
        os.replace(staging, frames_dir)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except OSError as exc:
        raise PrepareError(f"cannot install frames into {frames_dir}: {exc}") from exc


def yaml_scalar(value: str) -> str:
    """`value` as a YAML scalar: plain when it reads back unchanged, else double-quoted."""
    try:
        if yaml.safe_load(f"k: {value}") == {"k": value} and "#" not in value:
            return value
    except yaml.YAMLError:
        pass
    return json.dumps(value)  # a JSON string is a valid YAML double-quoted scalar


def config_block(model_id: str, frames_dir: Path, crop_rects: Path, video: Path,
                 num_frames: int) -> str:
    """The `models:` entry for a prepared avatar, indented to sit under `models:`."""
    return "\n".join([
        f"  {yaml_scalar(model_id)}:",
        f"    model_path: {yaml_scalar(f'{model_id}/unet.onnx')}        # put the avatar's UNet here",
        f"    background_dir: {yaml_scalar(str(frames_dir))}",
        f"    crop_rects_path: {yaml_scalar(str(crop_rects))}",
        f"    source_video: {yaml_scalar(str(video))}",
        f"    num_frames: {num_frames}",
        "    preload_model: false",
        "    preload_backgrounds: false",
        "    preferred_gpu: -1",
        "    composite_mode: synctalk",
    ]) + "\n"


def cmd_prepare_avatar(args: argparse.Namespace) -> int:
    """The command: prepare, then print the config block; exit 2 with one line on errors."""
    # FFmpeg logs its own line ("moov atom not found") for a file it cannot read; our error
    # says it. OpenCV reads this once, when its FFmpeg backend first opens a file.
    os.environ.setdefault("OPENCV_FFMPEG_LOGLEVEL", "-8")  # AV_LOG_QUIET
    try:
        block = prepare_avatar(args.video, args.crop_rects, args.out, model_id=args.model_id,
                               jpeg_quality=args.jpeg_quality, num_frames=args.num_frames,
                               progress=True, force=args.force)
    except PrepareError as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted; nothing was installed", file=sys.stderr)
        return 130
    print("# add under `models:` in config.yaml")
    print(block, end="")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """Add the `prepare-avatar` subcommand to the `lipsync` parser."""
    p = sub.add_parser("prepare-avatar", help="extract an avatar's frames and print its config",
                       description=__doc__.split("\n\n")[0])
    p.add_argument("--video", type=Path, required=True, help="the avatar's source video")
    p.add_argument("--crop-rects", type=Path, required=True,
                   help="JSON list of [x1, y1, x2, y2], one per frame")
    p.add_argument("--out", type=Path, required=True,
                   help="avatar directory; frames go to OUT/frames, rects to OUT/crop_rects.json")
    p.add_argument("--model-id", help="model id in the config block (default: OUT's name)")
    p.add_argument("--jpeg-quality", type=int, default=DEFAULT_JPEG_QUALITY,
                   help=f"JPEG quality of the frames (default {DEFAULT_JPEG_QUALITY})")
    p.add_argument("--num-frames", type=int, help="extract only the first N frames")
    p.add_argument("--force", action="store_true", help="replace frames already in OUT/frames")
    p.set_defaults(func=cmd_prepare_avatar)
