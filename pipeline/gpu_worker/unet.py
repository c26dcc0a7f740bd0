"""The one inference interface the engine calls, whatever runs it: an avatar's UNet and the
audio encoder on ONNX Runtime (CUDA or CPU) or OpenVINO (CPU), at the precision the config
asks for and the CPU allows, replaying CUDA graphs where asked for and possible.

The engine, the batching and the model cache see only `UNetRunner.run(visual, audio, out)`
(inputs read from and the prediction written into shared memory, in place) and
`Encoder.encode(windows)`; `Backend` says what runs them, for the log, the heartbeat and
the operator's figures.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Protocol

import numpy as np

from pipeline.gpu_worker.device import Resolved
from pipeline.gpu_worker.precision import resolve_precision

log = logging.getLogger(__name__)


class UNetRunner(Protocol):
    visual_name: str
    audio_name: str
    output_name: str

    def run(self, visual: np.ndarray, audio: np.ndarray, out: np.ndarray) -> None:
        """Write the predictions for visual/audio into `out` (all [B,...] float32)."""

    def warm_up(self) -> None:
        """One frame through the network, so the first request does not pay for it."""


class Encoder(Protocol):
    def encode(self, windows: np.ndarray) -> np.ndarray:
        """[N,1,80,16] mel windows -> [N,512] features (N may be 0)."""


@dataclass(frozen=True)
class Backend:
    """What runs a worker's networks: the provider, the UNet's precision (resolved: never
    `auto`) and its CPU threads (0: the runtime's default; on CUDA the device computes)."""

    provider: Resolved
    precision: str
    threads: int = 0

    @classmethod
    def of(cls, provider: Resolved, precision: str, threads: int = 0) -> Backend:
        """The backend for the config's `gpus.unet_precision` (auto included) on `provider`;
        ValueError for a precision the provider or this CPU cannot run."""
        return cls(provider, resolve_precision(precision, provider), threads)

    @property
    def runtime(self) -> str:
        return "openvino" if self.provider == "openvino" else f"onnxruntime-{self.provider}"

    def label(self) -> str:
        """E.g. "openvino bf16, 2 threads", "onnxruntime-cuda fp16"."""
        threads = f", {self.threads} threads" if self.threads and self.provider != "cuda" else ""
        return f"{self.runtime} {self.precision}{threads}"

    def with_threads(self, threads: int) -> Backend:
        return replace(self, threads=threads)


def load_unet(path: Path, provider: Resolved, intra_op_threads: int = 0,
              precision: str = "fp32", cuda_graphs: bool = False) -> UNetRunner:
    """The UNet at `precision` (`auto` resolved for the provider) with `intra_op_threads`
    CPU threads; with `cuda_graphs` on CUDA, one that replays captured graphs (elsewhere the
    option is ignored, and says so)."""
    precision = resolve_precision(precision, provider)
    graphs = cuda_graphs and provider == "cuda"
    if cuda_graphs and not graphs:
        log.warning("gpus.cuda_graphs ignored: CUDA graphs need the CUDA execution "
                    "provider and this worker runs on the CPU")
    if provider == "openvino":
        from pipeline.gpu_worker.openvino_runtime import OpenVinoUNet

        return OpenVinoUNet.create(path, precision, intra_op_threads)
    from pipeline.gpu_worker.cuda_graphs import GraphedUNet
    from pipeline.gpu_worker.sessions import UNet, unet_session

    session = unet_session(path, provider, intra_op_threads, precision, graphs)
    return GraphedUNet(session) if graphs else UNet(session)


def load_audio_encoder(path: Path, provider: Resolved, intra_op_threads: int = 0) -> Encoder:
    """The audio encoder (float32 on every backend) with `intra_op_threads` CPU threads."""
    if provider == "openvino":
        from pipeline.gpu_worker.openvino_runtime import OpenVinoAudioEncoder

        return OpenVinoAudioEncoder.create(path, intra_op_threads)
    from pipeline.gpu_worker.sessions import AudioEncoder

    return AudioEncoder.create(path, provider, intra_op_threads)
