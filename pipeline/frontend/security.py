"""Who may talk to the frontend: TLS for gRPC and the WebSocket, and bearer tokens.

`server.tls` serves both ports over TLS (with `client_ca_file`, clients must present a
certificate that CA signed). `server.auth.tokens_file` holds one token per line; every RPC
but grpc.health.v1 (what balancers and orchestrators probe) then needs the metadata
`authorization: Bearer <token>`, and every WebSocket a token in its `Authorization`
header or, for browsers (which cannot set headers on a WebSocket), `?token=`. The file is
read again on SIGHUP, so tokens rotate without a restart.
"""
from __future__ import annotations

import asyncio
import hmac
import inspect
import logging
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc

from pipeline.config import ServerConfig, TlsConfig
from pipeline.runtime.process import RoleError

log = logging.getLogger(__name__)

UNAUTHENTICATED_PREFIXES = ("/grpc.health.v1.Health/",)


class SecurityError(RoleError):
    """A TLS or token file that cannot be used (the start stops, naming it)."""


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise SecurityError(f"cannot read {what} {path}: {exc.strerror}") from None


class TokenWatch:
    """One session's hold on the token it was admitted with: `on_revoked` runs once, on the
    thread that reloads the tokens (the frontend's event loop: its SIGHUP handler), when a
    reload no longer accepts that token. `close()` (or leaving the `with` block) ends the
    watch; a session closes it when it ends."""

    def __init__(self, store: TokenStore | None, token: bytes,
                 on_revoked: Callable[[], None]) -> None:
        self._store, self.token, self._on_revoked = store, token, on_revoked
        self.revoked = False

    def _revoke(self) -> None:
        self.revoked, self._store = True, None
        try:
            self._on_revoked()
        except Exception:  # one session's bad callback must not keep the others running
            log.exception("ending a session of a revoked token failed")

    def close(self) -> None:
        if self._store is not None:
            self._store._unwatch(self)
            self._store = None

    def __enter__(self) -> TokenWatch:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class TokenStore:
    """The accepted tokens, from `server.auth.tokens_file`; `enabled` False when unset.

    Sessions outlive the check that admitted them: a transport that keeps a session open
    watches its token (`watch`), and a reload that drops the token ends the session."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self._tokens: tuple[bytes, ...] = ()
        self._watches: dict[bytes, set[TokenWatch]] = {}
        if path is not None:
            self._tokens = self._load(path)
            if not self._tokens:
                log.warning("%s holds no token: every authenticated call will be refused", path)

    @property
    def enabled(self) -> bool:
        return self.path is not None

    @staticmethod
    def _load(path: Path) -> tuple[bytes, ...]:
        lines = _read(path, "server.auth.tokens_file").decode(errors="replace").splitlines()
        return tuple(line.strip().encode() for line in lines
                     if line.strip() and not line.lstrip().startswith("#"))

    def reload(self) -> None:
        """SIGHUP: read the file again, and end the sessions of every token it no longer
        holds. A file that cannot be read, or holds no token (an editor or a deploy caught
        mid-write), keeps the old tokens: an empty list would refuse everyone."""
        if self.path is None:
            return
        try:
            tokens = self._load(self.path)
        except SecurityError as exc:
            log.error("tokens not reloaded (the previous ones stay valid): %s", exc)
            return
        if not tokens:
            log.error("tokens not reloaded: %s holds no token (caught mid-write?); the previous "
                      "%d stay valid", self.path, len(self._tokens))
            return
        self._tokens = tokens
        revoked = [t for t in self._watches if t not in set(tokens)]
        ended = 0
        for token in revoked:
            for watch in self._watches.pop(token):
                watch._revoke()
                ended += 1
        log.info("reloaded %d token(s) from %s%s", len(tokens), self.path,
                 f"; ended {ended} session(s) of revoked tokens" if ended else "")

    def accepts(self, token: str | None) -> bool:
        """Whether `token` is one of the tokens (always, when auth is off). Compared in
        constant time against every token, so timing tells nothing about any of them."""
        if not self.enabled:
            return True
        given = (token or "").encode()
        found = False
        for known in self._tokens:
            found |= hmac.compare_digest(given, known)
        return bool(given) and found

    def watch(self, token: str | None, on_revoked: Callable[[], None]) -> TokenWatch:
        """Call `on_revoked()` once if a reload drops `token` (an accepted one) before the
        returned watch is closed. With auth off nothing is revoked: the watch never fires."""
        watch = TokenWatch(self if self.enabled else None, (token or "").encode(), on_revoked)
        if self.enabled:
            self._watches.setdefault(watch.token, set()).add(watch)
        return watch

    def watching(self) -> int:
        """Sessions watching a token now (open watches)."""
        return sum(len(w) for w in self._watches.values())

    def _unwatch(self, watch: TokenWatch) -> None:
        watches = self._watches.get(watch.token)
        if watches is not None:
            watches.discard(watch)
            if not watches:
                del self._watches[watch.token]


def bearer(value: str | None) -> str | None:
    """The token of an `Authorization: Bearer <token>` value."""
    if value and value[:7].lower() == "bearer ":
        return value[7:].strip()
    return None


REVOKED = "the token of this call was revoked"
REQUIRED = "a valid token is required: metadata 'authorization: Bearer <token>'"


class TokenInterceptor(grpc.aio.ServerInterceptor):
    """UNAUTHENTICATED for any RPC without an accepted bearer token (health checks aside),
    answered from the metadata alone: the request message is never read, so a refused
    call costs no parse and no buffer of its size. An accepted call ends UNAUTHENTICATED
    when a reload revokes its token."""

    def __init__(self, tokens: TokenStore) -> None:
        self.tokens = tokens

    async def intercept_service(
            self, continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
            details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None or details.method.startswith(UNAUTHENTICATED_PREFIXES):
            return handler
        metadata = dict(details.invocation_metadata or ())
        token = bearer(metadata.get("authorization"))
        if self.tokens.accepts(token):
            return _ended_on_revocation(handler, self.tokens, token)
        return _refusal(handler, details.method)


def _refusal(handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
    """A handler that answers UNAUTHENTICATED without reading the request: registered as
    request-streaming with no deserializer, so grpc.aio reads no message before it runs
    (a unary handler's request is received and parsed first, to 100 MiB)."""
    async def refuse(context: grpc.aio.ServicerContext) -> None:
        log.warning("refused %s from %s: no valid bearer token", method, context.peer())
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, REQUIRED)

    if handler.response_streaming:
        async def refuse_stream(_: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            await refuse(context)
            yield  # an async generator: grpc.aio's mark of a streaming handler
        return grpc.stream_stream_rpc_method_handler(refuse_stream)

    async def refuse_unary(_: Any, context: grpc.aio.ServicerContext) -> None:
        await refuse(context)
    return grpc.stream_unary_rpc_method_handler(refuse_unary)


def _ended_on_revocation(handler: grpc.RpcMethodHandler, tokens: TokenStore,
                         token: str | None) -> grpc.RpcMethodHandler:
    """`handler` with its behaviour ended UNAUTHENTICATED when `token` is revoked: the
    call's task is cancelled while it is inside the behaviour (never while grpc.aio writes a
    response: then the next step ends it), and the cancellation becomes the status."""
    for kind in ("unary_unary", "unary_stream", "stream_unary", "stream_stream"):
        behavior = getattr(handler, kind)
        if behavior is not None:
            return handler._replace(**{kind: _revocable(behavior, tokens, token)})
    return handler


class _Revocation:
    """The revocation of one call's token, as its task sees it."""

    def __init__(self) -> None:
        self.task = asyncio.current_task()
        self.inside = False      # the task is in the behaviour: a cancel lands there
        self.cancelled = False

    def revoke(self) -> None:
        if self.inside and self.task is not None and not self.cancelled:
            self.cancelled = True
            self.task.cancel()

    def absorb(self) -> None:
        """The cancellation we caused is over: the task may await again."""
        if self.cancelled and self.task is not None:
            self.task.uncancel()


def _revocable(behavior: Callable[..., Any], tokens: TokenStore,
               token: str | None) -> Callable[..., Any]:
    if inspect.isasyncgenfunction(behavior):
        async def stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            call = _Revocation()
            with tokens.watch(token, call.revoke) as watch:
                responses = behavior(request, context)
                try:
                    while not watch.revoked:
                        call.inside = True
                        try:
                            response = await anext(responses)
                        except StopAsyncIteration:
                            return
                        except asyncio.CancelledError:
                            if not call.cancelled:
                                raise
                            call.absorb()
                            break
                        finally:
                            call.inside = False
                        yield response
                finally:
                    await responses.aclose()
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, REVOKED)
        return stream

    async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
        call = _Revocation()
        with tokens.watch(token, call.revoke) as watch:
            call.inside = True
            try:
                result = await behavior(request, context)
            except asyncio.CancelledError:
                if not call.cancelled:
                    raise
                call.absorb()
            finally:
                call.inside = False
            if not watch.revoked:
                return result
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, REVOKED)
    return unary


