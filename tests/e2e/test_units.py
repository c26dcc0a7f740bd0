"""The roles as separate OS processes, started the way the systemd units start them
(`lipsync role ...`, no supervisor, Type=notify): they find each other through the config
alone, in any start order, serve, and stop on SIGTERM leaving nothing behind.
"""
from __future__ import annotations

import itertools
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import cv2
import grpc
import numpy as np
import pytest
import yaml

from pipeline.bench.local_server import free_port, wait_healthy
from pipeline.client import build_request, channel
from pipeline.rpc import monolithic_pb2 as pb
from pipeline.rpc import monolithic_pb2_grpc as pb_grpc
from pipeline.shm.segment import list_segments
from tests.conftest import child_pids, write_config

START_TIMEOUT_S = 180.0
STOP_TIMEOUT_S = 10.0
_sockets = itertools.count()


class NotifySocket:
    """What systemd listens on for a Type=notify unit: an abstract AF_UNIX datagram socket.

    Collects every datagram as (sender pid, {KEY: VALUE}) with the sender's pid taken from
    the kernel (SO_PASSCRED), as systemd does for NotifyAccess=main.
    """

    def __init__(self) -> None:
        self.address = f"@lipsync-test-{os.getpid()}-{next(_sockets)}"
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind("\0" + self.address[1:])
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self.sock.settimeout(0.1)
        self.messages: list[tuple[int, dict[str, str]]] = []
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._collect, daemon=True)
        self._thread.start()

    def _collect(self) -> None:
        creds = socket.CMSG_SPACE(12)  # struct ucred: pid, uid, gid
        while not self._closed.is_set():
            try:
                data, ancdata, _, _ = self.sock.recvmsg(4096, creds)
            except TimeoutError:
                continue
            except OSError:
                return
            pid = next((int.from_bytes(d[:4], sys.byteorder) for level, kind, d in ancdata
                        if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS), -1)
            fields = dict(line.split("=", 1) for line in data.decode().splitlines() if "=" in line)
            self.messages.append((pid, fields))

    def of(self, pid: int) -> list[dict[str, str]]:
        return [fields for sender, fields in self.messages if sender == pid]

    def close(self) -> None:
        self._closed.set()
        self._thread.join()
        self.sock.close()


