"""The live audio socket `ws://host:8080/audio` (docs/streaming.md): a transport of stream
sessions.

`GET /demo` serves the browser demo page (`demo.py`). Handshake checks of `/audio` (before
the upgrade): path (404), upgrade (400), browser Origin against the allowlist (403), token
(401), the client caps (503), model and audio format (404 / 400); a plain GET of `/audio` is
answered with the reason such a handshake would be refused (a browser cannot read the status
of a refused WebSocket handshake; the demo page asks this way). Then binary messages are
audio, text messages JSON controls; frames go back as binary messages (a 16-byte header + the
JPEG), status and errors as JSON text messages.
"""
from __future__ import annotations

import asyncio
import logging
import socket
import ssl
from urllib.parse import parse_qs, urlsplit

from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

from pipeline.config import Config, parse_origin
from pipeline.frontend.capacity import Refused
from pipeline.frontend.security import TokenStore, bearer
from pipeline.frontend.streaming.audio import AudioFormat, StreamError
from pipeline.frontend.streaming.demo import DEMO_PATH, demo_page, demo_response
from pipeline.frontend.streaming.events import Event, FrameReady, Session, SessionEnds
from pipeline.frontend.streaming.session import escape
from pipeline.frontend.streaming.sessions import RateLimit, Sessions, SessionSpec, control
from pipeline.protocol import Error, encode_status, frame_message, live_frame_message
from pipeline.protocol import control_kind as parse_control
from pipeline.synctalk import FRAME_US, SAMPLE_RATE

log = logging.getLogger(__name__)

CLOSE_REASON_BYTES = 123  # RFC 6455: a close frame's reason


def _address(connection: ServerConnection) -> str:
    """The client's IP address (the balancer's, behind one)."""
    peer = connection.remote_address
    return str(peer[0]) if peer else "?"


def close_reason(text: str) -> str:
    """`text` cut to what a close frame can carry (whole UTF-8 characters)."""
    return text.encode()[:CLOSE_REASON_BYTES].decode(errors="ignore")


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


