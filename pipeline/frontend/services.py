"""The gRPC server of the frontend: its options, its listening port (TLS or not, tokens or
not) and every service behind its method's request limits."""
from __future__ import annotations

import grpc
from google.protobuf.descriptor import ServiceDescriptor
from grpc_health.v1 import health as grpc_health
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection, reflection_pb2

from pipeline.config import Config
from pipeline.frontend.drain import InflightCalls
from pipeline.frontend.ports import Listener
from pipeline.frontend.security import TokenInterceptor, TokenStore, grpc_credentials
from pipeline.frontend.wire import (
    COMPOSITE_MAX_FIELDS,
    MethodLimits,
    add_servicer,
    parse_composite_request,
)
from pipeline.rpc import inference_pb2 as ipb
from pipeline.rpc import monolithic_pb2 as pb

CONTROL_MESSAGE_BYTES = 64 * 2**10
PROCESS_AUDIO_BYTES = 4 * 2**20  # 2 min of s16le 16 kHz; a session holds at most 60 s

MONOLITHIC = pb.DESCRIPTOR.services_by_name["MonolithicService"]
INFERENCE = ipb.DESCRIPTOR.services_by_name["InferenceService"]
HEALTH = health_pb2.DESCRIPTOR.services_by_name["Health"]
REFLECTION = reflection_pb2.DESCRIPTOR.services_by_name["ServerReflection"]
SERVICE_NAMES = (MONOLITHIC.full_name, INFERENCE.full_name, grpc_health.SERVICE_NAME,
                 reflection.SERVICE_NAME)
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


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


def bound_server(cfg: Config, listener: Listener, tokens: TokenStore,
                 calls: InflightCalls) -> grpc.aio.Server:
    """The gRPC server, its port bound (a taken one raises PortTaken naming it); `calls`
    counts its calls in flight (a drain behind a balancer waits them out)."""
    interceptors: list[grpc.aio.ServerInterceptor] = [calls]
    if tokens.enabled:
        interceptors.append(TokenInterceptor(tokens))
    server = grpc.aio.server(options=grpc_options(cfg), interceptors=interceptors)
    address = f"{cfg.server.host}:{cfg.server.port}"
    try:
        if cfg.server.tls.enabled:
            server.add_secure_port(address, grpc_credentials(cfg.server.tls))
        else:
            server.add_insecure_port(address)
    except RuntimeError as exc:
        raise listener.taken(exc) from None
    return server


def add_services(server: grpc.aio.Server, cfg: Config,
                 servicers: dict[ServiceDescriptor, object]) -> None:
    """Every service, each request read behind its method's limits: control messages are
    small; a stream's audio message and ProcessAudio's utterance are bounded by what a
    session accepts; InferBatchComposite is read by the zero-copy wire reader."""
    limits = {
        "InferBatchComposite": MethodLimits(cfg.server.max_message_size_mb * 2**20,
                                            COMPOSITE_MAX_FIELDS),
        "StreamAudio": MethodLimits(cfg.streaming.max_message_bytes + CONTROL_MESSAGE_BYTES, 64),
        "ProcessAudio": MethodLimits(PROCESS_AUDIO_BYTES, 10_000),
    }
    for service, servicer in servicers.items():
        add_servicer(server, servicer, service, limits, MethodLimits(CONTROL_MESSAGE_BYTES),
                     {"InferBatchComposite": parse_composite_request})


async def set_health(health: grpc_health.aio.HealthServicer, status: int) -> None:
    """The overall status ("") and every service's."""
    for name in ("", *SERVICE_NAMES[:2]):
        await health.set(name, status)
