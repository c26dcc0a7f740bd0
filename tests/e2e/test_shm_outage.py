"""A frontend that dies with /dev/shm nearly full: its successor gets the space back.

Runs the server in a private mount namespace with a small tmpfs on /dev/shm (root and
unshare(1) needed; skipped otherwise), fills it to less than one arena free, kills the
frontend and expects the restarted one to serve.
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline.bench.local_server import free_port, wait_healthy
from pipeline.client import channel, speech_like_audio
from pipeline.rpc import monolithic_pb2 as pb
from pipeline.rpc import monolithic_pb2_grpc as pb_grpc
from tests.conftest import role_pids, write_config

ARENA_MB = 128
TMPFS_MB = 400


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
