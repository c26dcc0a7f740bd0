"""Which execution provider a gpu_worker uses, and what its device's memory reads.

`gpus.provider: auto` means CUDA when ONNX Runtime has the CUDA EP *and* NVML sees a
device; otherwise CPU workers: on OpenVINO when it is installed (the `openvino` extra: about
twice ONNX Runtime's frames/s on a CPU with bf16 units, docs/benchmarks.md), else on ONNX
Runtime's CPU provider (`cpu`), so every code path runs on a machine without a GPU.
"""
from __future__ import annotations

import importlib.util
import os
from typing import Literal

from pipeline.runtime.process import private_bytes

Resolved = Literal["cuda", "cpu", "openvino"]


def openvino_installed() -> bool:
    return importlib.util.find_spec("openvino") is not None


def cuda_device_count() -> int:
    """Devices NVML sees (0 when there is no driver). Does not initialise CUDA."""
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            return int(pynvml.nvmlDeviceGetCount())
        finally:
            pynvml.nvmlShutdown()
    except Exception:
        return 0


def resolve_provider(requested: str, gpu_count: int) -> Resolved:
    """The provider the workers will run, or ValueError when `cuda` was asked and cannot be had."""
    if requested == "cpu":
        return "cpu"
    if requested == "openvino":
        if not openvino_installed():
            raise ValueError("gpus.provider is openvino but the openvino package is not "
                             "installed (pip install -e '.[openvino]')")
        return "openvino"
    import onnxruntime as ort

    has_ep = "CUDAExecutionProvider" in ort.get_available_providers()
    devices = cuda_device_count() if has_ep else 0
    if requested == "cuda":
        if not has_ep:
            raise ValueError("gpus.provider is cuda but onnxruntime has no CUDAExecutionProvider "
                             "(install onnxruntime-gpu)")
        if devices < gpu_count:
            raise ValueError(f"gpus.provider is cuda and gpus.count is {gpu_count}, "
                             f"but only {devices} CUDA device(s) are visible")
        return "cuda"
    if devices >= 1:
        return "cuda"
    return "openvino" if openvino_installed() else "cpu"


def pin_to_device(provider: Resolved, gpu_index: int) -> None:
    """Make device `gpu_index` the only one this process sees. Call before importing ORT."""
    if provider == "cuda":
        os.environ["CUDA_VISIBLE_DEVICES"] = str(gpu_index)


class DeviceMemory:
    """Measured memory in use on this worker's device: NVML on a GPU, private RSS on CPU."""

    def __init__(self, provider: Resolved, gpu_index: int) -> None:
        self._handle = None
        if provider == "cuda":
            import pynvml

            pynvml.nvmlInit()
            self._handle = pynvml.nvmlDeviceGetHandleByIndex(gpu_index)

    def used_bytes(self) -> int:
        if self._handle is None:
            return private_bytes()
        import pynvml

        return int(pynvml.nvmlDeviceGetMemoryInfo(self._handle).used)
