"""The frontend process: waits for every role, preloads models, then serves gRPC."""
from __future__ import annotations

import asyncio
import logging
import signal
import threading
from multiprocessing.connection import Connection

import grpc
from grpc_health.v1 import health as grpc_health
from google.protobuf.descriptor import ServiceDescriptor
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection, reflection_pb2

from pipeline.runtime.addresses import Addresses
from pipeline.config import Config, retired_environment
from pipeline.frontend.dispatcher import Dispatcher
from pipeline.frontend.grpc_service import MonolithicService
from pipeline.frontend.models import ModelManager
from pipeline.frontend.ports import bind, listeners
from pipeline.frontend.security import (TokenInterceptor, TokenStore, grpc_credentials,
                                        ssl_context, warn_if_exposed)
from pipeline.frontend.stream_rpc import InferenceService, StreamRpc
from pipeline.frontend.telemetry import Telemetry
from pipeline.frontend.websocket import AudioSocketServer
from pipeline.frontend.wire import (COMPOSITE_MAX_FIELDS, MethodLimits, add_servicer,
                                    parse_composite_request)
from pipeline.runtime.process import Readiness, run_role
from pipeline.rpc import inference_pb2 as ipb
from pipeline.rpc import monolithic_pb2 as pb

log = logging.getLogger(__name__)



def run_frontend_process(cfg: Config, ready: Connection | None = None) -> None:
    """Entry point of the frontend (spawned, or run by systemd)."""
    run_role("frontend", ready,
             lambda readiness, stop: asyncio.run(serve(cfg, readiness, stop)),
             lock=Addresses.of(cfg).role_lock("frontend"))


def add_services(server: grpc.aio.Server, cfg: Config,
                 servicers: dict[ServiceDescriptor, object]) -> None:
    """Every service, each request read behind its method's limits: control messages are
    small; a stream's audio message and ProcessAudio's utterance are bounded by what a
    session accepts; InferBatchComposite is read by the zero-copy wire reader."""
    streaming = cfg.streaming
    limits = {
        "InferBatchComposite": MethodLimits(cfg.server.max_message_size_mb * 2**20,
                                            COMPOSITE_MAX_FIELDS),
        "StreamAudio": MethodLimits(streaming.max_message_bytes + CONTROL_MESSAGE_BYTES, 64),
        "ProcessAudio": MethodLimits(PROCESS_AUDIO_BYTES, 10_000),
    }
    for service, servicer in servicers.items():
        add_servicer(server, servicer, service, limits, MethodLimits(CONTROL_MESSAGE_BYTES),
                     {"InferBatchComposite": parse_composite_request})


CONTROL_MESSAGE_BYTES = 64 * 2**10
PROCESS_AUDIO_BYTES = 4 * 2**20  # 2 min of s16le 16 kHz; a session holds at most 60 s


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
        # a second server on a taken port must fail, not share it (grpcio's default is 1)
        ("grpc.so_reuseport", 0),
    ]


async def serve(cfg: Config, readiness: Readiness, stop: threading.Event) -> None:
    # every port first: a taken one stops the start at once, naming the port
    grpc_listener, ws_listener, *_ = listeners(cfg)
    tls = cfg.server.tls
    tokens = TokenStore(cfg.server.auth.tokens_file)
    warn_if_exposed(cfg.server)
    for line in retired_environment():
        log.warning("%s", line)
    server: grpc.aio.Server | None = grpc.aio.server(
        options=grpc_options(cfg), interceptors=[TokenInterceptor(tokens)] if tokens.enabled else [])
    address = f"{cfg.server.host}:{cfg.server.port}"
    try:
        if tls.enabled:
            server.add_secure_port(address, grpc_credentials(tls))
        else:
            server.add_insecure_port(address)
    except RuntimeError as exc:
        raise grpc_listener.taken(exc) from None
    ws_socket = bind(ws_listener)
    asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, tokens.reload)
    dispatcher = Dispatcher(cfg)
    telemetry = Telemetry(cfg)
    models = ModelManager(cfg, dispatcher, telemetry)
    telemetry.attach(dispatcher, models)
    ops: asyncio.Task[None] | None = None
    sockets: AudioSocketServer | None = None
    health = grpc_health.aio.HealthServicer()
    watch: asyncio.Task[None] | None = None
    try:
        ops = telemetry.start(dispatcher.addresses.ops, cfg.ops.metrics_host,
                              cfg.ops.metrics_port)
        await dispatcher.start()
        await dispatcher.wait_for_roles(cfg.runtime.start_timeout_s)
        await preload(cfg, models)
        models.start()
        streams = StreamRpc(cfg, models)
        add_services(server, cfg, {
            pb.DESCRIPTOR.services_by_name["MonolithicService"]:
                MonolithicService(dispatcher, models, streams),
            ipb.DESCRIPTOR.services_by_name["InferenceService"]: InferenceService(streams),
            health_pb2.DESCRIPTOR.services_by_name["Health"]: health,
            reflection_pb2.DESCRIPTOR.services_by_name["ServerReflection"]:
                reflection.aio.ReflectionServicer(SERVICE_NAMES)})
        await server.start()
        watch = asyncio.create_task(follow_health(health, dispatcher))
        log.info("serving monolithic.MonolithicService on %s (%s%s)", address,
                 "TLS" if tls.enabled else "plaintext", ", tokens" if tokens.enabled else "")
        sockets = AudioSocketServer(cfg, models, tokens)
        await sockets.start(ws_socket, ssl_context(tls) if tls.enabled else None)
        telemetry.websocket_sessions = lambda: len(sockets.sessions) if sockets else 0
        readiness.ready()
        while not stop.is_set():
            await asyncio.sleep(0.1)
        grace = cfg.server.shutdown_grace_s
        log.info("draining: no new work, finishing in-flight requests (grace %.0f s)", grace)
        if watch is not None:
            watch.cancel()
        await set_health(health, NOT_SERVING)
        # gRPC refuses new calls (UNAVAILABLE) while the calls in flight finish; the
        # WebSocket stops accepting, lets each session finish its batch, then closes (1001)
        await asyncio.gather(server.stop(grace), sockets.drain(grace), streams.drain(grace))
        server = sockets = None
    finally:
        ws_socket.close()
        for task in (watch, ops):
            if task is not None:
                task.cancel()
        if sockets is not None:
            await sockets.drain(0)
        if server is not None:
            await server.stop(0)
        await models.close()
        await dispatcher.close()


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
