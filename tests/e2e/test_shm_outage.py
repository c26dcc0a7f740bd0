"""/dev/shm too small: a frontend that dies with it nearly full gives its successor the
space back, and a start in a container's 64 MB stops at once with one line saying what to
change.

Runs the server in a private mount namespace with a small tmpfs on /dev/shm (root and
unshare(1) needed; skipped otherwise).
"""
from __future__ import annotations

import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline.bench.local_server import free_port, wait_healthy
from pipeline.client import channel, speech_like_audio
from pipeline.frontend.inflight import ARENA_SPACE_WAIT_S
from pipeline.rpc import monolithic_pb2 as pb
from pipeline.rpc import monolithic_pb2_grpc as pb_grpc
from tests.conftest import role_pids, write_config

ARENA_MB = 128
TMPFS_MB = 400
CONTAINER_SHM_MB = 64  # Docker's /dev/shm unless `--shm-size` says otherwise


def _private_tmpfs_works() -> bool:
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        return False
    probe = subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c",
                            "mount -t tmpfs -o size=1m tmpfs /dev/shm"], capture_output=True)
    return probe.returncode == 0


pytestmark = pytest.mark.skipif(not _private_tmpfs_works(),
                                reason="needs root and unshare -m for a private /dev/shm")


def test_a_dead_frontends_arena_is_given_back_to_its_successor(tmp_path: Path,
                                                              small_models_root: Path) -> None:
    """Less than one arena free, the frontend SIGKILLed: the other roles unmap its arena at
    once, and the restarted frontend reserves its own and serves."""
    grpc_port = free_port()
    config = write_config(tmp_path / "config.yaml", small_models_root,
                          **{"runtime.arena_mb": ARENA_MB, "compositor.pool_size": 1})
    script = (f"mount -t tmpfs -o size={TMPFS_MB}m tmpfs /dev/shm && exec {sys.executable} -m "
              f"pipeline.cli serve --config {config} --grpc-port {grpc_port} "
              f"--ws-port {free_port()}")
    log = open(tmp_path / "server.log", "wb")
    proc = subprocess.Popen(["unshare", "-m", "--propagation", "private", "sh", "-c", script],
                            stdout=log, stderr=subprocess.STDOUT,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    address = f"127.0.0.1:{grpc_port}"

    def died() -> str | None:
        return None if proc.poll() is None else f"server exited with {proc.returncode}"

    try:
        assert wait_healthy(address, 120, died)
        shm = Path(f"/proc/{proc.pid}/root/dev/shm")  # the server's own /dev/shm
        stat = os.statvfs(shm)
        free = stat.f_bavail * stat.f_frsize
        filler = os.open(shm / "filler", os.O_CREAT | os.O_RDWR)
        os.posix_fallocate(filler, 0, free - ARENA_MB * 2**20 // 2)  # half an arena left
        os.close(filler)
        (frontend,) = role_pids(proc.pid, "frontend")
        os.kill(frontend, signal.SIGKILL)
        deadline = time.monotonic() + 60
        while role_pids(proc.pid, "frontend") in ([], [frontend]):
            assert time.monotonic() < deadline, "the frontend was not restarted"
            time.sleep(0.1)
        assert wait_healthy(address, 30, died), \
            "the restarted frontend did not serve:\n" + (tmp_path / "server.log").read_text()[-3000:]
        with channel(address) as ch:
            resp = pb_grpc.MonolithicServiceStub(ch).InferBatchComposite(
                pb.CompositeBatchRequest(model_id="demo", batch_size=2,
                                         raw_audio=speech_like_audio(0.7).tobytes()), timeout=60)
        assert resp.success, resp.error
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


@pytest.mark.parametrize("command", [["serve"], ["role", "frontend"]], ids=["serve", "role"])
def test_a_start_in_a_containers_dev_shm_stops_at_once_with_one_line(
        tmp_path: Path, small_models_root: Path, command: list[str]) -> None:
    """The default 1024 MB arena in a 64 MB /dev/shm: `lipsync serve` (before it spawns a
    role) and a frontend run on its own exit 1 at once, with one line naming the arena's
    size, what /dev/shm has and what to change; no traceback, no wait for space that no
    other role can give back."""
    config = write_config(tmp_path / "config.yaml", small_models_root,
                          **{"runtime.arena_mb": 1024, "server.port": free_port(),
                             "server.ws_port": free_port()})
    argv = [sys.executable, "-m", "pipeline.cli", *command, "--config", str(config)]
    script = f"mount -t tmpfs -o size={CONTAINER_SHM_MB}m tmpfs /dev/shm && exec {shlex.join(argv)}"
    t0 = time.monotonic()
    done = subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c", script],
                          capture_output=True, text=True, timeout=120)
    elapsed = time.monotonic() - t0
    out = done.stdout + done.stderr
    assert done.returncode == 1, out[-3000:]
    assert "Traceback" not in out, out[-3000:]
    lines = [line for line in out.splitlines() if "runtime.arena_mb" in line]
    assert len(lines) == 1, out[-3000:]
    assert "1024 MB" in lines[0] and f"{CONTAINER_SHM_MB} MB" in lines[0], lines[0]
    assert "--shm-size" in lines[0], lines[0]
    assert elapsed < ARENA_SPACE_WAIT_S, f"took {elapsed:.1f} s:\n{out[-3000:]}"
    if command == ["serve"]:
        assert "ready" not in out, out[-3000:]  # refused before any role was spawned