class AudioSocketServer:
    def __init__(self, cfg: Config, tokens: TokenStore, sessions: Sessions) -> None:
        self.cfg = cfg
        self.tokens = tokens
        self.sessions = sessions
        self.settings = cfg.streaming
        self.connections: dict[ServerConnection, Session] = {}
        self.server: Server | None = None
        demo_page()  # read once, now: a broken install stops the start, not a request

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
        await asyncio.gather(*(s.finish_batch(grace) for s in list(self.connections.values())))
        await asyncio.gather(*(ws.close(1001, "server shutting down")
                               for ws in list(self.connections)), return_exceptions=True)
        await self.server.wait_closed()
        self.server = None

    # ---- handshake -------------------------------------------------------------------

    def _check_handshake(self, connection: ServerConnection, request: Request) -> Response | None:
        url = urlsplit(request.path)
        if url.path == DEMO_PATH:  # the browser demo: a static page; its WebSocket is checked
            return demo_response(connection)
        if url.path != "/audio":
            return connection.respond(404, "Not Found\n")
        refusal = self._refusal(connection, request)
        if refusal is not None:
            status, reason = refusal
            response = connection.respond(status, reason + "\n")
            if status == 401:
                response.headers["WWW-Authenticate"] = "Bearer"
            return response
        if "websocket" not in request.headers.get("Upgrade", "").lower():
            return connection.respond(400, "Bad Request: /audio takes a WebSocket upgrade\n")
        return None

    def _refusal(self, connection: ServerConnection, request: Request) -> tuple[int, str] | None:
        """Why this request for /audio would be refused: (HTTP status, reason), or None."""
        origin = request.headers.get("Origin")
        if origin is not None and not origin_allowed(origin, self.settings.allowed_origins):
            log.warning("refused a connection from origin %s", escape(origin))
            return 403, "Forbidden: origin not allowed"
        query = _query(request)
        if not self.tokens.accepts(_token(request, query)):
            log.warning("refused a connection from %s: no valid token", _address(connection))
            return 401, ("Unauthorized: a valid token is required (Authorization: Bearer "
                         "<token>, or ?token=)")
        caps = self.sessions.check(_address(connection))
        if caps is not None:
            log.warning("refused a connection from %s: %s", _address(connection), caps)
            return 503, f"Service Unavailable: {caps}"
        model = _model(request, query, self.cfg)
        if model not in self.cfg.models:
            return 404, f"Not Found: model '{escape(model)}' is not configured"
        try:
            _format(query)
        except (StreamError, ValueError) as exc:
            return 400, f"Bad Request: {exc}"
        if query.get("mode", "audio") not in ("audio", "live"):
            return 400, "Bad Request: mode must be audio or live"
        return None

    # ---- a session -------------------------------------------------------------------

    async def _handle(self, ws: ServerConnection) -> None:
        request = ws.request
        assert request is not None
        query = _query(request)
        live = query.get("mode") == "live"
        spec = SessionSpec("websocket", request.headers.get("X-Client-ID", ""),
                           _model(request, query, self.cfg), _format(query), live,
                           _address(ws), _token(request, query))
        sink = _Sink(ws, self.settings.send_timeout_s)

        async def end(code: int, reason: str) -> None:
            await sink(SessionEnds(code, reason))

        try:
            async with self.sessions.open(spec, sink, end) as session:
                self.connections[ws] = session
                try:
                    await self._serve(ws, session, sink)
                except StreamError as exc:
                    log.error("audio read error: client=%s: %s", session.client_id, exc)
                    if session.error is None:  # else the session has reported it already
                        await _quietly(sink(Error(str(exc))))
                    await ws.close(1011, close_reason(str(exc)))
                finally:
                    self.connections.pop(ws, None)
        except Refused as exc:
            log.warning("refused a %ssession from %s: %s", "live " if live else "", spec.address, exc)
            await _quietly(sink(Error(str(exc))))
            await ws.close(1013, close_reason(str(exc)))
        except StreamError as exc:  # it could not start
            log.error("session of client %s failed to start: %s", escape(spec.client_id), exc)
            await _quietly(sink(SessionEnds(1011, str(exc))))
        except ConnectionClosed:
            pass

    async def _serve(self, ws: ServerConnection, session: Session, sink: _Sink) -> None:
        limit = RateLimit(self.settings.rate_limit_messages_per_s)
        while True:
            try:
                async with asyncio.timeout(self.settings.idle_timeout_s):
                    message = await ws.recv()
            except TimeoutError:  # a connection that says nothing holds a slot for nothing
                log.info("client %s idle for %.0f s: closing", session.client_id,
                         self.settings.idle_timeout_s)
                await ws.close(1000, "idle")
                return
            if not limit.take():
                await sink(SessionEnds(1008, "rate limit exceeded"))
                return
            if isinstance(message, bytes):
                await session.feed(message)
            elif (kind := parse_control(message)) is not None:
                await control(session, kind, sink)
            else:
                await sink(Error("unknown message: expected a type flush, cancel, interrupt "
                                 "or ping"))


class _Sink:
    """A session's events as WebSocket messages, each sent within the send timeout (a
    client that does not take one is closed, not buffered without bound)."""

    def __init__(self, ws: ServerConnection, timeout: float) -> None:
        self.ws = ws
        self.timeout = timeout

    async def __call__(self, event: Event) -> None:
        if isinstance(event, FrameReady):
            message: bytes | str = (
                frame_message(event.index, event.index * FRAME_US, event.jpeg)
                if event.due_epoch_us is None else
                live_frame_message(event.index, event.speech, event.due_epoch_us, event.jpeg))
        elif isinstance(event, SessionEnds):
            await _quietly(self._send(encode_status(Error(event.reason))))
            await self.ws.close(event.code, close_reason(event.reason))
            return
        else:
            message = encode_status(event)
        await self._send(message)

    async def _send(self, message: bytes | str) -> None:
        try:
            async with asyncio.timeout(self.timeout):
                await self.ws.send(message)
        except TimeoutError:
            self.ws.transport.abort()
            raise StreamError(f"client did not take a message for {self.timeout:.0f} s") from None
        except ConnectionClosed:
            raise StreamError("connection closed") from None


async def _quietly(sending: object) -> None:
    try:
        await sending  # type: ignore[misc]
    except (StreamError, ConnectionClosed):
        pass


def _query(request: Request) -> dict[str, str]:
    return {k: v[-1] for k, v in parse_qs(urlsplit(request.path).query).items()}


def _token(request: Request, query: dict[str, str]) -> str | None:
    return bearer(request.headers.get("Authorization")) or query.get("token")


def _model(request: Request, query: dict[str, str], cfg: Config) -> str:
    return query.get("model") or request.headers.get("X-Model-ID") or cfg.default_model


def _format(query: dict[str, str]) -> AudioFormat:
    return AudioFormat(query.get("format", "s16le"), int(query.get("rate", SAMPLE_RATE)))
