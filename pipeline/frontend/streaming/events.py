"""What a stream session is to its transport: the `Session` protocol it calls, and the events
the session sends out through one `EventSink`.

A session knows nothing of sockets. The transport (WebSocket, StreamAudio, ProcessAudio)
feeds it audio and controls and turns each event into its own message: a `FrameReady` into
a binary frame message (or a `StreamFrame`), a status (`pipeline.protocol`: flushed,
interrupted, speech_start, ...) into its JSON, `SessionEnds` into the end of the connection.
The sink raises StreamError when the client cannot take the event (gone, or too slow).
"""
from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol

from pipeline.protocol import Status


@dataclass(frozen=True, slots=True)
class FrameReady:
    """Frame `index` of the stream. A live frame has the wall-clock time it is due and says
    whether it shows speech; a frame of the audio mode has neither (due_epoch_us None)."""

    index: int
    jpeg: bytes
    speech: bool = True
    due_epoch_us: int | None = None


@dataclass(frozen=True, slots=True)
class SessionEnds:
    """The session ends itself (a live session below real time, say): the transport sends
    `reason` as an error and closes with `code` (a WebSocket close code)."""

    code: int
    reason: str


Event = FrameReady | Status | SessionEnds
EventSink = Callable[[Event], Awaitable[None]]


class Session(Protocol):
    """One client's stream, audio mode or live; the transport drives it through these only."""

    client_id: str
    model_id: str

    async def start(self) -> None:
        """Begin (a live session's video starts now). Raises StreamError."""

    async def feed(self, data: bytes) -> None:
        """Audio bytes in the session's format, any size. Raises StreamError."""

    async def flush(self) -> None:
        """The audio so far ends an utterance: render all of it ("flushed")."""

    async def wait_flushed(self) -> None:
        """Until a flush has been rendered and sent (or the session failed)."""

    async def cancel(self) -> None:
        """Drop queued audio and unsent frames (live: the same as interrupt)."""

    async def interrupt(self) -> None:
        """Barge-in: drop what is queued at once, answered by "interrupted"."""

    async def finish_batch(self, timeout: float) -> None:
        """A drain: start no new render, wait up to `timeout` for the one under way."""

    async def close(self) -> None:
        """Stop everything the session runs (idempotent)."""

    @property
    def error(self) -> str | None:
        """Why the session failed (None while it is well)."""

    @property
    def frames_sent(self) -> int: ...
