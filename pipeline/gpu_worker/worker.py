"""The gpu_worker process: one per device, pinned to it.

Threads: a receiver bridges the inbox socket into `inbox` (a queue), a sender drains
`outbox` into the outgoing sockets, a loader builds models; the compute loop only ever
waits on the queue, never on a socket. Per request it computes the audio features,
runs the UNet on the shared-memory tensors (output written in place) and hands one
CompositeJob per frame to the compositor pool.

Dynamic batching: the compute loop coalesces the requests of one model that are queued
(or arrive within `batching.max_queue_delay_ms`) into one UNet run of at most
`batching.max_batch_frames` frames (auto: 32 on CUDA, none on CPU). A run of one request
binds its shared-memory tensors directly; a coalesced run gathers the requests' inputs
into one staging batch and scatters the predictions back into each request's output block.
"""
from __future__ import annotations

import itertools
import logging
import os
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import TYPE_CHECKING

import cv2
import numpy as np
import zmq

from pipeline import messages as msg
from pipeline.config import Config, ModelConfig
from pipeline.gpu_worker.device import DeviceMemory, Resolved, pin_to_device
from pipeline.runtime.addresses import Addresses
from pipeline.runtime.logs import logging_request
from pipeline.runtime.process import Readiness, release_free_heap, run_role
from pipeline.runtime.sockets import make_socket
from pipeline.shm.segment import SegmentCache

if TYPE_CHECKING:  # onnxruntime is imported only after the device is pinned
    from pipeline.gpu_worker.avatar import Avatar
    from pipeline.gpu_worker.sessions import UNet

log = logging.getLogger(__name__)

FRONTEND, JOBS, EVENTS = "frontend", "jobs", "events"
STOP_FLUSH_S = 0.5


@dataclass
class LoadedModel:
    config: ModelConfig
    unet: UNet
    avatar: Avatar
    memory_bytes: int
    load_ns: int

    def close(self) -> None:
        self.avatar.close()


@dataclass
class Loading:
    """A load in progress; requests and LoadModel replies wait on it (coalesced)."""

    future: Future[LoadedModel]
    waiting: list[msg.InferRequest | msg.LoadModel] = field(default_factory=list)
    discard: bool = False  # unloaded while loading


def run_gpu_worker_process(cfg: Config, gpu_index: int, provider: Resolved,
                           ready: Connection | None = None) -> None:
    """Entry point of gpu_worker `gpu_index` (spawned, or run by systemd)."""
    pin_to_device(provider, gpu_index)  # before onnxruntime is imported anywhere
    role = f"gpu_worker {gpu_index}"
    run_role(role, ready,
             lambda readiness, stop: GpuWorker(cfg, gpu_index, provider).serve(readiness, stop),
             lock=Addresses.of(cfg).role_lock(role))


