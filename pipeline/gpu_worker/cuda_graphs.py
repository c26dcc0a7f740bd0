"""CUDA graphs for the UNet (`gpus.cuda_graphs: true`, CUDA only).

Why: a UNet run launches a couple of hundred small kernels; replaying them as one captured
CUDA graph removes the per-launch CPU cost, which dominates at small batches.

How ONNX Runtime does it (its CUDA EP and `onnxruntime_run_options_config_keys.h`), and what
that asks of us:

- Provider option `enable_cuda_graph=1`: the session runs on one stream of its own.
- A run whose RunOptions carry `gpu_graph_id=N` (N >= 1) is captured as graph N once the
  thread has done its warm-up runs (`min_num_runs_before_cuda_graph_capture_`; ORT repeats
  the run internally until the capture is made), and every later run with N replays it.
  `gpu_graph_id=-1` runs normally, without capture or replay.
- A replay reads and writes the addresses the capture saw, so inputs and output live in
  static device buffers, bound once per graph; each run copies the request's rows from
  shared memory into them and the prediction back out.
- A graph is one fixed shape: batches are padded up to the next of BUCKETS (the padding rows
  are computed and dropped: no op of the UNet contract mixes frames of a batch), and a run
  larger than the largest bucket is split.
- cuDNN picks its convolution algorithms on a shape's first run, which cannot happen inside
  a capture: each (thread, bucket) first runs twice with `gpu_graph_id=-1`.
- The captured graphs live in the calling thread's context, so capture and replay happen on
  the thread that serves requests (the worker's compute loop), and the capture is in CUDA's
  global mode: a CUDA allocation on another thread of the process meanwhile breaks it.
  CAPTURE_LOCK serialises the first runs of a bucket with whatever else allocates (the
  loader creating a session); later replays take no lock.

The same class runs on the CPU EP over host buffers (HostMemory), where ONNX Runtime ignores
`gpu_graph_id`: that is how the bucketing, padding, splitting and copies are tested without a
GPU. The worker itself never builds one on the CPU (`load_unet` ignores the option there).
"""
from __future__ import annotations

import ctypes
import threading
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import onnxruntime as ort

from pipeline.gpu_worker.sessions import UNet
from pipeline.synctalk import AUDIO_SHAPE, PREDICTION_SHAPE, VISUAL_SHAPE

BUCKETS = (1, 2, 4, 8, 12, 16, 24, 32)  # padding costs at most 60 % (5 -> 8), 33 % above 8
WARMUP_RUNS = 2                          # uncaptured runs of a new shape before its capture
CAPTURE_LOCK = threading.RLock()     # re-entered by warm_up under the loader's hold
_SKIP = "-1"                             # gpu_graph_id of a run outside any graph


def bucket_for(frames: int, buckets: tuple[int, ...] = BUCKETS) -> int:
    """The smallest bucket that holds `frames` (1 <= frames <= the largest bucket)."""
    for bucket in buckets:
        if frames <= bucket:
            return bucket
    raise ValueError(f"{frames} frames exceed the largest bucket ({buckets[-1]})")


def split_frames(frames: int, largest: int) -> Iterator[slice]:
    """Row ranges of at most `largest` frames covering [0, frames)."""
    for start in range(0, frames, largest):
        yield slice(start, min(start + largest, frames))


class CudaRuntime:
    """cudaMemcpy between host arrays and device pointers, through the CUDA runtime that
    ONNX Runtime's CUDA EP already loaded (no other CUDA binding is needed)."""

    HOST_TO_DEVICE, DEVICE_TO_HOST = 1, 2

    def __init__(self) -> None:
        from onnxruntime.capi import build_and_package_info as build

        major = str(getattr(build, "cuda_version", "") or "13").split(".")[0]
        try:
            # by soname: the library ORT's CUDA EP loaded is the one returned
            self.lib = ctypes.CDLL(f"libcudart.so.{major}")
        except OSError as exc:
            raise RuntimeError(f"CUDA graphs need libcudart.so.{major}: {exc}") from exc
        self.lib.cudaMemcpy.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t,
                                        ctypes.c_int]
        self.lib.cudaMemset.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t]
        self.lib.cudaStreamSynchronize.argtypes = [ctypes.c_void_p]
        self.lib.cudaGetErrorString.restype = ctypes.c_char_p

    def _check(self, code: int, what: str) -> None:
        if code != 0:
            raise RuntimeError(f"{what} failed: {self.lib.cudaGetErrorString(code).decode()}")

    def to_device(self, dst: int, array: np.ndarray) -> None:
        self._check(self.lib.cudaMemcpy(dst, array.ctypes.data, array.nbytes,
                                        self.HOST_TO_DEVICE), "cudaMemcpy to the device")

    def to_host(self, out: np.ndarray, src: int) -> None:
        # from pageable memory this returns once the copy is done
        self._check(self.lib.cudaMemcpy(out.ctypes.data, src, out.nbytes,
                                        self.DEVICE_TO_HOST), "cudaMemcpy to the host")

    def zero(self, dst: int, nbytes: int) -> None:
        self._check(self.lib.cudaMemset(dst, 0, nbytes), "cudaMemset")

    def synchronize(self) -> None:
        # A copy from pageable memory may return before its DMA lands, and ORT's graph
        # stream is non-blocking (it does not wait for the legacy stream): wait here.
        self._check(self.lib.cudaStreamSynchronize(None), "cudaStreamSynchronize")


