"""The in-process baseline of `lipsync bench --compare inprocess` (and the components
`--stages` times): the gpu_worker's own Engine and the compositor's own `composite_job`,
run in this one process, one request after another. No copy of the pipeline: the very code
the server runs, minus the process hops, the sockets and the frontend.

A request's tensors go once into a request arena of this process (as the frontend writes
them; not timed, as the baseline never paid for a copy), the Engine is fed InferRequests
that point into it and emits its CompositeJobs into a list, and each job is composited
here, reading the prediction and the background in place.
"""
from __future__ import annotations

import dataclasses
import itertools
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec
import numpy as np

from pipeline import messages as msg
from pipeline.compositor.composite import composite_job
from pipeline.compositor.jpeg_splice import BackgroundJpegs
from pipeline.config import load_config
from pipeline.frontend.wire import CompositeRequestView
from pipeline.gpu_worker.batching import Inbox
from pipeline.gpu_worker.device import Resolved, resolve_provider
from pipeline.gpu_worker.engine import EncodedFrames, Engine
from pipeline.gpu_worker.model_cache import ModelCache, load_finished, unet_rebuilt
from pipeline.protocol import RequestLayout
from pipeline.shm.arena import Arena
from pipeline.shm.segment import SegmentCache, segment_name, sweep_stale_segments
from pipeline.synctalk import SAMPLE_RATE

GPU_INDEX = 0
INSTANCE_PREFIX = "bench"  # this process's segments: lipsync-bench<pid>-<pid>-<tag>


class BaselineFailed(RuntimeError):
    """The in-process run failed (the server's error string)."""


def _fail(failed: msg.InferFailed, _: dict[str, int]) -> None:
    raise BaselineFailed(failed.error)


