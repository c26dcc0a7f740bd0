"""The frontend process: waits for every role, preloads models, then serves gRPC."""
from __future__ import annotations

import asyncio
import logging
import threading
from multiprocessing.connection import Connection

import grpc

from pipeline.config import Config
from pipeline.frontend.dispatcher import Dispatcher
from pipeline.frontend.grpc_service import MonolithicService
from pipeline.frontend.models import ModelManager
from pipeline.frontend.stream_rpc import InferenceService, StreamRpc
from pipeline.frontend.websocket import AudioSocketServer
from pipeline.process import Readiness, run_role
from pipeline.rpc import inference_pb2_grpc as ipb_grpc
from pipeline.rpc import monolithic_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

SHUTDOWN_GRACE_S = 5.0


def run_frontend_process(cfg: Config, ready: Connection | None = None) -> None:
    """Entry point of the frontend (spawned, or run by systemd)."""
    run_role("frontend", ready,
             lambda readiness, stop: asyncio.run(serve(cfg, readiness, stop)))


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
    models = ModelManager(cfg, dispatcher)
    server: grpc.aio.Server | None = None
    sockets: AudioSocketServer | None = None
    try:
        await dispatcher.start()
        await dispatcher.wait_for_roles(cfg.runtime.start_timeout_s)
        await preload(cfg, models)
        models.start()
        streams = StreamRpc(cfg, models)
        server = grpc.aio.server(options=grpc_options(cfg))
        pb_grpc.add_MonolithicServiceServicer_to_server(
            MonolithicService(dispatcher, models, streams), server)
        ipb_grpc.add_InferenceServiceServicer_to_server(InferenceService(streams), server)
        address = f"{cfg.server.host}:{cfg.server.port}"
        server.add_insecure_port(address)
        await server.start()
        log.info("serving monolithic.MonolithicService on %s", address)
        sockets = AudioSocketServer(cfg, models)
        await sockets.start()
        readiness.ready()
        while not stop.is_set():
            await asyncio.sleep(0.1)
        log.info("stopping: finishing in-flight requests (grace %.0f s)", SHUTDOWN_GRACE_S)
    finally:
        if sockets is not None:
            await sockets.close()
        if server is not None:
            await server.stop(SHUTDOWN_GRACE_S)
        await models.close()
        await dispatcher.close()


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
