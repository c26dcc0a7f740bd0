"""The seed's live audio socket: `ws://host:8080/audio` (docs/streaming.md).

`GET /demo` serves the browser demo page (`demo.py`). Handshake checks of `/audio` (before
the upgrade): path (404), upgrade (400), browser Origin against the allowlist (403),
MAX_CLIENTS (503), model and audio format (404 / 400). Then binary messages are audio,
text messages are JSON controls ({"type": "flush"} / {"type": "cancel"}); frames go back
as binary messages (a 16-byte header + the JPEG), status and errors as JSON text messages.
"""
from __future__ import annotations

import asyncio
import json
import logging
import socket
import ssl
import time
from collections.abc import Awaitable, Callable
from urllib.parse import parse_qs, urlsplit

from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response
from websockets.protocol import State

from pipeline.client import frame_message, live_frame_message
from pipeline.config import Config, parse_origin
from pipeline.frontend.capacity import FrameBudget
from pipeline.frontend.router import Router
from pipeline.frontend.security import TokenStore, bearer
from pipeline.frontend.streaming.demo import DEMO_PATH, demo_page, demo_response
from pipeline.frontend.streaming.live import IdleFrames, LiveSession
from pipeline.frontend.streaming.session import AudioFormat, StreamError, StreamSession, escape

log = logging.getLogger(__name__)

def _address(connection: ServerConnection) -> str:
    """The client's IP address (the balancer's, behind one)."""
    peer = connection.remote_address
    return str(peer[0]) if peer else "?"


def origin_allowed(origin: str, patterns: tuple[str, ...]) -> bool:
    """Exact matching of a browser Origin (scheme, host, numeric port) against the allowed
    patterns; a pattern's port `*` stands for any explicit port and a host `*.example.com`
    for any subdomain (at a label boundary). Anything that is not a plain origin (user
    info, a path, a port that is not a number) is refused."""
    parsed = parse_origin(origin)
    if parsed is None or parsed[2] == "*" or parsed[1].startswith("*."):
        return False
    scheme, host, port = parsed
    for pattern in patterns:
        allowed = parse_origin(pattern)
        if allowed is None or allowed[0] != scheme:
            continue
        host_ok = allowed[1] == host or (allowed[1].startswith("*.")
                                         and host.endswith(allowed[1][1:]))
        port_ok = allowed[2] == port or (allowed[2] == "*" and port != "")
        if host_ok and port_ok:
            return True
    return False


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


