"""The UNet's numeric precision: the graph ONNX Runtime is given, and how to compare two.

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

import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import onnx

PRECISIONS = ("fp32", "tf32", "fp16")


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
