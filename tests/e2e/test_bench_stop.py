"""A `lipsync bench` stopped from outside leaves nothing behind: SIGTERM (`timeout`, a CI
job cancelled, systemd) stops the server it started and frees its in-process engine's
shared memory, as Ctrl-C does; after SIGKILL its server still stops, and the next in-process
bench reclaims the dead one's segments (720 MB each for the demo avatar)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from pipeline.config import load_config
from pipeline.runtime.process import ExitWatch
from pipeline.shm.segment import SHM_DIR, list_segments, pid_alive
from tests.conftest import child_pids, write_config

REPO = Path(__file__).resolve().parents[2]


def _start_bench(config: Path) -> subprocess.Popen[bytes]:
    """A long in-process comparison: its server serves and its engine holds segments."""
    return subprocess.Popen(
        [sys.executable, "-m", "pipeline.cli", "bench", "--config", str(config), "--batch", "8",
         "--concurrency", "2", "--requests", "100000", "--rounds", "2", "--visual", "server",
         "--compare", "inprocess"],
        cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _wait_for_engine_segments(bench: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 150
    while not list_segments(f"bench{bench.pid}"):
        assert bench.poll() is None, bench.stderr.read().decode()[-3000:] if bench.stderr else ""
        assert time.monotonic() < deadline, "the bench's in-process engine never started"
        time.sleep(0.2)


def _wait_gone(pids: set[int], timeout_s: float) -> set[int]:
    deadline = time.monotonic() + timeout_s
    watches = {p: ExitWatch(p) for p in pids}
    try:
        # a zombie (its exit status set) is gone: its parent, init, reaps it when it will
        while (alive := {p for p, watch in watches.items()
                         if pid_alive(p) and watch.exit_status() is None}) \
                and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        for watch in watches.values():
            watch.close()
    return alive


@dataclass
class RunningBench:
    process: subprocess.Popen[bytes]
    server: set[int]       # the processes of the server it started
    instance: str          # that server's runtime instance
    config: Path


@pytest.fixture
def running_bench(tmp_path: Path, small_models_root: Path) -> Iterator[RunningBench]:
    """A bench mid-comparison; whatever a failed test leaves (an orphaned server, segments)
    is killed and removed after, not left to the other tests."""
    config = write_config(tmp_path / "config.yaml", small_models_root)
    bench = _start_bench(config)
    running = RunningBench(bench, set(), load_config(config).runtime.instance, config)
    try:
        _wait_for_engine_segments(bench)
        running.server = child_pids(bench.pid)
        assert running.server and list_segments(running.instance)
        yield running
    finally:
        bench.kill()
        bench.wait()
        for pid in running.server:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for name in list_segments(f"bench{bench.pid}"):
            (SHM_DIR / name).unlink(missing_ok=True)


def test_a_terminated_bench_stops_its_server_and_frees_its_memory(
        running_bench: RunningBench) -> None:
    bench = running_bench.process
    bench.send_signal(signal.SIGTERM)
    bench.wait(60)
    assert _wait_gone(running_bench.server, 30) == set(), "the bench's server outlived it"
    assert list_segments(f"bench{bench.pid}") == []
    assert list_segments(running_bench.instance) == []


def test_a_killed_benchs_server_stops_and_the_next_bench_reclaims_its_memory(
        running_bench: RunningBench) -> None:
    bench = running_bench.process
    bench.kill()
    bench.wait()
    assert _wait_gone(running_bench.server, 30) == set(), "the bench's server outlived it"
    assert list_segments(running_bench.instance) == []
    assert list_segments(f"bench{bench.pid}"), "a SIGKILLed process cannot free its own"
    done = subprocess.run([sys.executable, "-m", "pipeline.cli", "bench", "--config",
                           str(running_bench.config), "--stages", "--batch", "8"],
                          cwd=REPO, capture_output=True, timeout=180)
    assert done.returncode == 0, done.stderr.decode()[-3000:]
    assert list_segments(f"bench{bench.pid}") == []
