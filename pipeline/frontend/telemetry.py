"""What an operator sees: the ZeroMQ ops socket (JSON) and the HTTP endpoint of Prometheus
`/metrics` and the balancers' probes `/healthz` and `/readyz` (ops_http), with per-process
figures (pid, CPU, RSS, uptime).

Everything comes from the parts' own snapshots (liveness, in-flight table, model
registry, sessions) and the shared `Metrics`; nothing here reads another object's
internals.
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from typing import Any

import psutil
import zmq
import zmq.asyncio

from pipeline.config import Config
from pipeline.frontend.capacity import Admission
from pipeline.frontend.inflight import InFlight
from pipeline.frontend.liveness import Liveness
from pipeline.frontend.metrics import Metrics
from pipeline.frontend.models import ModelRegistry
from pipeline.frontend.ops_http import NotReadyReason, OpsHttpServer
from pipeline.frontend.ports import Listener
from pipeline.frontend.streaming.sessions import Sessions
from pipeline.runtime.process import private_bytes
from pipeline.runtime.sockets import make_socket

log = logging.getLogger(__name__)

# the loop-lag probe's period: a stall of the loop longer than this is always seen (by at
# least its excess), shorter ones when they overlap a probe's wake-up. At 20 ms the probe
# alone woke an idle frontend 50 times a second (10.5 ms of CPU a second, 4.0-4.5 at 100 ms)
LAG_PROBE_S = 0.1
OPS_MAX_REQUEST_BYTES = 1 << 20


class Telemetry:
    def __init__(self, cfg: Config, metrics: Metrics, liveness: Liveness, inflight: InFlight,
                 registry: ModelRegistry, sessions: Sessions, admission: Admission) -> None:
        self.cfg = cfg
        self.metrics = metrics
        self.liveness = liveness
        self.inflight = inflight
        self.registry = registry
        self.sessions = sessions
        self.admission = admission
        self._processes: dict[int, psutil.Process] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._http: OpsHttpServer | None = None

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
                        "private_bytes": private_bytes(pid),
                        "uptime_s": round(time.time() - proc.create_time(), 1)}
        except psutil.Error:
            self._processes.pop(pid, None)
            return {"pid": pid, "gone": True}

    def snapshot(self) -> dict[str, Any]:
        """Everything the ops socket answers, as JSON-able data."""
        roles = self.liveness.snapshot()
        inflight = self.inflight.snapshot()
        models = self.registry.snapshot()
        per_worker = inflight["per_worker"]
        workers = [{**view, **self._process(view["pid"]),
                    "inflight": per_worker.get(view["index"], 0),
                    "models": sorted(mid for mid, m in models.items()
                                     if m["gpu_id"] == view["index"] and m["state"] == "ready")}
                   for view in roles["gpu_workers"]]
        compositors = [{**view, **self._process(view["pid"])}
                       for view in roles["compositors"]]
        m = self.metrics
        for model_id, model in models.items():
            model["stages"] = {s: {"count": c, "ns": ns}
                               for s, (c, ns) in m.stages[model_id].items()}
        return {
            "time": time.time(), "instance": self.cfg.runtime.instance,
            "frontend": {**self._process(os.getpid()), "restarts": 0,
                         "inflight_requests": inflight["inflight_requests"],
                         "websocket_sessions": self.sessions.count("websocket"),
                         "loop_lag_max_ms": round(m.loop_lag_max_s * 1e3, 1),
                         "tasks": len(asyncio.all_tasks())},
            "gpu_workers": workers, "compositors": compositors, "models": models,
            "arena": inflight["arena"], "frames": m.frames, "evictions": m.evictions,
            "evictions_last_minute": m.evictions_since(time.monotonic() - 60),
            "failures": dict(m.failures), "capacity": self.admission.snapshot(),
            "streams": self.sessions.snapshot(),
        }

    def refresh_gauges(self) -> None:
        m = self.metrics
        budget = self.admission.budget.budget_fps()
        m.budget_fps.set(budget if budget != float("inf") else 0)
        m.used_fps.set(self.admission.used_fps())
        m.refused.set(self.admission.refused)
        m.loaded.set(self.registry.loaded_count())
        inflight = self.inflight.snapshot()
        m.inflight.set(inflight["inflight_requests"])
        m.sessions.set(self.sessions.count("websocket"))
        m.arena.set(inflight["arena"]["used_bytes"])
        for view in self.liveness.snapshot()["gpu_workers"]:
            m.queue.labels(str(view["index"])).set(view["queue_depth"])
            m.memory.labels(str(view["index"])).set(view["device_memory_used_bytes"])

    # ---- endpoints ---------------------------------------------------------------------

    def start(self, endpoint: str, not_ready: NotReadyReason) -> None:
        """Bind the HTTP endpoint (its own threads: probes are answered however busy the
        event loop is) and the ops socket (ZMQ ROUTER, JSON); a bind that fails stops the start
        with its reason. `not_ready` says why /readyz is 503 (None: 200)."""
        host, port = self.cfg.ops.metrics_host, self.cfg.ops.metrics_port
        if port:
            try:
                self._http = OpsHttpServer.create(host, port, self.metrics.registry, not_ready)
            except OSError as exc:
                raise Listener("metrics", host, port, "ops.metrics_port (0 turns it off)",
                               "--metrics-port").taken(exc.strerror or exc) from None
        sock = make_socket(zmq.asyncio.Context.instance(), zmq.ROUTER, bind=endpoint)
        sock.setsockopt(zmq.MAXMSGSIZE, OPS_MAX_REQUEST_BYTES)  # larger: the peer is dropped
        log.info("ops socket on %s", endpoint)
        self._tasks = [asyncio.create_task(self._serve(sock)),
                       asyncio.create_task(self._refresh_forever()),
                       asyncio.create_task(watch_loop_lag(self.metrics))]

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        if self._http is not None:
            self._http.close()

    async def _serve(self, sock: zmq.asyncio.Socket) -> None:
        """A ROUTER, not a REP: a REP raises (and so would stop) on a message without the
        empty delimiter a REQ adds, which any DEALER can send. Here the envelope is read by
        hand, and whatever a peer sends gets one reply or none."""
        try:
            while True:
                frames = await sock.recv_multipart()
                envelope, body = _split_envelope(frames)
                if len(body) != 1:
                    reply: dict[str, Any] = {"error": f"bad request: {len(body)} frames after "
                                                      "the envelope, expected 1"}
                else:
                    reply = self._reply(body[0])
                try:
                    await sock.send_multipart([*envelope, json.dumps(reply).encode()],
                                              zmq.NOBLOCK)
                except zmq.ZMQError:  # the peer is gone (or not reading): no reply
                    pass
        finally:
            sock.close(0)

    def _reply(self, raw: bytes) -> dict[str, Any]:
        try:
            return self._answer(raw)
        except Exception as exc:  # RecursionError of a nested document, a bug: the
            # socket must answer and go on
            log.warning("ops socket: bad request (%d bytes): %s: %s", len(raw),
                        type(exc).__name__, str(exc)[:200])
            return {"error": f"bad request: {type(exc).__name__}: {str(exc)[:200]}"}

    def _answer(self, raw: bytes) -> dict[str, Any]:
        request = json.loads(raw) if raw.strip() else {}
        command = request.get("cmd", "stats") if isinstance(request, dict) else None
        if command == "stats":
            return self.snapshot()
        if command == "ping":
            return {"pong": True}
        return {"error": f"unknown command {command!r} (stats, ping)"}

    async def _refresh_forever(self) -> None:
        while True:
            self.refresh_gauges()
            await asyncio.sleep(1.0)


def _split_envelope(frames: list[bytes]) -> tuple[list[bytes], list[bytes]]:
    """(routing envelope, request frames) of what a ROUTER received: the envelope ends at
    the first empty frame (REQ, or a DEALER that adds it); without one, it is the peer's
    routing id alone (a DEALER that sends the request bare gets its reply bare)."""
    for i, frame in enumerate(frames[1:], start=1):
        if not frame:
            return frames[:i + 1], frames[i + 1:]
    return frames[:1], frames[1:]


async def watch_loop_lag(metrics: Metrics, period_s: float = LAG_PROBE_S) -> None:
    """Anything that holds the event loop delays every client: measure it always, as how
    late a timer of `period_s` runs."""
    loop = asyncio.get_running_loop()
    while True:
        start = loop.time()
        await asyncio.sleep(period_s)
        metrics.loop_lagged(max(0.0, loop.time() - start - period_s))
