"""InferBatchComposite requests read without copying their tensors.

The protobuf runtime copies a bytes field when it parses the message and again on every
attribute access (upb builds a new `bytes` each time): three copies of a batch-32 request's
79 MB before our own copy into shared memory. Here the received message is scanned once at
the wire level; `visual_frames`, `raw_audio` and `audio_features` become memoryviews of the
bytes gRPC handed us, and only the remaining small fields go through protobuf.
"""
from __future__ import annotations

from dataclasses import dataclass

import grpc
from google.protobuf import message_factory
from google.protobuf.descriptor import ServiceDescriptor
from google.protobuf.message import DecodeError

from pipeline.rpc import monolithic_pb2 as pb

# field numbers of CompositeBatchRequest's tensors (proto/monolithic.proto)
_TENSOR_FIELDS = {2: "visual_frames", 3: "raw_audio", 4: "audio_features"}
_LENGTH_DELIMITED = 2


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


def parse_composite_request(data: bytes) -> CompositeRequestView:
    """The request in `data` (its wire bytes), tensors as memoryviews of `data`."""
    view = memoryview(data)
    tensors = dict.fromkeys(_TENSOR_FIELDS.values(), view[:0])
    small = bytearray()
    pos = 0
    while pos < len(data):
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
            if pos + length > len(data):
                raise DecodeError("truncated length-delimited field")
            if number in _TENSOR_FIELDS:  # the last occurrence wins, as in protobuf
                tensors[_TENSOR_FIELDS[number]] = view[pos:pos + length]
                pos += length
                continue
            pos += length
        else:
            raise DecodeError(f"unsupported wire type {wire_type} (field {number})")
        if pos > len(data):
            raise DecodeError("truncated field")
        small += view[start:pos]
    fields = pb.CompositeBatchRequest.FromString(bytes(small))
    return CompositeRequestView(fields.model_id, fields.batch_size, fields.start_frame_idx,
                                fields.sample_rate, **tensors)


def add_servicer(server: grpc.aio.Server, servicer: object, service: ServiceDescriptor,
                 deserializers: dict[str, object] | None = None) -> None:
    """Register `servicer` for `service` like the generated add_*_to_server, with a request
    deserializer of our own for the methods named in `deserializers`."""
    kinds = {(False, False): grpc.unary_unary_rpc_method_handler,
             (False, True): grpc.unary_stream_rpc_method_handler,
             (True, False): grpc.stream_unary_rpc_method_handler,
             (True, True): grpc.stream_stream_rpc_method_handler}
    handlers = {}
    for method in service.methods:
        request = message_factory.GetMessageClass(method.input_type)
        response = message_factory.GetMessageClass(method.output_type)
        handlers[method.name] = kinds[method.client_streaming, method.server_streaming](
            getattr(servicer, method.name),
            request_deserializer=(deserializers or {}).get(method.name, request.FromString),
            response_serializer=response.SerializeToString)
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(service.full_name, handlers),))
    server.add_registered_method_handlers(service.full_name, handlers)
