"""The UNet's numeric precision: which one a worker runs, the graph ONNX Runtime is given,
and how to compare two.

`gpus.unet_precision: auto` is float32 on ONNX Runtime (CUDA and CPU) and, on OpenVINO, bf16
where the CPU has bf16 units and float32 where it has not; `fp32` and `bf16` force either
(bf16 is OpenVINO's, and refused, never emulated, on a CPU without the units).

`gpus.unet_precision: fp16` converts the avatar's float32 UNet to float16 when it is loaded,
with onnxconverter-common (the converter the ONNX project maintains). Its inputs and output
stay float32 (`keep_io_types`): Cast nodes at the graph's edges convert, so the shared-memory
tensors, the IO binding and every other role are unchanged.

On the CUDA EP every converted node runs in float16. On the CPU EP most have no float16
kernel (Conv, Relu, Add, Sigmoid on x86): ONNX Runtime's InsertCastTransformer runs those in
float32 between Casts, so the converted graph runs on the CPU too (with float16-rounded
weights), which is how the normal test suite checks the conversion without a GPU. The
converter's default op block list keeps Resize (and a few ops with no float16 form) in
float32; nothing else needs blocking for the SyncTalk-2D graph.
"""
from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import onnx

log = logging.getLogger(__name__)

PRECISIONS = ("fp32", "tf32", "fp16")   # what ONNX Runtime runs
_RUNS = {"cuda": ("fp32", "tf32", "fp16"), "cpu": ("fp32", "tf32", "fp16"),
         "openvino": ("fp32", "bf16")}


def resolve_precision(requested: str, provider: str, bf16_units: bool | None = None) -> str:
    """The precision a worker on `provider` runs for `gpus.unet_precision: requested`;
    ValueError, naming the setting, for one it cannot run. `bf16_units`: whether this CPU
    has them (None: ask OpenVINO and the CPU's flags)."""
    if provider == "openvino" and requested in ("auto", "bf16"):
        if bf16_units is None:
            from pipeline.gpu_worker.openvino_runtime import bf16_units as probe

            bf16_units = probe()
        if requested == "auto":
            return "bf16" if bf16_units else "fp32"
        if not bf16_units:
            raise ValueError("gpus.unet_precision is bf16, but this CPU has no bf16 units "
                             "(AVX512-BF16 or AMX): set fp32 (or auto, which picks it here)")
        return "bf16"
    if requested == "auto":
        return "fp32"
    runs = _RUNS.get(provider, ())
    if requested not in runs:
        raise ValueError(f"gpus.unet_precision is {requested}, which the {provider} provider "
                         f"does not run (it runs {', '.join(runs)}; bf16 is OpenVINO's)")
    if requested == "tf32" and provider != "cuda":
        log.warning("gpus.unet_precision tf32 applies to CUDA only: the CPU computes fp32")
        return "fp32"
    return requested


def convert_to_fp16(model: onnx.ModelProto) -> onnx.ModelProto:
    """The model with float16 weights and compute, float32 inputs and outputs."""
    from onnxconverter_common import float16

    with warnings.catch_warnings():
        # the converter warns once per weight below float16's range (~6e-8) that it is
        # flushed to +-1e-7; a trained UNet has thousands of them and the flush is intended
        warnings.simplefilter("ignore", UserWarning)
        return float16.convert_float_to_float16(model, keep_io_types=True)


def unet_model(path: Path, precision: str) -> Path | bytes:
    """What ONNX Runtime loads for `precision`: the file itself, or the converted graph."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown UNet precision {precision!r} (one of {', '.join(PRECISIONS)})")
    if precision != "fp16":
        return path  # tf32 differs from fp32 only in a CUDA provider option
    import onnx

    return convert_to_fp16(onnx.load(str(path))).SerializeToString()


def psnr_db(reference: np.ndarray, test: np.ndarray, peak: float = 255.0) -> float:
    """Peak signal-to-noise ratio of `test` against `reference` (inf when identical)."""
    if reference.shape != test.shape:
        raise ValueError(f"shapes differ: {reference.shape} vs {test.shape}")
    mse = float(np.mean((reference.astype(np.float64) - test.astype(np.float64)) ** 2))
    return float("inf") if mse == 0.0 else float(10.0 * np.log10(peak * peak / mse))


def max_abs_diff(a: np.ndarray, b: np.ndarray) -> float:
    """The largest elementwise |a - b| (float64, so float16 rounding is not hidden)."""
    return float(np.max(np.abs(a.astype(np.float64) - b.astype(np.float64))))
