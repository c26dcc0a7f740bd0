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
from pathlib import Path

from pipeline.config import load_config
from pipeline.shm.segment import list_segments, pid_alive
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
    while (alive := {p for p in pids if pid_alive(p) and not _zombie(p)}) \
            and time.monotonic() < deadline:
        time.sleep(0.1)
    return alive


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return False


def _kill_all(pids: set[int]) -> None:
    """What a failed test leaves running (an orphaned server) is killed, not left to others."""
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def test_a_terminated_bench_stops_its_server_and_frees_its_memory(
        tmp_path: Path, small_models_root: Path) -> None:
    config = write_config(tmp_path / "config.yaml", small_models_root)
    instance = load_config(config).runtime.instance
    bench = _start_bench(config)
    server: set[int] = set()
    try:
        _wait_for_engine_segments(bench)
        server = child_pids(bench.pid)
        assert server and list_segments(instance)
        bench.send_signal(signal.SIGTERM)
        bench.wait(60)
        assert _wait_gone(server, 30) == set(), "the bench's server outlived it"
        assert list_segments(f"bench{bench.pid}") == []
        assert list_segments(instance) == []
    finally:
        bench.kill()
        bench.wait()
        _kill_all(server)


def test_a_killed_benchs_server_stops_and_the_next_bench_reclaims_its_memory(
        tmp_path: Path, small_models_root: Path) -> None:
    config = write_config(tmp_path / "config.yaml", small_models_root)
    instance = load_config(config).runtime.instance
    bench = _start_bench(config)
    server: set[int] = set()
    try:
        _wait_for_engine_segments(bench)
        server = child_pids(bench.pid)
        bench.kill()
        bench.wait()
        assert _wait_gone(server, 30) == set(), "the bench's server outlived it"
        assert list_segments(instance) == []
        assert list_segments(f"bench{bench.pid}"), "a SIGKILLed process cannot free its own"
        done = subprocess.run([sys.executable, "-m", "pipeline.cli", "bench", "--config",
                               str(config), "--stages", "--batch", "8"],
                              cwd=REPO, capture_output=True, timeout=180)
        assert done.returncode == 0, done.stderr.decode()[-3000:]
        assert list_segments(f"bench{bench.pid}") == []
    finally:
        _kill_all(server)
        for name in list_segments(f"bench{bench.pid}"):  # a failed reclaim: not left to others
            (Path("/dev/shm") / name).unlink(missing_ok=True)