class Units:
    """The roles of one config, each started as its unit's ExecStart would start it."""

    def __init__(self, tmp_path: Path, models_root: Path, **overrides: object) -> None:
        self.tmp = tmp_path
        self.grpc_port, self.ws_port = free_port(), free_port()
        self.config = write_config(tmp_path / "config.yaml", models_root,
                                   **{"server.port": self.grpc_port,
                                      "server.ws_port": self.ws_port,
                                      "compositor.pool_size": 2, "gpus.count": 1, **overrides})
        self.instance = yaml.safe_load(self.config.read_text())["runtime"]["instance"]
        self.address = f"127.0.0.1:{self.grpc_port}"
        self.notify = NotifySocket()
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def start(self, role: str, index: int | None = None) -> subprocess.Popen[bytes]:
        name = role if index is None else f"{role}@{index}"
        argv = [sys.executable, "-m", "pipeline.cli", "role", role, "--config", str(self.config)]
        if index is not None:
            argv += ["--index", str(index)]
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "NOTIFY_SOCKET": self.notify.address,
               "WATCHDOG_USEC": "1000000"}  # as systemd sets them for Type=notify, WatchdogSec=1
        with open(self.tmp / f"{name}.log", "ab") as log:
            proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env)
        self.procs[name] = proc
        return proc

    def start_workers(self) -> None:
        self.start("compositor", 0)
        self.start("compositor", 1)
        self.start("gpu-worker", 0)

    def logs(self) -> str:
        return "".join(f"\n--- {p.name} (tail) ---\n{p.read_text(errors='replace')[-3000:]}"
                       for p in sorted(self.tmp.glob("*.log")))

    def wait_healthy(self) -> None:
        def died() -> str | None:
            dead = {n: p.returncode for n, p in self.procs.items() if p.poll() is not None}
            return f"roles exited: {dead}{self.logs()}" if dead else None

        assert wait_healthy(self.address, START_TIMEOUT_S, died), \
            f"not healthy after {START_TIMEOUT_S} s{self.logs()}"

    def infer(self, batch: int = 2) -> pb.CompositeBatchResponse:
        with channel(self.address) as ch:
            return pb_grpc.MonolithicServiceStub(ch).InferBatchComposite(
                build_request(self.config, "demo", batch, 0), timeout=60)

    def stop_all(self, frontend_first: bool = True) -> dict[str, int | None]:
        """SIGTERM every role; their exit codes (None: still running after 10 s in all).

        frontend_first is what `systemctl stop lipsync.target` does with the units'
        ordering (workers and compositors are Before= the frontend, so they stop after it);
        otherwise all at once, as `systemctl kill lipsync-*` would.
        """
        deadline = time.monotonic() + STOP_TIMEOUT_S
        order = sorted(self.procs, key=lambda n: n != "frontend") if frontend_first else []
        for name in order[:1]:
            self.procs[name].send_signal(signal.SIGTERM)
            try:
                self.procs[name].wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        codes: dict[str, int | None] = {}
        for name, proc in self.procs.items():
            try:
                codes[name] = proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                codes[name] = None
        return codes

    def kill_all(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        self.notify.close()


@pytest.fixture
def units(tmp_path: Path, small_models_root: Path) -> Iterator[Units]:
    u = Units(tmp_path, small_models_root)
    try:
        yield u
    finally:
        u.kill_all()


def assert_serves_two_jpegs(units: Units) -> None:
    resp = units.infer(2)
    assert resp.success, resp.error + units.logs()
    assert len(resp.composited_frames) == 2
    for jpeg in resp.composited_frames:
        assert jpeg[:2] == b"\xff\xd8"
        frame = cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR)
        assert frame is not None and frame.shape == (720, 1280, 3)


def assert_stops_cleanly(units: Units, frontend_first: bool = True) -> None:
    descendants = {p for proc in units.procs.values() for p in child_pids(proc.pid)}
    assert list_segments(units.instance)  # the request arena and the backgrounds exist
    t0 = time.monotonic()
    codes = units.stop_all(frontend_first)
    assert codes == {name: 0 for name in units.procs}, f"{codes}{units.logs()}"
    assert time.monotonic() - t0 < STOP_TIMEOUT_S
    deadline = time.monotonic() + 5  # helpers (resource tracker) go when their parent does
    while any(Path(f"/proc/{p}").exists() for p in descendants) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert [p for p in descendants if Path(f"/proc/{p}").exists()] == []
    assert list_segments(units.instance) == []


def assert_notified_systemd(units: Units) -> None:
    """Every role told its NOTIFY_SOCKET READY=1 with its own pid, pinged the watchdog, and
    said STOPPING=1 on SIGTERM."""
    for name, proc in units.procs.items():
        sent = units.notify.of(proc.pid)
        ready = [m for m in sent if m.get("READY") == "1"]
        assert len(ready) == 1, (name, sent)
        assert ready[0]["MAINPID"] == str(proc.pid)
        assert any(m.get("WATCHDOG") == "1" for m in sent), (name, sent)
        assert any(m.get("STOPPING") == "1" for m in sent), (name, sent)


def test_roles_as_separate_processes_serve_and_stop_cleanly(units: Units) -> None:
    """Compositors, gpu-worker, then frontend as `lipsync role` processes (no supervisor):
    healthy, 2 JPEGs for a batch of 2, and on SIGTERM every one exits 0 within 10 s and no
    /dev/shm segment of the instance is left."""
    units.start_workers()
    units.start("frontend")
    units.wait_healthy()
    assert_serves_two_jpegs(units)
    assert_stops_cleanly(units)
    assert_notified_systemd(units)