class GpuWorker:
    def __init__(self, cfg: Config, gpu_index: int, provider: Resolved) -> None:
        from pipeline.gpu_worker import audio
        from pipeline.gpu_worker.sessions import AudioEncoder

        self.cfg = cfg
        self.index = gpu_index
        self.provider = provider
        self.addresses = Addresses.of(cfg)
        self.inbox: queue.Queue[object] = queue.Queue()
        self.backlog: deque[object] = deque()   # taken from the inbox, set aside by a batch
        self.max_batch_frames = cfg.batching.max_batch_frames or (32 if provider == "cuda" else 1)
        self.staging: StagingBatch | None = None
        self.outbox: queue.Queue[tuple[str, list[bytes]]] = queue.Queue()
        self.segments = SegmentCache()          # the frontend's request arena, attached lazily
        self.models: dict[str, LoadedModel] = {}
        # what heartbeats report, replaced whole by the compute loop (the sender thread
        # reads it; iterating `models` there could meet a change mid-way)
        self.loaded: dict[str, int] = {}
        self.loading: dict[str, Loading] = {}
        self.loader = ThreadPoolExecutor(1, thread_name_prefix="loader")
        self.memory = DeviceMemory(provider, gpu_index)
        self._bg_serial = itertools.count()
        audio.warm_up()
        cv2.setNumThreads(1)  # building visual inputs: OpenCV's threads only cost on 320 px
        self.encoder = AudioEncoder.create(cfg.audio_encoder_path, provider,
                                           cfg.gpus.intra_op_threads)
        self.encoder.encode(np.full((1, 1, 80, 16), -4.0, np.float32))  # first run allocates

    # ---- threads ---------------------------------------------------------------------

    def serve(self, readiness: Readiness, stop: threading.Event) -> None:
        ctx = zmq.Context()
        inbox = make_socket(ctx, zmq.PULL, bind=self.addresses.worker_inbox(self.index))
        out = {
            FRONTEND: make_socket(ctx, zmq.PUSH, connect=[self.addresses.frontend_inbox]),
            JOBS: make_socket(ctx, zmq.PUSH, bind=self.addresses.worker_jobs(self.index)),
            EVENTS: make_socket(ctx, zmq.PUB, bind=self.addresses.worker_events(self.index)),
        }
        threads = [threading.Thread(target=self._receive, args=(inbox, stop), name="receiver"),
                   threading.Thread(target=self._send, args=(out, stop), name="sender")]
        for t in threads:
            t.start()
        log.info("ready (%s, device %d)", self.provider, self.index)
        readiness.ready()
        try:
            self._compute_loop(stop)
        finally:
            stop.set()
            for t in threads:
                t.join()
            self.loader.shutdown(wait=True, cancel_futures=True)
            for model in self.models.values():
                model.close()
            self.segments.close()
            for sock in [inbox, *out.values()]:
                sock.close(0)
            ctx.term()

    def _receive(self, sock: zmq.Socket, stop: threading.Event) -> None:
        pid = os.getpid()
        while not stop.is_set():
            if sock.poll(100):
                try:
                    message = msg.worker_decoder.decode(sock.recv())
                except Exception:
                    log.exception("dropped an undecodable message")
                    continue
                # ZMQ hands a restarted worker what was queued for its predecessor; the
                # frontend has failed those requests and may reuse their memory already
                if message.worker_pid == pid:
                    self.inbox.put(message)
                else:
                    log.warning("dropped %s %d meant for pid %d", type(message).__name__,
                                message.request_id, message.worker_pid)

    def _send(self, socks: dict[str, zmq.Socket], stop: threading.Event) -> None:
        next_beat = 0.0
        flush_until: float | None = None  # stopping: what is queued goes out by then, or never
        while flush_until is None or (time.monotonic() < flush_until and not self.outbox.empty()):
            now = time.monotonic()
            if stop.is_set() and flush_until is None:
                flush_until = now + STOP_FLUSH_S
            if now >= next_beat and flush_until is None:
                self._post(FRONTEND, self._heartbeat())
                next_beat = now + self.cfg.runtime.heartbeat_s
            try:
                target, frames = self.outbox.get(timeout=0.05)
            except queue.Empty:
                continue
            try:
                # stopping, a peer that is gone (the frontend stops first) must not hold
                # this thread for a send timeout per message: don't wait for it
                socks[target].send_multipart(frames, zmq.NOBLOCK if flush_until else 0)
            except zmq.Again:
                log.error("send to %s timed out; message dropped", target)

    def _post(self, target: str, message: msg.Message) -> None:
        self.outbox.put((target, [msg.encode(message)]))

    def _heartbeat(self) -> msg.Heartbeat:
        return msg.Heartbeat(role="gpu_worker", index=self.index, pid=os.getpid(),
                             gpu_id=self.index, device_memory_used_bytes=self.memory.used_bytes(),
                             loaded_models=self.loaded,
                             queue_depth=self.inbox.qsize() + len(self.backlog))

    # ---- compute loop ----------------------------------------------------------------

    def _compute_loop(self, stop: threading.Event) -> None:
        handlers: dict[type, Callable[[object], None]] = {
            msg.InferRequest: self._on_infer, msg.LoadModel: self._on_load,
            msg.UnloadModel: self._on_unload, LoadFinished: self._on_load_finished}
        next_sweep = 0.0
        while not stop.is_set():
            item = self.backlog.popleft() if self.backlog else self._get(time.monotonic() + 0.1)
            if item is not None:
                handlers[type(item)](item)
            if time.monotonic() >= next_sweep:  # a dead frontend's arena goes at once
                self.segments.forget_dead()
                next_sweep = time.monotonic() + self.cfg.runtime.heartbeat_s

    def _get(self, deadline: float) -> object | None:
        """The next inbox item, waiting until `deadline` (monotonic) at most."""
        try:
            return self.inbox.get(timeout=max(0.0, deadline - time.monotonic()))
        except queue.Empty:
            return None

    def _loaded_or_wait(self, req: msg.InferRequest | msg.LoadModel) -> LoadedModel | None:
        """The request's model if loaded; else None, the request waiting on its load."""
        model = self.models.get(req.model_id)
        if model is None:
            self._start_load(req.model_id).waiting.append(req)
        return model

    def _on_infer(self, req: msg.InferRequest) -> None:
        if (model := self._loaded_or_wait(req)) is not None:
            self._infer(model, self._coalesce(req), model_loaded=False)

    def _coalesce(self, first: msg.InferRequest) -> list[msg.InferRequest]:
        """`first` and the requests of its model queued behind it, or arriving within the
        queue delay, up to max_batch_frames. Other items keep their order in the backlog;
        a control message or a request that does not fit ends the search."""
        limit = self.max_batch_frames
        run, frames, set_aside = [first], first.batch_size, []
        earlier = list(self.backlog)
        self.backlog.clear()
        deadline = time.monotonic() + self.cfg.batching.max_queue_delay_ms / 1e3
        while frames < limit:
            item = earlier.pop(0) if earlier else self._get(deadline)
            if item is None:
                break
            same_model = isinstance(item, msg.InferRequest) and item.model_id == first.model_id
            if same_model and frames + item.batch_size <= limit:  # type: ignore[union-attr]
                run.append(item)  # type: ignore[arg-type]
                frames += item.batch_size  # type: ignore[union-attr]
                continue
            set_aside.append(item)
            if same_model or not isinstance(item, msg.InferRequest):
                break
        self.backlog.extend(set_aside + earlier)
        return run

    def _on_load(self, req: msg.LoadModel) -> None:
        if (model := self._loaded_or_wait(req)) is not None:
            self._post(FRONTEND, msg.ControlReply(req.request_id, ok=True, gpu_id=self.index,
                                                  memory_bytes=model.memory_bytes))

    def _on_unload(self, req: msg.UnloadModel) -> None:
        model = self.models.pop(req.model_id, None)
        self.loaded = {m: v.memory_bytes for m, v in self.models.items()}
        loading = self.loading.get(req.model_id)
        if model is None and loading is not None:
            loading.discard = True  # the frontend gave up on this load: drop it when done
        if model is None:
            self._post(FRONTEND, msg.ControlReply(
                req.request_id, ok=False,
                error=f"Failed to unload model: model '{req.model_id}' not loaded"))
            return
        t0 = time.monotonic_ns()
        segment = model.avatar.segment.name
        model.close()
        del model
        release_free_heap()
        self._post(EVENTS, msg.ReleaseSegment(segment))
        self._post(FRONTEND, msg.ControlReply(req.request_id, ok=True, gpu_id=self.index,
                                              elapsed_ns=time.monotonic_ns() - t0))
        log.info("unloaded %s", req.model_id)

    def _start_load(self, model_id: str) -> Loading:
        loading = self.loading.get(model_id)
        if loading is None:
            config = self.cfg.models[model_id]
            future = self.loader.submit(self._load, config)
            future.add_done_callback(lambda f: self.inbox.put(LoadFinished(model_id, f)))
            loading = self.loading[model_id] = Loading(future)
        return loading

    def _load(self, config: ModelConfig) -> LoadedModel:
        """Runs on the loader thread: sessions, backgrounds, one warm-up batch."""
        from pipeline.gpu_worker.avatar import load_avatar
        from pipeline.gpu_worker.cuda_graphs import CAPTURE_LOCK
        from pipeline.gpu_worker.sessions import UNet

        t0 = time.monotonic_ns()
        before = self.memory.used_bytes()
        gpus = self.cfg.gpus
        with CAPTURE_LOCK:  # a CUDA graph capture on the compute loop must not meet these
            try:            # allocations (cuda_graphs.py)
                unet = UNet.create(config.model_path, self.provider, gpus.intra_op_threads,
                                   gpus.unet_precision, gpus.cuda_graphs)
            except Exception as exc:
                raise LoadError(f"failed to create inferencer: failed to create session: {exc}") from exc
            unet.warm_up()
        try:
            avatar = load_avatar(config, self.addresses.background_arena(self.index, next(self._bg_serial)))
        except Exception as exc:
            raise LoadError(f"Failed to get model data: {exc}") from exc
        # measured: the device's (or, on CPU, this process's private) memory growth over
        # the load, plus the backgrounds' shared-memory segment
        memory = max(0, self.memory.used_bytes() - before) + avatar.nbytes
        return LoadedModel(config, unet, avatar, memory, time.monotonic_ns() - t0)

    def _on_load_finished(self, done: LoadFinished) -> None:
        loading = self.loading.pop(done.model_id)
        try:
            model = done.future.result()
            if loading.discard:
                model.close()
                raise LoadError("the load was cancelled")
        except Exception as exc:
            error = str(exc) if isinstance(exc, LoadError) else f"{type(exc).__name__}: {exc}"
            log.error("loading %s failed: %s", done.model_id, error)
            for req in loading.waiting:
                text = f"Failed to load model '{done.model_id}': {error}"
                if isinstance(req, msg.InferRequest):
                    self._post(FRONTEND, msg.InferFailed(req.request_id, text))
                else:
                    self._post(FRONTEND, msg.ControlReply(req.request_id, ok=False, error=text))
            return
        self.models[done.model_id] = model
        self.loaded = {m: v.memory_bytes for m, v in self.models.items()}
        log.info("loaded %s in %.0f ms (%d frames, %.1f MB)", done.model_id, model.load_ns / 1e6,
                 model.avatar.num_frames, model.memory_bytes / 2**20)
        for req in loading.waiting:
            if isinstance(req, msg.LoadModel):
                self._post(FRONTEND, msg.ControlReply(req.request_id, ok=True, gpu_id=self.index,
                                                      elapsed_ns=model.load_ns,
                                                      memory_bytes=model.memory_bytes))
        requests = [r for r in loading.waiting if isinstance(r, msg.InferRequest)]
        for run in frame_limited_runs(requests, self.max_batch_frames):
            self._infer(model, run, model_loaded=True)

    def _infer(self, model: LoadedModel, run: list[msg.InferRequest], model_loaded: bool) -> None:
        """One UNet run for the requests of `run` (one model); each is answered on its own."""
        prepared = []
        for req in run:
            with logging_request(req.request_id):
                try:
                    prepared.append(self._prepare(model, req))
                except Exception as exc:
                    self._post(FRONTEND, msg.InferFailed(req.request_id, _client_error(exc, req)))
        if not prepared:
            return
        t0 = time.monotonic_ns()
        try:
            self._run_unet(model, prepared)
        except Exception as exc:
            for p in prepared:
                self._post(FRONTEND, msg.InferFailed(p.req.request_id, f"Inference failed: {exc}"))
            return
        t1 = time.monotonic_ns()
        frames = sum(p.req.batch_size for p in prepared)
        for p in prepared:
            with logging_request(p.req.request_id):
                try:
                    self._dispatch_frames(model, p.req)
                except Exception as exc:
                    self._post(FRONTEND, msg.InferFailed(p.req.request_id,
                                                         _client_error(exc, p.req)))
                    continue
            self._post(FRONTEND, msg.InferDone(
                p.req.request_id, gpu_id=self.index,
                queue_ns=max(0, p.started_ns - p.req.sent_ns) if p.req.sent_ns else 0,
                audio_ns=p.audio_ns, encoder_ns=p.encoder_ns, visual_ns=p.visual_ns,
                inference_ns=t1 - t0, model_loaded=model_loaded,
                load_ns=model.load_ns if model_loaded else 0, composite_start_ns=t1,
                run_frames=frames, run_requests=len(prepared)))

    def _prepare(self, model: LoadedModel, req: msg.InferRequest) -> Prepared:
        """The request's audio features, and its visual input when the server builds it."""
        from pipeline.gpu_worker import audio

        b = req.batch_size
        t0 = time.monotonic_ns()
        encoder_ns = 0

        def encode(windows: np.ndarray) -> np.ndarray:
            nonlocal encoder_ns
            start = time.monotonic_ns()
            encoded = self.encoder.encode(windows)
            encoder_ns += time.monotonic_ns() - start
            return encoded

        try:
            if req.stream_offset >= 0 and req.audio is not None:
                features = audio.stream_frame_features(
                    encode, self._view(req.audio), req.stream_offset, req.start_frame_idx, b)
            elif req.audio is not None:
                features = audio.request_features(encode, self._view(req.audio),
                                                  req.sample_rate, b)
            elif req.features is not None:
                features = audio.replicated_features(self._view(req.features).tobytes(), b)
            else:
                raise RequestError("Either raw_audio or audio_features must be provided")
        except RequestError:
            raise
        except Exception as exc:
            raise RequestError(f"Failed to encode audio features: {exc}") from exc
        t1 = time.monotonic_ns()
        if req.build_visual:
            model.avatar.visual_inputs(req.start_frame_idx, out=self._view(req.visual))
        return Prepared(req, features, started_ns=t0, audio_ns=t1 - t0, encoder_ns=encoder_ns,
                        visual_ns=time.monotonic_ns() - t1 if req.build_visual else 0)

    def _run_unet(self, model: LoadedModel, prepared: list[Prepared]) -> None:
        """One ORT run over every prepared request, predictions into their output blocks."""
        if len(prepared) == 1:  # bound in place: ORT reads and writes shared memory
            p = prepared[0]
            model.unet.run(self._view(p.req.visual), p.features, self._view(p.req.output))
            return
        frames = sum(p.req.batch_size for p in prepared)
        if self.staging is None:
            self.staging = StagingBatch(self.max_batch_frames)
        visual, audio_in, output = self.staging.views(frames)
        for p, rows in zip(prepared, self._rows(prepared)):
            visual[rows] = self._view(p.req.visual)
            audio_in[rows] = p.features
        model.unet.run(visual, audio_in, output)
        for p, rows in zip(prepared, self._rows(prepared)):
            self._view(p.req.output)[...] = output[rows]

    @staticmethod
    def _rows(prepared: list[Prepared]) -> Iterator[slice]:
        start = 0
        for p in prepared:
            yield slice(start, start + p.req.batch_size)
            start += p.req.batch_size

    def _dispatch_frames(self, model: LoadedModel, req: msg.InferRequest) -> None:
        """One CompositeJob per frame: the compositors read prediction and background in place."""
        frame_bytes = 3 * 320 * 320 * 4
        for i in range(req.batch_size):
            frame = req.start_frame_idx + i
            self._post(JOBS, msg.CompositeJob(
                request_id=req.request_id, frame_index=i,
                prediction=msg.TensorRef(req.output.segment, req.output.offset + i * frame_bytes,
                                         (3, 320, 320), "float32"),
                background=model.avatar.background_ref(frame), rect=model.avatar.rect(frame),
                mode=model.config.composite_mode, jpeg_quality=self.cfg.jpeg_quality))

    def _view(self, ref: msg.TensorRef) -> np.ndarray:
        return self.segments.ndarray(ref.segment, ref.offset, ref.shape, ref.dtype)


