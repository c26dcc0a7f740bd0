"""A SyncTalk-2D training run made into a model folder the server serves:

    OUT/unet.onnx            the UNet (BatchNorm folded), or the run's own ONNX as it is
    OUT/audio_encoder.onnx   the run's audio encoder (a model entry's audio_encoder_path)
    OUT/frames/frame_%04d.*  the run's frames, copied byte for byte (never re-encoded)
    OUT/crop_rects.json      one [x1, y1, x2, y2] per frame, from its landmarks
    OUT/import.json          the build record: every source with its sha256, the tool version

Everything is written into a temporary sibling folder, loaded there with the server's own
loaders and run on one frame, and only then renamed to OUT: an import that fails leaves
nothing behind, and one that succeeds has been served a frame.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from pipeline.importer.landmarks import LandmarkError, crop_rects
from pipeline.importer.training_run import (
    ImportFailed,
    TrainingRun,
    encoder_graph,
    locate,
    parameters,
    unet_graph,
)
from pipeline.runtime.files import new_dir, sha256_file

UNET_FILE, ENCODER_FILE, FRAMES_DIR = "unet.onnx", "audio_encoder.onnx", "frames"
RECTS_FILE, RECORD_FILE = "crop_rects.json", "import.json"
TOOL = "lipsync import-synctalk"
Progress = Callable[[int, int], None]  # (frames done, frames in all)


@dataclass(frozen=True)
class Imported:
    out: Path
    frames: int
    parameters: int       # of the UNet, BatchNorm folded
    seconds: float


def import_training_run(root: Path, name: str, out: Path, checkpoint: Path | None = None,
                        audio_encoder: Path | None = None, smooth: int = 1, force: bool = False,
                        progress: Progress | None = None) -> Imported:
    """Import `root`'s run `name` into the model folder `out` (replaced only with `force`).
    ImportFailed says why in one line; nothing under `out` changes then."""
    t0 = time.perf_counter()
    out = Path(out).resolve()
    if smooth < 1:
        raise ImportFailed(f"--smooth must be >= 1 frames, got {smooth}")
    if (out.exists() or out.is_symlink()) and not force:
        raise ImportFailed(f"{out} already exists; --force replaces it")
    run = locate(root, name, checkpoint, audio_encoder)
    doc = f"SyncTalk-2D '{name}' imported by {TOOL} from {run.checkpoint.name}"
    unet = unet_graph(run, doc)
    encoder = encoder_graph(run, f"SyncTalk-2D audio encoder imported by {TOOL}")
    # the first folder above `out` that this import creates: removed again if it fails
    created = next((p for p in reversed(out.parents) if not p.exists()), None)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        staging = new_dir(out.parent, f".{out.name}.import-")
    except OSError as exc:
        raise ImportFailed(f"cannot create {out.parent}: {exc.strerror}") from None
    installed = False
    try:
        (staging / UNET_FILE).write_bytes(unet)
        (staging / ENCODER_FILE).write_bytes(encoder)
        sizes, frames_sha = _copy_frames(run, staging / FRAMES_DIR, progress)
        try:
            rects = crop_rects(run.landmarks, sizes, smooth)
        except LandmarkError as exc:
            raise ImportFailed(str(exc)) from None
        (staging / RECTS_FILE).write_text(json.dumps(rects.tolist()))
        run_one_frame(staging)
        record = _record(run, frames_sha, smooth, staging)
        (staging / RECORD_FILE).write_text(json.dumps(record, indent=2) + "\n")
        _install(staging, out)
        installed = True
    except OSError as exc:
        raise ImportFailed(f"cannot write {out}: {exc}") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        if created is not None and not installed:
            shutil.rmtree(created, ignore_errors=True)
    return Imported(out, len(run.frames), parameters(unet), time.perf_counter() - t0)


def _copy_frames(run: TrainingRun, dest: Path, progress: Progress | None
                 ) -> tuple[list[tuple[int, int]], str]:
    """Copy every frame as it is (frame_%04d with its own extension) and decode it, as the
    server will: its (width, height), all equal; and one sha256 over the frames in order."""
    dest.mkdir()

    def copy(i: int) -> tuple[tuple[int, int], bytes]:
        source = run.frames[i]
        data = source.read_bytes()
        image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
        if image is None:
            raise ImportFailed(f"frame {i}: {source} is not an image OpenCV can decode")
        (dest / f"frame_{i:04d}{source.suffix.lower()}").write_bytes(data)
        return (image.shape[1], image.shape[0]), hashlib.sha256(data).digest()

    total = len(run.frames)
    sizes: list[tuple[int, int]] = []
    digest = hashlib.sha256()
    # decoding releases the GIL: threads use every core
    pool = ThreadPoolExecutor(max(1, min(8, os.cpu_count() or 1)))
    try:
        for i, (size, frame_sha) in enumerate(pool.map(copy, range(total))):
            if sizes and size != sizes[0]:
                raise ImportFailed(f"frame {i}: {run.frames[i]} is {size[0]}x{size[1]}, frame 0 "
                                   f"is {sizes[0][0]}x{sizes[0][1]} (an avatar's frames share "
                                   "one size)")
            sizes.append(size)
            digest.update(frame_sha)
            if progress is not None:
                progress(i + 1, total)
    finally:  # a failure stops the frames not started yet
        pool.shutdown(wait=True, cancel_futures=True)
    return sizes, digest.hexdigest()


def run_one_frame(folder: Path) -> None:
    """Load `folder`'s graphs with the server's own loaders and render its frame 0 (mel
    windows of silence through the encoder: the mel itself is the server's, not the
    model's): ImportFailed unless a finite [1,3,320,320] prediction in [0, 1] comes out."""
    from pipeline.gpu_worker import audio
    from pipeline.gpu_worker import mel as mel_math
    from pipeline.gpu_worker.avatar import load_crop_rects
    from pipeline.gpu_worker.sessions import AudioEncoder
    from pipeline.gpu_worker.unet import load_unet
    from pipeline.synctalk import CONTEXT, MEL_WINDOW_SHAPE, PREDICTION_SHAPE, visual_input

    try:
        unet = load_unet(folder / UNET_FILE, "cpu")
        encoder = AudioEncoder.create(folder / ENCODER_FILE, "cpu")
        frame = cv2.imread(str(next((folder / FRAMES_DIR).glob("frame_0000.*"))))
        rect = tuple(int(v) for v in load_crop_rects(folder / RECTS_FILE)[0])
        visual = visual_input(frame, rect)[None]  # type: ignore[arg-type]
        silence = np.full((2 * CONTEXT, *MEL_WINDOW_SHAPE), mel_math.SILENCE, np.float32)
        features = audio.frame_features(encoder.encode(silence), 1)
        prediction = np.empty((1, *PREDICTION_SHAPE), np.float32)
        unet.run(visual, features, prediction)
    except Exception as exc:
        raise ImportFailed(f"the imported model does not run: {type(exc).__name__}: {exc}") from None
    if not (np.isfinite(prediction).all() and prediction.min() >= 0 and prediction.max() <= 1):
        raise ImportFailed("the imported model's prediction of frame 0 is not an image in [0, 1] "
                           "(NaN or out of range): its weights are broken")


def _record(run: TrainingRun, frames_sha: str, smooth: int, staging: Path) -> dict[str, object]:
    from importlib.metadata import PackageNotFoundError, version

    try:
        tool_version = version("lipsync-server")
    except PackageNotFoundError:
        tool_version = "unknown"
    landmarks = hashlib.sha256()
    for path in run.landmarks:
        landmarks.update(hashlib.sha256(path.read_bytes()).digest())
    return {
        "tool": TOOL, "tool_version": tool_version,
        "imported_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "name": run.name, "architecture": "SyncTalk-2D unet_328 (ave)",
        "sources": {
            "checkpoint": {"path": str(run.checkpoint.resolve()), "sha256": sha256_file(run.checkpoint)},
            "audio_encoder": {"path": str(run.audio_encoder.resolve()),
                              "sha256": sha256_file(run.audio_encoder)},
            "frames": {"path": str(run.frames[0].parent.resolve()), "count": len(run.frames),
                       "sha256_of_sha256s": frames_sha},
            "landmarks": {"path": str(run.landmarks[0].parent.resolve()),
                          "sha256_of_sha256s": landmarks.hexdigest(), "smooth": smooth},
        },
        "outputs": {name: sha256_file(staging / name) for name in (UNET_FILE, ENCODER_FILE, RECTS_FILE)},
    }


def _install(staging: Path, out: Path) -> None:
    """Rename the finished folder to `out`; a folder already there (force was checked) is
    moved aside first and removed once the new one is in place."""
    old = None
    if out.exists() or out.is_symlink():
        old = new_dir(out.parent, f".{out.name}.old-")
        os.replace(out, old / out.name)
    os.replace(staging, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
