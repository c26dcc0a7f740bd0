"""Start `lipsync serve` as a child process and wait until it answers Health.

Used by `lipsync bench` (when no --address is given) and by the integration tests, so
both drive exactly what a user runs.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import grpc

# every client of ours opens its channel there (affinity header, retries); re-exported
from pipeline.client_channel import channel
from pipeline.rpc import monolithic_pb2 as pb
from pipeline.rpc import monolithic_pb2_grpc as pb_grpc


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(address: str, timeout_s: float, died: Callable[[], str | None]) -> bool:
    """Poll Health at `address` until it says healthy (True) or `timeout_s` passes (False);
    RuntimeError with died()'s message as soon as it reports a dead process."""
    deadline = time.monotonic() + timeout_s
    with channel(address) as ch:
        stub = pb_grpc.MonolithicServiceStub(ch)
        while time.monotonic() < deadline:
            reason = died()
            if reason is not None:
                raise RuntimeError(reason)
            try:
                if stub.Health(pb.HealthRequest(), timeout=1).healthy:
                    return True
            except grpc.RpcError:
                pass
            time.sleep(0.2)
    return False


class ServerProcess:
    """`lipsync serve` on free ports; a context manager that stops it with SIGTERM."""

    def __init__(self, config: Path, log_path: Path | None = None,
                 start_timeout_s: float = 180.0) -> None:
        self.config = config
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

        if wait_healthy(self.address, self.start_timeout_s, died):
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
