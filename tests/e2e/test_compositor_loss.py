"""A compositor lost under load fails nothing: the gpu_worker hands the jobs it held to the
other compositors (they pull work with credits), a frozen one is never handed more than
its credits, and the frames that come back are always the right ones. The real server,
three compositors, the 32-frame avatar."""
from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Any

import pytest

from pipeline.bench.local_server import ServerProcess
from tests.conftest import SMALL_FRAMES, ops_stats
from tests.e2e.load import Load
from tests.helpers import FrameOracle

POOL = 3


@pytest.fixture(scope="module")
def server(start_server) -> ServerProcess:
    return start_server(**{"compositor.pool_size": POOL, "server.request_timeout_s": 30,
                           "runtime.restart_backoff_max_s": 0.5})


@pytest.fixture(scope="module")
def corners(small_models_root: Path) -> Any:
    return FrameOracle.of(small_models_root, SMALL_FRAMES)


def _stats(server: ServerProcess) -> dict[str, Any]:
    return ops_stats(server.config)  # type: ignore[attr-defined]


def _all_alive(server: ServerProcess, timeout: float = 30.0) -> dict[str, Any]:
    """The stats once every role is alive and the worker hands jobs to every compositor."""
    deadline = time.monotonic() + timeout
    while True:
        stats = _stats(server)
        links = stats["gpu_workers"][0]["compositor_jobs"].get("compositors", [])
        roles = stats["gpu_workers"] + stats["compositors"]
        if all(r["alive"] for r in roles) and sum(link["alive"] for link in links) == POOL:
            return stats
        assert time.monotonic() < deadline, stats
        time.sleep(0.1)


def _busy(server: ServerProcess, load: Load) -> None:
    """Until the load runs: requests done, and requests in flight on the worker now."""
    deadline = time.monotonic() + 30
    while len(load.outcomes) < 4 or _stats(server)["gpu_workers"][0]["inflight"] < 2:
        assert time.monotonic() < deadline, "the load never got going"
        time.sleep(0.02)


def _link(stats: dict[str, Any], pid: int) -> dict[str, Any] | None:
    """gpu_worker 0's view of the compositor with this pid."""
    links = stats["gpu_workers"][0]["compositor_jobs"]["compositors"]
    return next((link for link in links if link["pid"] == pid), None)


def _redispatched(stats: dict[str, Any]) -> int:
    return stats["gpu_workers"][0]["compositor_jobs"]["redispatched"]


def test_a_killed_compositor_fails_no_request(server: ServerProcess, corners: Any) -> None:
    """SIGKILL of one of 3 compositors while it holds jobs, under 4 concurrent clients:
    every request succeeds with the right frames, the jobs it held were handed to the
    others, and the work goes on. (It is stopped a moment first, so that it surely holds
    jobs when it dies; it dies long before its silence would be noticed.)"""
    stats = _all_alive(server)
    victim = stats["compositors"][1]["pid"]
    with Load(server.address, corners) as load:
        _busy(server, load)
        before = _redispatched(_stats(server))
        os.kill(victim, signal.SIGSTOP)
        frozen_at = time.monotonic()
        held = 0
        while held == 0 and time.monotonic() - frozen_at < 1.0:
            time.sleep(0.05)
            link = _link(_stats(server), victim)
            held = link["held"] if link else 0
        os.kill(victim, signal.SIGKILL)
        killed_at = time.monotonic()
        assert held >= 1 and killed_at - frozen_at < 1.3  # the kill, not the silence, counts
        time.sleep(2.5)
    problems = load.problems()
    assert problems == [], problems[:5]
    assert [o for o in load.outcomes if o.started < frozen_at < o.ended], \
        ("none in flight", frozen_at, load.outcomes[-12:])
    assert len(load.ended_between(killed_at + 0.5, killed_at + 2.5)) >= 3  # work went on
    stats = _stats(server)
    assert _redispatched(stats) - before >= held
    assert _link(stats, victim) is None  # forgotten: its process is gone
    _all_alive(server)  # restarted by the supervisor, and taking jobs again


def test_a_frozen_compositor_holds_at_most_its_credits(server: ServerProcess,
                                                       corners: Any) -> None:
    """SIGSTOP one compositor for 3 s under load: no request fails, the frozen one holds at
    most its credits (2) and is handed nothing beyond them, its jobs go to the others
    once its silence is noticed, the other two keep serving, and after SIGCONT it takes
    jobs again without breaking anything (its late frames are duplicates, dropped)."""
    stats = _all_alive(server)
    frozen = stats["compositors"][2]["pid"]
    samples = []
    with Load(server.address, corners) as load:
        _busy(server, load)
        before = _redispatched(_stats(server))
        os.kill(frozen, signal.SIGSTOP)
        stopped_at = time.monotonic()
        try:
            time.sleep(0.7)  # from now on every heartbeat was sent after the stop
            while time.monotonic() - stopped_at < 3.0:
                link = _link(_stats(server), frozen)
                assert link is not None
                samples.append(link)
                time.sleep(0.2)
        finally:
            os.kill(frozen, signal.SIGCONT)
        resumed_at = time.monotonic()
        deadline = resumed_at + 10
        while not (link := _link(_stats(server), frozen)) or not link["alive"]:
            assert time.monotonic() < deadline, "the thawed compositor never took jobs again"
            time.sleep(0.1)
        time.sleep(1.0)
    problems = load.problems()
    assert problems == [], problems[:5]
    # frozen, it finished nothing (handed - held, the jobs it gave back, stays put), and it
    # was never handed more than that plus its credits
    finished = {s["handed"] - s["held"] for s in samples}
    assert len(finished) == 1, samples
    assert all(s["credits"] == 2 and s["held"] <= 2 for s in samples), samples
    assert max(s["handed"] for s in samples) <= finished.pop() + 2, samples
    assert any(not s["alive"] for s in samples), samples  # its silence was noticed...
    assert _redispatched(_stats(server)) - before >= samples[0]["held"]  # ...its jobs moved
    assert len(load.ended_between(stopped_at + 0.5, resumed_at)) >= 3  # the others served
    assert len(load.ended_between(resumed_at, time.monotonic())) >= 1
    assert _stats(server)["gpu_workers"][0]["alive"]
