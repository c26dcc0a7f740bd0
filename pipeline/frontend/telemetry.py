"""What an operator sees: per-model stage statistics, per-process figures, the ZeroMQ ops
socket (JSON) and the Prometheus registry (served by `ops_http`).

Stage times are Triton-style `{count, ns}` pairs per model: queue (frontend send -> worker
start), audio (mel and assembly), encoder, visual (server-built input), unet, composite
(paste) and jpeg (summed over frames).
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from collections import defaultdict
from typing import TYPE_CHECKING, Any

import psutil
import zmq
import zmq.asyncio
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from pipeline.config import Config
from pipeline.sockets import make_socket

if TYPE_CHECKING:
    from pipeline.frontend.dispatcher import Dispatcher, InferResult
    from pipeline.frontend.models import ModelManager

log = logging.getLogger(__name__)

STAGES = ("queue", "audio", "encoder", "visual", "unet", "composite", "jpeg")
_STAGE_BUCKETS = (.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10)
_LOAD_BUCKETS = (.05, .1, .25, .5, 1, 2, 5, 10, 20, 60)


class Telemetry:
    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.started = time.time()
        self.stages: dict[str, dict[str, list[int]]] = defaultdict(
            lambda: {stage: [0, 0] for stage in STAGES})
        self.failures: dict[str, int] = defaultdict(int)
        self.frames = 0
        self.evictions = 0
        self._processes: dict[int, psutil.Process] = {}
        self.dispatcher: Dispatcher | None = None
        self.models: ModelManager | None = None
        self.websocket_sessions = lambda: 0
        r = self.registry = CollectorRegistry()
        self.m_requests = Counter("lipsync_requests", "Requests answered", ["model"], registry=r)
        self.m_failures = Counter("lipsync_request_failures", "Requests failed, by reason",
                                  ["reason"], registry=r)
        self.m_stage = Histogram("lipsync_stage_duration_seconds", "Time per request stage",
                                 ["stage"], buckets=_STAGE_BUCKETS, registry=r)
        self.m_frames = Counter("lipsync_frames", "Frames produced", ["model"], registry=r)
        self.m_load = Histogram("lipsync_model_load_seconds", "Model load latency",
                                buckets=_LOAD_BUCKETS, registry=r)
        self.m_unload = Histogram("lipsync_model_unload_seconds", "Model unload latency",
                                  buckets=_LOAD_BUCKETS, registry=r)
        self.m_evictions = Counter("lipsync_model_evictions", "Models evicted", registry=r)
        self.m_loaded = Gauge("lipsync_loaded_models", "Models loaded", registry=r)
        self.m_queue = Gauge("lipsync_queue_depth", "Requests queued in a gpu_worker",
                             ["gpu"], registry=r)
        self.m_inflight = Gauge("lipsync_inflight_requests", "Requests admitted, not answered",
                                registry=r)
        self.m_memory = Gauge("lipsync_device_memory_used_bytes",
                              "Measured device memory (NVML, or worker RSS on CPU)", ["gpu"],
                              registry=r)
        self.m_sessions = Gauge("lipsync_websocket_sessions", "Open WebSocket sessions",
                                registry=r)
        self.m_arena = Gauge("lipsync_shm_arena_used_bytes", "Request arena in use", registry=r)

    def attach(self, dispatcher: Dispatcher, models: ModelManager) -> None:
        self.dispatcher, self.models = dispatcher, models

    # ---- events ------------------------------------------------------------------------

    def request_done(self, model_id: str, result: InferResult) -> None:
        done = result.done
        values = {"queue": done.queue_ns, "audio": done.audio_ns - done.encoder_ns,
                  "encoder": done.encoder_ns, "visual": done.visual_ns,
                  "unet": done.inference_ns, "composite": result.paste_ns,
                  "jpeg": result.jpeg_ns}
        stages = self.stages[model_id]
        for stage, ns in values.items():
            if stage == "visual" and not ns:
                continue
            stages[stage][0] += 1
            stages[stage][1] += ns
            self.m_stage.labels(stage).observe(ns / 1e9)
        self.frames += len(result.frames)
        self.m_requests.labels(model_id).inc()
        self.m_frames.labels(model_id).inc(len(result.frames))

    def request_failed(self, reason: str) -> None:
        self.failures[reason] += 1
        self.m_failures.labels(reason).inc()

    def model_loaded(self, seconds: float) -> None:
        self.m_load.observe(seconds)

    def model_unloaded(self, seconds: float, evicted: bool) -> None:
        self.m_unload.observe(seconds)
        if evicted:
            self.evictions += 1
            self.m_evictions.inc()

    # ---- views -------------------------------------------------------------------------

    def _process(self, pid: int) -> dict[str, Any]:
        if not pid:
            return {"pid": 0}
        try:
            proc = self._processes.get(pid)
            if proc is None:
                proc = self._processes[pid] = psutil.Process(pid)
                proc.cpu_percent(None)  # the first reading primes the counter
            with proc.oneshot():
                cpu = proc.cpu_times()
                return {"pid": pid, "cpu_percent": proc.cpu_percent(None),
                        "cpu_s": round(cpu.user + cpu.system, 3),
                        "rss_bytes": proc.memory_info().rss,
                        "uptime_s": round(time.time() - proc.create_time(), 1)}
        except psutil.Error:
            self._processes.pop(pid, None)
            return {"pid": pid, "gone": True}

    def snapshot(self) -> dict[str, Any]:
        """Everything the ops socket answers, as JSON-able data."""
        d, m = self.dispatcher, self.models
        assert d is not None and m is not None
        workers = []
        for i, w in enumerate(d.workers):
            workers.append({
                "index": i, **self._process(w.pid), "restarts": w.restarts,
                "alive": w.alive(time.monotonic(), self.cfg.runtime.heartbeat_s),
                "queue_depth": w.queue_depth,
                "inflight": sum(p.worker == i for p in d.pending.values()),
                "device_memory_used_bytes": w.device_memory_used_bytes,
                "models": sorted(v.model_id for v in m.models.values()
                                 if v.worker == i and v.state == "ready")})
        compositors = [{"index": i, **self._process(c.pid), "restarts": c.restarts,
                        "alive": c.alive(time.monotonic(), self.cfg.runtime.heartbeat_s)}
                       for i, c in sorted(d.compositors.items())]
        models = {}
        for v in m.models.values():
            models[v.model_id] = {
                "state": v.state, "gpu_id": v.worker, "memory_bytes": v.memory_bytes,
                "requests": v.request_count, "inflight": v.inflight, "error": v.error,
                "stages": {s: {"count": c, "ns": ns}
                           for s, (c, ns) in self.stages[v.model_id].items()}}
        return {
            "time": time.time(), "instance": self.cfg.runtime.instance,
            "frontend": {**self._process(os.getpid()), "restarts": 0,
                         "inflight_requests": len(d.pending),
                         "websocket_sessions": self.websocket_sessions()},
            "gpu_workers": workers, "compositors": compositors, "models": models,
            "arena": {"name": d.arena.name, "capacity_bytes": d.arena.capacity,
                      "used_bytes": d.arena.used_bytes, "blocks": d.arena.blocks_in_use},
            "frames": self.frames, "evictions": self.evictions,
            "failures": dict(self.failures),
        }

    def refresh_gauges(self) -> None:
        d, m = self.dispatcher, self.models
        assert d is not None and m is not None
        self.m_loaded.set(m.loaded_count())
        self.m_inflight.set(len(d.pending))
        self.m_sessions.set(self.websocket_sessions())
        self.m_arena.set(d.arena.used_bytes)
        for i, w in enumerate(d.workers):
            self.m_queue.labels(str(i)).set(w.queue_depth)
            self.m_memory.labels(str(i)).set(w.device_memory_used_bytes)

    # ---- endpoints ---------------------------------------------------------------------

    def start(self, endpoint: str) -> asyncio.Task[None]:
        """Bind the ops socket (ZMQ REP, JSON); a bind that fails stops the start with its
        reason. Returns the task that answers."""
        sock = make_socket(zmq.asyncio.Context.instance(), zmq.REP, bind=endpoint)
        log.info("ops socket on %s", endpoint)
        return asyncio.create_task(self._serve(sock))

    async def _serve(self, sock: zmq.asyncio.Socket) -> None:
        refresh = asyncio.create_task(self._refresh_forever())
        try:
            while True:
                raw = await sock.recv()
                try:
                    request = json.loads(raw) if raw.strip() else {}
                    command = request.get("cmd", "stats") if isinstance(request, dict) else None
                    if command == "stats":
                        reply: dict[str, Any] = self.snapshot()
                    elif command == "ping":
                        reply = {"pong": True}
                    else:
                        reply = {"error": f"unknown command {command!r} (stats, ping)"}
                except (ValueError, UnicodeDecodeError) as exc:
                    reply = {"error": f"bad request: {exc}"}
                await sock.send(json.dumps(reply).encode())
        finally:
            refresh.cancel()
            sock.close(0)

    async def _refresh_forever(self) -> None:
        while True:
            self.refresh_gauges()
            await asyncio.sleep(1.0)
