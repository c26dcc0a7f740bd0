"""/healthz and /readyz of a real server on its metrics port, from start-up to exit."""
from __future__ import annotations

import signal
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

from pipeline.bench.local_server import ServerProcess, free_port
from pipeline.client import build_request, channel
from pipeline.rpc import monolithic_pb2_grpc as pb_grpc
from tests.conftest import write_config


def probe(port: int, path: str) -> tuple[int, str]:
    """(status, body); (0, reason) when nothing answers."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=2) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()
    except OSError as exc:
        return 0, str(exc)


def test_readiness_follows_start_serving_and_sigterm(tmp_path: Path, models_root: Path) -> None:
    """/healthz is 200 while the process is up; /readyz is 503 while starting, 200 while
    serving, and 503 at once on SIGTERM, while the box still serves its lame duck
    (server.drain_delay_s) and then exits 0."""
    port = free_port()
    config = write_config(tmp_path / "config.yaml", models_root, **{
        "ops.metrics_port": port, "server.drain_delay_s": 2.0})
    srv = ServerProcess(config, log_path=tmp_path / "server.log")
    seen: list[tuple[int, int, str]] = []
    started = threading.Event()

    def poll_during_start() -> None:
        while not started.is_set():
            health, (ready, body) = probe(port, "/healthz")[0], probe(port, "/readyz")
            seen.append((health, ready, body))
            time.sleep(0.05)

    poller = threading.Thread(target=poll_during_start)
    poller.start()
    try:
        srv.start()
    finally:
        started.set()
        poller.join()
    try:
        assert (200, 503, "not ready: starting\n") in seen, seen
        assert probe(port, "/healthz") == (200, "ok\n")
        assert probe(port, "/readyz") == (200, "ready\n")
        assert "lipsync_requests_total" in probe(port, "/metrics")[1]
        request = build_request(config, "demo", 2, 0, client_visual=False)
        sigterm = time.monotonic()
        srv.proc.send_signal(signal.SIGTERM)  # type: ignore[union-attr]
        while probe(port, "/readyz")[0] != 503:
            assert time.monotonic() - sigterm < 0.5, "readiness still 200 after SIGTERM"
            time.sleep(0.01)
        assert probe(port, "/readyz") == (503, "not ready: draining\n")
        assert probe(port, "/healthz") == (200, "ok\n")
        with channel(srv.address) as ch:  # the lame duck still serves a new request
            resp = pb_grpc.MonolithicServiceStub(ch).InferBatchComposite(request, timeout=30)
        assert resp.success and len(resp.composited_frames) == 2, resp.error
        assert time.monotonic() - sigterm < 2.0
        assert srv.proc.wait(15) == 0  # type: ignore[union-attr]
        assert probe(port, "/healthz")[0] == 0  # the process is gone, and its port with it
    finally:
        srv.stop()


def test_a_failed_preload_is_not_ready_until_the_model_loads(tmp_path: Path,
                                                            small_models_root: Path) -> None:
    """A preloaded model that fails to load (a corrupt UNet) makes /readyz 503 naming it and
    gRPC health NOT_SERVING, as ListModels shows it FAILED; the reason is logged. Once the
    file is fixed and LoadModel loads it, /readyz is 200 and health SERVING again."""
    import shutil
    import subprocess
    import sys

    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from pipeline.rpc import monolithic_pb2 as pb

    root = tmp_path / "models"
    shutil.copytree(small_models_root, root)
    (root / "broken").mkdir()
    unet = root / "broken" / "unet.onnx"
    unet.write_bytes(b"not an ONNX graph")
    port, grpc_port = free_port(), free_port()
    config = write_config(tmp_path / "config.yaml", root, **{
        "ops.metrics_port": port, "models.broken": {
            "model_path": "broken/unet.onnx", "background_dir": "demo/frames",
            "crop_rects_path": "demo/crop_rects.json", "num_frames": 32, "preload_model": True}})
    log_path = tmp_path / "server.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "pipeline.cli", "serve", "--config", str(config),
             "--grpc-port", str(grpc_port), "--ws-port", str(free_port())],
            stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while probe(port, "/readyz")[1] in ("not ready: starting\n",) or probe(port, "/readyz")[0] == 0:
            assert proc.poll() is None and time.monotonic() < deadline, log_path.read_text()[-3000:]
            time.sleep(0.1)
        status, body = probe(port, "/readyz")
        assert status == 503 and "preloaded model 'broken' failed to load" in body, body
        address = f"127.0.0.1:{grpc_port}"
        with channel(address) as ch:
            health = health_pb2_grpc.HealthStub(ch)
            stub = pb_grpc.MonolithicServiceStub(ch)
            assert health.Check(health_pb2.HealthCheckRequest(), timeout=5).status \
                == health_pb2.HealthCheckResponse.NOT_SERVING
            states = {m.model_id: m.state for m in stub.ListModels(pb.ListModelsRequest()).models}
            assert states == {"demo": pb.MODEL_STATE_READY, "broken": pb.MODEL_STATE_FAILED}
            assert "not ready: preloaded model 'broken' failed to load" in log_path.read_text()
            shutil.copyfile(root / "demo" / "unet.onnx", unet)
            loaded = stub.LoadModel(pb.LoadModelRequest(model_id="broken"), timeout=60)
            assert loaded.success, loaded.error
            deadline = time.monotonic() + 2
            while probe(port, "/readyz") != (200, "ready\n"):
                assert time.monotonic() < deadline, probe(port, "/readyz")
                time.sleep(0.05)
            assert health.Check(health_pb2.HealthCheckRequest(), timeout=5).status \
                == health_pb2.HealthCheckResponse.SERVING
    finally:
        proc.terminate()
        assert proc.wait(30) == 0
