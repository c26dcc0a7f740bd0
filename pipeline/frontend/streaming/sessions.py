"""Every open stream session of every transport, opened and closed in one place.

`Sessions.open()` admits a session (a capacity ticket: the client caps, and for a live
session the frame budget), builds it (audio mode or live) and registers it; leaving the
context closes it and releases the ticket, on every ending. The transports (WebSocket,
StreamAudio, ProcessAudio) share it, with the same limits from the same settings: the client
caps, the message rate (`RateLimit`), the idle timeout, the controls (`control`).
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from pipeline.config import Config
from pipeline.frontend.capacity import Admission
from pipeline.frontend.security import TokenStore
from pipeline.frontend.streaming.audio import AudioFormat
from pipeline.frontend.streaming.events import EventSink, Session
from pipeline.frontend.streaming.live import IdleFrames, LiveSession
from pipeline.frontend.streaming.render import FrameSource
from pipeline.frontend.streaming.session import AudioSession
from pipeline.protocol import Pong, Ready
from pipeline.synctalk import VIDEO_FPS

log = logging.getLogger(__name__)

EndConnection = Callable[[int, str], Coroutine[Any, Any, None]]  # close code, reason


@dataclass(frozen=True)
class SessionSpec:
    """What a client asked for, and who it is."""

    transport: str               # "websocket" | "grpc stream" | "process audio"
    client_id: str
    model_id: str
    fmt: AudioFormat
    live: bool
    address: str                 # the client's IP address (the balancer's, behind one)
    token: str | None = None     # the bearer token it was admitted with


@dataclass(eq=False)
class OpenSession:
    spec: SessionSpec
    session: Session
    end: EndConnection           # the transport ends the connection (code, reason)


class RateLimit:
    """Token bucket: `rate` messages per second with a burst of two seconds' worth."""

    def __init__(self, rate: float) -> None:
        self.rate, self.capacity = rate, 2 * rate
        self.tokens, self.at = self.capacity, time.monotonic()

    def take(self) -> bool:
        now = time.monotonic()
        self.tokens = min(self.capacity, self.tokens + (now - self.at) * self.rate)
        self.at = now
        if self.tokens < 1:
            return False
        self.tokens -= 1
        return True


class Sessions:
    def __init__(self, cfg: Config, router: FrameSource, admission: Admission, idle: IdleFrames,
                 tokens: TokenStore) -> None:
        self.cfg = cfg
        self.router = router
        self.admission = admission
        self.idle = idle
        self.tokens = tokens
        self.settings = cfg.streaming
        self.open_sessions: set[OpenSession] = set()
        self._ending: set[asyncio.Task[None]] = set()

    def check(self, address: str) -> str | None:
        """Why a session from `address` would be refused by the client caps (None: it would
        not), before a WebSocket's upgrade; counts nothing."""
        return self.admission.check(address)

    @asynccontextmanager
    async def open(self, spec: SessionSpec, sink: EventSink,
                   end: EndConnection) -> AsyncIterator[Session]:
        """The session, admitted and started; closed and its ticket released on leaving; ended
        (1008) when a reload of the tokens revokes the one it was admitted with. Raises
        capacity.Refused (not admitted) or StreamError (bad request, failed start)."""
        with self.admission.admit(spec.address, spec.live) as ticket, \
                self.tokens.watch(spec.token, lambda: self._end(end, "token revoked")):
            session: Session
            if spec.live:
                session = LiveSession(self.cfg, self.router, self.idle, ticket, spec.client_id,
                                      spec.model_id, spec.fmt, sink)
            else:
                session = AudioSession(self.cfg, self.router, spec.client_id, spec.model_id,
                                       spec.fmt, sink, self.settings.flush_timeout_s)
            entry = OpenSession(spec, session, end)
            self.open_sessions.add(entry)
            log.info("client %s connected (%s, model %s%s)", session.client_id, spec.transport,
                     spec.model_id, ", live" if spec.live else "")
            try:
                await sink(Ready(session.client_id, spec.model_id, VIDEO_FPS, spec.fmt.sample_rate,
                                 spec.fmt.encoding, "live" if spec.live else ""))
                await session.start()
                yield session
            finally:
                self.open_sessions.discard(entry)
                await session.close()
                log.info("client %s disconnected (%s, %d frames)", session.client_id,
                         spec.transport, session.frames_sent)

    def _end(self, end: EndConnection, reason: str) -> None:
        """End a session from outside its own task (a token revoked by a reload)."""
        task = asyncio.get_running_loop().create_task(end(1008, reason))
        self._ending.add(task)
        task.add_done_callback(self._ending.discard)

    def count(self, transport: str | None = None) -> int:
        return sum(transport is None or s.spec.transport == transport for s in self.open_sessions)

    def snapshot(self) -> dict[str, int]:
        counts = {"sessions": len(self.open_sessions)}
        for entry in self.open_sessions:
            counts[entry.spec.transport] = counts.get(entry.spec.transport, 0) + 1
        return counts


CONTROLS: dict[str, Callable[[Session], Awaitable[None]]] = {
    "flush": lambda s: s.flush(),
    "cancel": lambda s: s.cancel(),
    "interrupt": lambda s: s.interrupt(),
}


async def control(session: Session, kind: str, sink: EventSink) -> None:
    """A client's control: flush, cancel (live: an interrupt), interrupt, or ping (answered
    "pong")."""
    if kind == "ping":
        await sink(Pong())
    else:
        await CONTROLS[kind](session)
