"""Operations on the real server: standard health and reflection (a real grpcurl), drain."""
from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from pipeline.bench.local_server import ServerProcess
from pipeline.client import channel
from pipeline.rpc import monolithic_pb2 as pb
from pipeline.rpc import monolithic_pb2_grpc as pb_grpc
from tests.conftest import write_config

GRPCURL = shutil.which("grpcurl", path=str(Path(sys.executable).parent))


@pytest.fixture(scope="module")
def server(start_server):
    from pipeline.bench.local_server import free_port

    return start_server(**{
        "models.sanders": {"model_path": "demo/unet.onnx", "background_dir": "demo/frames",
                           "crop_rects_path": "demo/crop_rects.json", "num_frames": 32},
        "ops.metrics_port": free_port()})


def grpcurl(server: ServerProcess, *args: str) -> dict:
    if GRPCURL is None:
        pytest.skip("grpcurl not installed (pip install -e '.[test]' brings it)")
    out = subprocess.run([GRPCURL, "-plaintext", *args], capture_output=True, text=True,
                         timeout=30)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def test_the_readmes_grpcurl_lines_work_verbatim(server) -> None:
    """Health, ListModels, LoadModel, UnloadModel and GetModelStats with grpcurl and server
    reflection, as the README writes them (no proto file)."""
    host = f"localhost:{server.grpc_port}"
    health = grpcurl(server, host, "monolithic.MonolithicService/Health")
    assert health["healthy"] is True and health["max_models"] == 40
    listed = grpcurl(server, host, "monolithic.MonolithicService/ListModels")
    assert {m["model_id"] for m in listed["models"]} == {"demo", "sanders"}
    loaded = grpcurl(server, "-d", '{"model_id": "sanders"}', host,
                     "monolithic.MonolithicService/LoadModel")
    assert loaded["success"] is True
    again = grpcurl(server, "-d", '{"model_id": "sanders", "preferred_gpu": 0}', host,
                    "monolithic.MonolithicService/LoadModel")
    assert again["success"] is True and again.get("gpu_id", 0) == 0
    unloaded = grpcurl(server, "-d", '{"model_id": "sanders"}', host,
                       "monolithic.MonolithicService/UnloadModel")
    assert unloaded["success"] is True
    stats = grpcurl(server, host, "monolithic.MonolithicService/GetModelStats")
    assert {m["model_id"] for m in stats["models"]} == {"demo", "sanders"}


