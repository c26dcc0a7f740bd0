"""`compositor.device: gpu`: the paste and the JPEG in the gpu_worker, on its device.

Right after a request's UNet run the worker pastes its frames with the paste graph
(paste_graph.py) on its own ONNX Runtime provider, the model's backgrounds kept on the
device since its load (decoded once, as for the compositors), and encodes them with
nvImageCodec's CUDA JPEG encoder, quality (`output.jpeg_quality`) and 4:2:0 chroma set
explicitly: the encoder's own defaults differ between releases. The worker then sends
[FramesDone, JPEG, ...] to the frontend itself, before the request's InferDone, on the socket that
carries the InferDone: no compositor job and no credit for these frames. What bounds them is
what bounds the request: the frontend admits only so many requests and tensor bytes in flight,
and each request's frames are made once, in its UNet run's turn on the compute loop. The
compositor pool still encodes the idle frames of live sessions, once per model.

The frames equal the compositors' to within JPEG loss (the unit tests hold the paste graph to
>= 45 dB of the compositor's paste; the GPU suite compares whole frames). The prediction
reaches the paste through the request's shared-memory block, where the UNet wrote it (one
copy to the device per frame, 1.2 MB): the one interface of every backend stays as it is.

What needs a GPU is one path, `DeviceCompositor` with provider "cuda": device-resident
backgrounds (OrtValues bound to the paste run) and the nvJPEG encoder reading the frames where
the paste wrote them (`__cuda_array_interface__`). A worker that cannot take it refuses to
start and says why (`unavailable`, then a self-check at start): never a silent fallback to the
CPU. With LIPSYNC_GPU_TESTS_ON_CPU=1 (`scripts/gpu-suite --dry-run` and the tests) the same
path runs on ONNX Runtime's CPU provider and nvImageCodec's CPU encoder, so none of its logic
is first tried on the GPU.
"""
from __future__ import annotations

import importlib.util
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np

from pipeline.config import gpu_path_on_cpu
from pipeline.gpu_worker.device import Resolved
from pipeline.gpu_worker.paste_graph import MODES, OUTPUT, Rect, paste_feeds, paste_graph

log = logging.getLogger(__name__)

# host threads nvImageCodec's CUDA encoder may use to feed its streams; the GPU suite's CPU
# figures tell whether more pay (its default is one per core of the box)
GPU_ENCODER_THREADS = 4
CHROMA = "4:2:0"


def unavailable(provider: Resolved) -> str | None:
    """Why `compositor.device: gpu` cannot run with this provider here (None: it can, as
    far as can be told without touching the device; the worker's self-check tells the rest)."""
    if provider != "cuda" and not gpu_path_on_cpu():
        return (f"compositor.device is gpu, but the gpu_workers run on the {provider} provider: "
                "it needs the CUDA provider and a device (gpus.provider cuda or auto on a GPU "
                "box); set compositor.device: cpu")
    if importlib.util.find_spec("nvidia") is None or \
            importlib.util.find_spec("nvidia.nvimgcodec") is None:
        return ("compositor.device is gpu, but nvImageCodec is not installed "
                "(pip install -e '.[gpu-compositor]'); set compositor.device: cpu")
    return None


class DeviceError(RuntimeError):
    """The device cannot composite: the message says what is missing."""


class JpegEncoder:
    """nvImageCodec's JPEG encoder: the CUDA one (nvJPEG) on a GPU, only that one; the CPU
    one in the test mode."""

    def __init__(self, on_gpu: bool, quality: int) -> None:
        from nvidia import nvimgcodec

        self.nv = nvimgcodec
        if on_gpu:
            self.encoder = nvimgcodec.Encoder(
                device_id=0, max_num_cpu_threads=GPU_ENCODER_THREADS,
                backends=[nvimgcodec.Backend(nvimgcodec.BackendKind.GPU_ONLY)])
        else:
            self.encoder = nvimgcodec.Encoder(
                device_id=nvimgcodec.NVIMGCODEC_DEVICE_CPU_ONLY, max_num_cpu_threads=1,
                backends=[nvimgcodec.Backend(nvimgcodec.BackendKind.CPU_ONLY)])
        self.params = nvimgcodec.EncodeParams(
            quality_type=nvimgcodec.QualityType.QUALITY, quality_value=float(quality),
            chroma_subsampling=nvimgcodec.ChromaSubsampling.CSS_420)

    def encode(self, images: Sequence[Any]) -> list[bytes]:
        """JPEGs of HxWx3 uint8 BGR frames (numpy arrays, or device buffers with a
        __cuda_array_interface__)."""
        wrapped = [self.nv.as_image(image, sample_format=self.nv.I_BGR) for image in images]
        streams = self.encoder.encode(wrapped, "jpeg", params=self.params)
        failed = [i for i, s in enumerate(streams) if s is None]
        if failed:
            raise DeviceError(f"nvImageCodec encoded no JPEG for frame(s) {failed} (no "
                              "encoder of this backend took them)")
        return [bytes(s) for s in streams]


class _DeviceFrame:
    """One frame of the paste's output in device memory, as nvImageCodec reads it."""

    def __init__(self, pointer: int, shape: tuple[int, int, int]) -> None:
        # the paste run has finished (its outputs synchronized): nothing to wait for
        self.__cuda_array_interface__ = {"shape": shape, "typestr": "|u1", "data": (pointer, False),
                                         "strides": None, "version": 3, "stream": None}


