"""What crosses a wire or the request arena, in one place: the frame messages of the streaming
endpoints (a binary header, then the JPEG), the JSON status messages a stream sends and the
controls it takes (docs/streaming.md), and the layout of one request in the frontend's
shared-memory arena. The server, the client library and the bench all import this module;
the server never imports the client library.
"""
from __future__ import annotations

import json
import struct
from dataclasses import dataclass

import msgspec

from pipeline.messages import TensorRef
from pipeline.synctalk import FRAME_US, PREDICTION_BYTES, PREDICTION_SHAPE, VISUAL_BYTES, VISUAL_SHAPE

# ---- frame messages ------------------------------------------------------------------------
# Frames for the audio received (audio mode): magic, index, media time (us).
FRAME_HEADER = struct.Struct("<4sIQ")
FRAME_MAGIC = b"LSF0"
# Live mode: magic, index, flags (bit 0: a speech frame), 3 pad bytes, media time (us),
# the wall-clock time the frame is due (Unix epoch, us).
LIVE_FRAME_HEADER = struct.Struct("<4sIB3xQQ")
LIVE_FRAME_MAGIC = b"LSF1"
SPEECH = 1


@dataclass(frozen=True)
class FrameMessage:
    """One frame of a stream, from either header (an audio-mode frame is always speech and
    has no due time: due_epoch_us 0)."""

    index: int
    pts_us: int
    speech: bool
    due_epoch_us: int
    jpeg: bytes


def frame_message(index: int, pts_us: int, jpeg: bytes) -> bytes:
    return FRAME_HEADER.pack(FRAME_MAGIC, index, pts_us) + jpeg


def live_frame_message(index: int, speech: bool, due_epoch_us: int, jpeg: bytes) -> bytes:
    return LIVE_FRAME_HEADER.pack(LIVE_FRAME_MAGIC, index, SPEECH if speech else 0,
                                  index * FRAME_US, due_epoch_us) + jpeg


def parse_frame_message(data: bytes) -> FrameMessage:
    """The frame in a binary message of either mode (ValueError if it is not one)."""
    magic = bytes(data[:4])
    if magic == FRAME_MAGIC and len(data) >= FRAME_HEADER.size:
        _, index, pts_us = FRAME_HEADER.unpack_from(data)
        return FrameMessage(index, pts_us, True, 0, bytes(data[FRAME_HEADER.size:]))
    if magic == LIVE_FRAME_MAGIC and len(data) >= LIVE_FRAME_HEADER.size:
        _, index, flags, pts_us, due = LIVE_FRAME_HEADER.unpack_from(data)
        return FrameMessage(index, pts_us, bool(flags & SPEECH), due,
                            bytes(data[LIVE_FRAME_HEADER.size:]))
    raise ValueError("not a frame message")


# ---- status messages (server -> client, JSON text) ---------------------------------------------


class Status(msgspec.Struct, frozen=True, tag_field="type", omit_defaults=True):
    """A stream's JSON status message: {"type": <tag>, ...fields}."""


class Ready(Status, frozen=True, tag="ready"):
    client_id: str
    model: str
    fps: int
    sample_rate: int
    format: str
    mode: str = ""               # "live" for a live session (omitted otherwise)


class Flushed(Status, frozen=True, tag="flushed"):
    frames: int                  # every frame of the audio so far has been sent


class Cancelled(Status, frozen=True, tag="cancelled"):
    dropped_frames: int


class Interrupted(Status, frozen=True, tag="interrupted"):
    frame: int                   # the stream's frame at the interrupt
    dropped_frames: int


class SpeechStart(Status, frozen=True, tag="speech_start"):
    frame: int


class SpeechEnd(Status, frozen=True, tag="speech_end"):
    frame: int


class BelowRealTime(Status, frozen=True, tag="below_real_time"):
    late_frames: int
    window_s: float
    closing: bool


class Pong(Status, frozen=True, tag="pong"):
    pass


class Error(Status, frozen=True, tag="error"):
    message: str


StatusMessage = Ready | Flushed | Cancelled | Interrupted | SpeechStart | SpeechEnd | \
    BelowRealTime | Pong | Error
_status_decoder = msgspec.json.Decoder(StatusMessage)


def encode_status(status: Status) -> str:
    return msgspec.json.encode(status).decode()


def decode_status(text: str | bytes) -> StatusMessage:
    """A status message (msgspec.ValidationError / DecodeError if it is not one)."""
    return _status_decoder.decode(text)


# ---- controls (client -> server, JSON text) ------------------------------------------------
CONTROLS = ("flush", "cancel", "interrupt", "ping")


def control_kind(text: str) -> str | None:
    """The control a text message asks for (one of CONTROLS), or None."""
    try:
        kind = json.loads(text).get("type")
    except (ValueError, AttributeError, RecursionError):
        return None
    return kind if kind in CONTROLS else None


# ---- one request in the arena ------------------------------------------------------------------
FLOAT32 = 4


@dataclass(frozen=True)
class RequestLayout:
    """Where a request's tensors lie in one block of the request arena, in this order: the
    visual input when the client sent it, the UNet's prediction, the audio and the
    deprecated features. A visual input the worker builds from the avatar's frames takes no
    room here: the worker builds it in memory of its own (gpu_worker/inputs.py). Every
    frontend and the in-process bench lay a request out so."""

    batch: int
    audio_bytes: int = 0
    feature_bytes: int = 0
    visual: bool = False            # the client sent the visual input

    @property
    def nbytes(self) -> int:
        return sum(nbytes for _, _, nbytes in self._tensors())

    def refs(self, segment: str, offset: int) -> dict[str, TensorRef]:
        """The tensors of a block that starts at `offset` of `segment`: the output always,
        the visual, audio and features when the request carries them."""
        refs = {}
        for name, shape, nbytes in self._tensors():
            if nbytes or name == "output":
                refs[name] = TensorRef(segment, offset, shape, "float32")
            offset += nbytes
        return refs

    def _tensors(self) -> tuple[tuple[str, tuple[int, ...], int], ...]:
        b = self.batch
        return (("visual", (b, *VISUAL_SHAPE), b * VISUAL_BYTES if self.visual else 0),
                ("output", (b, *PREDICTION_SHAPE), b * PREDICTION_BYTES),
                ("audio", (self.audio_bytes // FLOAT32,), self.audio_bytes),
                ("features", (self.feature_bytes // FLOAT32,), self.feature_bytes))
