"""What a SyncTalk-2D training run holds, found where SyncTalk-2D leaves it:

    checkpoint/NAME/<epoch>.pth                  the UNet (unet_328.py, "ave"), torch.save(state_dict)
    model/checkpoints/audio_visual_encoder.pth   the audio encoder (shared by a user's avatars)
    dataset/NAME/full_body_img/<i>.jpg           the avatar's frames, 0 .. N-1
    dataset/NAME/landmarks/<i>.lms               98 "x y" landmarks per frame

and how its networks become the server's two ONNX graphs: a `.pth` or `.safetensors` is
built into a graph by the layout the bench model uses (BatchNorm folded); an `.onnx` is
taken as it is once its inputs and outputs are those the server feeds.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.gpu_worker.avatar import FRAME_EXTENSIONS
from pipeline.importer.checkpoint import CheckpointError, read_state_dict
from pipeline.networks.builder import ArchitectureError
from pipeline.networks.synctalk2d import (
    UNET,
    audio_mode,
    encoder_from_state_dict,
    unet_from_state_dict,
)
from pipeline.synctalk import AUDIO_SHAPE, ENCODED_DIM, MEL_WINDOW_SHAPE, PREDICTION_SHAPE, VISUAL_SHAPE

ENCODER_PATH = Path("model/checkpoints/audio_visual_encoder.pth")
# the audio features SyncTalk-2D's training read, by mode (datasetsss_328.py's names)
_FEATURE_FILES = {"aud_ave.npy": "ave", "aud_hu.npy": "hubert", "aud_wenet.npy": "wenet"}


class ImportFailed(Exception):
    """The training run cannot be imported; the message is one line naming the file."""


@dataclass(frozen=True)
class TrainingRun:
    name: str
    checkpoint: Path
    audio_encoder: Path
    dataset: Path
    frames: list[Path]      # frame i's image, i = 0 .. N-1
    landmarks: list[Path]   # frame i's landmarks


def locate(root: Path, name: str, checkpoint: Path | None = None,
           audio_encoder: Path | None = None) -> TrainingRun:
    """The run's files; ImportFailed names the first one missing."""
    root = Path(root)
    if not root.is_dir():
        raise ImportFailed(f"training run {root} is not a directory")
    dataset = root / "dataset" / name
    images = dataset / "full_body_img"
    if not images.is_dir():
        raise ImportFailed(f"{images} is not a directory (a SyncTalk-2D run keeps the avatar's "
                           "frames there)")
    if checkpoint is None:
        checkpoint = latest_checkpoint(root / "checkpoint" / name)
    encoder = root / ENCODER_PATH if audio_encoder is None else Path(audio_encoder)
    for path, what in ((checkpoint, "checkpoint"), (encoder, "audio encoder")):
        if not path.is_file():
            raise ImportFailed(f"{what} {path} not found")
    frames = frame_files(images)
    landmarks = [dataset / "landmarks" / f"{i}.lms" for i in range(len(frames))]
    missing = next((i for i, path in enumerate(landmarks) if not path.is_file()), None)
    if missing is not None:  # said before any frame is copied
        raise ImportFailed(f"frame {missing} has no landmarks ({landmarks[missing]} is missing)")
    return TrainingRun(name, checkpoint, encoder, dataset, frames, landmarks)


def latest_checkpoint(folder: Path) -> Path:
    """The highest-numbered `<epoch>.pth` of `folder` (SyncTalk-2D's inference picks it)."""
    epochs = {int(p.stem): p for p in folder.glob("*.pth") if p.stem.isdigit()} \
        if folder.is_dir() else {}
    if not epochs:
        raise ImportFailed(f"no <epoch>.pth checkpoint in {folder} (--checkpoint names one)")
    return epochs[max(epochs)]


def frame_files(images: Path) -> list[Path]:
    """`images`' frames <i>.<ext> in index order; every index 0 .. N-1 must be there."""
    found: dict[int, Path] = {}
    for path in images.iterdir():
        if path.stem.isdigit() and path.suffix.lower() in FRAME_EXTENSIONS:
            index = int(path.stem)
            if index in found:
                raise ImportFailed(f"frame {index} is there twice: {found[index].name} and "
                                   f"{path.name} in {images}")
            found[index] = path
    if not found:
        raise ImportFailed(f"{images} holds no frames (<i>.jpg or <i>.png)")
    missing = sorted(set(range(max(found) + 1)) - set(found))
    if missing:
        raise ImportFailed(f"frame {missing[0]} is missing from {images} (frames 0 .. "
                           f"{max(found)} must all be there)")
    return [found[i] for i in range(len(found))]


