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

The frames and crop rects come from pipeline/demo/frames.py, the two graphs from
pipeline/demo/graphs.py.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import cv2

from pipeline.demo.frames import COUNTER_BOX, demo_crop_rect, draw_background_frame
from pipeline.demo.graphs import ASSET_VERSION, build_audio_encoder_model, build_unet_model
from pipeline.shm.segment import pid_alive

__all__ = ["COUNTER_BOX", "DEMO_MODEL_ID", "NUM_FRAMES", "build_demo_assets",
           "demo_asset_paths", "demo_assets_present"]

DEMO_MODEL_ID = "demo"
NUM_FRAMES = 250
JPEG_QUALITY = 90
_MANIFEST = "build.json"
_STAGING_PREFIX = ".demo-build-"


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


