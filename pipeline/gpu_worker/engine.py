"""The gpu_worker's engine: inbox -> coalesce -> prepare -> UNet -> CompositeJobs (a few frames each).

Pure compute: no sockets and no threads of its own. The process shell (proc.py) fills the
inbox from its receiver and loader threads and carries what the engine emits (through the
injected `emit`) to the frontend, the compositors and the segment-release channel. Unit
tests and `lipsync bench --compare inprocess` run this very class in one process.

Per request it prepares the audio features and the visual input (inputs.py), runs the UNet
(the prediction written in place into the request's arena block) and emits its frames as a
few CompositeJobs (jobs.py) and its InferDone (or InferFailed). A request for a model this
worker does not hold fails at once: the frontend only sends work for models it has seen
loaded here, so that is a restart's leftover, not a reason to load.
"""
from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import cv2
import numpy as np

from pipeline import messages as msg
from pipeline.config import Config, ModelConfig
from pipeline.gpu_worker.batching import Inbox, StagingBatch, coalesce
from pipeline.gpu_worker.device import Resolved
from pipeline.gpu_worker.inputs import Prepared, RequestError, RequestInputs, background_indices
from pipeline.gpu_worker.jobs import composite_jobs
from pipeline.gpu_worker.model_cache import LoadedModel, LoadFinished, ModelCache, UNetRebuilt
from pipeline.runtime.logs import logging_request
from pipeline.runtime.process import RoleError
from pipeline.shm.segment import SegmentCache

if TYPE_CHECKING:
    from pipeline.gpu_worker.device_compositor import DeviceCompositor

log = logging.getLogger(__name__)

# where an emitted message goes
FRONTEND, JOBS, EVENTS = "frontend", "jobs", "events"


@dataclass(frozen=True)
class EncodedFrames:
    """JPEGs this worker made on its device (compositor.device gpu), for the frontend: the
    header, and the bytes that travel as its next ZMQ frames."""

    header: msg.FramesDone
    jpegs: list[bytes]


Emit = Callable[[str, msg.Message | EncodedFrames], None]
# runs a load (rebuild False) or a loaded model's UNet rebuild elsewhere; LoadFinished or
# UNetRebuilt comes back through the inbox
StartLoad = Callable[[ModelConfig, bool], None]


@dataclass
class Loading:
    """A load in progress; the LoadModel requests waiting on it (coalesced)."""

    waiting: list[msg.LoadModel] = field(default_factory=list)
    discard: bool = False  # unloaded while loading: dropped when it finishes


class ConfigMismatch(RoleError):
    """The frontend named a model this worker's config lacks: the two run different
    configs (a unit restarted after an edit). The worker exits, and its supervisor starts
    it again with the config on disk."""


