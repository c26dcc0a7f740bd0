"""The frontend process: every part wired once, in data order, and stopped once.

`Frontend.create()` binds the ports (a taken one stops the start at once), then builds the
worker tier's client, the liveness view, the in-flight table, the model registry, the
request path, the stream transports and the operator's view, each handed what it uses.
`serve()` waits for every role, preloads, serves, and on SIGTERM drains: the state goes
RUNNING -> DRAINING -> CLOSED on those events, never by polling.
"""
from __future__ import annotations

import asyncio
import enum
import logging
import signal
import socket
import threading
from multiprocessing.connection import Connection

import grpc
from grpc_health.v1 import health as grpc_health
from grpc_reflection.v1alpha import reflection

from pipeline import messages as msg
from pipeline.config import Config, retired_environment
from pipeline.frontend.capacity import Admission, FrameBudget
from pipeline.frontend.drain import InflightCalls, wait_out_balancer
from pipeline.frontend.errors import Unavailable
from pipeline.frontend.grpc_service import MonolithicService
from pipeline.frontend.heap import HeapTrim
from pipeline.frontend.inflight import InFlight
from pipeline.frontend.liveness import CompositorLost, Event, Liveness, WorkerHolds, WorkerLost
from pipeline.frontend.metrics import Metrics
from pipeline.frontend.models import FAILED, ModelRegistry
from pipeline.frontend.ports import bind, listeners
from pipeline.frontend.router import Router, Runner
from pipeline.frontend.security import TokenStore, ssl_context, warn_if_exposed
from pipeline.frontend.services import (
    HEALTH,
    INFERENCE,
    MONOLITHIC,
    NOT_SERVING,
    REFLECTION,
    SERVICE_NAMES,
    SERVING,
    add_services,
    bound_server,
    set_health,
)
from pipeline.frontend.streaming.grpc_stream import InferenceService, StreamRpc
from pipeline.frontend.streaming.live import IdleFrames
from pipeline.frontend.streaming.sessions import Sessions
from pipeline.frontend.streaming.websocket import AudioSocketServer
from pipeline.frontend.telemetry import Telemetry
from pipeline.frontend.worker_client import WorkerClient
from pipeline.runtime.addresses import Addresses
from pipeline.runtime.process import Readiness, run_role

log = logging.getLogger(__name__)


class State(enum.Enum):
    STARTING = "starting"
    RUNNING = "running"
    DRAINING = "draining"
    CLOSED = "closed"


def run_frontend_process(cfg: Config, ready: Connection | None = None) -> None:
    """Entry point of the frontend (spawned, or run by systemd)."""
    run_role("frontend", ready,
             lambda readiness, stop: asyncio.run(_main(cfg, readiness, stop)),
             lock=Addresses.of(cfg).role_lock("frontend"))


async def _main(cfg: Config, readiness: Readiness, stop: threading.Event) -> None:
    frontend = Frontend.create(cfg)
    try:
        await frontend.start()
        readiness.ready()
        await asyncio.to_thread(stop.wait)  # SIGTERM (run_role sets it)
        await frontend.drain()
    finally:
        stop.set()  # releases the waiting thread on every way out
        await frontend.close()


