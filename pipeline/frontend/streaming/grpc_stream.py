"""Streaming over gRPC: MonolithicService.StreamAudio (bidirectional, the WebSocket's
semantics for gRPC-native clients) and the seed's InferenceService.ProcessAudio."""
from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import grpc

from pipeline.config import Config
from pipeline.frontend.capacity import FrameBudget
from pipeline.frontend.router import Router
from pipeline.frontend.streaming.live import IdleFrames, LiveSession
from pipeline.frontend.streaming.session import (
    AudioFormat,
    StreamError,
    StreamSession,
    cancel_and_wait,
)
from pipeline.frontend.wire import MalformedMessage
from pipeline.rpc import inference_pb2 as ipb
from pipeline.rpc import inference_pb2_grpc as ipb_grpc
from pipeline.rpc import monolithic_pb2 as pb
from pipeline.synctalk import FRAME_US

log = logging.getLogger(__name__)

OUTBOX = 64  # responses buffered per stream before the producer waits for the client
SHUTTING_DOWN = "server shutting down"


class _Ending:
    """Put into a stream's outbox by a drain: the stream ends with UNAVAILABLE."""


@dataclass(eq=False)
class _ActiveStream:
    session: StreamSession | LiveSession
    outbox: asyncio.Queue
    reader: asyncio.Task[None] | None = None
    ending: bool = False

    async def end(self, grace: float) -> None:
        """Stop taking audio, finish the batch being rendered (up to `grace`), then end
        the call once the frames rendered are sent."""
        self.ending = True
        if self.reader is not None:
            await cancel_and_wait(self.reader)
        await self.session.finish_batch(grace)
        await self.session.close()
        if not self.outbox.full():
            self.outbox.put_nowait(_Ending())


class StreamRpc:
    def __init__(self, cfg: Config, router: Router, idle: IdleFrames,
                 budget: FrameBudget) -> None:
        self.cfg = cfg
        self.router = router
        self.idle = idle
        self.budget = budget
        self.settings = cfg.streaming
        self.active: set[_ActiveStream] = set()

    async def drain(self, grace: float) -> None:
        """SIGTERM: each StreamAudio call finishes the batch it is rendering (up to
        `grace`), sends what it rendered, and ends with UNAVAILABLE "server shutting down"
        (a clean end a client can retry elsewhere, instead of a cancellation at the end of
        the grace period)."""
        await asyncio.gather(*(s.end(grace) for s in list(self.active)))

    def session(self, client_id: str, model_id: str, fmt: AudioFormat, outbox: asyncio.Queue,
                live: bool = False) -> StreamSession | LiveSession:
        timeout = self.settings.send_timeout_s

        async def put(item: object) -> None:
            try:
                async with asyncio.timeout(timeout):
                    await outbox.put(item)
            except TimeoutError:
                raise StreamError(f"client did not take frames for {timeout:.0f} s") from None

        async def send_frame(index: int, pts_us: int, jpeg: bytes) -> None:
            await put(pb.StreamAudioResponse(frame=pb.StreamFrame(
                frame_index=index, pts_us=pts_us, jpeg=jpeg)))

        async def send_status(status: dict) -> None:
            await put(pb.StreamAudioResponse(status_json=json.dumps(status)))

        async def send_live_frame(index: int, speech: bool, due_us: int, jpeg: bytes) -> None:
            await put(pb.StreamAudioResponse(frame=pb.StreamFrame(
                frame_index=index, pts_us=index * FRAME_US, jpeg=jpeg, speech=speech,
                due_epoch_us=due_us)))

        async def end(code: int, reason: str) -> None:
            try:
                outbox.put_nowait(pb.StreamAudioResponse(status_json=json.dumps(
                    {"type": "error", "message": reason})))
                outbox.put_nowait(None)
            except asyncio.QueueFull:
                pass  # the client stopped reading: its send timeout ends the call

        if live:
            return LiveSession(self.cfg, self.router, self.idle, self.budget, client_id, model_id,
                               fmt, send_live_frame, send_status, end)
        return StreamSession(self.cfg, self.router, client_id, model_id, fmt, send_frame,
                             send_status, self.settings.flush_timeout_s)

    async def stream_audio(self, requests: AsyncIterator[pb.StreamAudioRequest],
                           context: grpc.aio.ServicerContext) -> AsyncIterator[pb.StreamAudioResponse]:
        outbox: asyncio.Queue = asyncio.Queue(OUTBOX)
        first = await anext(aiter(requests), None)
        config = first.config if first is not None and first.HasField("config") else pb.StreamConfig()
        live = config.mode == "live"
        try:
            if config.mode not in ("", "audio", "live"):
                raise StreamError(f"unknown mode {config.mode!r}: audio or live")
            fmt = AudioFormat(config.format or "s16le", config.sample_rate or 16000)
            session = self.session(config.client_id, config.model_id or self.cfg.default_model,
                                   fmt, outbox, live)
        except StreamError as exc:
            yield pb.StreamAudioResponse(status_json=json.dumps({"type": "error", "message": str(exc)}))
            return
        if live and (refused := self.budget.admit_live()) is not None:
            log.warning("refused a live stream: %s", refused)
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, refused)
        log.info("client %s connected (grpc stream, model %s)", session.client_id, session.model_id)
        active = _ActiveStream(session, outbox)
        self.active.add(active)
        await outbox.put(pb.StreamAudioResponse(status_json=json.dumps(
            {**self.ready_status(session), **({"mode": "live"} if live else {})})))
        try:
            await session.start()
        except StreamError as exc:
            self.active.discard(active)
            await session.close()
            yield pb.StreamAudioResponse(status_json=json.dumps({"type": "error", "message": str(exc)}))
            return

        async def read() -> None:
            async def all_requests() -> AsyncIterator[pb.StreamAudioRequest]:
                if first is not None and not first.HasField("config"):
                    yield first
                async for r in requests:
                    yield r
            try:
                async for r in all_requests():
                    kind = r.WhichOneof("message")
                    if kind == "audio":
                        await session.feed(r.audio)
                    elif kind == "control" and r.control == pb.STREAM_CONTROL_FLUSH:
                        await session.flush()
                    elif kind == "control" and r.control == pb.STREAM_CONTROL_CANCEL:
                        await session.cancel()  # live: an interrupt
                    elif kind == "control" and r.control == pb.STREAM_CONTROL_INTERRUPT:
                        await session.interrupt()
                    elif kind == "config":
                        raise StreamError("config is only accepted as the first message")
                await session.flush()  # the client half-closed: render what it sent
                await session.wait_flushed()
            except StreamError as exc:
                await outbox.put(pb.StreamAudioResponse(
                    status_json=json.dumps({"type": "error", "message": str(exc)})))
            except MalformedMessage as exc:  # answered INVALID_ARGUMENT by the handler's wrapper
                await outbox.put(exc)
                return
            await outbox.put(None)

        reader = active.reader = asyncio.create_task(read())
        try:
            while (item := await outbox.get()) is not None:
                if isinstance(item, MalformedMessage):
                    raise item
                if isinstance(item, _Ending):
                    break
                yield item
                if active.ending and outbox.empty():
                    break
            if active.ending:
                await context.abort(grpc.StatusCode.UNAVAILABLE, SHUTTING_DOWN)
        finally:
            self.active.discard(active)
            await cancel_and_wait(reader)
            await session.close()
            log.info("client %s disconnected (grpc stream, %d frames)", session.client_id,
                     session.frames_sent)

    def ready_status(self, session: StreamSession | LiveSession) -> dict:
        return {"type": "ready", "client_id": session.client_id, "model": session.model_id,
                "fps": 25, "sample_rate": session.decoder.fmt.sample_rate,
                "format": session.decoder.fmt.encoding}