def grpc_credentials(tls: TlsConfig) -> grpc.ServerCredentials:
    assert tls.cert_file is not None and tls.key_file is not None
    key = _read(tls.key_file, "server.tls.key_file")
    cert = _read(tls.cert_file, "server.tls.cert_file")
    ca = _read(tls.client_ca_file, "server.tls.client_ca_file") if tls.client_ca_file else None
    return grpc.ssl_server_credentials([(key, cert)], root_certificates=ca,
                                       require_client_auth=ca is not None)


def ssl_context(tls: TlsConfig) -> ssl.SSLContext:
    """The WebSocket's TLS context: the same certificate, key and client CA as gRPC."""
    assert tls.cert_file is not None and tls.key_file is not None
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(tls.cert_file, tls.key_file)
        if tls.client_ca_file is not None:
            context.load_verify_locations(tls.client_ca_file)
            context.verify_mode = ssl.CERT_REQUIRED
    except (OSError, ssl.SSLError) as exc:
        raise SecurityError(f"server.tls: cannot use {tls.cert_file} / {tls.key_file}: {exc}") from None
    return context


def warn_if_exposed(server: ServerConfig) -> None:
    """A listener beyond loopback without tokens lets anyone who reaches it load, unload
    and run models: say so at every start."""
    loopback = server.host in ("127.0.0.1", "localhost", "::1")
    if not loopback and server.auth.tokens_file is None:
        log.warning("listening on %s without server.auth.tokens_file%s: anyone who reaches "
                    "these ports can run and manage models (docs/deploy.md, 'Exposed')",
                    server.host, "" if server.tls.enabled else " or TLS")
