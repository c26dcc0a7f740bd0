"""Start `lipsync serve` as a child process and wait until it answers Health.

Used by `lipsync bench` (when no --address is given) and by the integration tests, so
both drive exactly what a user runs.
"""
from __future__ import annotations

import argparse
import os
import ssl
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import grpc

from pipeline.config import client_credentials


MAX_MESSAGE = 256 * 2**20


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Metadata(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor,
                grpc.StreamUnaryClientInterceptor, grpc.StreamStreamClientInterceptor):
    """Adds fixed metadata (the bearer token) to every call of a channel."""

    def __init__(self, pairs: tuple[tuple[str, str], ...]) -> None:
        self.pairs = pairs

    def _with(self, details: grpc.ClientCallDetails) -> grpc.ClientCallDetails:
        return details._replace(metadata=(*(details.metadata or ()), *self.pairs))  # type: ignore[attr-defined]

    def intercept_unary_unary(self, continuation, details, request):  # type: ignore[no-untyped-def]
        return continuation(self._with(details), request)

    intercept_unary_stream = intercept_unary_unary

    def intercept_stream_unary(self, continuation, details, requests):  # type: ignore[no-untyped-def]
        return continuation(self._with(details), requests)

    intercept_stream_stream = intercept_stream_unary


def add_security_arguments(parser: argparse.ArgumentParser) -> None:
    """--token and --tls-ca for a command that talks to a server (they set the environment
    the clients read, so every channel and WebSocket of the command uses them)."""
    parser.add_argument("--token", help="bearer token for a server with server.auth "
                                        "(default: $LIPSYNC_TOKEN)")
    parser.add_argument("--tls-ca", metavar="PEM", help="CA certificate of a TLS server "
                                                        "(default: $LIPSYNC_TLS_CA)")


def apply_security_arguments(args: argparse.Namespace) -> None:
    if getattr(args, "token", None):
        os.environ["LIPSYNC_TOKEN"] = args.token
    if getattr(args, "tls_ca", None):
        os.environ["LIPSYNC_TLS_CA"] = str(args.tls_ca)


def websocket_options() -> dict[str, object]:
    """What a WebSocket client of ours passes to connect(): the token as an Authorization
    header and, for wss://, the CA ($LIPSYNC_TOKEN, $LIPSYNC_TLS_CA)."""
    options: dict[str, object] = {}
    token, ca = client_credentials()
    if token:
        options["additional_headers"] = {"Authorization": f"Bearer {token}"}
    if ca:
        options["ssl"] = ssl.create_default_context(cafile=ca)
    return options


def channel(address: str, token: str | None = None, tls_ca: str | os.PathLike[str] | None = None,
            client_cert: tuple[Path, Path] | None = None) -> grpc.Channel:
    """A channel to the server at `address`. `token` (default $LIPSYNC_TOKEN) goes with
    every call as `authorization: Bearer`; `tls_ca` (default $LIPSYNC_TLS_CA), a PEM file
    of the CA that signed the server's certificate, makes it a TLS channel, presenting
    `client_cert` (certificate, key) to a server that asks for one (mutual TLS)."""
    env_token, env_ca = client_credentials()
    token = token if token is not None else env_token
    tls_ca = tls_ca if tls_ca is not None else env_ca
    options = [("grpc.max_receive_message_length", MAX_MESSAGE),
               ("grpc.max_send_message_length", MAX_MESSAGE)]
    if tls_ca:
        ca = Path(tls_ca).read_bytes()
        cert, key = (client_cert[0].read_bytes(), client_cert[1].read_bytes()) \
            if client_cert else (None, None)
        credentials = grpc.ssl_channel_credentials(ca, private_key=key, certificate_chain=cert)
        ch = grpc.secure_channel(address, credentials, options=options)
    else:
        ch = grpc.insecure_channel(address, options=options)
    if token:
        ch = grpc.intercept_channel(ch, _Metadata((("authorization", f"Bearer {token}"),)))
    return ch


def wait_healthy(address: str, timeout_s: float, died: Callable[[], str | None],
                 tls_ca: Path | None = None, client_cert: tuple[Path, Path] | None = None) -> bool:
    """Poll grpc.health.v1 at `address` (no token needed) until it says SERVING (True) or
    `timeout_s` passes (False); RuntimeError with died()'s message as soon as it reports a
    dead process."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    deadline = time.monotonic() + timeout_s
    with channel(address, tls_ca=tls_ca, client_cert=client_cert) as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        while time.monotonic() < deadline:
            reason = died()
            if reason is not None:
                raise RuntimeError(reason)
            try:
                if stub.Check(health_pb2.HealthCheckRequest(), timeout=1).status \
                        == health_pb2.HealthCheckResponse.SERVING:
                    return True
            except grpc.RpcError:
                pass
            time.sleep(0.2)
    return False


class ServerProcess:
    """`lipsync serve` on free ports; a context manager that stops it with SIGTERM."""

    def __init__(self, config: Path, log_path: Path | None = None,
                 start_timeout_s: float = 180.0, tls_ca: Path | None = None,
                 client_cert: tuple[Path, Path] | None = None) -> None:
        self.config = config
        self.tls_ca, self.client_cert = tls_ca, client_cert
        self.grpc_port = free_port()
        self.ws_port = free_port()
        self.address = f"127.0.0.1:{self.grpc_port}"
        self.log_path = log_path
        self.start_timeout_s = start_timeout_s
        self.proc: subprocess.Popen[bytes] | None = None
        self._log = None

    def __enter__(self) -> ServerProcess:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        self._log = open(self.log_path, "wb") if self.log_path else subprocess.DEVNULL
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "pipeline.cli", "serve", "--config", str(self.config),
             "--grpc-port", str(self.grpc_port), "--ws-port", str(self.ws_port)],
            stdout=self._log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        proc = self.proc

        def died() -> str | None:
            if proc.poll() is None:
                return None
            return f"lipsync serve exited with {proc.returncode}{self._tail()}"

        if wait_healthy(self.address, self.start_timeout_s, died, self.tls_ca, self.client_cert):
            return
        self.stop()
        raise TimeoutError(f"lipsync serve not healthy after {self.start_timeout_s} s{self._tail()}")

    def stop(self, timeout: float = 15.0) -> int | None:
        """SIGTERM and wait; returns the exit code (None if it had to be killed)."""
        if self.proc is None:
            return None
        code: int | None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                code = self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                code = None
        else:
            code = self.proc.returncode
        if self._log not in (None, subprocess.DEVNULL):
            self._log.close()
        return code

    def _tail(self) -> str:
        if self.log_path is None or not self.log_path.exists():
            return ""
        return "\n--- server log (tail) ---\n" + self.log_path.read_text(errors="replace")[-4000:]
