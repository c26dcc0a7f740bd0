"""Every message that crosses a process boundary, as typed msgspec structs.

Rule: tensors never travel inside a message. A message carries `TensorRef` handles
(segment, offset, shape, dtype) to bytes in shared memory; only a finished JPEG travels
as a separate ZMQ frame beside its `FramesDone` header.

Flow of one InferBatchComposite request:
    frontend --InferRequest--> gpu_worker --CompositeJob (a few frames each)--> compositors
    gpu_worker --InferDone | InferFailed--> frontend
    compositor --FramesDone + its JPEGs | FramesFailed--> frontend
    compositor --Credit--> gpu_worker (a job finished: room for the next one)

Compositors pull work: each grants every gpu_worker a few credits (jobs it may hold at
once), and a worker hands a CompositeJob only to a compositor with a free credit; the jobs a
dead or frozen compositor held go to the others. A role that raises sends RoleDown before it
exits (to the frontend; a compositor also to its gpu_workers).
"""
from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec

from pipeline.synctalk import SAMPLE_RATE


class Message(msgspec.Struct, tag=True, array_like=True, frozen=True):
    """Base of every wire message (tagged, so one decoder reads any of them)."""


class TensorRef(msgspec.Struct, array_like=True, frozen=True):
    """Where a tensor lives: a shared-memory segment, a byte offset, shape and dtype."""

    segment: str
    offset: int
    shape: tuple[int, ...]
    dtype: str

    @property
    def nbytes(self) -> int:
        n = _DTYPE_SIZES[self.dtype]
        for d in self.shape:
            n *= d
        return n


_DTYPE_SIZES = {"float32": 4, "float16": 2, "int16": 2, "uint8": 1}


# ---- frontend -> gpu_worker -------------------------------------------------------------

class InferRequest(Message, frozen=True):
    request_id: int
    worker_pid: int                     # the process it is meant for (see gpu_worker/proc.py)
    model_id: str
    batch_size: int
    start_frame_idx: int
    output: TensorRef                   # [B,3,320,320] float32, written by the UNet
    visual: TensorRef | None = None     # [B,6,320,320] float32 the client sent; None: the
                                        # worker builds it from the avatar's frames
    audio: TensorRef | None = None      # [n] float32 PCM at sample_rate
    sample_rate: int = SAMPLE_RATE
    features: TensorRef | None = None   # deprecated: one frame's [32,16,16], replicated
    stream_offset: int = -1             # >= 0: a stream's frames start_frame_idx.., the audio
                                        # being its 16 kHz samples from this one on
    sent_ns: int = 0                    # time.monotonic_ns() at the frontend's send
    background_indices: tuple[int, ...] = ()   # frame i's background frame (a live session's walk);
                                        # empty: start_frame_idx + i
    live: bool = False                  # a live session's: served ahead of batch work


class BackgroundJpegs(Message, frozen=True):
    """The JPEGs of some of an avatar's background frames as they are, no mouth pasted: a
    live session's idle frames, encoded once per model by the compositors."""

    request_id: int
    worker_pid: int
    model_id: str
    indices: tuple[int, ...]


class LoadModel(Message, frozen=True):
    request_id: int
    worker_pid: int
    model_id: str


class UnloadModel(Message, frozen=True):
    request_id: int
    worker_pid: int
    model_id: str


# ---- gpu_worker -> compositor -----------------------------------------------------------

class CompositeJob(Message, frozen=True):
    """Frames [first_frame, first_frame + n) of a request, for one compositor to paste and
    encode: a request's frames go out as a few jobs (gpu_worker/jobs.py), not one message,
    credit and wake-up per frame."""

    request_id: int
    first_frame: int                    # the batch position of the job's first frame
    predictions: TensorRef | None       # [n,3,320,320] float32 BGR in [0,1]; None: backgrounds only
    backgrounds: tuple[TensorRef, ...]  # n of [H,W,3] uint8 BGR
    rects: tuple[tuple[int, int, int, int], ...]  # n of x1, y1, x2, y2 (half-open)
    mode: Literal["synctalk", "stretch"]
    jpeg_quality: int
    live: bool = False                  # a live session's frames: handed out first


class ReleaseSegment(Message, frozen=True):
    """Broadcast by a gpu_worker: unmap this segment (a model's backgrounds were unloaded)."""

    segment: str


# ---- compositor -> gpu_worker -----------------------------------------------------------