def test_reflection_lists_every_service(server) -> None:
    """grpcurl list (server reflection) shows our services, health and reflection."""
    if GRPCURL is None:
        pytest.skip("grpcurl not installed")
    out = subprocess.run([GRPCURL, "-plaintext", f"localhost:{server.grpc_port}", "list"],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    services = set(out.stdout.split())
    assert {"monolithic.MonolithicService", "InferenceService", "grpc.health.v1.Health",
            "grpc.reflection.v1alpha.ServerReflection"} <= services


def test_standard_health_says_serving(server) -> None:
    """grpc.health.v1: SERVING overall and for MonolithicService while every role is up."""
    with channel(server.address) as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        for service in ("", "monolithic.MonolithicService"):
            resp = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
            assert resp.status == health_pb2.HealthCheckResponse.SERVING
    check = grpcurl(server, f"localhost:{server.grpc_port}", "grpc.health.v1.Health/Check")
    assert check["status"] == "SERVING"


def test_ops_socket_stats_table_and_metrics(server) -> None:
    """The ops socket answers every role's stats; lipsync stats prints them; /metrics too."""
    import urllib.request

    import yaml

    from pipeline.client import build_request

    with channel(server.address) as ch:
        stub = pb_grpc.MonolithicServiceStub(ch)
        for _ in range(3):
            assert stub.InferBatchComposite(build_request(server.config, "demo", 2, 0),
                                            timeout=60).success
        assert not stub.InferBatchComposite(pb.CompositeBatchRequest(), timeout=10).success
    cli = [sys.executable, "-m", "pipeline.cli", "stats", "--config", str(server.config)]
    raw = subprocess.run([*cli, "--json"], capture_output=True, text=True, timeout=30, check=True)
    stats = json.loads(raw.stdout)
    assert stats["frontend"]["pid"] > 0 and stats["frontend"]["rss_bytes"] > 0
    (worker,) = stats["gpu_workers"]
    assert worker["alive"] and worker["models"] == ["demo"] and worker["uptime_s"] > 0
    assert {c["index"] for c in stats["compositors"]} == {0, 1}
    assert all(c["restarts"] == 0 and c["alive"] for c in stats["compositors"])
    demo = stats["models"]["demo"]
    assert demo["state"] == "ready" and demo["requests"] >= 3
    for stage in ("queue", "audio", "encoder", "unet", "composite", "jpeg"):
        assert demo["stages"][stage]["count"] >= 3 and demo["stages"][stage]["ns"] > 0, stage
    assert stats["arena"]["blocks"] == 0 and stats["arena"]["capacity_bytes"] == 512 * 2**20
    assert stats["failures"]["invalid"] >= 1
    table = subprocess.run(cli, capture_output=True, text=True, timeout=30, check=True).stdout
    assert "gpu_worker 0" in table and "compositor 1" in table and "demo" in table
    port = yaml.safe_load(server.config.read_text())["ops"]["metrics_port"]
    metrics = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    for name in ('lipsync_requests_total{model="demo"}', "lipsync_request_failures_total",
                 'lipsync_stage_duration_seconds_count{stage="unet"}', "lipsync_frames_total",
                 "lipsync_queue_depth", "lipsync_model_load_seconds_count", "lipsync_loaded_models",
                 "lipsync_device_memory_used_bytes", "lipsync_websocket_sessions"):
        assert name in metrics, name


def test_sigterm_drains_in_flight_work_then_exits_0(tmp_path: Path,
                                                   small_models_root: Path) -> None:
    """SIGTERM: in-flight requests finish, new ones get UNAVAILABLE, WebSockets close 1001."""
    config = write_config(tmp_path / "config.yaml", small_models_root)
    srv = ServerProcess(config, log_path=tmp_path / "server.log")
    srv.start()
    results: list[pb.CompositeBatchResponse] = []

    def long_request() -> None:
        with channel(srv.address) as ch:
            audio = np.zeros(47 * 640, np.float32).tobytes()
            results.append(pb_grpc.MonolithicServiceStub(ch).InferBatchComposite(
                pb.CompositeBatchRequest(model_id="demo", raw_audio=audio, batch_size=32),
                timeout=60))

    async def websocket_close_code() -> int:
        async with connect(f"ws://127.0.0.1:{srv.ws_port}/audio") as ws:
            await ws.recv()
            opened.set()
            try:
                while True:
                    await ws.recv()
            except ConnectionClosed as exc:
                return exc.rcvd.code if exc.rcvd else -1

    opened = threading.Event()
    codes: list[int] = []
    ws_thread = threading.Thread(target=lambda: codes.append(asyncio.run(websocket_close_code())))
    ws_thread.start()
    assert opened.wait(10)
    threads = [threading.Thread(target=long_request) for _ in range(3)]
    for t in threads:
        t.start()
    time.sleep(0.4)  # the requests are in flight
    srv.proc.send_signal(signal.SIGTERM)
    time.sleep(0.3)
    with channel(srv.address) as ch:
        with pytest.raises(grpc.RpcError) as refused:
            pb_grpc.MonolithicServiceStub(ch).Health(pb.HealthRequest(), timeout=5)
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    for t in threads:
        t.join(30)
    ws_thread.join(30)
    assert srv.proc.wait(15) == 0
    srv.stop()
    assert len(results) == 3 and all(r.success and len(r.composited_frames) == 32 for r in results)
    assert codes == [1001]


def test_sigkill_under_load_costs_requests_never_the_service(tmp_path: Path,
                                                            small_models_root: Path) -> None:
    """SIGKILL a gpu_worker and a compositor under load, again and again: in-flight requests
    fail fast and clearly, no wrong frame, no stuck arena block, no leaked segment, and the
    frontend's memory does not grow."""
    import cv2
    import yaml

    from pipeline.cli.stats import fetch
    from pipeline.shm.segment import list_segments
    from tests.conftest import SMALL_FRAMES as DEMO_FRAMES
    from tests.conftest import child_pids, role_pids

    kills = int(os.environ.get("LIPSYNC_KILL_ROUNDS", "3"))  # 20 and more: before a release
    config = write_config(tmp_path / "config.yaml", small_models_root, **{
        "runtime.restart_backoff_max_s": 0.5, "server.request_timeout_s": 20})
    raw = yaml.safe_load(config.read_text())
    instance = raw["runtime"]["instance"]
    ops = f"ipc://{raw['runtime']['dir']}/{instance}-ops.ipc"
    x1, y1, x2, y2 = (20, 20, 340, 135)  # the frame counter
    counters = np.stack([cv2.imread(str(small_models_root / "demo" / "frames" / f"frame_{i:04d}.jpg"))
                         [y1:y2, x1:x2] for i in range(DEMO_FRAMES)]).astype(np.float32)
    stop = threading.Event()
    outcomes: list[str] = []
    slow: list[float] = []

    def client(c: int) -> None:
        audio = np.zeros(19 * 640, np.float32).tobytes()
        with channel(srv.address, retries=False) as ch:  # each failure as the server says it
            stub = pb_grpc.MonolithicServiceStub(ch)
            r = 0
            while not stop.is_set():
                start = (c * 50 + r * 7) % DEMO_FRAMES
                r += 1
                t0 = time.monotonic()
                try:
                    resp = stub.InferBatchComposite(pb.CompositeBatchRequest(
                        model_id="demo", raw_audio=audio, batch_size=4, start_frame_idx=start),
                        timeout=30)
                except grpc.RpcError as exc:
                    outcomes.append("unavailable" if exc.code() == grpc.StatusCode.UNAVAILABLE
                                    else f"grpc {exc.code()}: {exc.details()}")
                    time.sleep(0.05)
                    continue
                finally:
                    slow.append(time.monotonic() - t0)
                if not resp.success:
                    outcomes.append(f"error: {resp.error}")
                    continue
                got = []
                for j in resp.composited_frames:
                    f = cv2.imdecode(np.frombuffer(j, np.uint8), cv2.IMREAD_COLOR)
                    corner = f[y1:y2, x1:x2].astype(np.float32)
                    got.append(int(np.argmin(np.abs(counters - corner).mean(axis=(1, 2, 3)))))
                want = [(start + i) % DEMO_FRAMES for i in range(4)]
                outcomes.append("ok" if got == want else f"WRONG FRAMES {got} != {want}")

    with ServerProcess(config, log_path=tmp_path / "server.log") as srv:
        (frontend,) = role_pids(srv.proc.pid, "frontend")
        clients = [threading.Thread(target=client, args=(c,)) for c in range(3)]
        for t in clients:
            t.start()
        time.sleep(2)
        rss_start = fetch(ops)["frontend"]["rss_bytes"]
        for round_ in range(kills):
            for role in ("gpu_worker", "compositor"):
                pids = role_pids(srv.proc.pid, role)
                served = outcomes.count("ok")
                os.kill(pids[0], signal.SIGKILL)
                deadline = time.monotonic() + 30
                while True:  # replaced, seen alive by the frontend, and serving again
                    assert time.monotonic() < deadline, f"round {round_}: {role} not back"
                    time.sleep(0.2)
                    stats = fetch(ops)
                    roles = stats["gpu_workers"] + stats["compositors"]
                    if (all(r["alive"] for r in roles) and pids[0] not in [r["pid"] for r in roles]
                            and outcomes.count("ok") > served):
                        break
        stop.set()
        for t in clients:
            t.join(60)
        time.sleep(1.0)
        stats = fetch(ops)
        rss_end = stats["frontend"]["rss_bytes"]
        assert stats["arena"]["blocks"] == 0 and stats["arena"]["used_bytes"] == 0
        live = set(list_segments(instance))
        assert len([n for n in live if n.endswith("-requests")]) == 1
        assert len([n for n in live if "-bg" in n]) <= 1  # the one loaded model, if loaded
        assert [w["restarts"] for w in stats["gpu_workers"]] == [kills]
        assert frontend in child_pids(srv.proc.pid)  # the frontend never died
    assert list_segments(instance) == []
    wrong = [o for o in outcomes if o.startswith("WRONG")]
    assert wrong == []
    unclear = [o for o in outcomes if o not in ("ok", "unavailable")
               and "unavailable" not in o and "restarted" not in o]
    assert unclear == []
    assert outcomes.count("ok") > kills  # it kept serving between the kills
    assert max(slow) < 10  # nothing waited for a timeout: dead roles fail requests fast
    assert rss_end - rss_start < 40 * 2**20, (rss_start, rss_end)


def test_a_second_server_of_the_same_instance_refuses_to_start(server, tmp_path: Path) -> None:
    """Another lipsync serve with the same instance exits with a clear error; the first is unharmed."""
    second = ServerProcess(server.config, log_path=tmp_path / "second.log",
                           start_timeout_s=60)
    with pytest.raises(RuntimeError, match="exited with 1"):
        second.start()
    assert "is already running (pid" in (tmp_path / "second.log").read_text()
    with channel(server.address) as ch:
        assert pb_grpc.MonolithicServiceStub(ch).Health(pb.HealthRequest(), timeout=5).healthy