class Frontend:
    """Every part of the frontend; built and wired by create()."""

    def __init__(self, cfg: Config, tokens: TokenStore, grpc_server: grpc.aio.Server,
                 ws_socket: socket.socket, client: WorkerClient, liveness: Liveness,
                 inflight: InFlight, metrics: Metrics, registry: ModelRegistry, router: Router,
                 budget: FrameBudget, streams: StreamRpc, sockets: AudioSocketServer,
                 telemetry: Telemetry, health: grpc_health.aio.HealthServicer,
                 calls: InflightCalls) -> None:
        self.cfg, self.tokens, self.grpc, self.ws_socket = cfg, tokens, grpc_server, ws_socket
        self.calls, self.budget = calls, budget
        self.client, self.liveness, self.inflight = client, liveness, inflight
        self.metrics, self.registry, self.router = metrics, registry, router
        self.streams, self.sockets, self.telemetry, self.health = streams, sockets, telemetry, health
        self.state = State.STARTING
        # what the health service was last told (None: nothing yet; it answers SERVING then)
        self._serving: int | None = None
        self._unready: str | None = "not checked yet"  # why not SERVING while RUNNING
        self._health_lock = asyncio.Lock()
        self._tasks: list[asyncio.Task[None]] = []

    @classmethod
    def create(cls, cfg: Config) -> Frontend:
        """Build the parts in data order, each handed what it uses."""
        grpc_listener, ws_listener, *_ = listeners(cfg)
        tokens = TokenStore(cfg.server.auth.tokens_file)
        warn_if_exposed(cfg.server)
        for line in retired_environment():
            log.warning("%s", line)
        # every port first: a taken one stops the start at once, naming the port
        heap = HeapTrim()
        calls = InflightCalls(heap)
        grpc_server = bound_server(cfg, grpc_listener, tokens, calls)
        ws_socket = bind(ws_listener)
        client = WorkerClient(cfg)
        liveness = Liveness(cfg)
        inflight = InFlight(cfg, client, liveness)
        metrics = Metrics()
        budget = FrameBudget(cfg)
        runner = Runner(cfg, inflight, metrics, budget, heap)
        registry = ModelRegistry(cfg, client, runner, liveness, metrics)
        router = Router(registry, runner)
        admission = Admission(cfg, budget)
        sessions = Sessions(cfg, router, admission, IdleFrames(cfg, router), tokens)
        streams = StreamRpc(cfg, sessions)
        sockets = AudioSocketServer(cfg, tokens, sessions)
        telemetry = Telemetry(cfg, metrics, liveness, inflight, registry, sessions, admission)
        health = grpc_health.aio.HealthServicer()
        add_services(grpc_server, cfg, {
            MONOLITHIC: MonolithicService(cfg, router, registry, liveness, metrics, streams),
            INFERENCE: InferenceService(cfg, sessions),
            HEALTH: health,
            REFLECTION: reflection.aio.ReflectionServicer(SERVICE_NAMES)})
        frontend = cls(cfg, tokens, grpc_server, ws_socket, client, liveness, inflight, metrics,
                       registry, router, budget, streams, sockets, telemetry, health, calls)
        telemetry.start(client.addresses.ops, frontend.not_ready_reason)  # /readyz: 503 "starting"
        return frontend

    async def start(self) -> None:
        """Wait for every role, preload, then serve gRPC and the WebSocket."""
        cfg = self.cfg
        asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, self.tokens.reload)
        self.client.start({
            msg.FramesDone: self.inflight.on_frames_done, msg.InferDone: self.inflight.on_infer_done,
            msg.InferFailed: self.inflight.on_failed, msg.FramesFailed: self.inflight.on_failed,
            msg.Heartbeat: self._on_heartbeat, msg.RoleDown: self._on_role_down})
        self._tasks = [asyncio.create_task(self._watch_liveness()),
                       asyncio.create_task(self.budget.sample_forever(self.liveness))]
        try:
            async with asyncio.timeout(cfg.runtime.start_timeout_s):
                await self.liveness.all_reported.wait()
        except TimeoutError:
            raise TimeoutError("not every role reported in: " + repr(self.liveness.snapshot())) from None
        await self._preload()
        self.registry.start()
        await self.grpc.start()
        log.info("serving monolithic.MonolithicService on %s:%d (%s%s)", cfg.server.host,
                 cfg.server.port, "TLS" if cfg.server.tls.enabled else "plaintext",
                 ", tokens" if self.tokens.enabled else "")
        await self.sockets.start(self.ws_socket,
                                 ssl_context(cfg.server.tls) if cfg.server.tls.enabled else None)
        self.state = State.RUNNING
        self._apply([])  # SERVING, if every role is alive

    async def drain(self) -> None:
        """No new work (gRPC UNAVAILABLE, WebSocket handshakes refused), in-flight requests
        finish, streams finish their batch and end cleanly; within shutdown_grace_s."""
        if self.state is not State.RUNNING:
            return
        self.state = State.DRAINING
        self._serving = NOT_SERVING
        grace = self.cfg.server.shutdown_grace_s
        await set_health(self.health, NOT_SERVING)
        if self.cfg.server.drain_delay_s:  # behind a balancer: close no connection under a call
            grace = await wait_out_balancer(self.calls, self.cfg.server.drain_delay_s, grace)
        log.info("draining: no new work, finishing in-flight requests (grace %.1f s)", grace)
        await asyncio.gather(self.grpc.stop(grace), self.sockets.drain(grace),
                             self.streams.drain(grace))

    async def close(self) -> None:
        """Idempotent: everything stopped and released, whatever state it was in."""
        if self.state is State.CLOSED:
            return
        self.state = State.CLOSED
        self.ws_socket.close()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.sockets.drain(0)
        await self.grpc.stop(0)
        await self.registry.close()
        await self.telemetry.close()
        await self.client.close()
        self.inflight.close()

    def not_ready_reason(self) -> str | None:
        """Why /readyz says 503 (None: ready). Read on the HTTP server's thread: two plain
        attribute reads, both written on the event loop; drain() flips the state first."""
        if self.state is State.STARTING:
            return "starting"
        if self.state is not State.RUNNING:
            return "draining"
        return self._unready

    def _unready_reason(self) -> str | None:
        """Why a running frontend cannot serve (None: it can). A preloaded model that failed
        to load counts: the box cannot serve what it was configured to hold, so a balancer
        must not send it traffic, until the model loads (LoadModel, or a request for it)."""
        if not self.liveness.healthy():
            return "a gpu_worker or every compositor is not alive"
        failed = [f"preloaded model '{m.model_id}' failed to load: {m.error}"
                  for m in self.registry.views()
                  if m.state == FAILED and self.cfg.models[m.model_id].preload_model]
        return "; ".join(failed) or None

    # ---- what the roles report ---------------------------------------------------------

    def _on_heartbeat(self, m: msg.Message, _: list[bytes]) -> None:
        assert isinstance(m, msg.Heartbeat)
        self._apply(self.liveness.heard(m))

    def _on_role_down(self, m: msg.Message, _: list[bytes]) -> None:
        assert isinstance(m, msg.RoleDown)
        self._apply(self.liveness.announced(m))

    async def _watch_liveness(self) -> None:
        """Silence is the one death nobody announces: check for it twice a heartbeat."""
        while True:
            await asyncio.sleep(self.cfg.runtime.heartbeat_s / 2)
            self._apply(self.liveness.check())

    def _apply(self, events: list[Event]) -> None:
        for event in events:
            if isinstance(event, WorkerLost):
                self.inflight.fail_worker(event.index, event.reason, event.restarted)
                self.client.fail_controls(event.index, Unavailable(event.reason))
                if event.restarted:  # a new process holds nothing
                    self.registry.worker_restarted(event.index)
            elif isinstance(event, CompositorLost):
                # nothing fails: its workers hand the jobs it held to the other compositors
                log.warning("%s; its jobs go to the other compositors", event.reason)
            elif isinstance(event, WorkerHolds):
                self.registry.reconcile(event.index, event.models)
        if self.state is State.RUNNING:
            unready = self._unready_reason()
            if unready != self._unready and (unready or "").startswith("preloaded"):
                log.error("not ready: %s (LoadModel makes it ready again)", unready)
            elif unready is None and (self._unready or "").startswith("preloaded"):
                log.info("ready again: no preloaded model has failed")
            self._unready = unready
        status = SERVING if self.state is State.RUNNING and self._unready is None else NOT_SERVING
        if status != self._serving:
            self._serving = status
            asyncio.get_running_loop().create_task(self._set_health(status))

    async def _set_health(self, status: int) -> None:
        async with self._health_lock:  # one change after another, in the order decided
            await set_health(self.health, status)

    async def _preload(self) -> None:
        """Load every `preload_model` model before serving; a failure is logged, not fatal."""
        wanted = [m for m in self.cfg.models.values() if m.preload_model]
        results = await asyncio.gather(*(self.registry.load(m.model_id, None) for m in wanted),
                                       return_exceptions=True)
        for model, result in zip(wanted, results, strict=True):
            if isinstance(result, BaseException):
                log.error("preloading %s failed: %s", model.model_id, result)
            else:
                log.info("preloaded %s on gpu_worker %d", model.model_id, result)
