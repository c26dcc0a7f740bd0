"""The audio mode of a stream (the seed's `/audio` behaviour, StreamAudio, ProcessAudio): the
frames of the audio received, each sent as soon as it is rendered, on the audio clock.

A `SpeechRenderer` (render.py) walking the audio clock, whose rendered batches go straight
out as `FrameReady` events, in order.
"""
from __future__ import annotations

import uuid

from pipeline.config import Config
from pipeline.frontend.streaming.audio import AudioFormat, StreamError
from pipeline.frontend.streaming.events import EventSink, FrameReady
from pipeline.frontend.streaming.render import AudioClock, FrameSource, SpeechRenderer
from pipeline.protocol import Cancelled, Interrupted

MAX_CLIENT_ID = 128


def escape(text: str) -> str:
    """`text` with every control and non-ASCII character escaped: what a client sends
    never forges a log line."""
    return text.encode("unicode_escape").decode("ascii")


def clean_client_id(client_id: str) -> str:
    """A client's id as logged and echoed: escaped, at most MAX_CLIENT_ID characters (a
    generated UUID when it sent none)."""
    return escape(client_id)[:MAX_CLIENT_ID] if client_id else str(uuid.uuid4())


class InOrder:
    """A renderer's frames straight to the client, in order (the audio mode's FrameOut)."""

    def __init__(self, sink: EventSink) -> None:
        self.sink = sink
        self.sent = 0
        self.generation = 0  # bumped by a drop: the rest of a batch being sent is not

    async def rendered(self, first: int, jpegs: list[bytes]) -> None:
        generation = self.generation
        for i, jpeg in enumerate(jpegs):
            if generation != self.generation:  # cancelled while sending: no more
                return
            await self.sink(FrameReady(first + i, jpeg))
            self.sent += 1


class AudioSession:
    """One client's stream in the audio mode (a `Session`)."""

    def __init__(self, cfg: Config, router: FrameSource, client_id: str, model_id: str,
                 fmt: AudioFormat, sink: EventSink, flush_timeout_s: float) -> None:
        if model_id not in cfg.models:
            raise StreamError(f"Model '{model_id}' not found in configuration")
        self.client_id = clean_client_id(client_id)
        self.model_id = model_id
        self.sink = sink
        self.out = InOrder(sink)
        self.renderer = SpeechRenderer(cfg, router, self.client_id, model_id, fmt, AudioClock(),
                                       self.out, sink, flush_timeout_s)

    async def start(self) -> None:
        self.renderer.start()

    async def feed(self, data: bytes) -> None:
        self.renderer.feed(data)

    async def flush(self) -> None:
        self.renderer.flush()

    async def wait_flushed(self) -> None:
        await self.renderer.wait_flushed()

    async def cancel(self) -> None:
        await self.sink(Cancelled(self._drop()))

    async def interrupt(self) -> None:
        frame = self.renderer.next_frame
        await self.sink(Interrupted(frame, self._drop()))

    def _drop(self) -> int:
        self.out.generation += 1
        return self.renderer.drop()

    async def finish_batch(self, timeout: float) -> None:
        await self.renderer.finish_batch(timeout)

    async def close(self) -> None:
        await self.renderer.close()

    @property
    def error(self) -> str | None:
        return self.renderer.error

    @property
    def frames_sent(self) -> int:
        return self.out.sent

    @property
    def received(self) -> int:
        """Stream samples received (16 kHz)."""
        return self.renderer.received
