"""Death is announced: a role whose body raises says so (msg.RoleDown) before it exits, so
its work fails, or moves, at once instead of after its heartbeats go silent. The failure is
injected from outside with a message the role cannot serve, not with a debug switch."""
from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import zmq

from pipeline import messages as msg
from pipeline.bench.local_server import ServerProcess
from pipeline.config import load_config
from pipeline.runtime.addresses import Addresses
from tests.conftest import SMALL_FRAMES, ops_stats, write_config
from tests.e2e.load import Load
from tests.helpers import FrameOracle

HEARTBEAT_S = 2.0  # silence would take 3 beats (6 s): an answer within 1.5 s was announced


@pytest.fixture
def server(start_server) -> Iterator[ServerProcess]:
    srv = start_server(**{"runtime.heartbeat_s": HEARTBEAT_S,
                          "runtime.restart_backoff_max_s": 0.5, "server.request_timeout_s": 30})
    yield srv
    srv.stop()  # each test its own server


def _inject(config: Path, message: msg.Message) -> None:
    """Send `message` straight into gpu_worker 0's inbox, as the frontend would."""
    ctx = zmq.Context.instance()
    sock = ctx.socket(zmq.PUSH)
    sock.setsockopt(zmq.LINGER, 2000)
    sock.connect(Addresses.of(load_config(config)).worker_inbox(0))
    sock.send(msg.encode(message))
    sock.close()


def test_a_raising_gpu_worker_fails_its_requests_at_once(server: ServerProcess,
                                                        small_models_root: Path) -> None:
    """gpu_worker 0 is made to raise (a LoadModel for a model its config lacks: config
    skew, which it may not serve) under load: every request in flight fails with a clear
    UNAVAILABLE naming the cause well before heartbeat silence could have told, no frame is
    wrong, and the restarted worker serves again."""
    config: Path = server.config  # type: ignore[attr-defined]
    worker: dict[str, Any] = ops_stats(config)["gpu_workers"][0]
    with Load(server.address, FrameOracle.of(small_models_root, SMALL_FRAMES),
              clients=4, batch=8) as load:
        deadline = time.monotonic() + 30
        while ops_stats(config)["gpu_workers"][0]["inflight"] < 2:  # requests on the worker
            assert time.monotonic() < deadline, "no load on the worker"
            time.sleep(0.02)
        injected_at = time.monotonic()
        _inject(config, msg.LoadModel(request_id=1, worker_pid=worker["pid"],
                                      model_id="not-in-this-config"))
        deadline = injected_at + 60
        while not any(o.kind == "ok" and o.started > injected_at + 0.5 for o in load.outcomes):
            assert time.monotonic() < deadline, load.outcomes[-5:]  # serving again
            time.sleep(0.2)
    in_flight = [o for o in load.outcomes if o.started < injected_at < o.ended]
    announced = [o for o in load.outcomes if "gpu_worker 0 failed" in o.detail]
    assert announced, [o for o in load.outcomes if o.ended > injected_at - 0.5][:12]
    assert all(o.kind == "UNAVAILABLE" and "not-in-this-config" in o.detail
               for o in announced), announced
    assert all(o.ended - injected_at < 1.5 for o in in_flight), in_flight
    # the rest failed fast and clearly while it was down (a load it would have served
    # included); no wrong frame, no timeout
    unclear = [o for o in load.problems() if o.kind not in ("UNAVAILABLE", "failed")
               or "gpu_worker 0 " not in o.detail]
    assert unclear == []
    stats = ops_stats(config)["gpu_workers"][0]
    assert stats["pid"] != worker["pid"] and stats["restarts"] == 1 and stats["alive"]
    assert f"gpu_worker 0 (pid {worker['pid']}) is exiting" in server.log_path.read_text()  # type: ignore[union-attr]


