"""A synthetic SyncTalk-2D training run, written without PyTorch: what `lipsync
import-synctalk` is measured and tested on where no real one is at hand.

The UNet checkpoint holds the bench model's weights as a trained state dict (each folded
convolution split back into a Conv2d and an identity BatchNorm, so importing it gives the
bench model again), saved in torch.save's zip format; the audio encoder likewise with
deterministic weights; the frames are the demo avatar's (1280×720 JPEG) and the landmarks
put SyncTalk-2D's crop rectangle where the demo avatar's crop rectangles are.

torch.save's zip layout: `<name>/data.pkl` (a protocol-2 pickle of the state dict whose
tensors refer to storages by key), `<name>/data/<key>` (each storage's raw little-endian
bytes), `<name>/byteorder`, `<name>/version`. The pickle is written opcode by opcode here
(the names it refers to, `torch.FloatStorage` and friends, cannot be pickled without torch).
"""
from __future__ import annotations

import struct
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from pipeline.networks.builder import BN_EPS, ConvKey, RandomWeights

_STORAGE_NAMES = {np.dtype(np.float32): "FloatStorage", np.dtype(np.float16): "HalfStorage",
                  np.dtype(np.int64): "LongStorage"}


def _global(module: str, name: str) -> bytes:
    return b"c" + module.encode() + b"\n" + name.encode() + b"\n"


def _text(value: str) -> bytes:
    data = value.encode()
    return b"X" + struct.pack("<I", len(data)) + data


def _int(value: int) -> bytes:
    return b"J" + struct.pack("<i", value)


def _tuple(values: tuple[int, ...]) -> bytes:
    return b"(" + b"".join(_int(v) for v in values) + b"t"


def state_dict_pickle(tensors: dict[str, np.ndarray], legacy: bool = False) -> bytes:
    """The pickle torch.save writes for an OrderedDict of tensors, storage i holding the
    i-th tensor (C-contiguous); `legacy`: the persistent ids of PyTorch < 1.6's format."""
    out = [b"\x80\x02", _global("collections", "OrderedDict"), b")R", b"("]
    for i, (key, array) in enumerate(tensors.items()):
        strides = tuple(s // array.itemsize for s in array.strides)
        out += [_text(key), _global("torch._utils", "_rebuild_tensor_v2"), b"(",
                b"(", _text("storage"), _global("torch", _STORAGE_NAMES[array.dtype]),
                _text(str(i)), _text("cpu"), _int(array.size), b"N" if legacy else b"",
                b"tQ", _int(0), _tuple(array.shape), _tuple(strides), b"\x89",
                _global("collections", "OrderedDict"), b")R", b"tR"]
    out += [b"u", b"."]
    return b"".join(out)


def write_torch_zip(path: Path, tensors: dict[str, np.ndarray]) -> Path:
    """`tensors` (float32, float16 or int64 arrays) as torch.save(state_dict) writes them."""
    name = Path(path).stem
    tensors = {k: np.asarray(v, order="C") for k, v in tensors.items()}  # 0-d stays 0-d
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as archive:
        archive.writestr(f"{name}/data.pkl", state_dict_pickle(tensors))
        archive.writestr(f"{name}/byteorder", "little")
        for i, array in enumerate(tensors.values()):
            archive.writestr(f"{name}/data/{i}", array.astype(array.dtype.newbyteorder("<"))
                             .tobytes())
        archive.writestr(f"{name}/version", "3\n")
    return Path(path)


@dataclass
class TrainedWeights:
    """Random weights drawn as `RandomWeights` draws them, recorded as a trained model's
    state dict: each convolution's own weight, and a BatchNorm that changes nothing but
    adds the bias (or, for a Conv2d with its own bias, a BatchNorm of zero shift)."""

    source: RandomWeights
    tensors: dict[str, np.ndarray] = field(default_factory=dict)

    def conv(self, key: ConvKey, shape: tuple[int, int, int, int],
             gain: float) -> tuple[np.ndarray, np.ndarray]:
        weight, bias = self.source.conv(key, shape, gain)
        cout = shape[0]
        self.tensors[f"{key.conv}.weight"] = weight
        if key.bias:
            self.tensors[f"{key.conv}.bias"] = bias
        if key.bn is not None:
            self.tensors.update({
                f"{key.bn}.weight": np.ones(cout, np.float32),
                f"{key.bn}.bias": np.zeros(cout, np.float32) if key.bias else bias,
                f"{key.bn}.running_mean": np.zeros(cout, np.float32),
                f"{key.bn}.running_var": np.full(cout, 1.0 - BN_EPS, np.float32),
                f"{key.bn}.num_batches_tracked": np.array(200, np.int64)})
        return weight, bias


def bench_unet_state_dict() -> dict[str, np.ndarray]:
    """The bench model (pipeline/demo/bench_model.py) as unet_328's state dict."""
    from pipeline.demo.bench_model import _SEED
    from pipeline.networks.synctalk2d import build_unet

    weights = TrainedWeights(RandomWeights(np.random.Generator(np.random.PCG64(_SEED))))
    build_unet(weights, "bench", "")
    return weights.tensors


def encoder_state_dict(seed: int = 16) -> dict[str, np.ndarray]:
    """A deterministic audio encoder state dict, keyed as audio_visual_encoder.pth is."""
    from pipeline.networks.synctalk2d import build_audio_encoder

    weights = TrainedWeights(RandomWeights(np.random.Generator(np.random.PCG64(seed))))
    build_audio_encoder(weights, "encoder", "")
    return weights.tensors


def write_landmarks(path: Path, rect: tuple[int, int, int, int]) -> None:
    """98 landmarks whose SyncTalk-2D crop rectangle is `rect` (a square), the rest on the
    rectangle's centre."""
    x1, y1, x2, _ = rect
    points = np.tile([(x1 + x2) / 2, y1 + (x2 - x1) / 2], (98, 1))
    points[1, 0], points[52, 1], points[31, 0] = x1 + 0.25, y1 + 0.5, x2 + 0.75
    path.write_text("".join(f"{x:.6f} {y:.6f}\n" for x, y in points))


def write_training_run(root: Path, name: str, frames: int) -> Path:
    """A training run at `root` as SyncTalk-2D lays one out: the bench UNet's checkpoint
    (checkpoint/NAME/1.pth), an audio encoder, and `frames` demo frames with landmarks."""
    from concurrent.futures import ThreadPoolExecutor

    from pipeline.demo.assets import JPEG_QUALITY
    from pipeline.demo.frames import demo_crop_rect, draw_background_frame
    from pipeline.importer.training_run import ENCODER_PATH

    root = Path(root)
    (root / "checkpoint" / name).mkdir(parents=True)
    write_torch_zip(root / "checkpoint" / name / "1.pth", bench_unet_state_dict())
    (root / ENCODER_PATH).parent.mkdir(parents=True)
    write_torch_zip(root / ENCODER_PATH, encoder_state_dict())
    images, landmarks = root / "dataset" / name / "full_body_img", root / "dataset" / name / "landmarks"
    images.mkdir(parents=True)
    landmarks.mkdir()

    def write(i: int) -> None:
        ok, jpeg = cv2.imencode(".jpg", draw_background_frame(i),
                                [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
        assert ok
        (images / f"{i}.jpg").write_bytes(jpeg.tobytes())
        write_landmarks(landmarks / f"{i}.lms", demo_crop_rect(i))

    with ThreadPoolExecutor(4) as pool:  # drawing and encoding release the GIL
        list(pool.map(write, range(frames)))
    return root
