"""Who may talk to the frontend: TLS for gRPC and the WebSocket, and bearer tokens.

`server.tls` serves both ports over TLS (with `client_ca_file`, clients must present a
certificate that CA signed). `server.auth.tokens_file` holds one token per line; every RPC
but grpc.health.v1 (what balancers and orchestrators probe) then needs the metadata
`authorization: Bearer <token>`, and every WebSocket a token in its `Authorization`
header or, for browsers (which cannot set headers on a WebSocket), `?token=`. The file is
read again on SIGHUP, so tokens rotate without a restart.
"""
from __future__ import annotations

import hmac
import logging
import ssl
from collections.abc import Awaitable, Callable
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


class TokenStore:
    """The accepted tokens, from `server.auth.tokens_file`; `enabled` False when unset."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self._tokens: tuple[bytes, ...] = ()
        if path is not None:
            self._tokens = self._load(path)

    @property
    def enabled(self) -> bool:
        return self.path is not None

    @staticmethod
    def _load(path: Path) -> tuple[bytes, ...]:
        lines = _read(path, "server.auth.tokens_file").decode(errors="replace").splitlines()
        tokens = tuple(line.strip().encode() for line in lines
                       if line.strip() and not line.lstrip().startswith("#"))
        if not tokens:
            log.warning("%s holds no token: every authenticated call will be refused", path)
        return tokens

    def reload(self) -> None:
        """SIGHUP: read the file again; a file that cannot be read keeps the old tokens."""
        if self.path is None:
            return
        try:
            self._tokens = self._load(self.path)
        except SecurityError as exc:
            log.error("tokens not reloaded (the previous ones stay valid): %s", exc)
            return
        log.info("reloaded %d token(s) from %s", len(self._tokens), self.path)

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


def bearer(value: str | None) -> str | None:
    """The token of an `Authorization: Bearer <token>` value."""
    if value and value[:7].lower() == "bearer ":
        return value[7:].strip()
    return None


class TokenInterceptor(grpc.aio.ServerInterceptor):
    """UNAUTHENTICATED for any RPC without an accepted bearer token (health checks aside)."""

    def __init__(self, tokens: TokenStore) -> None:
        self.tokens = tokens

    async def intercept_service(
            self, continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
            details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None or details.method.startswith(UNAUTHENTICATED_PREFIXES):
            return handler
        metadata = dict(details.invocation_metadata or ())
        if self.tokens.accepts(bearer(metadata.get("authorization"))):
            return handler
        return _refusal_like(handler, details.method)


def _refusal_like(handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
    """A handler of the same kind as `handler` that answers UNAUTHENTICATED."""
    async def refuse(request: Any, context: grpc.aio.ServicerContext) -> None:
        log.warning("refused %s from %s: no valid bearer token", method, context.peer())
        await context.abort(grpc.StatusCode.UNAUTHENTICATED,
                            "a valid token is required: metadata 'authorization: Bearer <token>'")

    kinds = {(False, False): grpc.unary_unary_rpc_method_handler,
             (False, True): grpc.unary_stream_rpc_method_handler,
             (True, False): grpc.stream_unary_rpc_method_handler,
             (True, True): grpc.stream_stream_rpc_method_handler}
    make = kinds[handler.request_streaming, handler.response_streaming]
    return make(refuse, request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer)


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