def _client_error(exc: Exception, req: msg.InferRequest) -> str:
    if isinstance(exc, RequestError):
        return str(exc)
    log.exception("request %d failed", req.request_id)  # a bug costs one request, not the worker
    return f"internal error: {exc}"


def frame_limited_runs(requests: list[msg.InferRequest], limit: int) -> Iterator[list[msg.InferRequest]]:
    """`requests` in order, cut into runs of at most `limit` frames (a larger request alone)."""
    run: list[msg.InferRequest] = []
    frames = 0
    for req in requests:
        if run and frames + req.batch_size > limit:
            yield run
            run, frames = [], 0
        run.append(req)
        frames += req.batch_size
    if run:
        yield run


@dataclass
class Prepared:
    """A request ready for the UNet: its features, and what preparing it took."""

    req: msg.InferRequest
    features: np.ndarray          # [B,32,16,16] float32
    started_ns: int
    audio_ns: int
    encoder_ns: int
    visual_ns: int


class StagingBatch:
    """The contiguous batch a coalesced run gathers its requests into (allocated once)."""

    def __init__(self, max_frames: int) -> None:
        self.visual = np.empty((max_frames, 6, 320, 320), np.float32)
        self.audio = np.empty((max_frames, 32, 16, 16), np.float32)
        self.output = np.empty((max_frames, 3, 320, 320), np.float32)

    def views(self, frames: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return self.visual[:frames], self.audio[:frames], self.output[:frames]


@dataclass(frozen=True)
class LoadFinished:
    """Posted by the loader thread into the compute loop's queue."""

    model_id: str
    future: Future[LoadedModel]


class LoadError(Exception):
    """A model failed to load; the message is the client-facing reason."""


class RequestError(Exception):
    """A request failed; the message is the client-facing error string."""
