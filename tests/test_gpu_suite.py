"""scripts/gpu-suite --dry-run: every step of the GPU suite, here on the CPU provider at
small sizes, writes the JSON and log it promises and prints its table last."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_dry_run_runs_every_step_and_reports(tmp_path: Path) -> None:
    """The dry run passes its GPU tests on the CPU, measures every benchmark, derives the
    figures, logs the CPU worker ignoring CUDA graphs, and ends with the table."""
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
        "e2e fp16+graphs": "ok", "stream 2": "ok", "server fp16+graphs": "ok"}

    probe = steps["probe"]["result"]
    assert probe["session_providers"][0] == "CPUExecutionProvider"
    tests = steps["tests"]["result"]
    assert tests["failed"] == 0 and tests["skipped"] == 0 and tests["passed"] >= 11
    figures = {t["test"]: t.get("figures", {}) for t in tests["tests"]}
    assert figures["test_precision_and_graphs::test_fp16_frames_are_within_40_db_of_fp32"][
        "psnr_db_min"] >= 40

    unet = steps["unet"]["result"]
    measured = {(r["variant"], r["batch"]) for r in unet["throughput"] if r.get("ort_fps", 0) > 0}
    assert measured == {(v, b) for v in ("fp32", "fp16") for b in (1, 2)}
    assert [r["variant"] for r in unet["throughput"] if "skipped" in r] == ["fp16+graphs"]
    assert unet["precision"]["psnr_db_min"] >= 40

    e2e = steps["e2e fp16+graphs"]["result"]
    assert e2e["fps"] > 0 and e2e["errors"] == 0 and e2e["ort_fps"] > 0
    assert e2e["ort_ratio"] == round(e2e["fps"] / e2e["ort_fps"], 3)
    assert e2e["cores_per_1000_fps_paste_jpeg"] > 0 and e2e["cores_per_1000_fps_compositors"] > 0
    assert {"frontend", "gpu_worker 0", "compositor 0"} <= set(e2e["cores_busy"])
    stream = steps["stream 2"]["result"]
    assert stream["sessions"] == 2 and stream["errors"] == 0 and stream["fps_total"] > 0

    log = (out / "gpu-suite.log").read_text()
    assert "gpus.cuda_graphs ignored: CUDA graphs need the CUDA execution provider" in log
    assert "=== tests" in log and "--- server log (fp16+graphs)" in log
    last = done.stdout.strip().splitlines()
    assert last[0].startswith("== gpu-suite DRY RUN on the CPU provider")
    assert last[-1] == "targets: not judged (CPU dry run)"
