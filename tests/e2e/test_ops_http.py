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
