"""The wire-level reader of InferBatchComposite requests: same fields as protobuf, tensors
as views of the received bytes (no copy), malformed input rejected."""
from __future__ import annotations

import numpy as np
import pytest
from google.protobuf.message import DecodeError

from pipeline.frontend.wire import parse_composite_request
from pipeline.rpc import monolithic_pb2 as pb

FIELDS = ("model_id", "batch_size", "start_frame_idx", "sample_rate", "visual_frames",
          "raw_audio", "audio_features")


def _same_as_protobuf(wire: bytes) -> None:
    reference = pb.CompositeBatchRequest.FromString(wire)
    parsed = parse_composite_request(wire)
    for name in FIELDS:
        got = getattr(parsed, name)
        assert (bytes(got) if isinstance(got, memoryview) else got) == getattr(reference, name), name


@pytest.mark.parametrize("fields", [
    {},
    {"model_id": "demo", "batch_size": 8, "start_frame_idx": 123, "sample_rate": 16000,
     "visual_frames": b"\x01\x02\x03\x04" * 1000, "raw_audio": b"\x00\x00\x80\x3f" * 640},
    {"model_id": "ünïcödé", "batch_size": -3, "start_frame_idx": -2**31, "audio_features": b"x" * 32768},
    {"model_id": "m", "batch_size": 2**31 - 1, "raw_audio": b"", "visual_frames": b""},
])
def test_fields_equal_protobufs(fields: dict) -> None:
    _same_as_protobuf(pb.CompositeBatchRequest(**fields).SerializeToString())


def test_tensors_are_views_of_the_received_bytes() -> None:
    visual = np.arange(6 * 320 * 320, dtype="<f4")
    wire = pb.CompositeBatchRequest(model_id="demo", batch_size=1, visual_frames=visual.tobytes(),
                                    raw_audio=b"\x00" * 64).SerializeToString()
    parsed = parse_composite_request(wire)
    tensor = np.frombuffer(parsed.visual_frames, "<f4")
    received = np.frombuffer(wire, np.uint8)
    assert np.shares_memory(tensor, received)  # no copy was made
    assert np.array_equal(tensor, visual)


def test_repeated_and_unknown_fields_follow_protobuf() -> None:
    """A field sent twice: the last wins (scalars and tensors); unknown fields are skipped."""
    first = pb.CompositeBatchRequest(model_id="a", batch_size=1, raw_audio=b"one").SerializeToString()
    second = pb.CompositeBatchRequest(model_id="b", batch_size=4, raw_audio=b"two!").SerializeToString()
    unknown = bytes([0x98, 0x06, 0x07])  # field 99, varint 7
    unknown += bytes([0xA2, 0x06, 0x03]) + b"xyz"  # field 100, 3 bytes
    unknown += bytes([0xAD, 0x06]) + b"\x00\x00\x80\x3f"  # field 101, fixed32
    unknown += bytes([0xB1, 0x06]) + b"\x00" * 8  # field 102, fixed64
    _same_as_protobuf(first + unknown + second)
    parsed = parse_composite_request(first + second)
    assert (parsed.model_id, parsed.batch_size, bytes(parsed.raw_audio)) == ("b", 4, b"two!")


@pytest.mark.parametrize("wire", [
    b"\x12\x05abc",            # visual_frames says 5 bytes, 3 follow
    b"\x28",                   # batch_size key without its varint
    b"\x28\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\x01",  # an overlong varint
    b"\x0b\x0c",               # a group (wire type 3)
    b"\x1d\x00\x00",           # fixed32 cut short
    b"\x0a\x02\xff\xfe",       # model_id not UTF-8
])
def test_malformed_messages_are_rejected(wire: bytes) -> None:
    with pytest.raises(DecodeError):
        parse_composite_request(wire)


def test_a_truncated_real_request_is_rejected_at_every_cut() -> None:
    wire = pb.CompositeBatchRequest(model_id="demo", batch_size=2, raw_audio=b"\x01" * 40,
                                    visual_frames=b"\x02" * 100).SerializeToString()
    for cut in range(1, len(wire)):
        try:
            reference = pb.CompositeBatchRequest.FromString(wire[:cut])
        except DecodeError:
            with pytest.raises(DecodeError):
                parse_composite_request(wire[:cut])
        else:  # a cut between fields is a valid shorter message
            assert parse_composite_request(wire[:cut]).model_id == reference.model_id
