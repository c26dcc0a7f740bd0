"""`lipsync bench` in gRPC batch mode against a real server: the JSON it promises, the
in-process baseline and ONNX-Runtime-only comparisons, --duration, and the bench model."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.bench.local_server import ServerProcess
from tests.conftest import write_config


def bench(*args: str) -> dict:
    done = subprocess.run([sys.executable, "-m", "pipeline.cli", "bench", "--json", *args],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def server(start_server):
    return start_server()


def test_compare_inprocess_and_ort(server: ServerProcess) -> None:
    result = bench("--config", str(server.config), "--address", server.address,  # type: ignore[attr-defined]
                   "--batch", "2", "--concurrency", "2", "--requests", "6", "--warmup", "1",
                   "--compare", "inprocess", "--compare", "ort", "--probe", "2",
                   "--visual", "server")
    assert result["errors"] == 0 and result["requests"] == 6 and result["batch"] == 2
    assert result["fps"] > 0 and 0 < result["p50_ms"] <= result["p95_ms"] <= result["p99_ms"]
    stages = result["stage_ms"]
    for stage in ("queue", "input_copy", "audio", "encoder", "visual", "unet", "paste", "jpeg",
                  "composite_critical", "compute", "server_total"):
        assert stage in stages
    assert stages["unet"] > 0 and stages["visual"] > 0 and stages["jpeg"] > 0
    # the critical path is part of everything the compositors did, and the compute of a
    # request is within its server time
    assert stages["composite_critical"] <= stages["paste"] + stages["jpeg"] + 0.01
    assert stages["compute"] <= stages["server_total"]
    # the baseline ran the same requests, in the same run; ratio is what it says
    assert result["baseline_requests"] == 6 and result["baseline_fps"] > 0
    assert result["baseline_backend"].startswith("onnxruntime-cpu fp32")  # the config's provider
    assert result["ratio"] == pytest.approx(result["fps"] / result["baseline_fps"], rel=1e-2)
    assert set(result["baseline_stage_ms"]) == {"audio", "encoder", "visual", "unet", "paste",
                                                "jpeg"}
    assert result["ort_fps"] > 0 and result["provider"] == "cpu"
    assert result["ort_ratio"] == pytest.approx(result["fps"] / result["ort_fps"], rel=1e-2)
    # where the CPU went, per process, from the server's ops socket and this process
    cpu = result["cpu_ms_per_request"]
    assert {"client", "frontend", "gpu_worker 0", "compositor 0", "compositor 1"} <= set(cpu)
    assert cpu["gpu_worker 0"] > 0 and cpu["total"] == pytest.approx(
        sum(v for k, v in cpu.items() if k != "total"), abs=0.1)
    assert result["baseline_cpu_ms_per_request"] > 0
    # the pipeline's own cost: every role's CPU per request (not the clients') against the
    # in-process engine's
    server_ms = sum(v for k, v in cpu.items() if k not in ("client", "total"))
    assert result["server_cpu_ms_per_request"] == pytest.approx(server_ms, abs=0.02)
    assert result["cpu_ratio"] == pytest.approx(
        server_ms / result["baseline_cpu_ms_per_request"], rel=1e-2)
    single = result["single_request"]
    assert single["requests"] == 2
    assert single["overhead_ms_p50"] == pytest.approx(
        single["latency_ms_p50"] - single["compute_ms_mean"], abs=single["latency_ms_p50"])
    assert 0 < single["compute_ms_mean"] < single["latency_ms_p50"]


def test_duration_mode_with_client_built_visual(server: ServerProcess) -> None:
    result = bench("--config", str(server.config), "--address", server.address,  # type: ignore[attr-defined]
                   "--batch", "1", "--concurrency", "2", "--duration", "1.5", "--warmup", "1",
                   "--probe", "0")
    assert result["errors"] == 0 and result["requests"] > 0 and result["visual"] == "client"
    assert 1.4 <= result["wall_s"] <= 15.0
    assert result["stage_ms"]["input_copy"] > 0 and result["stage_ms"]["visual"] == 0
    assert "single_request" not in result and "ratio" not in result


def test_the_bench_model_is_built_and_served(tmp_path: Path, small_models_root: Path) -> None:
    """--model bench builds the SyncTalk-2D-sized UNet where the config expects it (when
    missing) and the pipeline serves it."""
    config = write_config(tmp_path / "config.yaml", small_models_root, **{"models.bench": {
        "model_path": "bench/unet.onnx", "background_dir": "demo/frames",
        "crop_rects_path": "demo/crop_rects.json", "num_frames": 10}})
    (small_models_root / "bench" / "unet.onnx").unlink(missing_ok=True)
    with ServerProcess(config, log_path=tmp_path / "server.log") as srv:
        result = bench("--config", str(config), "--address", srv.address, "--model", "bench",
                       "--batch", "1", "--concurrency", "1", "--requests", "2", "--warmup", "1",
                       "--probe", "0", "--visual", "server")
    assert (small_models_root / "bench" / "unet.onnx").is_file()
    assert result["errors"] == 0 and result["model"] == "bench"
    assert result["stage_ms"]["unet"] > 5 * result["stage_ms"]["audio"]  # a real network's cost


def test_providers_are_compared_in_alternating_rounds(small_models_root: Path,
                                                      tmp_path: Path) -> None:
    """--providers cpu,openvino:1 starts one server per entry, measures both in the same
    rounds, names what each worker ran and gives the ratio of their frames/s."""
    pytest.importorskip("openvino", reason="the openvino extra is not installed")
    config = write_config(tmp_path / "config.yaml", small_models_root)
    result = bench("--config", str(config), "--model", "demo", "--providers", "cpu,openvino:1",
                   "--duration", "2", "--rounds", "2", "--batch", "2", "--concurrency", "1")
    assert result["providers"] == ["cpu", "openvino:1"] and result["rounds"] == 2
    for entry, backend in (("cpu", "onnxruntime-cpu fp32"), ("openvino:1", "openvino ")):
        assert result[entry]["errors"] == 0 and result[entry]["fps"] > 0
        assert len(result[entry]["fps_per_round"]) == 2
        assert result[entry]["backend"].startswith(backend)
    assert result["openvino:1"]["backend"].split(" (")[0].endswith("x1")
    assert result["ratio_openvino:1_vs_cpu"] == pytest.approx(
        result["openvino:1"]["fps"] / result["cpu"]["fps"], rel=1e-2)


def test_bad_provider_entries_are_refused() -> None:
    """A repeated, unknown or non-numeric entry is a one-line error before any server starts."""
    for entries in ("cpu,cpu", "cpu,tpu", "cpu,openvino:x", "cpu"):
        done = subprocess.run([sys.executable, "-m", "pipeline.cli", "bench", "--providers",
                               entries, "--duration", "1"], capture_output=True, text=True,
                              timeout=120)
        assert done.returncode != 0 and "--providers" in done.stderr, (entries, done.stderr)


def test_refused_calls_are_counted_as_errors_not_a_crash(start_server) -> None:
    """A server that refuses (RESOURCE_EXHAUSTED: one request in flight at most, four
    clients) is measured: every refusal an error with its status, the run completes."""
    busy = start_server(**{"server.max_inflight_requests": 1})
    done = subprocess.run([sys.executable, "-m", "pipeline.cli", "bench", "--json", "--config",
                           str(busy.config), "--address", busy.address, "--batch", "2",
                           "--concurrency", "4", "--requests", "40", "--warmup", "2",
                           "--visual", "server"], capture_output=True, text=True, timeout=300)
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    assert done.returncode == 1  # errors: the exit status says so
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["errors"] > 0 and result["requests"] + result["errors"] == 40
    assert result["first_error"].startswith("RESOURCE_EXHAUSTED: server busy")
