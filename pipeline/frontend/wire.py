"""Request messages read at the wire level, with bounded work, before protobuf sees them.

Two reasons. Speed: the protobuf runtime copies a bytes field when it parses the message
and again on every attribute access (upb builds a new `bytes` each time): three copies of
a batch-32 request's 79 MB before our own copy into shared memory. Here the received
message is scanned once; `visual_frames`, `raw_audio` and `audio_features` become
memoryviews of the bytes gRPC handed us, and only the small fields go through protobuf.

Safety: grpc.aio runs request deserializers on the event loop. A message of millions of
tiny fields costs a per-field Python loop ~1 s per MiB and even the C parser ~2.5 ms per
MiB, so every method has a byte limit and a field budget, checked before anything is
parsed: scanning stops at the budget, so no message costs more than a few hundred field
steps. A message that breaks either becomes `Malformed`; the handler wrapper answers it
with INVALID_ARGUMENT and one log line (a deserializer that raises would make grpc.aio
answer UNKNOWN and log a traceback).
"""
from __future__ import annotations

import inspect
import logging
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf import message_factory
from google.protobuf.descriptor import ServiceDescriptor
from google.protobuf.message import DecodeError

from pipeline.rpc import monolithic_pb2 as pb

log = logging.getLogger(__name__)

# field numbers of CompositeBatchRequest's tensors (proto/monolithic.proto)
_TENSOR_FIELDS = {2: "visual_frames", 3: "raw_audio", 4: "audio_features"}
_SMALL_FIELDS = {1, 5, 6, 7}       # model_id, batch_size, start_frame_idx, sample_rate
_LENGTH_DELIMITED = 2
COMPOSITE_MAX_FIELDS = 64          # a real request has at most 7 (plus a few unknown)
MAX_MODEL_ID_BYTES = 1024


@dataclass(frozen=True)
class Malformed:
    """What a guarded deserializer returns for a message it will not parse."""

    reason: str


class MalformedMessage(Exception):
    """Raised into a streaming handler by its request iterator at a Malformed message."""


@dataclass(frozen=True)
class MethodLimits:
    """Bounds on one method's request messages."""

    max_bytes: int
    max_fields: int = 256


@dataclass(frozen=True)
class CompositeRequestView:
    """What `validate` reads of a CompositeBatchRequest; the tensors are views, not copies."""

    model_id: str
    batch_size: int
    start_frame_idx: int
    sample_rate: int
    visual_frames: memoryview
    raw_audio: memoryview
    audio_features: memoryview


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(data) or shift > 63:
            raise DecodeError("truncated or overlong varint")
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7


def scan_fields(data: bytes, max_fields: int) -> Iterator[tuple[int, int, int, int]]:
    """(field number, wire type, start of the field, end of the field) of each top-level
    field; the value of a length-delimited field is data[end - length:end]. DecodeError
    for a truncated message, an unsupported wire type or more than `max_fields` fields."""
    pos = count = 0
    while pos < len(data):
        count += 1
        if count > max_fields:
            raise DecodeError(f"more than {max_fields} fields")
        start = pos
        key, pos = _varint(data, pos)
        number, wire_type = key >> 3, key & 7
        if wire_type == 0:
            _, pos = _varint(data, pos)
        elif wire_type == 1:
            pos += 8
        elif wire_type == 5:
            pos += 4
        elif wire_type == _LENGTH_DELIMITED:
            length, pos = _varint(data, pos)
            pos += length
        else:
            raise DecodeError(f"unsupported wire type {wire_type} (field {number})")
        if pos > len(data):
            raise DecodeError("truncated field")
        yield number, wire_type, start, pos