@dataclass
class DeviceBackgrounds:
    """A model's decoded backgrounds [N,H,W,3] uint8 where the paste reads them: an
    OrtValue in device memory (CUDA), or the shared-memory frames themselves (CPU)."""

    value: Any                    # onnxruntime.OrtValue on CUDA, np.ndarray on the CPU
    shape: tuple[int, int, int, int]

    @property
    def nbytes(self) -> int:
        n, h, w, c = self.shape
        return n * h * w * c

    def bind(self, binding: Any, name: str) -> None:
        if isinstance(self.value, np.ndarray):
            binding.bind_input(name, "cpu", 0, np.uint8, list(self.shape), self.value.ctypes.data)
        else:
            binding.bind_ortvalue_input(name, self.value)


@dataclass(frozen=True)
class Composited:
    jpegs: list[bytes]
    paste_ns: int
    jpeg_ns: int


class DeviceCompositor:
    def __init__(self, provider: Resolved, sessions: dict[str, Any], encoder: JpegEncoder) -> None:
        self.provider = provider
        self.device = "cuda" if provider == "cuda" else "cpu"
        self.sessions = sessions
        self.encoder = encoder

    @classmethod
    def create(cls, provider: Resolved, jpeg_quality: int) -> DeviceCompositor:
        """The paste sessions (both modes) and the encoder, proven on a small frame;
        DeviceError saying what is missing when this worker cannot composite on its device."""
        reason = unavailable(provider)
        if reason is not None:
            raise DeviceError(reason)
        from pipeline.gpu_worker.sessions import make_session

        if provider != "cuda":
            log.warning("compositor.device gpu on the %s provider with nvImageCodec's CPU "
                        "encoder: the GPU path's test mode (LIPSYNC_GPU_TESTS_ON_CPU=1), not a "
                        "deployment", provider)
        sessions = {mode: make_session(paste_graph(mode).SerializeToString(), provider, 0)
                    for mode in MODES}
        compositor = cls(provider, sessions, JpegEncoder(provider == "cuda", jpeg_quality))
        compositor.self_check()
        return compositor

    def upload(self, frames: np.ndarray) -> DeviceBackgrounds:
        """A model's backgrounds ([N,H,W,3] uint8, in shared memory) where the paste reads
        them: copied to the device once (CUDA), read in place (CPU)."""
        shape = tuple(frames.shape)
        if self.device == "cpu":
            return DeviceBackgrounds(frames, shape)
        import onnxruntime as ort

        return DeviceBackgrounds(ort.OrtValue.ortvalue_from_numpy(frames, "cuda", 0), shape)

    def composite(self, backgrounds: DeviceBackgrounds, frames: Sequence[int], rects: Sequence[Rect],
                  prediction: np.ndarray, mode: str) -> Composited:
        """The JPEGs of len(frames) frames: prediction[i] ([B,3,320,320] float32) pasted
        into background frames[i] at rects[i]."""
        t0 = time.perf_counter_ns()
        _, height, width, _ = backgrounds.shape
        session = self.sessions[mode]
        binding = session.io_binding()
        backgrounds.bind(binding, "backgrounds")
        binding.bind_cpu_input("prediction", np.ascontiguousarray(prediction, np.float32))
        for name, array in paste_feeds(mode, frames, rects, height, width).items():
            binding.bind_cpu_input(name, array)
        binding.bind_output(OUTPUT, self.device)
        session.run_with_iobinding(binding)
        binding.synchronize_outputs()
        out = binding.get_outputs()[0]
        t1 = time.perf_counter_ns()
        if self.device == "cpu":
            pasted = out.numpy()
            images: list[Any] = [pasted[i] for i in range(len(frames))]
        else:
            size, pointer = height * width * 3, out.data_ptr()
            images = [_DeviceFrame(pointer + i * size, (height, width, 3))
                      for i in range(len(frames))]
        jpegs = self.encoder.encode(images)
        del out, images  # the device frames live until the JPEGs are out
        return Composited(jpegs, t1 - t0, time.perf_counter_ns() - t1)

    def self_check(self) -> None:
        """A small known frame through both pastes and the encoder, decoded here: the
        device, its kernels, the encoder and the channel order all work before the worker
        says it is ready."""
        background, mouth = (40, 90, 160), (200, 100, 30)
        frames = np.empty((1, 48, 64, 3), np.uint8)
        frames[...] = background
        prediction = np.empty((1, 3, 320, 320), np.float32)
        for c, v in enumerate(mouth):
            prediction[0, c] = (v + 0.5) / 255
        uploaded = self.upload(frames)
        for mode in MODES:
            try:
                (jpeg,) = self.composite(uploaded, [0], [(16, 8, 48, 40)], prediction, mode).jpegs
            except Exception as exc:
                raise DeviceError(f"compositing on the {self.device} failed its self-check "
                                  f"({mode}): {type(exc).__name__}: {exc}") from exc
            frame = cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR)
            got = None if frame is None else (frame[24, 32].tolist(), frame[2, 2].tolist())
            if got is None or np.abs(np.subtract(got, [mouth, background])).max() > 12:
                raise DeviceError(f"compositing on the {self.device} failed its self-check "
                                  f"({mode}): expected BGR {mouth} in the rect and {background} "
                                  f"outside it, decoded {got}")
