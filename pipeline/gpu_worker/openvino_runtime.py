"""OpenVINO on the CPU (`gpus.provider: openvino`): the avatar's UNet and the audio encoder.

Why: on a CPU with bf16 units (AVX512-BF16, AMX) OpenVINO runs the SyncTalk-2D UNet in
bfloat16 at about twice the frames/s of ONNX Runtime's float32 (docs/benchmarks.md), and
in float32 no slower. The same contract as the ONNX Runtime classes of sessions.py:

- names from the graph (visual: the 4-D input with 6 channels; audio: the other);
- one compiled model with a dynamic batch dimension serves every batch size (measured no
  slower than a model compiled per shape, docs/benchmarks.md, and one copy of the weights);
- zero copies: the request's shared-memory tensors are wrapped (`ov.Tensor(array,
  shared_memory=True)`) and set as the inputs *and* the output of the infer request, so
  OpenVINO reads the inputs in place and writes the prediction into the request's block;
- precision is explicit (`INFERENCE_PRECISION_HINT`): OpenVINO's own default is bf16 on a
  CPU that has the units, and we never let a default choose it (precision.py decides).

OpenVINO threads: `INFERENCE_NUM_THREADS` per compiled model (threads.py decides how many),
one stream (the engine runs one UNet batch at a time), and no pinning of its threads to
cores: the compositors and the frontend share those cores, and a thread pinned beside a
busy compositor could not move to an idle core.
"""
from __future__ import annotations

import functools
import platform
from pathlib import Path
from typing import Any

import numpy as np
import openvino as ov

from pipeline.synctalk import AUDIO_SHAPE, ENCODED_DIM, PREDICTION_SHAPE, VISUAL_SHAPE

# OpenVINO's names of our precisions
_HINTS = {"fp32": "f32", "bf16": "bf16"}


@functools.cache
def core() -> ov.Core:
    return ov.Core()


def bf16_units() -> bool:
    """Whether this CPU computes bf16 in hardware (x86: AVX512-BF16 or AMX-BF16; Arm:
    the BF16 extension) and OpenVINO's CPU plugin says it can use them."""
    return _cpu_has_bf16(_cpu_flags()) and "BF16" in core().get_property(
        "CPU", "OPTIMIZATION_CAPABILITIES")


def _cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    flags: set[str] = set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            flags.update(value.split())
    return flags


def _cpu_has_bf16(flags: set[str]) -> bool:
    if platform.machine() in ("aarch64", "arm64"):
        return "bf16" in flags
    return bool(flags & {"avx512_bf16", "amx_bf16"})


def device_name() -> str:
    return str(core().get_property("CPU", "FULL_DEVICE_NAME"))


def compile_model(model: Path, precision: str, threads: int,
                  batch: int | None = None) -> ov.CompiledModel:
    """`model` (an ONNX file) compiled for the CPU at `precision` (fp32 or bf16) with
    `threads` inference threads (0: OpenVINO's choice, every core); with `batch`, for that
    batch size only (the alternative to the dynamic batch that the benchmarks measure)."""
    if precision not in _HINTS:
        raise ValueError(f"OpenVINO runs fp32 or bf16, not {precision!r}")
    config: dict[str, Any] = {
        "INFERENCE_PRECISION_HINT": _HINTS[precision],
        "PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": 1, "ENABLE_CPU_PINNING": False}
    if threads:
        config["INFERENCE_NUM_THREADS"] = threads
    if batch is None:
        return core().compile_model(str(model), "CPU", config)
    graph = core().read_model(str(model))
    graph.reshape({port.get_any_name(): [batch, *list(port.get_partial_shape())[1:]]
                   for port in graph.inputs})
    return core().compile_model(graph, "CPU", config)


def _shared(array: np.ndarray, name: str) -> ov.Tensor:
    if not array.flags.c_contiguous or array.dtype != np.float32:
        raise ValueError(f"{name}: expected a C-contiguous float32 array")
    return ov.Tensor(array, shared_memory=True)


