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
    demo/build.json             written last (inside the staging dir): version, frame count
                                and the sha256 of every file written (the encoder's too)

The frames and crop rects come from pipeline/demo/frames.py, the two graphs from
pipeline/demo/graphs.py.

A build never writes over a file it did not write: a file is the build's when build.json
records its hash (or, for the encoder, when it is the bytes the generator writes). A
foreign encoder is kept (any encoder of the contract serves the demo UNet); a demo/ that
holds anything else stops the build with DemoAssetsError naming it.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import cv2

from pipeline.demo import owned
from pipeline.demo.frames import COUNTER_BOX, demo_crop_rect, draw_background_frame
from pipeline.demo.graphs import ASSET_VERSION, build_audio_encoder_model, build_unet_model
from pipeline.demo.owned import DemoAssetsError
from pipeline.runtime.files import new_dir
from pipeline.shm.segment import pid_alive

__all__ = ["COUNTER_BOX", "DEMO_MODEL_ID", "NUM_FRAMES", "DemoAssetsError", "build_demo_assets",
           "demo_asset_paths", "demo_assets_present"]

log = logging.getLogger(__name__)

DEMO_MODEL_ID = "demo"
NUM_FRAMES = 250
JPEG_QUALITY = 90
_MANIFEST = owned.MANIFEST
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


def demo_assets_present(root: Path, num_frames: int = NUM_FRAMES, encoder: bool = True) -> bool:
    """True when a complete build of this asset version with `num_frames` frames is there
    (and an audio encoder at the default place, with `encoder`: whoever's it is)."""
    paths = demo_asset_paths(root)
    manifest = owned.read_manifest(paths.unet_path.parent)
    if (manifest.get("version"), manifest.get("num_frames")) != (ASSET_VERSION, num_frames):
        return False
    files = [paths.unet_path, paths.crop_rects_path]
    files += [paths.audio_encoder_path] if encoder else []
    files += [paths.background_dir / _frame_name(i) for i in range(num_frames)]
    return all(p.is_file() for p in files)


def build_demo_assets(
    root: Path,
    num_frames: int = NUM_FRAMES,
    force: bool = False,
    progress: Callable[[int, int], None] | None = None,
    encoder: bool = True,
) -> DemoAssets:
    """Write the demo avatar (and the audio encoder, with `encoder`) under `root`; a no-op
    when already complete. DemoAssetsError when demo/ holds a file the build did not write.

    The avatar directory is staged in a sibling temp dir and renamed into place last, so an
    interrupted build leaves no `demo/` (or the previous one) and is rebuilt next time.
    `progress(done, total)` is called after each frame is written.
    """
    if num_frames < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}")
    paths = demo_asset_paths(root)
    if not force and demo_assets_present(paths.root, num_frames, encoder):
        return paths
    model_dir = paths.unet_path.parent
    foreign = owned.foreign_files(model_dir)
    if foreign:
        names = ", ".join(str(p.relative_to(model_dir)) for p in foreign[:3])
        more = f" and {len(foreign) - 3} more" if len(foreign) > 3 else ""
        raise DemoAssetsError(
            f"{model_dir} holds files lipsync did not write ({names}{more}): not replacing "
            "them with the demo avatar; move them away, or give your model another id and "
            "directory")
    encoder_bytes = build_audio_encoder_model().SerializeToString()
    write_encoder = encoder and _encoder_is_ours(paths, encoder_bytes)
    paths.root.mkdir(parents=True, exist_ok=True)
    _remove_dead_staging_dirs(paths.root)

    staging = new_dir(paths.root, f"{_STAGING_PREFIX}{os.getpid()}-")
    try:
        frames_dir = staging / paths.background_dir.name
        frames_dir.mkdir()
        _write_frames(frames_dir, num_frames, progress)
        rects = [list(demo_crop_rect(i)) for i in range(num_frames)]
        (staging / paths.crop_rects_path.name).write_text(json.dumps(rects))
        (staging / paths.unet_path.name).write_bytes(build_unet_model().SerializeToString())
        shared = {paths.audio_encoder_path.name: owned.digest_bytes(encoder_bytes)}
        owned.write_manifest(staging, {"version": ASSET_VERSION, "num_frames": num_frames},
                             [p for p in staging.rglob("*") if p.is_file()],
                             shared if write_encoder else {})
        if write_encoder:
            encoder_tmp = staging / paths.audio_encoder_path.name
            encoder_tmp.write_bytes(encoder_bytes)
            os.replace(encoder_tmp, paths.audio_encoder_path)
        if model_dir.exists():
            shutil.rmtree(model_dir)
        os.rename(staging, model_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return paths


def _encoder_is_ours(paths: DemoAssets, generated: bytes) -> bool:
    """Whether the build may write the encoder: absent, recorded by the last build, or the
    generator's own bytes (a build from before hashes were recorded)."""
    path = paths.audio_encoder_path
    if not path.exists() and not path.is_symlink():
        return True
    recorded = owned.read_manifest(paths.unet_path.parent).get("shared", {})
    if owned.matches(path, recorded.get(path.name)) or (
            path.is_file() and path.stat().st_size == len(generated)
            and path.read_bytes() == generated):
        return True
    log.warning("keeping %s: lipsync did not write it (the demo avatar uses it as it is)", path)
    return False


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


