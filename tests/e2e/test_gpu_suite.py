"""scripts/gpu-suite --dry-run: every step of the GPU suite, here on the CPU provider at
small sizes, writes the JSON and log it promises and prints its table last."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_dry_run_runs_every_step_and_reports(tmp_path: Path) -> None:
    """The dry run passes its GPU tests on the CPU (compositor.device gpu's among them),
    measures every benchmark (a server compositing on the device too), derives the figures,
    logs the CPU worker ignoring CUDA graphs, and ends with the table."""
    out = tmp_path / "out"
    done = subprocess.run([sys.executable, str(REPO / "scripts" / "gpu-suite"), "--dry-run",
                           "--out", str(out)], capture_output=True, text=True, timeout=300,
                          cwd=tmp_path)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    report = json.loads((out / "gpu-suite.json").read_text())
    steps = {s["name"]: s for s in report["steps"]}
    assert report["dry_run"] is True and report["elapsed_s"] <= report["budget_s"]
    assert steps["wheels"]["status"] == "skipped" and steps["install"]["status"] == "skipped"
    assert {n: s["status"] for n, s in steps.items() if n not in ("wheels", "install")} == {
        "assets": "ok", "probe": "ok", "tests": "ok", "unet": "ok",
        "e2e fp16+graphs+gpu-compositor": "ok", "server fp16+graphs+gpu-compositor": "ok",
        "e2e fp16+graphs": "ok", "overhead fp16+graphs": "ok", "stream 2": "ok", "live 2": "ok",
        "server fp16+graphs": "ok"}

    probe = steps["probe"]["result"]
    assert probe["session_providers"][0] == "CPUExecutionProvider"
    tests = steps["tests"]["result"]
    assert tests["failed"] == 0 and tests["skipped"] == 0 and tests["passed"] >= 14
    figures = {t["test"]: t.get("figures", {}) for t in tests["tests"]}
    assert figures["test_precision_and_graphs::test_fp16_frames_are_within_40_db_of_fp32"][
        "psnr_db_min"] >= 40
    device = figures["test_device_compositor::test_device_frames_equal_the_compositors_and_what_each_costs"]
    assert device["synctalk_worst_frame_psnr_db"] >= 45 and device["stretch_worst_frame_psnr_db"] >= 45
    assert device["synctalk_device_cpu_ms_per_frame"] > 0
    assert device["synctalk_compositor_cpu_ms_per_frame"] > 0
    assert figures["test_device_compositor::test_a_server_compositing_on_the_device_answers_the_cpu_frames"][
        "worst_frame_psnr_db"] >= 45

    unet = steps["unet"]["result"]
    measured = {(r["variant"], r["batch"]) for r in unet["throughput"] if r.get("ort_fps", 0) > 0}
    assert measured == {(v, b) for v in ("fp32", "fp16") for b in (1, 2)}
    assert [r["variant"] for r in unet["throughput"] if "skipped" in r] == ["fp16+graphs"]
    assert unet["precision"]["psnr_db_min"] >= 40

    for name in ("fp16+graphs", "fp16+graphs+gpu-compositor"):
        e2e = steps[f"e2e {name}"]["result"]
        assert e2e["fps"] > 0 and e2e["errors"] == 0 and e2e["ort_fps"] > 0
        assert e2e["ort_ratio"] == round(e2e["fps"] / e2e["ort_fps"], 3)
        assert e2e["cores_per_1000_fps_paste_jpeg"] > 0
        assert e2e["cores_per_1000_fps_server"] >= e2e["cores_per_1000_fps_gpu_worker"] > 0
        assert {"frontend", "gpu_worker 0", "compositor 0"} <= set(e2e["cores_busy"])
    assert steps["e2e fp16+graphs"]["result"]["cores_per_1000_fps_compositors"] > 0
    overhead = steps["overhead fp16+graphs"]["result"]
    assert overhead["errors"] == 0 and overhead["requests"] == 6
    assert overhead["server_cpu_ms_per_request"] > 0 and overhead["baseline_cpu_ms_per_request"] > 0
    assert overhead["cpu_ratio"] == round(
        overhead["server_cpu_ms_per_request"] / overhead["baseline_cpu_ms_per_request"], 3)
    assert {"frontend", "gpu_worker 0", "compositor 0"} <= set(overhead["cpu_ms_per_request"])
    stream = steps["stream 2"]["result"]
    assert stream["sessions"] == 2 and stream["errors"] == 0 and stream["fps_total"] > 0
    live = steps["live 2"]["result"]
    assert live["sessions"] == 2 and live["errors"] == 0 and live["refused"] == 0
    assert live["min_fps"] >= 24.5 and live["speech_frames"] > 0

    log = (out / "gpu-suite.log").read_text()
    assert "gpus.cuda_graphs ignored: CUDA graphs need the CUDA execution provider" in log
    assert "=== tests" in log and "--- server log (fp16+graphs)" in log
    assert "--- server log (fp16+graphs+gpu-compositor)" in log
    assert "compositor.device gpu on the cpu provider with nvImageCodec's CPU encoder" in log
    last = done.stdout.strip().splitlines()
    assert last[0].startswith("== gpu-suite DRY RUN on the CPU provider")
    assert last[-1] == "targets: not judged (CPU dry run)"


def test_the_table_judges_the_targets_of_a_gpu_run() -> None:
    """On a GPU report (the branch the dry run cannot take) the table prints every figure
    (the device compositor's against the compositors' too) and judges the targets: ratio and
    fps of the best configuration, sessions held, the server's CPU against the in-process
    engine's."""
    sys.path.insert(0, str(REPO / "scripts"))
    from gpu_suite_table import table

    def e2e(fps: float, ratio: float) -> dict:
        return {"fps": fps, "ort_fps": round(fps / ratio, 1), "ort_ratio": ratio, "p50_ms": 120.0,
                "cores_per_1000_fps_paste_jpeg": 2.4, "cores_per_1000_fps_compositors": 2.1,
                "cores_per_1000_fps_server": 3.3}

    def stream(sessions: int, held: int) -> dict:
        return {"sessions": sessions, "holding_25fps": held, "all_hold_25fps": held == sessions}

    steps = [
        {"name": "probe", "status": "ok", "result": {
            "device": "NVIDIA H200, 580.159.03, 143771 MiB, 1 MiB", "package": "onnxruntime-gpu",
            "onnxruntime": "1.31.1", "built_for_cuda": "13.0",
            "session_providers": ["CUDAExecutionProvider", "CPUExecutionProvider"],
            "cuda_libraries_from": "preload_dlls / already loaded"}},
        {"name": "tests", "status": "ok", "result": {"passed": 14, "failed": 0, "skipped": 0,
                                                     "tests": [{
            "test": "test_device_compositor::test_device_frames_equal_the_compositors_and_what_each_costs",
            "outcome": "passed", "figures": {
                f"{mode}_{key}": value for mode in ("synctalk", "stretch") for key, value in (
                    ("device_ms_per_frame", 0.4), ("device_cpu_ms_per_frame", 0.1),
                    ("compositor_ms_per_frame", 4.1), ("compositor_cpu_ms_per_frame", 4.0),
                    ("worst_frame_psnr_db", 52.0))}}]}},
        {"name": "unet", "status": "ok", "result": {
            "model": "bench", "provider": "cuda",
            "throughput": [{"variant": v, "batch": b, "ort_fps": f * b}
                           for v, f in (("fp32", 100.0), ("fp16+graphs", 300.0)) for b in (1, 8, 32)]
            + [{"variant": "tf32", "skipped": "n/a"}],
            "precision": {"batch": 8, "psnr_db_min": 47.5, "prediction_max_abs_diff": 0.01}}},
        {"name": "e2e fp32", "status": "ok", "result": e2e(1200.0, 0.95)},
        {"name": "e2e fp16+graphs", "status": "ok", "result": e2e(2400.0, 0.85)},
        {"name": "overhead fp16+graphs", "status": "ok", "result": {
            "batch": 8, "concurrency": 4, "server_cpu_ms_per_request": 27.5,
            "baseline_cpu_ms_per_request": 24.1, "baseline_backend": "onnxruntime-cuda fp16",
            "cpu_ratio": 1.141}},
        {"name": "stream 30", "status": "ok", "result": stream(30, 30)},
        {"name": "stream 60", "status": "ok", "result": stream(60, 60)},
        {"name": "stream 90", "status": "ok", "result": stream(90, 71)},
    ]
    text = table({"dry_run": False, "date": "2026-12-01T00:00:00+00:00", "elapsed_s": 402.0,
                  "budget_s": 480, "steps": steps})
    lines = text.splitlines()
    assert lines[0].startswith("== gpu-suite on the GPU")
    assert "NVIDIA H200" in lines[1] and "CUDAExecutionProvider" in lines[1]
    assert any(line.split()[:4] == ["fp16+graphs", "300.0", "2400.0", "9600.0"] for line in lines)
    assert any("PSNR min 47.5 dB" in line for line in lines)
    assert any(line.split() == ["fp16+graphs", "2400.0", "2823.5", "0.85", "120.0", "2.4", "2.1",
                                "3.3"] for line in lines)
    assert ("pipeline's own cost (fp16+graphs, batch 8 x 4): server CPU 27.5 ms a request vs "
            "in-process 24.1 (onnxruntime-cuda fp16): ratio 1.141") in lines
    assert "90 sessions 71/90 hold -> most held: 60" in text
    assert ("on the device vs the compositors (ms wall, ms CPU): synctalk 0.4, 0.1 vs 4.1, 4.0, "
            "worst 52.0 dB; stretch 0.4") in text
    assert lines[-1] == ("targets: e2e/ORT >= 0.9: NOT met (0.85); >= 1500 fps: met (2400.0); "
                         ">= 60 sessions: met; server/in-process CPU <= 1.10: NOT met (1.141)")
