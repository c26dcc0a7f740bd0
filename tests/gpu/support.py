"""What the GPU tests share: whether they run, on which provider, at which sizes, and the
CPU reference a GPU frame is compared with.

They run where ONNX Runtime has its CUDA provider and NVML sees a device (scripts/gpu-suite
on the GPU box), and are skipped, saying why, everywhere else. `scripts/gpu-suite --dry-run`
sets LIPSYNC_GPU_TESTS_ON_CPU=1: the same tests then run on the CPU provider at small sizes,
so none of their logic is first tried on the GPU.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import pytest

from pipeline.config import gpu_path_on_cpu

ON_CPU = gpu_path_on_cpu()
BACKGROUNDS = 25  # background frames of the test models (their loads stay quick)


def cuda_missing() -> str | None:
    """Why the CUDA path cannot run here; None when it can."""
    import onnxruntime as ort

    from pipeline.gpu_worker.device import cuda_device_count

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return "onnxruntime has no CUDAExecutionProvider (onnxruntime-gpu is not installed)"
    if cuda_device_count() < 1:
        return "NVML sees no CUDA device"
    return None


_MISSING = None if ON_CPU else cuda_missing()
requires_gpu = [pytest.mark.gpu,
                pytest.mark.skipif(_MISSING is not None, reason=f"needs a GPU: {_MISSING}")]


@dataclass(frozen=True)
class Sizes:
    batch: int                       # the end-to-end request
    cycles: int                      # LoadModel/UnloadModel cycles
    coalesced: tuple[int, ...]       # batch sizes of the requests sent together
    unet_batches: tuple[int, ...]    # batches compared between the device and the CPU
    graph_batches: tuple[int, ...]   # exact bucket, padded, and split (> 32) batches
    precision_batch: int             # frames of the fp16 check
    split: tuple[int, int]           # one batch against two runs of these sizes


SIZES = (Sizes(2, 1, (1, 2), (2,), (3,), 1, (1, 2)) if ON_CPU
         else Sizes(32, 20, (3, 5, 8, 16), (1, 8, 32), (1, 3, 8, 13, 32, 40), 8, (2, 3)))


def decode(jpeg: bytes) -> np.ndarray:
    frame = cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR)
    assert frame is not None, "not a JPEG"
    return frame


def reference_frames(config: Path, model_id: str, raw_audio: bytes, batch: int,
                     start: int) -> list[np.ndarray]:
    """The frames of an audio-only request computed in this process on the CPU provider
    (encoder, server-built visual input, fp32 UNet, paste, JPEG), decoded."""
    from pipeline.compositor.composite import paste
    from pipeline.compositor.jpeg_splice import encode_jpeg
    from pipeline.config import load_config
    from pipeline.gpu_worker import audio
    from pipeline.gpu_worker.avatar import load_avatar
    from pipeline.gpu_worker.sessions import AudioEncoder
    from pipeline.gpu_worker.unet import load_unet
    from pipeline.shm.segment import segment_name
    from pipeline.synctalk import SAMPLE_RATE

    cfg = load_config(config)
    model = cfg.models[model_id]
    encoder = AudioEncoder.create(cfg.audio_encoder_path, "cpu")
    features = audio.request_features(encoder.encode, np.frombuffer(raw_audio, "<f4"),
                                      SAMPLE_RATE, batch)
    avatar = load_avatar(model, segment_name(f"gpuref{os.getpid()}", "bg"))
    try:
        visual = avatar.visual_inputs(range(start, start + batch),
                                      np.empty((batch, 6, 320, 320), np.float32))
        prediction = np.empty((batch, 3, 320, 320), np.float32)
        load_unet(model.model_path, "cpu").run(visual, features, prediction)
        frames = avatar.frames()
        return [decode(encode_jpeg(paste(frames[(start + i) % avatar.num_frames], prediction[i],
                                         avatar.rect(start + i), model.composite_mode),
                                   cfg.jpeg_quality)) for i in range(batch)]
    finally:
        avatar.close()