class Credit(Message, frozen=True):
    """Sent by a compositor on its DEALER to one gpu_worker: the jobs it may hold at once
    (`credits`), and the job it just finished, which frees one (request_id -1: none). Sent
    at start, after every job and every heartbeat period: it is also the compositor's
    heartbeat to the worker."""

    index: int
    pid: int
    credits: Annotated[int, msgspec.Meta(ge=0)]
    request_id: int = -1
    first_frame: int = -1
    cpu_ns: int = 0                     # the finished job's CPU per frame (paste + JPEG; 0: not
                                        # measured)


class CompositorLink(msgspec.Struct, array_like=True, frozen=True):
    """A gpu_worker's view of one compositor it hands jobs to (in its heartbeats)."""

    index: int
    pid: int
    credits: int                        # jobs it asked to hold at most
    held: int                           # jobs it holds now
    handed: int                         # jobs handed to it so far
    alive: bool                         # false: silent, its jobs handed to the others


# ---- gpu_worker / compositor -> frontend ------------------------------------------------

class InferDone(Message, frozen=True):
    request_id: int
    gpu_id: int
    queue_ns: int                       # from the frontend's send to the worker starting it
    audio_ns: int                       # mel, encoder and per-frame assembly
    encoder_ns: int                     # the audio encoder's share of audio_ns
    visual_ns: int                      # building the visual input (0 when the client sent it)
    inference_ns: int                   # the UNet
    composite_start_ns: int             # time.monotonic_ns() when the jobs were dispatched
    run_frames: int = 0                 # frames of the UNet run this request shared (batching)
    run_requests: int = 1               # requests coalesced into that run


class InferFailed(Message, frozen=True):
    request_id: int
    error: str


class FramesDone(Message, frozen=True):
    """Header of a job's JPEGs, frames [first_frame, first_frame + n) of a request; the n
    JPEGs follow as the next ZMQ frames, one each."""

    request_id: int
    first_frame: int
    compositor: int                     # which compositor made them (DEVICE_COMPOSITOR: the
                                        # gpu_worker itself, compositor.device gpu)
    paste_ns: int                       # summed over the frames
    jpeg_ns: int


DEVICE_COMPOSITOR = -1


class FramesFailed(Message, frozen=True):
    """A job's frames (from first_frame on) could not be made."""

    request_id: int
    first_frame: int
    error: str


class ControlReply(Message, frozen=True):
    request_id: int
    ok: bool
    error: str = ""
    gpu_id: int = -1
    elapsed_ns: int = 0
    memory_bytes: int = 0               # LoadModel: the model's measured memory


class Heartbeat(Message, frozen=True):
    role: Literal["gpu_worker", "compositor"]
    index: int
    pid: int
    gpu_id: int = -1
    device_memory_used_bytes: int = 0   # measured (NVML on a GPU, process RSS on CPU)
    loaded_models: dict[str, int] = {}  # model id -> its measured memory (bytes)
    queue_depth: int = 0
    jobs_waiting: int = 0               # gpu_worker: CompositeJobs waiting for a credit
    jobs_redispatched: int = 0          # gpu_worker: jobs of lost compositors handed again
    compositors: list[CompositorLink] = []  # gpu_worker: the compositors it hands jobs to
    cuda: bool = False                  # gpu_worker: runs the CUDA execution provider
    # gpu_worker: what runs its networks ("openvino", "onnxruntime-cpu", "onnxruntime-cuda"),
    # the UNet's precision (fp32, tf32, fp16, bf16) and its CPU threads (0: not CPU-bound)
    backend: str = ""
    precision: str = ""
    threads: int = 0
    # gpu_worker on a CPU: the measured CPU per frame of its stages and the threads they
    # call for (gpu_worker/threads.py: ThreadPlanner.snapshot)
    thread_plan: dict[str, Any] = {}


class RoleDown(Message, frozen=True):
    """Sent by a role about to exit because of an error (death announced, not inferred):
    the frontend fails its work at once instead of after heartbeats go silent."""

    role: Literal["gpu_worker", "compositor"]
    index: int
    pid: int
    reason: str


ToWorker = InferRequest | BackgroundJpegs | LoadModel | UnloadModel
ToWorkerJobs = Credit | RoleDown  # what a gpu_worker's jobs socket receives
ToCompositor = CompositeJob | ReleaseSegment
ToFrontend = (InferDone | InferFailed | FramesDone | FramesFailed | ControlReply | Heartbeat
              | RoleDown)

encode = msgspec.msgpack.Encoder().encode
worker_decoder = msgspec.msgpack.Decoder(ToWorker)
worker_jobs_decoder = msgspec.msgpack.Decoder(ToWorkerJobs)
compositor_decoder = msgspec.msgpack.Decoder(ToCompositor)
frontend_decoder = msgspec.msgpack.Decoder(ToFrontend)