def test_a_raising_compositor_tells_the_frontend_and_its_workers(tmp_path: Path,
                                                                 small_models_root: Path) -> None:
    """A compositor run on its own (`lipsync role compositor`) against a stand-in worker and
    frontend: it grants its credits, and when a worker sends it a message it cannot decode
    (a worker of another version), it sends RoleDown to the frontend and to the worker,
    then exits 1."""
    config = write_config(tmp_path / "config.yaml", small_models_root)
    addresses = Addresses.of(load_config(config))
    addresses.runtime_dir.mkdir(parents=True, exist_ok=True)
    ctx = zmq.Context.instance()
    frontend = ctx.socket(zmq.PULL)
    jobs = ctx.socket(zmq.ROUTER)
    for sock in (frontend, jobs):
        sock.setsockopt(zmq.LINGER, 0)
    frontend.bind(addresses.frontend_inbox)
    jobs.bind(addresses.worker_jobs(0))
    role = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "role", "compositor",
                             "--index", "0", "--config", str(config)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        assert jobs.poll(60_000), "the compositor never granted credits"
        identity, payload = jobs.recv_multipart()
        credit = msg.worker_jobs_decoder.decode(payload)
        assert isinstance(credit, msg.Credit) and (credit.index, credit.credits) == (0, 2)
        assert credit.pid == role.pid and credit.request_id == -1
        jobs.send_multipart([identity, b"\xc1 not msgpack"])
        to_worker = _role_down(jobs, lambda frames: frames[-1])
        to_frontend = _role_down(frontend, lambda frames: frames[0])
        for down in (to_worker, to_frontend):
            assert (down.role, down.index, down.pid) == ("compositor", 0, role.pid)
            assert down.reason.startswith("DecodeError")
        assert role.wait(15) == 1
    finally:
        if role.poll() is None:
            role.kill()
        stderr = role.communicate()[1].decode(errors="replace")
        frontend.close()
        jobs.close()
    assert "compositor 0 failed" in stderr


def _role_down(sock: zmq.Socket[Any], payload: Any) -> msg.RoleDown:
    """The first RoleDown `sock` receives within 10 s (heartbeats and credits skipped)."""
    deadline = time.monotonic() + 10
    while sock.poll(max(0, int((deadline - time.monotonic()) * 1000))):
        message = msg.frontend_decoder.decode(payload(sock.recv_multipart())) \
            if sock.type == zmq.PULL else msg.worker_jobs_decoder.decode(payload(sock.recv_multipart()))
        if isinstance(message, msg.RoleDown):
            return message
    raise AssertionError("no RoleDown within 10 s")


def test_a_killed_gpu_worker_fails_its_requests_within_400_ms(server: ServerProcess,
                                                               small_models_root: Path) -> None:
    """gpu_worker 0 is SIGKILLed under load, three times over: it cannot say a word, but the
    supervisor sees its process exit and tells the frontend at once, so the requests in
    flight on it fail UNAVAILABLE, naming the kill, within 400 ms (heartbeat silence would
    take 6 s here; a request whose worker part was done may still complete, with the right
    frames); the restarted worker serves again each time, and no frame is wrong."""
    import os
    import signal

    config: Path = server.config  # type: ignore[attr-defined]
    kills: list[float] = []
    with Load(server.address, FrameOracle.of(small_models_root, SMALL_FRAMES),
              clients=4, batch=8) as load:
        for _ in range(3):
            deadline = time.monotonic() + 60
            while True:  # the worker back, alive and busy
                worker = ops_stats(config)["gpu_workers"][0]
                if worker["alive"] and worker["inflight"] >= 1 and (
                        not kills or any(o.kind == "ok" and o.started > kills[-1] + 0.5
                                         for o in load.outcomes)):
                    break
                assert time.monotonic() < deadline, (worker, load.outcomes[-5:])
                time.sleep(0.02)
            # kill just after an answer: its client's next request is then at the worker
            # (queued, or in its UNet), not only in the compositors, whose part outlives the
            # worker's (slowest at the start, while they first encode each background)
            answered = len(load.outcomes)
            while len(load.outcomes) == answered:
                assert time.monotonic() < deadline, load.outcomes[-5:]
                time.sleep(0.002)
            time.sleep(0.01)
            kills.append(time.monotonic())
            os.kill(worker["pid"], signal.SIGKILL)
            time.sleep(1.0)
        deadline = time.monotonic() + 60
        while not any(o.kind == "ok" and o.started > kills[-1] + 0.5 for o in load.outcomes):
            assert time.monotonic() < deadline, load.outcomes[-5:]  # serving again
            time.sleep(0.2)
    rounds = []
    for killed in kills:
        in_flight = [o for o in load.outcomes if o.started < killed < o.ended]
        failed = [o for o in in_flight if o.kind != "ok"]
        assert failed, f"no request failed at the kill: {in_flight}"
        assert all(o.kind == "UNAVAILABLE" and "killed by SIGKILL" in o.detail
                   for o in failed), failed
        rounds.append(max(o.ended - killed for o in failed))
    print("SIGKILL -> UNAVAILABLE ms, per round:", [round(r * 1000) for r in rounds])
    assert max(rounds) < 0.4, rounds
    assert not [o for o in load.problems() if o.kind == "wrong frames"]


