"""The gpu_worker process: one per device, pinned to it.

Threads: a receiver bridges the inbox socket into `inbox` (a queue), a sender drains
`outbox` into the outgoing sockets, a loader builds models; the compute loop only ever
waits on the queue, never on a socket. Per request it computes the audio features,
runs the UNet on the shared-memory tensors (output written in place) and hands one
CompositeJob per frame to the compositor pool.
"""
from __future__ import annotations

import ctypes
import itertools
import logging
import os
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import TYPE_CHECKING

import numpy as np
import zmq

from pipeline import messages as msg
from pipeline.addresses import Addresses
from pipeline.config import Config, ModelConfig
from pipeline.gpu_worker.device import DeviceMemory, Resolved, pin_to_device
from pipeline.process import Readiness, logging_request, run_role
from pipeline.shm.segment import SegmentCache
from pipeline.sockets import make_socket

if TYPE_CHECKING:  # onnxruntime is imported only after the device is pinned
    from pipeline.gpu_worker.avatar import Avatar
    from pipeline.gpu_worker.sessions import UNet

log = logging.getLogger(__name__)

FRONTEND, JOBS, EVENTS = "frontend", "jobs", "events"


@dataclass
class LoadedModel:
    config: ModelConfig
    unet: "UNet"
    avatar: "Avatar"
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
        self.outbox: queue.Queue[tuple[str, list[bytes]]] = queue.Queue()
        self.segments = SegmentCache()          # the frontend's request arena, attached lazily
        self.models: dict[str, LoadedModel] = {}
        self.loading: dict[str, Loading] = {}
        self.loader = ThreadPoolExecutor(1, thread_name_prefix="loader")
        self.memory = DeviceMemory(provider, gpu_index)
        self._bg_serial = itertools.count()
        audio.warm_up()
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
        while not stop.is_set() or not self.outbox.empty():
            now = time.monotonic()
            if now >= next_beat:
                self._post(FRONTEND, self._heartbeat())
                next_beat = now + self.cfg.runtime.heartbeat_s
            try:
                target, frames = self.outbox.get(timeout=0.05)
            except queue.Empty:
                continue
            try:
                socks[target].send_multipart(frames, copy=False)
            except zmq.Again:
                log.error("send to %s timed out; message dropped", target)

    def _post(self, target: str, message: msg.Message) -> None:
        self.outbox.put((target, [msg.encode(message)]))

    def _heartbeat(self) -> msg.Heartbeat:
        return msg.Heartbeat(role="gpu_worker", index=self.index, pid=os.getpid(),
                             gpu_id=self.index, device_memory_used_bytes=self.memory.used_bytes(),
                             loaded_models=tuple(self.models), queue_depth=self.inbox.qsize())

    # ---- compute loop ----------------------------------------------------------------

    def _compute_loop(self, stop: threading.Event) -> None:
        handlers: dict[type, Callable[[object], None]] = {
            msg.InferRequest: self._on_infer, msg.LoadModel: self._on_load,
            msg.UnloadModel: self._on_unload, LoadFinished: self._on_load_finished}
        while not stop.is_set():
            try:
                item = self.inbox.get(timeout=0.1)
            except queue.Empty:
                continue
            handlers[type(item)](item)

    def _on_infer(self, req: msg.InferRequest) -> None:
        model = self.models.get(req.model_id)
        if model is None:
            self._start_load(req.model_id).waiting.append(req)
            return
        self._infer(model, req, model_loaded=False)

    def _on_load(self, req: msg.LoadModel) -> None:
        model = self.models.get(req.model_id)
        if model is None:
            self._start_load(req.model_id).waiting.append(req)
            return
        self._post(FRONTEND, msg.ControlReply(req.request_id, ok=True, gpu_id=self.index,
                                              memory_bytes=model.memory_bytes))

    def _on_unload(self, req: msg.UnloadModel) -> None:
        model = self.models.pop(req.model_id, None)
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
        from pipeline.gpu_worker.sessions import UNet

        t0 = time.monotonic_ns()
        before = self.memory.used_bytes()
        try:
            unet = UNet.create(config.model_path, self.provider, self.cfg.gpus.intra_op_threads)
        except Exception as exc:
            raise LoadError(f"failed to create inferencer: failed to create session: {exc}") from exc
        visual = np.zeros((1, 6, 320, 320), np.float32)
        out = np.empty((1, 3, 320, 320), np.float32)
        unet.run(visual, np.zeros((1, 32, 16, 16), np.float32), out)
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
        log.info("loaded %s in %.0f ms (%d frames, %.1f MB)", done.model_id, model.load_ns / 1e6,
                 model.avatar.num_frames, model.memory_bytes / 2**20)
        for req in loading.waiting:
            if isinstance(req, msg.InferRequest):
                self._infer(model, req, model_loaded=True)
            else:
                self._post(FRONTEND, msg.ControlReply(req.request_id, ok=True, gpu_id=self.index,
                                                      elapsed_ns=model.load_ns,
                                                      memory_bytes=model.memory_bytes))

    def _infer(self, model: LoadedModel, req: msg.InferRequest, model_loaded: bool) -> None:
        with logging_request(req.request_id):
            try:
                done: msg.Message = self._run(model, req, model_loaded)
            except RequestError as exc:
                done = msg.InferFailed(req.request_id, str(exc))
            except Exception as exc:  # a bug must cost one request, never the worker
                log.exception("request %d failed", req.request_id)
                done = msg.InferFailed(req.request_id, f"internal error: {exc}")
        self._post(FRONTEND, done)

    def _run(self, model: LoadedModel, req: msg.InferRequest, model_loaded: bool) -> msg.InferDone:
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
                samples = self._view(req.audio)
                mel = audio.melspectrogram(samples, req.sample_rate)
                features = audio.frame_features(encode(audio.mel_windows(mel)), b)
            elif req.features is not None:
                features = audio.replicated_features(self._view(req.features).tobytes(), b)
            else:
                raise RequestError("Either raw_audio or audio_features must be provided")
        except RequestError:
            raise
        except Exception as exc:
            raise RequestError(f"Failed to encode audio features: {exc}") from exc
        t1 = time.monotonic_ns()
        visual = self._view(req.visual)
        if req.build_visual:
            model.avatar.visual_inputs(req.start_frame_idx, out=visual)
        t2 = time.monotonic_ns()
        prediction = self._view(req.output)
        try:
            model.unet.run(visual, features, prediction)
        except Exception as exc:
            raise RequestError(f"Inference failed: {exc}") from exc
        t3 = time.monotonic_ns()
        frame_bytes = 3 * 320 * 320 * 4
        for i in range(b):
            frame = req.start_frame_idx + i
            job = msg.CompositeJob(
                request_id=req.request_id, frame_index=i,
                prediction=msg.TensorRef(req.output.segment, req.output.offset + i * frame_bytes,
                                         (3, 320, 320), "float32"),
                background=model.avatar.background_ref(frame), rect=model.avatar.rect(frame),
                mode=model.config.composite_mode, jpeg_quality=self.cfg.jpeg_quality)
            self._post(JOBS, job)
        return msg.InferDone(req.request_id, gpu_id=self.index,
                             queue_ns=max(0, t0 - req.sent_ns) if req.sent_ns else 0,
                             audio_ns=t1 - t0, encoder_ns=encoder_ns,
                             visual_ns=t2 - t1 if req.build_visual else 0,
                             inference_ns=t3 - t2, model_loaded=model_loaded,
                             load_ns=model.load_ns if model_loaded else 0, composite_start_ns=t3)

    def _view(self, ref: msg.TensorRef) -> np.ndarray:
        return self.segments.ndarray(ref.segment, ref.offset, ref.shape, ref.dtype)


def release_free_heap() -> None:
    """Hand memory freed by an unloaded model back to the OS (glibc keeps it otherwise, and
    a worker that loads and unloads avatars all day would only ever grow)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


@dataclass(frozen=True)
class LoadFinished:
    """Posted by the loader thread into the compute loop's queue."""

    model_id: str
    future: Future[LoadedModel]


class LoadError(Exception):
    """A model failed to load; the message is the client-facing reason."""


class RequestError(Exception):
    """A request failed; the message is the client-facing error string."""