class Engine:
    def __init__(self, cfg: Config, gpu_index: int, provider: Resolved, inbox: Inbox,
                 cache: ModelCache, emit: Emit, start_load: StartLoad) -> None:
        self.cfg = cfg
        self.index = gpu_index
        self.inbox = inbox
        self.cache = cache
        self.emit = emit
        self.start_load = start_load
        self.max_batch_frames = cfg.batching.max_batch_frames or (32 if provider == "cuda" else 1)
        self.queue_delay_s = cfg.batching.max_queue_delay_ms / 1e3
        self.staging: StagingBatch | None = None
        self.inputs = RequestInputs(self._view)
        self.segments = SegmentCache()          # the frontend's request arena, attached lazily
        self.loading: dict[str, Loading] = {}
        self.rebuilding: set[str] = set()
        self.handlers: dict[type, Callable[[object], None]] = {
            msg.InferRequest: self._on_infer,  # type: ignore[dict-item]
            msg.BackgroundJpegs: self._on_background_jpegs,  # type: ignore[dict-item]
            msg.LoadModel: self._on_load,  # type: ignore[dict-item]
            msg.UnloadModel: self._on_unload,  # type: ignore[dict-item]
            LoadFinished: self._on_load_finished,  # type: ignore[dict-item]
            UNetRebuilt: self._on_rebuilt,  # type: ignore[dict-item]
        }

    @classmethod
    def create(cls, cfg: Config, gpu_index: int, provider: Resolved, inbox: Inbox,
               cache: ModelCache, emit: Emit, start_load: StartLoad) -> Engine:
        """An engine with the shared audio encoder built and warm, held for the worker's
        life (the models that use it find it loaded)."""
        from pipeline.gpu_worker import mel

        mel.warm_up()
        cv2.setNumThreads(1)  # building visual inputs: OpenCV's threads only cost on 320 px
        cache.encoders.acquire(cfg.audio_encoder_path)
        return cls(cfg, gpu_index, provider, inbox, cache, emit, start_load)

    # ---- the loop ----------------------------------------------------------------------

    def run(self, stop: threading.Event) -> None:
        """Handle inbox items until `stop` is set (the shell wakes the inbox when it is).
        An exception out of a handler is a bug or a fatal condition: it ends the loop (the
        shell announces the death)."""
        next_sweep = 0.0
        while not stop.is_set():
            self.step(max(0.0, next_sweep - time.monotonic()))
            if time.monotonic() >= next_sweep:  # a dead frontend's arena goes at once
                self.segments.forget_dead()
                next_sweep = time.monotonic() + self.cfg.runtime.heartbeat_s

    def step(self, timeout_s: float) -> bool:
        """Handle the next inbox item, waiting `timeout_s` at most; False if none came."""
        item = self.inbox.next(time.monotonic() + timeout_s)
        if item is None:
            return False
        self.handlers[type(item)](item)
        return True

    def close(self) -> None:
        self.cache.close()
        self.segments.close()

    # ---- control -----------------------------------------------------------------------

    def _reply(self, req: msg.LoadModel | msg.UnloadModel, ok: bool, **fields: object) -> None:
        self.emit(FRONTEND, msg.ControlReply(req.request_id, ok=ok, **fields))  # type: ignore[arg-type]

    def _on_load(self, req: msg.LoadModel) -> None:
        model = self.cache.get(req.model_id)
        if model is not None:
            self._reply(req, True, gpu_id=self.index, memory_bytes=model.memory_bytes)
            return
        loading = self.loading.get(req.model_id)
        if loading is None:
            config = self.cfg.models.get(req.model_id)
            if config is None:
                raise ConfigMismatch(
                    f"the frontend asked to load '{req.model_id}', which this gpu_worker's "
                    "config does not have: they run different configs; exiting, to be "
                    "started again with the current one")
            loading = self.loading[req.model_id] = Loading()
            self.start_load(config, False)
        loading.waiting.append(req)

    def _on_load_finished(self, done: LoadFinished) -> None:
        loading = self.loading.pop(done.model_id)
        model, error = done.model, done.error
        if model is not None and loading.discard:
            model.close()
            model, error = None, "the load was cancelled"
        if model is None:
            log.error("loading %s failed: %s", done.model_id, error)
            for req in loading.waiting:
                self._reply(req, False, error=f"Failed to load model '{done.model_id}': {error}")
            return
        self.cache.add(model)
        log.info("loaded %s in %.0f ms (%d frames, %.1f MB, %s)", done.model_id,
                 model.load_ns / 1e6, model.avatar.num_frames, model.memory_bytes / 2**20,
                 self.cache.backend.label())
        for req in loading.waiting:
            self._reply(req, True, gpu_id=self.index, elapsed_ns=model.load_ns,
                        memory_bytes=model.memory_bytes)

    def _on_unload(self, req: msg.UnloadModel) -> None:
        t0 = time.monotonic_ns()
        segment = self.cache.unload(req.model_id)
        if segment is None:
            loading = self.loading.get(req.model_id)
            if loading is not None:
                loading.discard = True  # the frontend gave up on this load: drop it when done
            self._reply(req, False,
                        error=f"Failed to unload model: model '{req.model_id}' not loaded")
            return
        self.emit(EVENTS, msg.ReleaseSegment(segment))
        self._reply(req, True, gpu_id=self.index, elapsed_ns=time.monotonic_ns() - t0)
        log.info("unloaded %s", req.model_id)

    def _rethread(self) -> None:
        """Rebuild the loaded UNets with the threads the measured stage CPU calls for
        (threads.py), on the loader thread; new loads use them at once."""
        threads = self.cache.planner.due()
        if threads is None:
            return
        log.info("inference threads %d -> %d (CPU ms per frame: %s)", self.cache.backend.threads,
                 threads, self.cache.planner.cpu.as_ms())
        self.cache.backend = self.cache.backend.with_threads(threads)
        self.cache.planner.threads = threads
        for model_id, model in self.cache.models.items():
            if model_id not in self.rebuilding:
                self.rebuilding.add(model_id)
                self.start_load(model.config, True)

    def _on_rebuilt(self, done: UNetRebuilt) -> None:
        self.rebuilding.discard(done.model_id)
        model = self.cache.get(done.model_id)
        if done.unet is None:
            log.warning("rebuilding %s with %d threads failed (it keeps its UNet): %s",
                        done.model_id, done.threads, done.error)
        elif model is not None:  # else unloaded meanwhile: the new UNet goes with this item
            model.unet = done.unet

    # ---- inference ---------------------------------------------------------------------

    def _on_background_jpegs(self, req: msg.BackgroundJpegs) -> None:
        """Compositing jobs with no prediction: each background's JPEG as it is."""
        model = self.cache.get(req.model_id)
        if model is None:
            self.emit(FRONTEND, msg.InferFailed(
                req.request_id, f"model '{req.model_id}' is not loaded on gpu_worker {self.index}"))
            return
        started = time.monotonic_ns()
        self._emit_jobs(model, req.request_id, req.indices, None, live=False)
        self.emit(FRONTEND, msg.InferDone(
            req.request_id, gpu_id=self.index, queue_ns=0, audio_ns=0, encoder_ns=0,
            visual_ns=0, inference_ns=0, composite_start_ns=started))

    def _on_infer(self, req: msg.InferRequest) -> None:
        model = self.cache.get(req.model_id)
        if model is None:
            self.emit(FRONTEND, msg.InferFailed(
                req.request_id, f"model '{req.model_id}' is not loaded on gpu_worker {self.index}"))
            return
        self._infer(model, coalesce(req, self.inbox, self.max_batch_frames, self.queue_delay_s))

    def _infer(self, model: LoadedModel, run: list[msg.InferRequest]) -> None:
        """One UNet run for the requests of `run` (one model); each is answered on its own."""
        prepared = []
        cpu0 = time.thread_time()
        for req, rows in zip(run, self._visual_rows(run), strict=True):
            with logging_request(req.request_id):
                try:
                    prepared.append(self.inputs.prepare(model, req, rows))
                except Exception as exc:
                    self.emit(FRONTEND, msg.InferFailed(req.request_id, _client_error(exc, req)))
        if not prepared:
            return
        frames = sum(p.req.batch_size for p in prepared)
        planner = self.cache.planner
        planner.prepare(frames, time.thread_time() - cpu0)
        t0, cpu0 = time.monotonic_ns(), time.process_time()
        try:
            self._run_unet(model, prepared)
        except Exception as exc:
            for p in prepared:
                self.emit(FRONTEND, msg.InferFailed(p.req.request_id, f"Inference failed: {exc}"))
            return
        t1 = time.monotonic_ns()
        planner.unet(frames, time.process_time() - cpu0)  # every thread of the run
        self._rethread()
        for p in prepared:
            with logging_request(p.req.request_id):
                try:
                    if self.cache.compositor is None:
                        self._emit_jobs(model, p.req.request_id, background_indices(p.req),
                                        p.req.output, p.req.live)
                    else:
                        self._composite_on_device(self.cache.compositor, model, p.req)
                except Exception as exc:
                    self.emit(FRONTEND, msg.InferFailed(p.req.request_id,
                                                        _client_error(exc, p.req)))
                    continue
            self.emit(FRONTEND, msg.InferDone(
                p.req.request_id, gpu_id=self.index,
                queue_ns=max(0, p.started_ns - p.req.sent_ns) if p.req.sent_ns else 0,
                audio_ns=p.audio_ns, encoder_ns=p.encoder_ns, visual_ns=p.visual_ns,
                inference_ns=t1 - t0, composite_start_ns=t1,
                run_frames=frames, run_requests=len(prepared)))

    def _visual_rows(self, run: list[msg.InferRequest]) -> list[np.ndarray | None]:
        """Where each request's visual input is built, if the worker builds it (None: the
        client's, in the arena): a single request's in the inputs' own buffer, a coalesced
        run's straight into its rows of the staging batch (the gather copies nothing)."""
        if len(run) == 1:
            req = run[0]
            return [self.inputs.room_to_build(req.batch_size) if req.visual is None else None]
        rows = self._staging().visual_rows([req.batch_size for req in run])
        return [r if req.visual is None else None for req, r in zip(run, rows, strict=True)]

    def _staging(self) -> StagingBatch:
        if self.staging is None:
            self.staging = StagingBatch(self.max_batch_frames)
        return self.staging

    def _run_unet(self, model: LoadedModel, prepared: list[Prepared]) -> None:
        """One ORT run over every prepared request, predictions into their output blocks."""
        if len(prepared) == 1:  # bound in place: the inputs read where they are, the
            p = prepared[0]      # prediction written into the request's arena block
            model.unet.run(p.visual, p.features, self._view(p.req.output))
            return
        self._staging().run(model.unet.run, [(p.visual, p.features,
                                              self._view(p.req.output)) for p in prepared])

    def _emit_jobs(self, model: LoadedModel, request_id: int, indices: Sequence[int],
                   output: msg.TensorRef | None, live: bool) -> None:
        """The frames as a few CompositeJobs (jobs.py); `output` None: the backgrounds as
        they are."""
        for job in composite_jobs(request_id, indices, output, model.avatar,
                                  model.config.composite_mode, self.cfg.jpeg_quality, live,
                                  self.cfg.compositor.pool_size):
            self.emit(JOBS, job)

    def _composite_on_device(self, compositor: DeviceCompositor, model: LoadedModel,
                             req: msg.InferRequest) -> None:
        """compositor.device gpu: the request's frames pasted and encoded here, straight to
        the frontend (device_compositor.py says why no compositor job is needed)."""
        assert model.device_backgrounds is not None
        indices, avatar = background_indices(req), model.avatar
        done = compositor.composite(model.device_backgrounds, [i % avatar.num_frames for i in indices],
                                    [avatar.rect(i) for i in indices], self._view(req.output),
                                    model.config.composite_mode)
        self.emit(FRONTEND, EncodedFrames(msg.FramesDone(
            req.request_id, 0, msg.DEVICE_COMPOSITOR, done.paste_ns, done.jpeg_ns), done.jpegs))

    def _view(self, ref: msg.TensorRef) -> np.ndarray:
        return self.segments.ndarray(ref.segment, ref.offset, ref.shape, ref.dtype)


def _client_error(exc: Exception, req: msg.InferRequest) -> str:
    if isinstance(exc, RequestError):
        return str(exc)
    log.exception("request %d failed", req.request_id)  # a bug costs one request, not the worker
    return f"internal error: {exc}"