def test_a_dead_frontends_arena_is_one_line_per_compositor(start_server,
                                                          small_models_root: Path) -> None:
    """The frontend is SIGKILLed under load: the jobs the worker still had for its arena
    fail in the compositors with one line each per arena ('... is gone ...'), not a
    traceback per frame; the restarted frontend serves."""
    import collections
    import os
    import re
    import signal

    from pipeline.bench.local_server import wait_healthy
    from tests.conftest import role_pids

    srv = start_server()
    try:
        with Load(srv.address, FrameOracle.of(small_models_root, SMALL_FRAMES),
                  clients=8, batch=16):
            time.sleep(2)
            (frontend,) = role_pids(srv.proc.pid, "frontend")
            os.kill(frontend, signal.SIGKILL)
            time.sleep(3)
        assert wait_healthy(srv.address, 60, lambda: None)
    finally:
        srv.stop()
    log = srv.log_path.read_text()  # type: ignore[union-attr]
    assert "Traceback" not in log, log[log.index("Traceback") - 300:][:3000]
    gone = collections.Counter(re.findall(r"\[(compositor \d+)\] .*segment (\S+) is gone", log))
    assert all(n == 1 for n in gone.values()), gone


def test_an_exit_is_read_before_the_child_is_reaped() -> None:
    """ExitWatch: None while a child runs; its exit code, or minus the signal that killed
    it, as soon as it is a zombie (what the supervisor's watch reads before the sentinel)."""
    import signal

    from pipeline.runtime.process import ExitWatch

    running = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    exiting = subprocess.Popen([sys.executable, "-c", "raise SystemExit(3)"])
    watches = ExitWatch(running.pid), ExitWatch(exiting.pid)
    try:
        assert watches[0].exit_status() is None
        running.send_signal(signal.SIGKILL)
        deadline = time.monotonic() + 10
        while any(watch.exit_status() is None for watch in watches):
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert tuple(watch.exit_status() for watch in watches) == (-signal.SIGKILL, 3)
    finally:
        running.kill()
        assert (running.wait(), exiting.wait()) == (-signal.SIGKILL, 3)
        for watch in watches:
            watch.close()


def test_an_exit_watch_reads_its_own_process_only() -> None:
    """ExitWatch, the supervisor's kept descriptor: None while the child runs, its status
    once it is a zombie, and None again once it is reaped, never the status of a process
    that got its pid since."""
    import signal

    from pipeline.runtime.process import ExitWatch

    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    watch = ExitWatch(child.pid)
    try:
        assert watch.exit_status() is None
        child.send_signal(signal.SIGKILL)
        deadline = time.monotonic() + 10
        while watch.exit_status() is None:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert watch.exit_status() == -signal.SIGKILL
        assert child.wait() == -signal.SIGKILL
        assert watch.exit_status() is None  # reaped: the descriptor names no process now
    finally:
        child.kill()
        child.wait()
        watch.close()