def unet_graph(run: TrainingRun, doc: str) -> bytes:
    """The UNet ONNX bytes of the run's checkpoint (.pth / .safetensors built, .onnx checked)."""
    path = run.checkpoint
    if path.suffix == ".onnx":
        return _checked_onnx(path, {"visual": VISUAL_SHAPE, "audio": AUDIO_SHAPE},
                             PREDICTION_SHAPE)
    tensors = _state_dict(path)
    trained_on = _dataset_audio_mode(run.dataset)
    if audio_mode(tensors) == "ave" and trained_on not in (None, "ave"):
        raise ImportFailed(f"{path}: a '{trained_on}' checkpoint (its dataset holds the "
                           f"'{trained_on}' features, not aud_ave.npy): only {UNET} is served")
    try:
        return unet_from_state_dict(tensors, doc).SerializeToString()
    except ArchitectureError as exc:
        raise ImportFailed(f"{path}: {exc}") from None


def encoder_graph(run: TrainingRun, doc: str) -> bytes:
    """The audio encoder ONNX bytes of the run's encoder checkpoint."""
    path = run.audio_encoder
    if path.suffix == ".onnx":
        return _checked_onnx(path, {"mel": MEL_WINDOW_SHAPE}, (ENCODED_DIM,))
    try:
        return encoder_from_state_dict(_state_dict(path), doc).SerializeToString()
    except ArchitectureError as exc:
        raise ImportFailed(f"{path}: {exc}") from None


def parameters(graph: bytes) -> int:
    """The float values a graph's initializers hold (its parameters, BatchNorm folded)."""
    import onnx

    model = onnx.load_from_string(graph)
    return sum(int(np.prod(t.dims)) for t in model.graph.initializer
               if t.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16))


def _state_dict(path: Path) -> dict[str, np.ndarray]:
    try:
        return read_state_dict(path)
    except CheckpointError as exc:
        raise ImportFailed(str(exc)) from None


def _dataset_audio_mode(dataset: Path) -> str | None:
    """The audio mode the run trained with, read from the features file its training used
    (aud_ave.npy wins when there are several); None when there is none."""
    modes = [mode for name, mode in _FEATURE_FILES.items() if (dataset / name).is_file()]
    return modes[0] if modes else None


def _checked_onnx(path: Path, inputs: dict[str, tuple[int, ...]],
                  output: tuple[int, ...]) -> bytes:
    """`path`'s bytes, once its inputs are [B, *shape] of `inputs` (in any order) and its one
    output [B, *output], B left free (the server runs batches)."""
    import onnx

    data = path.read_bytes()
    try:
        model = onnx.load_from_string(data)
    except Exception as exc:  # protobuf's DecodeError and friends
        raise ImportFailed(f"{path}: not an ONNX model: {exc}") from None
    graph = model.graph
    constants = {t.name for t in graph.initializer}
    fed = [v for v in graph.input if v.name not in constants]
    outs = [_shape(v) for v in graph.output]
    if Counter(_shape(v)[1:] for v in fed) != Counter(inputs.values()) or len(outs) != 1 \
            or outs[0][1:] != output:
        raise ImportFailed(
            f"{path}: inputs {[(v.name, _shape(v)) for v in fed]} and outputs {outs}; the server "
            f"feeds {[['B', *s] for s in inputs.values()]} and reads ['B', "
            f"{', '.join(map(str, output))}]")
    for value in [*fed, *graph.output]:
        batch = value.type.tensor_type.shape.dim[0]
        if batch.HasField("dim_value"):
            raise ImportFailed(f"{path}: '{value.name}' has its batch dimension fixed at "
                               f"{batch.dim_value}; the server runs batches (export with a "
                               "dynamic batch axis, or import the .pth)")
    return data


def _shape(value: object) -> tuple[int | str, ...]:
    dims = value.type.tensor_type.shape.dim  # type: ignore[attr-defined]
    return tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in dims)
