"""The frontend process: waits for every role, preloads models, then serves gRPC."""
from __future__ import annotations

import asyncio
import logging
import threading
from multiprocessing.connection import Connection

import grpc
from grpc_health.v1 import health as grpc_health
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from pipeline.addresses import Addresses
from pipeline.config import Config
from pipeline.frontend.dispatcher import Dispatcher
from pipeline.frontend.drain import InflightCalls, wait_out_balancer
from pipeline.frontend.grpc_service import MonolithicService
from pipeline.frontend.models import ModelManager
from pipeline.frontend.ops_http import OpsHttpServer
from pipeline.frontend.stream_rpc import InferenceService, StreamRpc
from pipeline.frontend.telemetry import Telemetry
from pipeline.frontend.websocket import AudioSocketServer
from pipeline.frontend.wire import add_servicer, parse_composite_request
from pipeline.process import Readiness, run_role
from pipeline.rpc import inference_pb2 as ipb
from pipeline.rpc import inference_pb2_grpc as ipb_grpc
from pipeline.rpc import monolithic_pb2 as pb

log = logging.getLogger(__name__)



def run_frontend_process(cfg: Config, ready: Connection | None = None) -> None:
    """Entry point of the frontend (spawned, or run by systemd)."""
    run_role("frontend", ready,
             lambda readiness, stop: asyncio.run(serve(cfg, readiness, stop)),
             lock=Addresses.of(cfg).role_lock("frontend"))


def grpc_options(cfg: Config) -> list[tuple[str, int]]:
    size = cfg.server.max_message_size_mb * 2**20
    return [
        ("grpc.max_receive_message_length", size),
        ("grpc.max_send_message_length", size),
        # keepalive as the original: clients may ping every 5 s, even without streams
        ("grpc.keepalive_time_ms", 10_000),
        ("grpc.keepalive_timeout_ms", 3_000),
        ("grpc.http2.min_ping_interval_without_data_ms", 5_000),
        ("grpc.keepalive_permit_without_calls", 1),
    ]


async def serve(cfg: Config, readiness: Readiness, stop: threading.Event) -> None:
    dispatcher = Dispatcher(cfg)
    telemetry = Telemetry(cfg)
    models = ModelManager(cfg, dispatcher, telemetry)
    telemetry.attach(dispatcher, models)
    ops: asyncio.Task[None] | None = None
    server: grpc.aio.Server | None = None
    sockets: AudioSocketServer | None = None
    health = grpc_health.aio.HealthServicer()
    watch: asyncio.Task[None] | None = None
    serving = threading.Event()
    probes: OpsHttpServer | None = None
    try:
        if cfg.ops.metrics_port:  # up from the start: /healthz 200, /readyz 503 "starting"
            probes = OpsHttpServer.create(cfg.ops.metrics_host, cfg.ops.metrics_port,
                                          telemetry.registry,
                                          lambda: not_ready_reason(stop, serving, dispatcher))
        await dispatcher.start()
        await dispatcher.wait_for_roles(cfg.runtime.start_timeout_s)
        await preload(cfg, models)
        models.start()
        streams = StreamRpc(cfg, models)
        calls = InflightCalls()
        server = grpc.aio.server(options=grpc_options(cfg), interceptors=[calls])
        add_servicer(server, MonolithicService(dispatcher, models, streams),
                     pb.DESCRIPTOR.services_by_name["MonolithicService"],
                     {"InferBatchComposite": parse_composite_request})
        ipb_grpc.add_InferenceServiceServicer_to_server(InferenceService(streams), server)
        health_pb2_grpc.add_HealthServicer_to_server(health, server)
        reflection.enable_server_reflection(SERVICE_NAMES, server)
        address = f"{cfg.server.host}:{cfg.server.port}"
        server.add_insecure_port(address)
        await server.start()
        watch = asyncio.create_task(follow_health(health, dispatcher))
        log.info("serving monolithic.MonolithicService on %s", address)
        sockets = AudioSocketServer(cfg, models)
        await sockets.start()
        telemetry.websocket_sessions = lambda: len(sockets.sessions) if sockets else 0
        ops = telemetry.start(dispatcher.addresses.ops)
        serving.set()
        readiness.ready()
        while not stop.is_set():
            await asyncio.sleep(0.1)
        grace = cfg.server.shutdown_grace_s
        log.info("draining: finishing in-flight requests (grace %.0f s)", grace)
        if watch is not None:
            watch.cancel()
        await set_health(health, NOT_SERVING)
        if cfg.server.drain_delay_s:  # behind a balancer: close no connection under a call
            grace = await wait_out_balancer(calls, cfg.server.drain_delay_s, grace)
        # gRPC refuses new calls (UNAVAILABLE) while the calls in flight finish; the
        # WebSocket stops accepting, lets each session finish its batch, then closes (1001)
        await asyncio.gather(server.stop(grace), sockets.drain(grace))
        server = sockets = None
    finally:
        for task in (watch, ops):
            if task is not None:
                task.cancel()
        if sockets is not None:
            await sockets.drain(0)
        if server is not None:
            await server.stop(0)
        await models.close()
        await dispatcher.close()
        if probes is not None:
            probes.close()


SERVICE_NAMES = (pb.DESCRIPTOR.services_by_name["MonolithicService"].full_name,
                 ipb.DESCRIPTOR.services_by_name["InferenceService"].full_name,
                 grpc_health.SERVICE_NAME, reflection.SERVICE_NAME)
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


async def set_health(health: grpc_health.aio.HealthServicer, status: int) -> None:
    """The overall status ("") and every service's."""
    for name in ("", *SERVICE_NAMES[:2]):
        await health.set(name, status)


async def follow_health(health: grpc_health.aio.HealthServicer, dispatcher: Dispatcher) -> None:
    """grpc.health.v1 says SERVING only while every worker and a compositor are alive."""
    current = None
    while True:
        status = SERVING if dispatcher.healthy() else NOT_SERVING
        if status != current:
            await set_health(health, status)
            current = status
        await asyncio.sleep(0.25)


def not_ready_reason(stop: threading.Event, serving: threading.Event,
                     dispatcher: Dispatcher) -> str | None:
    """Why /readyz says 503 (None: ready). Read on the probe server's thread: `stop` is
    set by the SIGTERM handler itself, so readiness drops before the drain begins."""
    if stop.is_set():
        return "draining"
    if not serving.is_set():
        return "starting"
    if not dispatcher.healthy():
        return "a gpu_worker or every compositor is not alive"
    return None


async def preload(cfg: Config, models: ModelManager) -> None:
    """Load every `preload_model` model before serving; a failure is logged, not fatal."""
    wanted = [m for m in cfg.models.values() if m.preload_model]
    results = await asyncio.gather(*(models.load(m.model_id, None) for m in wanted),
                                   return_exceptions=True)
    for model, result in zip(wanted, results):
        if isinstance(result, BaseException):
            log.error("preloading %s failed: %s", model.model_id, result)
        else:
            log.info("preloaded %s on gpu_worker %d", model.model_id, result)