class HostMemory:
    """The same four operations on host memory: the CPU EP's buffers, for the tests."""

    def to_device(self, dst: int, array: np.ndarray) -> None:
        ctypes.memmove(dst, array.ctypes.data, array.nbytes)

    def to_host(self, out: np.ndarray, src: int) -> None:
        ctypes.memmove(out.ctypes.data, src, out.nbytes)

    def zero(self, dst: int, nbytes: int) -> None:
        ctypes.memset(dst, 0, nbytes)

    def synchronize(self) -> None:
        pass


@dataclass
class _Graph:
    """One bucket: its binding to the static buffers and the RunOptions naming its graph."""

    binding: ort.IOBinding
    options: ort.RunOptions


def _run_options(graph_id: str) -> ort.RunOptions:
    options = ort.RunOptions()
    options.add_run_config_entry("gpu_graph_id", graph_id)
    return options


class GraphedUNet(UNet):
    """A UNet whose runs replay one captured CUDA graph per batch bucket."""

    def __init__(self, session: ort.InferenceSession, device: str = "cuda",
                 buckets: tuple[int, ...] = BUCKETS) -> None:
        super().__init__(session)
        self.device = device
        self.buckets = buckets
        self.copies: CudaRuntime | HostMemory = CudaRuntime() if device == "cuda" else HostMemory()
        largest = buckets[-1]
        # one set of buffers of the largest bucket; every bucket's binding views its start
        # (the runs of one session never overlap, so the buckets can share them)
        self.static = {name: ort.OrtValue.ortvalue_from_shape_and_type(
            [largest, *shape], np.float32, device, 0) for name, shape in
            ((self.visual_name, VISUAL_SHAPE), (self.audio_name, AUDIO_SHAPE),
             (self.output_name, PREDICTION_SHAPE))}
        for value in self.static.values():  # padding rows: zeros or earlier frames, never junk
            self.copies.zero(value.data_ptr(), _nbytes(value))
        self.copies.synchronize()  # cudaMemset may return before it is done
        self.graphs = {bucket: _Graph(self._binding(bucket), _run_options(str(i + 1)))
                       for i, bucket in enumerate(buckets)}
        self.uncaptured = _run_options(_SKIP)
        self.first_runs: dict[tuple[int, int], int] = {}  # (thread, bucket) -> runs so far

    def _binding(self, frames: int) -> ort.IOBinding:
        binding = self.session.io_binding()
        for name, value in self.static.items():
            shape = [frames, *value.shape()[1:]]
            bind = binding.bind_output if name == self.output_name else binding.bind_input
            bind(name, self.device, 0, np.float32, shape, value.data_ptr())
        return binding

    def ptr(self, name: str) -> int:
        """Device address of a static buffer (input or output name)."""
        return self.static[name].data_ptr()

    def run(self, visual: np.ndarray, audio: np.ndarray, out: np.ndarray) -> None:
        """Write the predictions for visual/audio into `out` (all [B,...] float32)."""
        for array in (visual, audio, out):
            if not array.flags.c_contiguous or array.dtype != np.float32:
                raise ValueError("expected C-contiguous float32 arrays")
        if not len(visual) == len(audio) == len(out):
            raise ValueError(f"batch sizes differ: {len(visual)}, {len(audio)}, {len(out)}")
        for rows in split_frames(len(visual), self.buckets[-1]):
            self.copies.to_device(self.ptr(self.visual_name), visual[rows])
            self.copies.to_device(self.ptr(self.audio_name), audio[rows])
            self.copies.synchronize()
            self.replay(bucket_for(rows.stop - rows.start, self.buckets))
            self.copies.to_host(out[rows], self.ptr(self.output_name))

    def replay(self, bucket: int) -> None:
        """Run bucket's graph on what the static buffers hold: on a thread's first runs of
        it, the warm-up runs and the capture (under CAPTURE_LOCK), then replays."""
        graph = self.graphs[bucket]
        key = (threading.get_ident(), bucket)
        done = self.first_runs.get(key, 0)
        if done > WARMUP_RUNS:
            self.session.run_with_iobinding(graph.binding, graph.options)
            return
        with CAPTURE_LOCK:
            options = self.uncaptured if done < WARMUP_RUNS else graph.options
            self.session.run_with_iobinding(graph.binding, options)
        self.first_runs[key] = done + 1

    def warm_up(self) -> None:
        """One uncaptured run of one frame: allocates, and captures nothing on this thread
        (the loader's; the compute loop captures its own graphs)."""
        with CAPTURE_LOCK:
            self.session.run_with_iobinding(self.graphs[self.buckets[0]].binding, self.uncaptured)


def _nbytes(value: ort.OrtValue) -> int:
    return int(np.prod(value.shape())) * 4
