"""What the request path and the model lifecycle count: Prometheus metrics and the
Triton-style per-model stage statistics (`{count, ns}` per stage) the ops socket reports.

Stages: queue (frontend send -> worker start), audio (mel and assembly), encoder, visual
(server-built input), unet, composite (paste) and jpeg (summed over frames).
"""
from __future__ import annotations

import time
from collections import defaultdict, deque

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from pipeline.frontend.inflight import InferResult

STAGES = ("queue", "audio", "encoder", "visual", "unet", "composite", "jpeg")
STAGE_BUCKETS = (.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10)
_LOAD_BUCKETS = (.05, .1, .25, .5, 1, 2, 5, 10, 20, 60)


class Metrics:
    def __init__(self) -> None:
        self.stages: dict[str, dict[str, list[int]]] = defaultdict(
            lambda: {stage: [0, 0] for stage in STAGES})
        self.failures: dict[str, int] = defaultdict(int)
        self.frames = 0
        self.evictions = 0
        self._eviction_times: deque[float] = deque(maxlen=10_000)
        self.loop_lag_max_s = 0.0
        r = self.registry = CollectorRegistry()
        self.requests = Counter("lipsync_requests", "Requests answered", ["model"], registry=r)
        self.failed = Counter("lipsync_request_failures", "Requests failed, by reason",
                              ["reason"], registry=r)
        self.stage = Histogram("lipsync_stage_duration_seconds", "Time per request stage",
                               ["stage"], buckets=STAGE_BUCKETS, registry=r)
        self.frames_total = Counter("lipsync_frames", "Frames produced", ["model"], registry=r)
        self.load = Histogram("lipsync_model_load_seconds", "Model load latency",
                              buckets=_LOAD_BUCKETS, registry=r)
        self.unload = Histogram("lipsync_model_unload_seconds", "Model unload latency",
                                buckets=_LOAD_BUCKETS, registry=r)
        self.evicted = Counter("lipsync_model_evictions", "Models evicted", registry=r)
        self.loaded = Gauge("lipsync_loaded_models", "Models loaded", registry=r)
        self.queue = Gauge("lipsync_queue_depth", "Requests queued in a gpu_worker", ["gpu"],
                           registry=r)
        self.inflight = Gauge("lipsync_inflight_requests", "Requests admitted, not answered",
                              registry=r)
        self.memory = Gauge("lipsync_device_memory_used_bytes",
                            "Measured device memory (NVML, or worker RSS on CPU)", ["gpu"],
                            registry=r)
        self.sessions = Gauge("lipsync_websocket_sessions", "Open WebSocket sessions",
                              registry=r)
        self.arena = Gauge("lipsync_shm_arena_used_bytes", "Request arena in use", registry=r)
        self.budget_fps = Gauge("lipsync_live_budget_fps",
                                "Speech frames per second the box can render (0: not measured)",
                                registry=r)
        self.used_fps = Gauge("lipsync_live_used_fps", "Frames per second rendered lately",
                              registry=r)
        self.refused = Gauge("lipsync_live_sessions_refused",
                             "Live sessions refused for want of capacity", registry=r)
        self.warmups = Counter("lipsync_model_warmups", "Warm-up runs of models at load",
                               ["model"], registry=r)
        self.loop_lag = Histogram("lipsync_event_loop_lag_seconds",
                                  "How late the frontend's event loop ran a 100 ms timer",
                                  buckets=STAGE_BUCKETS, registry=r)

    def warmup_done(self, model_id: str) -> None:
        """A model's warm-up at load ran through every stage (not a client's request)."""
        self.warmups.labels(model_id).inc()

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
            self.stage.labels(stage).observe(ns / 1e9)
        self.frames += len(result.frames)
        self.requests.labels(model_id).inc()
        self.frames_total.labels(model_id).inc(len(result.frames))

    def request_failed(self, reason: str) -> None:
        self.failures[reason] += 1
        self.failed.labels(reason).inc()

    def model_loaded(self, seconds: float) -> None:
        self.load.observe(seconds)

    def model_unloaded(self, seconds: float, evicted: bool) -> None:
        self.unload.observe(seconds)
        if evicted:
            self.evictions += 1
            self.evicted.inc()
            self._eviction_times.append(time.monotonic())

    def evictions_since(self, since: float) -> int:
        """Evictions after `since` (monotonic): a high rate means more hot models than
        capacity.max_models / max_memory_gb hold, and every request pays a load."""
        return sum(t > since for t in self._eviction_times)

    def loop_lagged(self, seconds: float) -> None:
        self.loop_lag_max_s = max(self.loop_lag_max_s, seconds)
        self.loop_lag.observe(seconds)
