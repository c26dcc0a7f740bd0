"""Streaming over gRPC, transports of stream sessions: MonolithicService.StreamAudio
(bidirectional, the WebSocket's semantics and limits for gRPC-native clients) and the seed's
InferenceService.ProcessAudio (a whole utterance in one request)."""
from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import grpc

from pipeline.config import Config
from pipeline.frontend.capacity import Refused
from pipeline.frontend.security import bearer
from pipeline.frontend.streaming.audio import AudioFormat, StreamError
from pipeline.frontend.streaming.events import Event, FrameReady, Session, SessionEnds
from pipeline.frontend.streaming.render import cancel_and_wait
from pipeline.frontend.streaming.sessions import RateLimit, Sessions, SessionSpec, control
from pipeline.frontend.wire import MalformedMessage
from pipeline.protocol import Error, encode_status
from pipeline.rpc import inference_pb2 as ipb
from pipeline.rpc import inference_pb2_grpc as ipb_grpc
from pipeline.rpc import monolithic_pb2 as pb
from pipeline.synctalk import FRAME_US, SAMPLE_RATE, VIDEO_FPS

log = logging.getLogger(__name__)

OUTBOX = 64            # responses buffered per stream before the session waits for the client
YIELD_EVERY = 64       # ProcessAudio: chunks fed between two yields to the event loop
SHUTTING_DOWN = "server shutting down"
CONTROLS = {pb.STREAM_CONTROL_FLUSH: "flush", pb.STREAM_CONTROL_CANCEL: "cancel",
            pb.STREAM_CONTROL_INTERRUPT: "interrupt"}


def peer_address(context: grpc.aio.ServicerContext) -> str:
    """The client's IP address from gRPC's peer string ("ipv4:1.2.3.4:5", "ipv6:[::1]:5")."""
    peer = context.peer() or "?"
    kind, _, rest = peer.partition(":")
    if kind == "ipv6" and rest.startswith("["):
        return rest[1:rest.find("]")]
    return rest.rpartition(":")[0] if kind == "ipv4" else peer


def peer_token(context: grpc.aio.ServicerContext) -> str | None:
    for key, value in context.invocation_metadata() or ():
        if key == "authorization":
            return bearer(value)
    return None


class _Ending:
    """Put into a stream's outbox: the call ends (with UNAVAILABLE when draining)."""

    def __init__(self, draining: bool = False) -> None:
        self.draining = draining


class _Outbox:
    """A StreamAudio call's responses, the session's events put in with the send timeout."""

    def __init__(self, timeout: float) -> None:
        self.queue: asyncio.Queue[object] = asyncio.Queue(OUTBOX)
        self.timeout = timeout

    async def __call__(self, event: Event) -> None:
        if isinstance(event, SessionEnds):
            self.end(event.reason)
            return
        if isinstance(event, FrameReady):
            live = event.due_epoch_us is not None
            item = pb.StreamAudioResponse(frame=pb.StreamFrame(
                frame_index=event.index, pts_us=event.index * FRAME_US, jpeg=event.jpeg,
                speech=event.speech if live else False, due_epoch_us=event.due_epoch_us or 0))
        else:
            item = pb.StreamAudioResponse(status_json=encode_status(event))
        try:
            async with asyncio.timeout(self.timeout):
                await self.queue.put(item)
        except TimeoutError:
            raise StreamError(f"client did not take frames for {self.timeout:.0f} s") from None

    def end(self, reason: str | None = None, draining: bool = False) -> None:
        """Say `reason` as an error and end the call, at once (the client may be reading
        nothing: then its send timeout has ended the call already)."""
        try:
            if reason is not None:
                self.queue.put_nowait(pb.StreamAudioResponse(
                    status_json=encode_status(Error(reason))))
            self.queue.put_nowait(_Ending(draining))
        except asyncio.QueueFull:
            pass