def test_frontend_first_then_workers(units: Units) -> None:
    """The frontend started alone is not ready (no READY=1, no gRPC) until the workers it
    waits for come up later; then it serves."""
    frontend = units.start("frontend")
    deadline = time.monotonic() + 60
    while not any(m.get("WATCHDOG") == "1" for m in units.notify.of(frontend.pid)):
        assert time.monotonic() < deadline and frontend.poll() is None, units.logs()
        time.sleep(0.1)
    time.sleep(2)  # it runs, and pings the watchdog, while it waits for the others
    assert frontend.poll() is None, units.logs()
    assert not [m for m in units.notify.of(frontend.pid) if m.get("READY")]
    with channel(units.address) as ch, pytest.raises(grpc.RpcError) as refused:
        pb_grpc.MonolithicServiceStub(ch).Health(pb.HealthRequest(), timeout=1)
    assert refused.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
    units.start("gpu-worker", 0)
    units.start("compositor", 1)
    units.start("compositor", 0)
    units.wait_healthy()
    assert_serves_two_jpegs(units)
    assert_stops_cleanly(units)
    assert_notified_systemd(units)


def test_a_killed_worker_restarted_like_systemd_does_serves_again(units: Units) -> None:
    """SIGKILL of the gpu-worker, then a new one (Restart=on-failure): it sweeps the dead
    one's background segment and the frontend serves through it again; then SIGTERM to
    every role at once still ends cleanly."""
    units.start_workers()
    units.start("frontend")
    units.wait_healthy()
    assert_serves_two_jpegs(units)
    old = units.procs["gpu-worker@0"]
    old_segments = [s for s in list_segments(units.instance) if f"-{old.pid}-" in s]
    assert old_segments  # its decoded backgrounds
    old.kill()
    old.wait()
    units.start("gpu-worker", 0)
    deadline = time.monotonic() + START_TIMEOUT_S
    while True:
        try:
            resp = units.infer(2)
            if resp.success:
                break
        except grpc.RpcError as exc:  # UNAVAILABLE until the new worker reports in
            assert exc.code() == grpc.StatusCode.UNAVAILABLE, exc
        assert time.monotonic() < deadline, units.logs()
        time.sleep(0.2)
    assert not set(old_segments) & set(list_segments(units.instance))
    assert_serves_two_jpegs(units)
    assert_stops_cleanly(units, frontend_first=False)


def test_a_loaded_standalone_frontend_stops_within_its_grace_period(tmp_path: Path,
                                                                   small_models_root: Path) -> None:
    """SIGTERM to a frontend run as a unit, while four WebSocket sessions and a StreamAudio
    call stream: it exits 0 within server.shutdown_grace_s + 2 s (a session task that
    swallowed its cancellation used to keep it running for tens of seconds)."""
    from tests.e2e.test_shutdown import GrpcStreamer, WebSocketStreamer

    grace = 2.0
    units = Units(tmp_path, small_models_root, **{"server.shutdown_grace_s": grace})
    try:
        units.start_workers()
        frontend = units.start("frontend")
        units.wait_healthy()
        streams = [WebSocketStreamer(units.ws_port) for _ in range(4)]
        streams.append(GrpcStreamer(units.address))  # type: ignore[arg-type]
        for stream in streams:
            stream.start()
        deadline = time.monotonic() + 60
        while any(stream.frames == 0 for stream in streams):
            assert time.monotonic() < deadline, units.logs()
            time.sleep(0.1)
        t0 = time.monotonic()
        frontend.send_signal(signal.SIGTERM)
        assert frontend.wait(grace + 10) == 0, units.logs()
        assert time.monotonic() - t0 < grace + 2
        for stream in streams:
            stream.join(10)
        assert [s.close_code for s in streams[:4]] == [1001] * 4  # type: ignore[attr-defined]
        assert_stops_cleanly(units)
    finally:
        units.kill_all()
