"""Start `lipsync serve` as a child process and wait until it answers grpc.health.v1.

Used by `lipsync bench` (when no --address is given) and by the integration tests, so
both drive exactly what a user runs.
"""
from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path
from typing import IO

import grpc

from pipeline.client import channel

# below Linux's ephemeral range (32768-60999): no outgoing connection is handed the port
# between its pick here and the server's bind
PICKED_PORTS = range(20000, 32768)


def free_port() -> int:
    """A port free on loopback now, outside the ephemeral range."""
    for _ in range(200):
        port = random.choice(PICKED_PORTS)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


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
    """`lipsync serve` on free ports; a context manager that stops it with SIGTERM. The server
    stops by itself, too, once this process has exited, even by SIGKILL."""

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
        self._log: IO[bytes] | int | None = None

    def __enter__(self) -> ServerProcess:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        """Start and wait until healthy; a port of ours that another program bound between
        its pick and the server's bind is picked again (twice at most)."""
        for attempt in range(3):
            try:
                return self._start()
            except RuntimeError as exc:
                taken = any(f"port {p} on 127.0.0.1 is in use" in str(exc)
                            for p in (self.grpc_port, self.ws_port))
                if not taken or attempt == 2:
                    raise
            self.grpc_port, self.ws_port = free_port(), free_port()
            self.address = f"127.0.0.1:{self.grpc_port}"

    def _start(self) -> None:
        self._log = open(self.log_path, "wb") if self.log_path else subprocess.DEVNULL
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "pipeline.cli", "serve", "--config", str(self.config),
             "--grpc-port", str(self.grpc_port), "--ws-port", str(self.ws_port),
             "--stop-with-parent"],  # however this process ends, the server does not outlive it
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
        if not isinstance(self._log, int | None):
            self._log.close()
        return code

    def _tail(self) -> str:
        if self.log_path is None or not self.log_path.exists():
            return ""
        return "\n--- server log (tail) ---\n" + self.log_path.read_text(errors="replace")[-4000:]


def start_server(stack: ExitStack, config: Path) -> ServerProcess:
    """A server for this bench run (its log in a temp dir), stopped when `stack` closes."""
    log = Path(tempfile.mkdtemp(prefix="lipsync-bench-")) / "server.log"
    return stack.enter_context(ServerProcess(config, log_path=log))