class AudioSocketServer:
    def __init__(self, cfg: Config, router: Router, tokens: TokenStore, idle: IdleFrames,
                 budget: FrameBudget) -> None:
        self.cfg = cfg
        self.router = router
        self.tokens = tokens
        self.idle = idle
        self.budget = budget
        self.settings = cfg.streaming
        self.sessions: dict[str, tuple[StreamSession | LiveSession, ServerConnection]] = {}
        self.server: Server | None = None
        demo_page()  # read once, now: a broken install stops the start, not a request

    def session_count(self) -> int:
        return len(self.sessions)

    async def start(self, sock: socket.socket, tls: ssl.SSLContext | None) -> None:
        """Serve on `sock`, bound by the frontend before anything else started."""
        self.server = await serve(
            self._handle, sock=sock, ssl=tls,
            process_request=self._check_handshake, max_size=self.settings.max_message_bytes,
            compression=None, server_header="lipsync")
        log.info("serving WebSocket /audio on %s:%d", self.cfg.server.host, self.cfg.server.ws_port)

    async def drain(self, grace: float) -> None:
        """Stop accepting; give each session up to `grace` seconds to finish the batch it
        is rendering, then close it with 1001 (going away)."""
        if self.server is None:
            return
        self.server.close(close_connections=False)
        await asyncio.gather(*(s.finish_batch(grace) for s, _ in list(self.sessions.values())))
        await asyncio.gather(*(ws.close(1001, "server shutting down")
                               for _, ws in list(self.sessions.values())),
                             return_exceptions=True)
        await self.server.wait_closed()
        self.server = None

    # ---- handshake -------------------------------------------------------------------

    def _check_handshake(self, connection: ServerConnection, request: Request) -> Response | None:
        url = urlsplit(request.path)
        if url.path == DEMO_PATH:  # the browser demo: a static page; its WebSocket is checked
            return demo_response(connection)
        if url.path != "/audio":
            return connection.respond(404, "Not Found\n")
        if "websocket" not in request.headers.get("Upgrade", "").lower():
            return connection.respond(400, "Bad Request: /audio takes a WebSocket upgrade\n")
        origin = request.headers.get("Origin")
        if origin is not None and not origin_allowed(origin, self.settings.allowed_origins):
            log.warning("refused a connection from origin %s", escape(origin))
            return connection.respond(403, "Forbidden: origin not allowed\n")
        query = {k: v[-1] for k, v in parse_qs(url.query).items()}
        token = bearer(request.headers.get("Authorization")) or query.get("token")
        if not self.tokens.accepts(token):
            log.warning("refused a connection from %s: no valid token", _address(connection))
            response = connection.respond(401, "Unauthorized: a valid token is required "
                                               "(Authorization: Bearer <token>, or ?token=)\n")
            response.headers["WWW-Authenticate"] = "Bearer"
            return response
        # a session whose connection is closing no longer holds its slot (its handler may
        # still be finishing when its client, told it is closed, connects again)
        open_sessions = [ws for _, ws in self.sessions.values() if ws.state is State.OPEN]
        if len(open_sessions) >= self.settings.max_clients:
            return connection.respond(503, f"Service Unavailable: {self.settings.max_clients} "
                                           "clients connected (MAX_CLIENTS)\n")
        limit = self.settings.max_sessions_per_address
        address = _address(connection)
        if limit and sum(_address(ws) == address for ws in open_sessions) >= limit:
            log.warning("refused a connection from %s: %d sessions open from it", address, limit)
            return connection.respond(503, f"Service Unavailable: {limit} sessions from this "
                                           "address (streaming.max_sessions_per_address)\n")
        model = query.get("model") or request.headers.get("X-Model-ID") or self.cfg.default_model
        if model not in self.cfg.models:
            return connection.respond(404, f"Not Found: model '{model}' is not configured\n")
        try:
            AudioFormat(query.get("format", "s16le"), int(query.get("rate", 16000)))
        except (StreamError, ValueError) as exc:
            return connection.respond(400, f"Bad Request: {exc}\n")
        if query.get("mode", "audio") not in ("audio", "live"):
            return connection.respond(400, "Bad Request: mode must be audio or live\n")
        return None

    # ---- a session -------------------------------------------------------------------

    async def _handle(self, ws: ServerConnection) -> None:
        request = ws.request
        assert request is not None
        query = {k: v[-1] for k, v in parse_qs(urlsplit(request.path).query).items()}
        model = query.get("model") or request.headers.get("X-Model-ID") or self.cfg.default_model
        fmt = AudioFormat(query.get("format", "s16le"), int(query.get("rate", 16000)))
        timeout = self.settings.send_timeout_s

        async def send(message: bytes | str) -> None:
            try:
                async with asyncio.timeout(timeout):
                    await ws.send(message)
            except TimeoutError:
                # a slow consumer is closed, not buffered without bound
                ws.transport.abort()
                raise StreamError(f"client did not take a message for {timeout:.0f} s") from None
            except ConnectionClosed:
                raise StreamError("connection closed") from None

        async def send_frame(index: int, pts_us: int, jpeg: bytes) -> None:
            await send(frame_message(index, pts_us, jpeg))

        async def send_status(status: dict) -> None:
            await send(json.dumps(status))

        async def send_live_frame(index: int, speech: bool, due_us: int, jpeg: bytes) -> None:
            await send(live_frame_message(index, speech, due_us, jpeg))

        client = request.headers.get("X-Client-ID", "")
        live = query.get("mode") == "live"
        session: StreamSession | LiveSession
        if live:
            refused = self.budget.admit_live()
            if refused is not None:
                log.warning("refused a live session: %s", refused)
                await ws.close(1013, refused[:120])
                return
            async def end(code: int, reason: str) -> None:
                await ws.close(code, reason[:120])

            session = LiveSession(self.cfg, self.router, self.idle, self.budget, client, model,
                                  fmt, send_live_frame, send_status, end)
        else:
            session = StreamSession(self.cfg, self.router, client, model, fmt, send_frame,
                                    send_status, self.settings.flush_timeout_s)
        client_id = session.client_id  # sanitised: printable, at most 128 characters
        key = f"{client_id}#{id(ws)}"
        self.sessions[key] = (session, ws)
        log.info("client %s connected", client_id)
        limit = RateLimit(self.settings.rate_limit_messages_per_s)
        try:
            await send_status({"type": "ready", "client_id": client_id, "model": model,
                               "fps": 25, "sample_rate": fmt.sample_rate,
                               "format": fmt.encoding, **({"mode": "live"} if live else {})})
            await session.start()
            while True:
                try:
                    async with asyncio.timeout(self.settings.idle_timeout_s):
                        message = await ws.recv()
                except TimeoutError:  # a connection that says nothing holds a slot for nothing
                    log.info("client %s idle for %.0f s: closing", client_id,
                             self.settings.idle_timeout_s)
                    await ws.close(1000, "idle")
                    break
                if not limit.take():
                    await send_status({"type": "error", "message": "rate limit exceeded"})
                    await ws.close(1008, "rate limit exceeded")
                    break
                if isinstance(message, bytes):
                    await session.feed(message)
                else:
                    await self._control(session, message, send_status)
        except StreamError as exc:
            log.error("audio read error: client=%s: %s", client_id, exc)
            try:
                if session.error is None:  # else the session has reported it already
                    await send_status({"type": "error", "message": str(exc)})
                await ws.close(1011, str(exc)[:120])
            except (StreamError, ConnectionClosed):
                pass
        except ConnectionClosed:
            pass
        finally:
            await session.close()
            self.sessions.pop(key, None)
            log.info("client %s disconnected", client_id)

    @staticmethod
    async def _control(session: StreamSession | LiveSession, text: str,
                       send_status: Callable[[dict], Awaitable[None]]) -> None:
        try:
            kind = json.loads(text).get("type")
        except (ValueError, AttributeError, RecursionError):
            kind = None
        if kind == "flush":
            await session.flush()
        elif kind == "cancel":
            await session.interrupt() if isinstance(session, LiveSession) else await session.cancel()
        elif kind == "interrupt":
            await session.interrupt()
        elif kind == "ping":
            await send_status({"type": "pong"})
        else:
            await send_status({"type": "error", "message": "unknown message: expected a type "
                                                           "flush, cancel, interrupt or ping"})