@dataclass(eq=False)
class _ActiveStream:
    session: Session
    outbox: _Outbox
    reader: asyncio.Task[None] | None = None

    async def end(self, grace: float) -> None:
        """Stop taking audio, finish the batch being rendered (up to `grace`), then end
        the call once the frames rendered are sent."""
        if self.reader is not None:
            await cancel_and_wait(self.reader)
        await self.session.finish_batch(grace)
        self.outbox.end(draining=True)


class StreamRpc:
    def __init__(self, cfg: Config, sessions: Sessions) -> None:
        self.cfg = cfg
        self.sessions = sessions
        self.settings = cfg.streaming
        self.active: set[_ActiveStream] = set()

    async def drain(self, grace: float) -> None:
        """SIGTERM: each StreamAudio call finishes the batch it is rendering (up to
        `grace`), sends what it rendered, and ends with UNAVAILABLE "server shutting down"
        (a clean end a client can retry elsewhere, instead of a cancellation at the end of
        the grace period)."""
        await asyncio.gather(*(s.end(grace) for s in list(self.active)))

    async def stream_audio(self, requests: AsyncIterator[pb.StreamAudioRequest],
                           context: grpc.aio.ServicerContext) -> AsyncIterator[pb.StreamAudioResponse]:
        outbox = _Outbox(self.settings.send_timeout_s)
        incoming = aiter(requests)
        try:
            async with asyncio.timeout(self.settings.idle_timeout_s):
                first = await anext(incoming, None)
        except TimeoutError:
            yield pb.StreamAudioResponse(status_json=encode_status(Error(self._idle())))
            return
        config = first.config if first is not None and first.HasField("config") else pb.StreamConfig()
        try:
            if config.mode not in ("", "audio", "live"):
                raise StreamError(f"unknown mode {config.mode!r}: audio or live")
            spec = SessionSpec("grpc stream", config.client_id,
                               config.model_id or self.cfg.default_model,
                               AudioFormat(config.format or "s16le", config.sample_rate or SAMPLE_RATE),
                               config.mode == "live", peer_address(context), peer_token(context))
            if spec.model_id not in self.cfg.models:
                raise StreamError(f"Model '{spec.model_id}' not found in configuration")
        except StreamError as exc:
            yield pb.StreamAudioResponse(status_json=encode_status(Error(str(exc))))
            return

        async def end(code: int, reason: str) -> None:
            outbox.end(reason)

        refused: str | None = None
        draining = False
        try:
            async with self.sessions.open(spec, outbox, end) as session:
                active = _ActiveStream(session, outbox)
                self.active.add(active)
                pending = [first] if first is not None and not first.HasField("config") else []
                active.reader = asyncio.create_task(self._read(session, pending, incoming, outbox))
                try:
                    async for item in self._responses(outbox):
                        yield item
                finally:
                    self.active.discard(active)
                    await cancel_and_wait(active.reader)
        except Refused as exc:
            log.warning("refused a %sstream from %s: %s", "live " if spec.live else "",
                        spec.address, exc)
            refused = str(exc)
        except _Draining:
            draining = True
        except StreamError as exc:  # it could not start
            yield pb.StreamAudioResponse(status_json=encode_status(Error(str(exc))))
            return
        if refused is not None:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, refused)
        if draining:
            await context.abort(grpc.StatusCode.UNAVAILABLE, SHUTTING_DOWN)

    async def _responses(self, outbox: _Outbox) -> AsyncIterator[pb.StreamAudioResponse]:
        """The outbox's responses until the call ends; raises what ends it otherwise."""
        while True:
            item = await outbox.queue.get()
            if isinstance(item, MalformedMessage):
                raise item  # answered INVALID_ARGUMENT by the handler's wrapper
            if isinstance(item, _Ending):
                if item.draining:
                    while not outbox.queue.empty():  # what was rendered before the drain
                        rest = outbox.queue.get_nowait()
                        if isinstance(rest, pb.StreamAudioResponse):
                            yield rest
                    raise _Draining()
                return
            assert isinstance(item, pb.StreamAudioResponse)
            yield item

    async def _read(self, session: Session, pending: list[pb.StreamAudioRequest],
                    incoming: AsyncIterator[pb.StreamAudioRequest], outbox: _Outbox) -> None:
        """The client's messages into the session, with the WebSocket's limits: the idle
        timeout and the message rate."""
        limit = RateLimit(self.settings.rate_limit_messages_per_s)
        try:
            while True:
                if pending:
                    r = pending.pop()
                else:
                    try:
                        async with asyncio.timeout(self.settings.idle_timeout_s):
                            r = await anext(incoming)
                    except StopAsyncIteration:
                        break
                    except TimeoutError:
                        log.info("client %s idle for %.0f s: closing", session.client_id,
                                 self.settings.idle_timeout_s)
                        outbox.end(self._idle())
                        return
                if not limit.take():
                    outbox.end("rate limit exceeded")
                    return
                kind = r.WhichOneof("message")
                if kind == "audio":
                    await session.feed(r.audio)
                elif kind == "control" and r.control in CONTROLS:
                    await control(session, CONTROLS[r.control], outbox)
                elif kind == "config":
                    raise StreamError("config is only accepted as the first message")
            await session.flush()  # the client half-closed: render what it sent
            await session.wait_flushed()
            outbox.end()
        except StreamError as exc:
            outbox.end(str(exc) if session.error is None else None)
        except MalformedMessage as exc:
            await outbox.queue.put(exc)

    def _idle(self) -> str:
        return f"idle for {self.settings.idle_timeout_s:g} s: closing"


