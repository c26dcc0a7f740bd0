"""ONNX Runtime sessions of a gpu_worker: the shared audio encoder and one UNet per avatar.

Input and output names are read from the graph (visual: the 4-D input with 6 channels;
audio: the other), so any export with the SyncTalk-2D contract drops in by config.
Tensors are bound in place (IO binding): ORT reads the request's visual tensor from
shared memory and writes the prediction straight into the request's output block.
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import onnxruntime as ort

from pipeline.gpu_worker.device import Resolved
from pipeline.synctalk import AUDIO_SHAPE, ENCODED_DIM, PREDICTION_SHAPE, VISUAL_SHAPE

log = logging.getLogger(__name__)



def make_session(model: Path | bytes, provider: Resolved, intra_op_threads: int,
             cuda_options: dict[str, str] | None = None) -> ort.InferenceSession:
    """A session of `model` (a file, or a serialized graph) on `provider`; on CUDA, float32
    stays float32 (TF32 off) unless `cuda_options` say otherwise."""
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if intra_op_threads:
        opts.intra_op_num_threads = intra_op_threads
    opts.log_severity_level = 3
    # idle ORT threads sleep instead of spinning: spinning threads would take the CPU from
    # the compositors and the frontend, which run beside the worker on the same cores
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.add_session_config_entry("session.inter_op.allow_spinning", "0")
    # which provider runs each node (nodes_by_provider): a partial CPU fallback is visible
    opts.add_session_config_entry("session.record_ep_graph_assignment_info", "1")
    providers: list[str | tuple[str, dict[str, str]]] = ["CPUExecutionProvider"]
    if provider == "cuda":
        _preload_cuda_libraries()
        # the process sees only its own device (CUDA_VISIBLE_DEVICES), so device 0
        providers.insert(0, ("CUDAExecutionProvider",
                             {"device_id": "0", "use_tf32": "0", **(cuda_options or {})}))
    source = model if isinstance(model, bytes) else str(model)
    session = ort.InferenceSession(source, sess_options=opts, providers=providers)
    if provider == "cuda" and session.get_providers()[0] != "CUDAExecutionProvider":
        # ONNX Runtime falls back to the CPU without a word (the original server's defect)
        raise RuntimeError(
            "the CUDA execution provider did not load (ONNX Runtime's CUDA/cuDNN libraries "
            f"are missing; onnxruntime {ort.__version__} needs those of "
            "`pip install onnxruntime-gpu[cuda,cudnn]`, i.e. `pip install -e '.[cuda]'`); "
            "set gpus.provider: cpu to run on the CPU")
    if provider == "cuda" and (on_cpu := nodes_by_provider(session).get("CPUExecutionProvider")):
        log.warning("%d nodes of %s run on the CPU (no CUDA kernel): %s", len(on_cpu),
                    model if isinstance(model, Path) else "the model", ", ".join(on_cpu[:10]))
    return session


def nodes_by_provider(session: ort.InferenceSession) -> dict[str, list[str]]:
    """The nodes ("OpType name") each execution provider runs; {} where the installed ONNX
    Runtime has no graph assignment info (older releases)."""
    info = getattr(session, "get_provider_graph_assignment_info", None)
    try:
        subgraphs = info() if info is not None else []
    except Exception:  # the session was created without recording it
        return {}
    nodes: dict[str, list[str]] = {}
    for subgraph in subgraphs:
        nodes.setdefault(subgraph.ep_name, []).extend(
            f"{node.op_type} {node.name}" for node in subgraph.get_nodes())
    return nodes


def _preload_cuda_libraries() -> None:
    """Load CUDA and cuDNN from the nvidia-* wheels when they are installed (the `cuda`
    extra); system libraries on the loader path serve otherwise."""
    preload = getattr(ort, "preload_dlls", None)
    if preload is not None:
        try:
            preload(cuda=True, cudnn=True, msvc=False)
        except Exception:  # nothing to preload: the system's libraries, or the error below
            pass


def _bind(binding: ort.IOBinding, name: str, array: np.ndarray, output: bool = False) -> None:
    if not array.flags.c_contiguous or array.dtype != np.float32:
        raise ValueError(f"{name}: expected a C-contiguous float32 array")
    bind = binding.bind_output if output else binding.bind_input
    bind(name, "cpu", 0, np.float32, list(array.shape), array.ctypes.data)


def unet_session(path: Path, provider: Resolved, intra_op_threads: int = 0,
                 precision: str = "fp32", graphs: bool = False) -> ort.InferenceSession:
    """An avatar's UNet session at `precision` (pipeline/gpu_worker/precision.py), set up
    for CUDA graph capture when `graphs` (pipeline/gpu_worker/unet.py decides when)."""
    from pipeline.gpu_worker.precision import unet_model

    options = {"use_tf32": "1" if precision == "tf32" else "0"}
    if graphs:
        options["enable_cuda_graph"] = "1"
    return make_session(unet_model(path, precision), provider, intra_op_threads, options)


class UNet:
    """An avatar's lip-sync UNet: [B,6,320,320] + [B,32,16,16] -> [B,3,320,320]."""

    def __init__(self, session: ort.InferenceSession) -> None:
        self.session = session
        inputs = session.get_inputs()
        visual = [i for i in inputs if len(i.shape) == 4 and i.shape[1] == VISUAL_SHAPE[0]]
        if len(inputs) != 2 or len(visual) != 1 or len(session.get_outputs()) != 1:
            raise ValueError("the model must have two inputs (one [B,6,320,320]) and one output, "
                             f"got inputs {[(i.name, i.shape) for i in inputs]}")
        self.visual_name = visual[0].name
        self.audio_name = next(i.name for i in inputs if i.name != self.visual_name)
        self.output_name = session.get_outputs()[0].name

    def run(self, visual: np.ndarray, audio: np.ndarray, out: np.ndarray) -> None:
        """Write the predictions for visual/audio into `out` (all [B,...] float32)."""
        binding = self.session.io_binding()
        _bind(binding, self.visual_name, visual)
        _bind(binding, self.audio_name, audio)
        _bind(binding, self.output_name, out, output=True)
        self.session.run_with_iobinding(binding)

    def warm_up(self) -> None:
        """One frame through the network: the first run allocates (and on CUDA picks its
        kernels), so the first request does not pay for it."""
        self.run(np.zeros((1, *VISUAL_SHAPE), np.float32), np.zeros((1, *AUDIO_SHAPE), np.float32),
                 np.empty((1, *PREDICTION_SHAPE), np.float32))


class AudioEncoder:
    """The shared audio encoder: every mel window of a request in one batched run."""

    def __init__(self, session: ort.InferenceSession) -> None:
        self.session = session
        self.input_name = session.get_inputs()[0].name
        self.output_name = session.get_outputs()[0].name

    @classmethod
    def create(cls, path: Path, provider: Resolved, intra_op_threads: int = 0) -> AudioEncoder:
        return cls(make_session(path, provider, intra_op_threads))

    def encode(self, windows: np.ndarray) -> np.ndarray:
        """[N,1,80,16] mel windows -> [N,512] features (N may be 0)."""
        if len(windows) == 0:
            return np.zeros((0, ENCODED_DIM), np.float32)
        (out,) = self.session.run([self.output_name],
                                  {self.input_name: np.ascontiguousarray(windows, np.float32)})
        return out