class InferenceService(ipb_grpc.InferenceServiceServicer):
    """The seed's ProcessAudio: a whole utterance (s16le 16 kHz chunks) in, frames out."""

    def __init__(self, streams: StreamRpc) -> None:
        self.streams = streams

    async def ProcessAudio(self, request: ipb.AudioRequest,
                           context: grpc.aio.ServicerContext) -> ipb.AudioResponse:
        t0 = time.perf_counter()
        frames: list[bytes] = []
        outbox: asyncio.Queue = asyncio.Queue()
        client_id = request.client_id
        if not request.audio_chunks:
            return ipb.AudioResponse(client_id=client_id, status_code=400,
                                     message="audio_chunks is empty", result=json.dumps({"frames": 0}))
        try:
            session = self.streams.session(client_id, self.streams.cfg.default_model,
                                           AudioFormat(), outbox)
        except StreamError as exc:
            return ipb.AudioResponse(client_id=client_id, status_code=400, message=str(exc),
                                     result=json.dumps({"frames": 0}))
        assert isinstance(session, StreamSession)  # ProcessAudio: never live
        await session.start()
        try:
            for chunk in request.audio_chunks:
                await session.feed(chunk)
            await session.flush()
            await session.wait_flushed()
        except StreamError as exc:
            return ipb.AudioResponse(client_id=session.client_id, status_code=503,
                                     message=str(exc), result=json.dumps({"frames": 0}))
        finally:
            await session.close()
        while not outbox.empty():
            item = outbox.get_nowait()
            if item.WhichOneof("message") == "frame":
                frames.append(item.frame.jpeg)
        seconds = session.received / 16000
        summary = {"client_id": session.client_id, "model": session.model_id,
                   "chunks": len(request.audio_chunks), "audio_seconds": round(seconds, 3),
                   "frames": len(frames), "fps": 25,
                   "processing_ms": round((time.perf_counter() - t0) * 1e3, 1)}
        return ipb.AudioResponse(client_id=session.client_id, result=json.dumps(summary),
                                 status_code=200, message="ok", frames=frames)