class OpenVinoUNet:
    """An avatar's lip-sync UNet on OpenVINO: [B,6,320,320] + [B,32,16,16] -> [B,3,320,320]."""

    def __init__(self, compiled: ov.CompiledModel) -> None:
        self.compiled = compiled
        inputs = compiled.inputs
        visual = [i for i in inputs if i.get_partial_shape().rank.get_length() == 4
                  and i.get_partial_shape()[1].is_static
                  and i.get_partial_shape()[1].get_length() == VISUAL_SHAPE[0]]
        if len(inputs) != 2 or len(visual) != 1 or len(compiled.outputs) != 1:
            raise ValueError("the model must have two inputs (one [B,6,320,320]) and one output, "
                             f"got inputs {[(i.get_any_name(), str(i.get_partial_shape())) for i in inputs]}")
        self.visual_port = visual[0]
        self.audio_port = next(i for i in inputs
                               if i.get_any_name() != visual[0].get_any_name())
        self.output_port = compiled.outputs[0]
        self.visual_name = self.visual_port.get_any_name()
        self.audio_name = self.audio_port.get_any_name()
        self.output_name = self.output_port.get_any_name()
        self.request = compiled.create_infer_request()
        # what the request holds between runs: a wrapped array keeps its buffer (a mapping
        # of shared memory) alive, and a dead frontend's arena must not stay mapped by us
        batch = compiled.inputs[0].get_partial_shape()[0]  # static: compiled for one size
        rows = batch.get_length() if batch.is_static else 1
        self.parked = [(port, ov.Tensor(np.zeros((rows, *shape), np.float32))) for port, shape in (
            (self.visual_port, VISUAL_SHAPE), (self.audio_port, AUDIO_SHAPE),
            (self.output_port, PREDICTION_SHAPE))]

    @classmethod
    def create(cls, path: Path, precision: str, threads: int) -> OpenVinoUNet:
        return cls(compile_model(path, precision, threads))

    def run(self, visual: np.ndarray, audio: np.ndarray, out: np.ndarray) -> None:
        """Write the predictions for visual/audio into `out` (all [B,...] float32), read and
        written in place."""
        if not len(visual) == len(audio) == len(out):
            raise ValueError(f"batch sizes differ: {len(visual)}, {len(audio)}, {len(out)}")
        request = self.request
        try:
            request.set_tensor(self.visual_port, _shared(visual, self.visual_name))
            request.set_tensor(self.audio_port, _shared(audio, self.audio_name))
            request.set_tensor(self.output_port, _shared(out, self.output_name))
            request.infer()
            written = request.get_tensor(self.output_port)
            if written.data.ctypes.data != out.ctypes.data:  # OpenVINO replaced our buffer
                out[...] = written.data.reshape(out.shape)
        finally:
            for port, tensor in self.parked:
                request.set_tensor(port, tensor)

    def warm_up(self) -> None:
        """One frame through the network: the first run allocates and picks its kernels."""
        self.run(np.zeros((1, *VISUAL_SHAPE), np.float32), np.zeros((1, *AUDIO_SHAPE), np.float32),
                 np.empty((1, *PREDICTION_SHAPE), np.float32))


class OpenVinoAudioEncoder:
    """The audio encoder on OpenVINO, in float32: every mel window of a request in one run.
    It is a small share of a frame's work (one [1,80,16] window per frame against the UNet's
    ~10 GFLOPs), so bf16 would buy nothing and move the features the UNet sees."""

    def __init__(self, compiled: ov.CompiledModel) -> None:
        self.request = compiled.create_infer_request()
        self.input_port = compiled.inputs[0]
        self.output_port = compiled.outputs[0]

    @classmethod
    def create(cls, path: Path, threads: int) -> OpenVinoAudioEncoder:
        return cls(compile_model(path, "fp32", threads))

    def encode(self, windows: np.ndarray) -> np.ndarray:
        """[N,1,80,16] mel windows -> [N,512] features (N may be 0)."""
        if len(windows) == 0:
            return np.zeros((0, ENCODED_DIM), np.float32)
        windows = np.ascontiguousarray(windows, np.float32)
        self.request.set_tensor(self.input_port, _shared(windows, "mel windows"))
        self.request.infer()
        # the output is the request's own memory, reused by the next run: the caller's copy
        return np.array(self.request.get_tensor(self.output_port).data, copy=True)