class InProcessEngine:
    """One model loaded into an Engine of this process, and a compositor's view of memory."""

    def __init__(self, cfg_path: Path, model_id: str, provider: Resolved | None = None,
                 threads: int = 0) -> None:
        """`provider` None: the one the server resolves; `threads` 0: ONNX Runtime's default
        (every core), the fastest one-at-a-time baseline."""
        cfg = load_config(cfg_path)
        # a run never waits for company (one request at a time), and this process's
        # segments carry an instance name of their own, apart from any server's; what a
        # killed bench left under its own (the avatar's frames: hundreds of MB) goes now
        sweep_stale_segments(private_to=INSTANCE_PREFIX)
        self.instance = f"{INSTANCE_PREFIX}{os.getpid()}"
        cfg = dataclasses.replace(
            cfg, gpus=dataclasses.replace(cfg.gpus, intra_op_threads=threads),
            batching=dataclasses.replace(cfg.batching, max_queue_delay_ms=0.0),
            runtime=dataclasses.replace(cfg.runtime, instance=self.instance))
        provider = provider or resolve_provider(cfg.gpus.provider, 1)
        self.model = cfg.models[model_id]
        self.emitted: list[tuple[str, msg.Message | EncodedFrames]] = []
        self.segments = SegmentCache()  # the compositor's side of shared memory
        self.jpegs = BackgroundJpegs(cfg.compositor.background_jpeg_cache_mb * 2**20)
        self.arena: Arena | None = None
        self._written: tuple[CompositeRequestView, msg.InferRequest] | None = None
        self._ids = itertools.count(1)
        inbox = Inbox()
        cache = ModelCache(cfg, GPU_INDEX, provider)
        self.engine = Engine.create(cfg, GPU_INDEX, provider, inbox, cache,
                                    lambda target, m: self.emitted.append((target, m)),
                                    lambda config, rebuild: inbox.put(
                                        (unet_rebuilt if rebuild else load_finished)(cache, config)))
        try:  # the load makes the avatar's segment: a load cut short (SIGTERM) frees it too
            self._control(msg.LoadModel(next(self._ids), os.getpid(), model_id))
            loaded = cache.get(model_id)
            assert loaded is not None
        except BaseException:
            self.close()
            raise
        self.encoder, self.unet, self.avatar = loaded.encoder, loaded.unet, loaded.avatar
        self.backend = cache.backend.label()  # e.g. "openvino bf16, 2 threads"

    def _control(self, message: msg.LoadModel) -> None:
        self.emitted.clear()
        self.engine.inbox.put(message)
        while not any(isinstance(m, msg.ControlReply) for _, m in self.emitted):
            self.engine.step(1.0)  # the LoadModel, then the LoadFinished it queues
        reply = next(m for _, m in self.emitted if isinstance(m, msg.ControlReply))
        if not reply.ok:
            raise BaselineFailed(reply.error)

    def close(self) -> None:
        self.engine.close()
        self.segments.close()
        if self.arena is not None:
            self.arena.close()
        # whatever is still named under this process's own instance (a segment made by a
        # step that an exception cut short, before anything tracked it) goes too
        sweep_stale_segments(self.instance, pids={os.getpid()})

    def run(self, request: CompositeRequestView) -> dict[str, int]:
        """One request (read as the server reads it) through every stage; ns per stage."""
        template = self._write(request)
        self.emitted.clear()
        self.engine.inbox.put(msgspec.structs.replace(template, request_id=next(self._ids)))
        self.engine.step(0.0)
        ns = dict.fromkeys(("audio", "encoder", "visual", "unet", "paste", "jpeg"), 0)
        handlers: dict[type, Callable[[Any, dict[str, int]], None]] = {
            msg.InferDone: self._on_done, msg.InferFailed: _fail, msg.CompositeJob: self._on_job,
            EncodedFrames: lambda frames, ns: self._timings(frames.header, ns)}
        for _, m in self.emitted:
            handlers[type(m)](m, ns)
        return ns

    @staticmethod
    def _on_done(done: msg.InferDone, ns: dict[str, int]) -> None:
        ns.update(audio=done.audio_ns, encoder=done.encoder_ns, visual=done.visual_ns,
                  unet=done.inference_ns)

    def _on_job(self, job: msg.CompositeJob, ns: dict[str, int]) -> None:
        """What a compositor does with the job; its FramesDone's timings."""
        header = msg.frontend_decoder.decode(composite_job(job, self._view, 0, self.jpegs)[0])
        if not isinstance(header, msg.FramesDone):
            raise BaselineFailed(getattr(header, "error", repr(header)))
        self._timings(header, ns)

    @staticmethod
    def _timings(header: msg.FramesDone, ns: dict[str, int]) -> None:
        """A job's paste and JPEG times (a compositor's, or the worker's own on its device)."""
        ns["paste"] += header.paste_ns
        ns["jpeg"] += header.jpeg_ns

    def _write(self, request: CompositeRequestView) -> msg.InferRequest:
        """The request's tensors in the arena (once per request object) and the
        InferRequest that points at them, as the frontend lays a request out."""
        if self._written is not None and self._written[0] is request:
            return self._written[1]
        if self.arena is not None:
            self.arena.close()
        b = request.batch_size
        audio = np.frombuffer(request.raw_audio, "<f4")
        features = np.frombuffer(request.audio_features, "<f4")
        layout = RequestLayout(b, audio.nbytes, features.nbytes, visual=bool(request.visual_frames))
        # a name never used before: the engine keeps what it mapped under an old one
        self.arena = arena = Arena.create(
            segment_name(self.instance, f"requests{next(self._ids)}"), layout.nbytes + 4096)
        refs = layout.refs(arena.name, 0)
        if request.visual_frames:
            arena.ndarray(0, refs["visual"].shape, "float32")[...] = np.frombuffer(
                request.visual_frames, "<f4").reshape(refs["visual"].shape)
        for name, source in (("audio", audio), ("features", features)):
            if source.size:
                arena.ndarray(refs[name].offset, source.shape, "float32")[...] = source
        template = msg.InferRequest(
            request_id=0, worker_pid=os.getpid(), model_id=self.model.model_id, batch_size=b,
            start_frame_idx=request.start_frame_idx, output=refs["output"],
            visual=refs.get("visual"),
            audio=refs.get("audio"), sample_rate=request.sample_rate or SAMPLE_RATE,
            features=refs.get("features") if not audio.size else None)
        self._written = (request, template)
        return template

    def _view(self, ref: msg.TensorRef) -> np.ndarray:
        return self.segments.ndarray(ref.segment, ref.offset, ref.shape, ref.dtype)
