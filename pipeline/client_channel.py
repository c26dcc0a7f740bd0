"""The one way our clients open a gRPC channel: the message-size limits, the `x-model-id`
affinity header and the retry policy for UNAVAILABLE (docs/deploy.md, "Scale-out").

A balancer in front of several boxes (HAProxy, `lipsync lb-config`) hashes `x-model-id`
so that each avatar is loaded on one box only; a request without it is still served, by
the least busy box. The header is taken from the request's `model_id` field, or from the
model the channel was opened for (requests that carry no such field: pre-serialized bytes,
the streaming calls whose model is in their first message).

A box that drains (SIGTERM) answers UNAVAILABLE until the balancer's readiness check has
taken it out of rotation (about a second); the retry policy below outlasts that, so a
drain costs our clients nothing. Other clients get the same by putting RETRY_SERVICE_CONFIG
in their channel's service config.
"""
from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import grpc

MAX_MESSAGE = 256 * 2**20
MODEL_ID_HEADER = "x-model-id"

# Attempts are spaced ~0.2, 0.4, 0.8, 1.6 s (gRPC adds +-20 % jitter): about 3 s in all,
# more than a balancer with 500 ms checks and `fall 2` needs to take a draining box out.
# Only UNAVAILABLE is retried: it means "not processed, try elsewhere"; RESOURCE_EXHAUSTED
# (overload) is not, since retrying it would add load to a full box.
RETRY_SERVICE_CONFIG: dict[str, Any] = {
    "methodConfig": [{
        "name": [{"service": "monolithic.MonolithicService"},
                 {"service": "InferenceService"},
                 {"service": "grpc.health.v1.Health"}],
        "retryPolicy": {
            "maxAttempts": 5,
            "initialBackoff": "0.2s",
            "maxBackoff": "2s",
            "backoffMultiplier": 2,
            "retryableStatusCodes": ["UNAVAILABLE"],
        },
    }],
}


def channel_options() -> list[tuple[str, int | str]]:
    """Options of every channel of ours (also usable with grpc.aio.insecure_channel)."""
    return [
        ("grpc.max_receive_message_length", MAX_MESSAGE),
        ("grpc.max_send_message_length", MAX_MESSAGE),
        ("grpc.enable_retries", 1),
        ("grpc.service_config", json.dumps(RETRY_SERVICE_CONFIG)),
        # a request is retried only while gRPC still holds all of it: by default 256 KiB,
        # less than one frame of a client-built visual tensor
        ("grpc.per_rpc_retry_buffer_size", MAX_MESSAGE),
    ]


def channel(address: str, model_id: str = "") -> grpc.Channel:
    """An insecure channel to `address` (a box or the balancer) whose calls carry
    `x-model-id`: the request's model_id, else `model_id` (empty: no header)."""
    return grpc.intercept_channel(grpc.insecure_channel(address, options=channel_options()),
                                  ModelAffinity(model_id))


class _CallDetails(NamedTuple):
    method: str
    timeout: float | None
    metadata: Any
    credentials: grpc.CallCredentials | None
    wait_for_ready: bool | None
    compression: grpc.Compression | None


class CallDetails(_CallDetails, grpc.ClientCallDetails):
    """grpc.ClientCallDetails with the fields grpc's interceptor machinery reads."""


class ModelAffinity(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor,
                    grpc.StreamUnaryClientInterceptor, grpc.StreamStreamClientInterceptor):
    """Adds `x-model-id` to every call that names a model and does not set it itself."""

    def __init__(self, model_id: str = "") -> None:
        self.model_id = model_id

    def _details(self, details: grpc.ClientCallDetails, request: object) -> grpc.ClientCallDetails:
        model = getattr(request, "model_id", None)
        if not isinstance(model, str) or not model:
            model = self.model_id
        metadata = list(details.metadata or ())
        if not model or any(key == MODEL_ID_HEADER for key, _ in metadata):
            return details
        metadata.append((MODEL_ID_HEADER, model))
        return CallDetails(details.method, details.timeout, metadata,
                           getattr(details, "credentials", None),
                           getattr(details, "wait_for_ready", None),
                           getattr(details, "compression", None))

    def intercept_unary_unary(self, continuation: Callable[..., Any],
                              client_call_details: grpc.ClientCallDetails, request: Any) -> Any:
        return continuation(self._details(client_call_details, request), request)

    def intercept_unary_stream(self, continuation: Callable[..., Any],
                               client_call_details: grpc.ClientCallDetails, request: Any) -> Any:
        return continuation(self._details(client_call_details, request), request)

    def intercept_stream_unary(self, continuation: Callable[..., Any],
                               client_call_details: grpc.ClientCallDetails,
                               request_iterator: Iterator[Any]) -> Any:
        # the model sits in the first message, which is not ours to wait for here
        return continuation(self._details(client_call_details, None), request_iterator)

    def intercept_stream_stream(self, continuation: Callable[..., Any],
                                client_call_details: grpc.ClientCallDetails,
                                request_iterator: Iterator[Any]) -> Any:
        return continuation(self._details(client_call_details, None), request_iterator)