class _Draining(Exception):
    """A drain ended the call: UNAVAILABLE "server shutting down"."""


class InferenceService(ipb_grpc.InferenceServiceServicer):
    """The seed's ProcessAudio: a whole utterance (s16le 16 kHz chunks) in, frames out."""

    def __init__(self, cfg: Config, sessions: Sessions) -> None:
        self.cfg = cfg
        self.sessions = sessions

    async def ProcessAudio(self, request: ipb.AudioRequest,
                           context: grpc.aio.ServicerContext) -> ipb.AudioResponse:
        t0 = time.perf_counter()
        client_id = request.client_id
        if not request.audio_chunks:
            return ipb.AudioResponse(client_id=client_id, status_code=400,
                                     message="audio_chunks is empty", result=json.dumps({"frames": 0}))
        frames: list[bytes] = []

        async def collect(event: Event) -> None:
            if isinstance(event, FrameReady):
                frames.append(event.jpeg)

        async def end(code: int, reason: str) -> None:
            pass  # the call ends when its utterance is rendered

        spec = SessionSpec("process audio", client_id, self.cfg.default_model, AudioFormat(),
                           False, peer_address(context), peer_token(context))
        try:
            async with self.sessions.open(spec, collect, end) as session:
                for i, chunk in enumerate(request.audio_chunks):
                    await session.feed(chunk)
                    if i % YIELD_EVERY == YIELD_EVERY - 1:
                        await asyncio.sleep(0)  # a message of many chunks stalls no one
                await session.flush()
                await session.wait_flushed()
                client_id = session.client_id
        except Refused as exc:
            return ipb.AudioResponse(client_id=client_id, status_code=503, message=str(exc),
                                     result=json.dumps({"frames": 0}))
        except StreamError as exc:
            return ipb.AudioResponse(client_id=client_id, status_code=503, message=str(exc),
                                     result=json.dumps({"frames": 0}))
        summary = {"client_id": client_id, "model": spec.model_id,
                   "chunks": len(request.audio_chunks),
                   "audio_seconds": round(sum(map(len, request.audio_chunks)) // 2 / SAMPLE_RATE, 3),
                   "frames": len(frames), "fps": VIDEO_FPS,
                   "processing_ms": round((time.perf_counter() - t0) * 1e3, 1)}
        return ipb.AudioResponse(client_id=client_id, result=json.dumps(summary),
                                 status_code=200, message="ok", frames=frames)