def parse_composite_request(data: bytes) -> CompositeRequestView:
    """The request in `data` (its wire bytes), tensors as memoryviews of `data`. Unknown
    fields are skipped without a copy; DecodeError for a message protobuf would refuse or
    one of more than COMPOSITE_MAX_FIELDS fields."""
    view = memoryview(data)
    tensors = dict.fromkeys(_TENSOR_FIELDS.values(), view[:0])
    small = bytearray()
    for number, wire_type, start, end in scan_fields(data, COMPOSITE_MAX_FIELDS):
        if number in _TENSOR_FIELDS and wire_type == _LENGTH_DELIMITED:
            _, value_start = _varint(data, _varint(data, start)[1])
            tensors[_TENSOR_FIELDS[number]] = view[value_start:end]  # the last one wins
        elif number in _SMALL_FIELDS:
            if end - start > MAX_MODEL_ID_BYTES:
                raise DecodeError(f"field {number} is {end - start} bytes long")
            small += view[start:end]
    fields = pb.CompositeBatchRequest.FromString(bytes(small))
    return CompositeRequestView(fields.model_id, fields.batch_size, fields.start_frame_idx,
                                fields.sample_rate, **tensors)


def guarded(parse: Callable[[bytes], Any], limits: MethodLimits) -> Callable[[bytes], Any]:
    """`parse` behind the method's limits: the message, or Malformed (never raises)."""

    def deserialize(data: bytes) -> Any:
        if len(data) > limits.max_bytes:
            return Malformed(f"request of {len(data)} bytes is over this method's limit of "
                             f"{limits.max_bytes}")
        try:
            for _ in scan_fields(data, limits.max_fields):
                pass
            return parse(data)
        except (DecodeError, ValueError) as exc:  # ValueError: e.g. a string not UTF-8
            return Malformed(str(exc) or type(exc).__name__)

    return deserialize


async def _checked(requests: AsyncIterator[Any]) -> AsyncIterator[Any]:
    async for request in requests:
        if isinstance(request, Malformed):
            raise MalformedMessage(request.reason)
        yield request


async def _reject(context: grpc.aio.ServicerContext, method: str, reason: str) -> None:
    log.warning("malformed %s request from %s: %s", method, context.peer(), reason)
    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"malformed request: {reason}")


def _wrap(method: str, behaviour: Callable[..., Any], client_streaming: bool) -> Callable[..., Any]:
    """The servicer method, answering a Malformed request with INVALID_ARGUMENT (an async
    generator for one that yields its responses, a coroutine otherwise)."""
    if inspect.isasyncgenfunction(behaviour):
        async def streaming(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            if isinstance(request, Malformed):
                await _reject(context, method, request.reason)
            try:
                source = _checked(request) if client_streaming else request
                async for response in behaviour(source, context):
                    yield response
            except MalformedMessage as exc:
                await _reject(context, method, str(exc))
        return streaming

    async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
        if isinstance(request, Malformed):
            await _reject(context, method, request.reason)
        try:
            return await behaviour(_checked(request) if client_streaming else request, context)
        except MalformedMessage as exc:
            await _reject(context, method, str(exc))
    return unary


def add_servicer(server: grpc.aio.Server, servicer: object, service: ServiceDescriptor,
                 limits: dict[str, MethodLimits], default: MethodLimits,
                 parsers: dict[str, Callable[[bytes], Any]] | None = None) -> None:
    """Register `servicer` for `service` like the generated add_*_to_server, with every
    request read behind its method's limits (`limits`, else `default`) and by the parser
    named in `parsers` where there is one (else protobuf)."""
    kinds = {(False, False): grpc.unary_unary_rpc_method_handler,
             (False, True): grpc.unary_stream_rpc_method_handler,
             (True, False): grpc.stream_unary_rpc_method_handler,
             (True, True): grpc.stream_stream_rpc_method_handler}
    handlers = {}
    for method in service.methods:
        request = message_factory.GetMessageClass(method.input_type)
        response = message_factory.GetMessageClass(method.output_type)
        parse = (parsers or {}).get(method.name, request.FromString)
        streams = method.client_streaming, method.server_streaming
        handlers[method.name] = kinds[streams](
            _wrap(f"{service.name}.{method.name}", getattr(servicer, method.name),
                  method.client_streaming),
            request_deserializer=guarded(parse, limits.get(method.name, default)),
            response_serializer=response.SerializeToString)
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(service.full_name, handlers),))
    server.add_registered_method_handlers(service.full_name, handlers)
