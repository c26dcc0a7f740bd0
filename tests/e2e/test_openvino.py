"""`lipsync serve` with `gpus.provider: openvino`: the real multi-process server answers on
OpenVINO, and the log, Health, ListModels and `lipsync stats` say which backend, precision
and threads each worker runs; a precision the CPU cannot run stops the start by name."""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline.bench.local_server import ServerProcess, free_port
from pipeline.client import build_request, channel, speech_like_audio
from pipeline.rpc import monolithic_pb2 as pb
from pipeline.rpc import monolithic_pb2_grpc as pb_grpc
from tests.conftest import ops_stats, write_config

ov_runtime = pytest.importorskip("pipeline.gpu_worker.openvino_runtime",
                                 reason="the openvino package (the openvino extra) is not installed")
PRECISION = "bf16" if ov_runtime.bf16_units() else "fp32"


def _serve(config: Path) -> list[str]:
    return [sys.executable, "-m", "pipeline.cli", "serve", "--config", str(config),
            "--grpc-port", str(free_port()), "--ws-port", str(free_port())]


@pytest.fixture(scope="module")
def server(start_server) -> ServerProcess:
    return start_server(**{"gpus.provider": "openvino", "gpus.unet_precision": "auto"})


def test_requests_are_served_on_openvino_and_every_report_says_so(server: ServerProcess) -> None:
    """A batch comes back whole; the worker's log line, Health, ListModels and the ops
    socket (what `lipsync stats` prints) name OpenVINO, the precision this CPU gets (bf16
    with bf16 units, else fp32) and the inference threads."""
    request = build_request(server.config, "demo", 4, start=0)
    request.raw_audio = speech_like_audio((4 + 15) * 0.04).tobytes()
    with channel(server.address) as ch:
        stub = pb_grpc.MonolithicServiceStub(ch)
        response = stub.InferBatchComposite(request, timeout=60)
        assert response.success, response.error
        assert len(response.composited_frames) == 4
        health = stub.Health(pb.HealthRequest(), timeout=10)
        models = {m.model_id: m for m in stub.ListModels(pb.ListModelsRequest(), timeout=10).models}
    assert list(health.backends) == ["openvino"] and list(health.precisions) == [PRECISION]
    assert (models["demo"].backend, models["demo"].precision) == ("openvino", PRECISION)
    deadline = time.monotonic() + 10
    while True:  # the compositors' CPU reaches the worker with their credits, then a heartbeat
        worker = ops_stats(server.config)["gpu_workers"][0]
        measured = worker["thread_plan"]["cpu_ms_per_frame"]
        if measured["composite"] is not None or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert (worker["backend"], worker["precision"]) == ("openvino", PRECISION)
    assert worker["threads"] >= 1 and worker["thread_plan"]["threads"] == worker["threads"]
    assert measured["unet"] > 0 and measured["prepare"] > 0 and measured["composite"] > 0
    log = server.log_path.read_text()  # type: ignore[union-attr]
    assert f"ready (openvino {PRECISION}, {worker['threads']} threads, device 0)" in log
    stats = subprocess.run([sys.executable, "-m", "pipeline.cli", "stats", "--config",
                            str(server.config)], capture_output=True, text=True, timeout=60)
    assert stats.returncode == 0, stats.stderr
    assert f"openvino {PRECISION} ×{worker['threads']}" in stats.stdout
    assert "gpu_worker 0 threads" in stats.stdout and "CPU ms per frame: unet" in stats.stdout
    json.loads(subprocess.run([sys.executable, "-m", "pipeline.cli", "stats", "--json",
                               "--config", str(server.config)], capture_output=True, text=True,
                              timeout=60).stdout)


def test_the_onnx_runtime_worker_reports_itself_too(start_server) -> None:
    """A `cpu` worker says onnxruntime-cpu fp32 in Health; an unloaded model names no
    backend in ListModels (it runs nowhere yet)."""
    server = start_server(**{"models.demo.preload_model": False})
    with channel(server.address) as ch:
        stub = pb_grpc.MonolithicServiceStub(ch)
        health = stub.Health(pb.HealthRequest(), timeout=10)
        demo = stub.ListModels(pb.ListModelsRequest(), timeout=10).models[0]
    assert list(health.backends) == ["onnxruntime-cpu"] and list(health.precisions) == ["fp32"]
    assert (demo.state, demo.backend, demo.precision) == (pb.MODEL_STATE_UNLOADED, "", "")


@pytest.mark.skipif(ov_runtime.bf16_units(), reason="this CPU has bf16 units: bf16 is allowed")
def test_bf16_without_units_stops_the_start(tmp_path: Path, small_models_root: Path) -> None:
    """gpus.unet_precision bf16 on a CPU without bf16 units is refused at start, by name."""
    config = write_config(tmp_path / "config.yaml", small_models_root,
                          **{"gpus.provider": "openvino", "gpus.unet_precision": "bf16"})
    done = subprocess.run(_serve(config), capture_output=True, text=True, timeout=120)
    assert done.returncode != 0 and "has no bf16 units" in done.stderr


def test_bf16_on_onnx_runtime_stops_the_start(tmp_path: Path, small_models_root: Path) -> None:
    """gpus.unet_precision bf16 with the cpu provider (ONNX Runtime) is refused at start
    with the reason, before any process starts."""
    config = write_config(tmp_path / "config.yaml", small_models_root,
                          **{"gpus.provider": "cpu", "gpus.unet_precision": "bf16"})
    done = subprocess.run(_serve(config), capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    assert "gpus.unet_precision is bf16, which the cpu provider does not run" in done.stderr
