"""The metrics/probe HTTP server on its own (no server processes)."""
from __future__ import annotations

import urllib.error
import urllib.request

import pytest
from prometheus_client import CollectorRegistry, Counter

from pipeline.frontend.ops_http import OpsHttpServer


def get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def test_one_port_serves_metrics_healthz_and_readyz_following_the_state() -> None:
    """/healthz is 200 always, /readyz follows the readiness reason, /metrics the registry."""
    registry = CollectorRegistry()
    Counter("lipsync_probe_test", "a counter", registry=registry).inc(3)
    state: dict[str, str | None] = {"reason": "starting"}
    server = OpsHttpServer.create("127.0.0.1", 0, registry, lambda: state["reason"])
    try:
        assert get(server.port, "/healthz") == (200, "ok\n")
        assert get(server.port, "/readyz") == (503, "not ready: starting\n")
        state["reason"] = None
        assert get(server.port, "/readyz") == (200, "ready\n")
        state["reason"] = "draining"
        assert get(server.port, "/readyz") == (503, "not ready: draining\n")
        assert get(server.port, "/healthz")[0] == 200
        status, metrics = get(server.port, "/metrics")
        assert status == 200 and "lipsync_probe_test_total 3.0" in metrics
    finally:
        server.close()
    server.close()  # idempotent
    with pytest.raises(urllib.error.URLError):
        get(server.port, "/healthz")


def test_a_taken_port_fails_loudly() -> None:
    """A second server on the same port raises instead of sharing it."""
    first = OpsHttpServer.create("127.0.0.1", 0, CollectorRegistry(), lambda: None)
    try:
        with pytest.raises(OSError):
            OpsHttpServer.create("127.0.0.1", first.port, CollectorRegistry(), lambda: None)
    finally:
        first.close()


def test_unfinished_requests_are_cut_off_and_their_threads_end() -> None:
    """Connections that send nothing, half a request line, or dribble a byte at a time are
    closed by the server once the request deadline passes, and the thread each held ends;
    probes are answered throughout, and connections beyond the cap are closed at once."""
    import socket
    import threading
    import time

    baseline = threading.active_count()
    server = OpsHttpServer.create("127.0.0.1", 0, CollectorRegistry(), lambda: None,
                                  request_deadline_s=0.5, max_connections=8)
    clients: list[socket.socket] = []
    try:
        for i in range(12):  # 8 are held until the deadline, 4 beyond the cap closed at once
            sock = socket.create_connection(("127.0.0.1", server.port))
            sock.settimeout(3)
            if i % 3 == 1:
                sock.sendall(b"GET /metr")
            clients.append(sock)
        start, cut = time.monotonic(), None
        while time.monotonic() - start < 1.5 and cut is None:  # one dribbles a byte at a time
            try:
                clients[2].sendall(b"G")
            except OSError:  # the server cut it off
                cut = time.monotonic() - start
            time.sleep(0.1)
        assert cut is not None and cut >= 0.4, cut
        assert threading.active_count() <= baseline + 1 + 8
        for sock in clients:
            try:
                assert sock.recv(1024) == b""
            except ConnectionResetError:
                pass
        assert time.monotonic() - start < 3.0
        assert get(server.port, "/healthz") == (200, "ok\n")
        deadline = time.monotonic() + 2
        while threading.active_count() > baseline + 1:  # the serving thread itself
            assert time.monotonic() < deadline, threading.enumerate()
            time.sleep(0.05)
    finally:
        for sock in clients:
            sock.close()
        server.close()
