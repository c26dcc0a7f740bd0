"""A taken port stops `lipsync serve` (and a frontend run on its own) at once, naming the
port and the setting or flag that moves it; nothing is left running."""
from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline.bench.local_server import free_port
from tests.conftest import write_config


def listening(port: int) -> socket.socket:
    """A listener as grpcio opens one by default: SO_REUSEPORT set (which let a second
    server share the port and steal a share of its traffic)."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind(("0.0.0.0", port))
    sock.listen()
    return sock


@pytest.mark.parametrize("taken, flag, setting", [
    ("grpc", "--grpc-port", "server.port"),
    ("ws", "--ws-port", "server.ws_port"),
    ("metrics", "--metrics-port", "ops.metrics_port"),
])
def test_serve_on_a_taken_port_stops_at_once(tmp_path: Path, small_models_root: Path,
                                              taken: str, flag: str, setting: str) -> None:
    """`lipsync serve` exits 1 within seconds with one clear line naming port and flag."""
    ports = {"grpc": free_port(), "ws": free_port(), "metrics": free_port()}
    config = write_config(tmp_path / "config.yaml", small_models_root,
                          **{"server.host": "0.0.0.0"})
    holder = listening(ports[taken])
    try:
        t0 = time.monotonic()
        result = subprocess.run(
            [sys.executable, "-m", "pipeline.cli", "serve", "--config", str(config),
             "--grpc-port", str(ports["grpc"]), "--ws-port", str(ports["ws"]),
             "--metrics-port", str(ports["metrics"])],
            capture_output=True, text=True, timeout=60)
        elapsed = time.monotonic() - t0
    finally:
        holder.close()
    assert result.returncode == 1
    assert f"port {ports[taken]}" in result.stderr and flag in result.stderr
    assert setting in result.stderr
    assert "Traceback" not in result.stderr
    assert elapsed < 15


def test_a_frontend_on_its_own_stops_at_once_on_a_taken_port(tmp_path: Path,
                                                              small_models_root: Path) -> None:
    """`lipsync role frontend` (as a systemd unit runs it) binds its ports before waiting
    for the other roles: a taken gRPC port ends it at once, without a traceback."""
    grpc_port = free_port()
    config = write_config(tmp_path / "config.yaml", small_models_root,
                          **{"server.port": grpc_port, "server.ws_port": free_port()})
    holder = listening(grpc_port)
    try:
        result = subprocess.run([sys.executable, "-m", "pipeline.cli", "role", "frontend",
                                 "--config", str(config)], capture_output=True, text=True,
                                timeout=60)
    finally:
        holder.close()
    assert result.returncode == 1
    assert f"gRPC port {grpc_port}" in result.stderr and "--grpc-port" in result.stderr
    assert "Traceback" not in result.stderr
