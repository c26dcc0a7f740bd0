"""The machinery of scripts/gpu-suite: the time budget, the log, bounded subprocesses, the
suite's config, the pytest report and the figures derived from the benchmarks.
Standard library only (it runs before anything is installed on the box)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
RESERVE_S = 10.0  # kept back from every step for writing the results


class StepFailed(Exception):
    """A step could not do its work; the message says why."""


class Skipped(Exception):
    """A step that does not apply here (or no longer fits the budget)."""


@dataclass
class Suite:
    """The run: its budget, its log file and the record of every step."""

    out: Path
    budget_s: float
    t0: float = field(default_factory=time.monotonic)
    steps: list[dict[str, Any]] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)   # extra environment of every child

    def __post_init__(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        self.log_file = open(self.out / "gpu-suite.log", "a", buffering=1)

    def left(self) -> float:
        return self.budget_s - (time.monotonic() - self.t0) - RESERVE_S

    def log(self, text: str, echo: bool = False) -> None:
        """Into the log file; with `echo` also to stderr (progress, kept short)."""
        stamp = f"[{time.monotonic() - self.t0:7.1f} s] "
        for line in text.rstrip("\n").splitlines() or [""]:
            self.log_file.write(stamp + line + "\n")
        if echo:
            print(stamp + text.strip()[:200], file=sys.stderr, flush=True)

    def step(self, name: str, needs_s: float, fn: Callable[[], dict[str, Any]],
             fatal: bool = False) -> dict[str, Any] | None:
        """Run `fn` as step `name` when `needs_s` seconds are left; record its outcome."""
        record: dict[str, Any] = {"name": name}
        start = time.monotonic()
        self.log(f"=== {name}", echo=True)
        try:
            if self.left() < needs_s:
                raise Skipped(f"{self.left():.0f} s left of the budget, {needs_s:.0f} s needed")
            result = fn()
            record.update(status="ok", result=result)
        except Skipped as exc:
            record.update(status="skipped", reason=str(exc))
        except Exception as exc:  # a step's failure is a finding, not the suite's end
            record.update(status="failed", reason=f"{type(exc).__name__}: {exc}")
        record["seconds"] = round(time.monotonic() - start, 1)
        self.log(f"--- {name}: {record['status']} in {record['seconds']} s "
                 f"{record.get('reason', '')}", echo=True)
        self.steps.append(record)
        if fatal and record["status"] == "failed":
            raise StepFailed(f"{name}: {record['reason']}")
        return record.get("result")

    def run(self, cmd: list[str], cap_s: float, ok_codes: tuple[int, ...] = (0,),
            env: dict[str, str] | None = None) -> str:
        """Run `cmd` (its whole process group killed past min(cap_s, budget left)); its
        output goes to the log; returns stdout. StepFailed on another exit code."""
        timeout = max(1.0, min(cap_s, self.left()))
        self.log("$ " + " ".join(cmd))
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, start_new_session=True,
                                env={**os.environ, **self.env, **(env or {}),
                                     "PYTHONUNBUFFERED": "1"})
        try:
            stdout, stderr = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            stdout, stderr = proc.communicate()
            self.log(stdout + stderr)
            raise StepFailed(f"timed out after {timeout:.0f} s: {' '.join(cmd[:6])} ...") from None
        self.log(stdout + stderr)
        if proc.returncode not in ok_codes:
            tail = (stderr or stdout).strip().splitlines()[-3:]
            raise StepFailed(f"exit {proc.returncode}: {' | '.join(tail)}")
        return stdout

    def run_json(self, cmd: list[str], cap_s: float, ok_codes: tuple[int, ...] = (0,)) -> dict:
        """run() of a command that prints one JSON object as its last stdout line."""
        lines = self.run(cmd, cap_s, ok_codes).strip().splitlines()
        try:
            return json.loads(lines[-1])
        except (IndexError, json.JSONDecodeError) as exc:
            raise StepFailed(f"no JSON from {' '.join(cmd[:6])} ...") from exc

    def attach(self, title: str, path: Path, limit: int = 200_000) -> None:
        """The tail of a file (a server's log) into the suite's log."""
        if path.is_file():
            self.log(f"--- {title} (last {limit // 1000} kB)\n" +
                     path.read_text(errors="replace")[-limit:])


def _kill_group(proc: subprocess.Popen[str]) -> None:
    """SIGTERM the step's process group (what this suite started), SIGKILL if it lingers."""
    for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(wait)
            return
        except subprocess.TimeoutExpired:
            continue


def write_config(path: Path, models_root: Path, runtime_dir: Path, provider: str,
                 model: str, compositors: int, arena_mb: int,
                 overrides: dict[str, dict[str, Any]]) -> Path:
    """The suite's config (JSON, which YAML reads): the demo encoder and `model` on the demo
    avatar's frames, preloaded, on `provider` with the `overrides` of the gpus and compositor
    sections."""
    models = {"demo": {"model_path": "demo/unet.onnx"},
              "bench": {"model_path": "bench/unet.onnx"}}
    spec = {**models[model], "background_dir": "demo/frames",
            "crop_rects_path": "demo/crop_rects.json", "num_frames": 250, "preload_model": True}
    raw = {
        "server": {"host": "127.0.0.1", "request_timeout_s": 120, "max_inflight_requests": 512},
        "gpus": {"count": 1, "provider": provider, **overrides.get("gpus", {})},
        "compositor": {"pool_size": compositors, **overrides.get("compositor", {})},
        "runtime": {"dir": str(runtime_dir), "instance": f"gpusuite{os.getpid()}",
                    "arena_mb": arena_mb},
        "ops": {"metrics_port": 0},
        # every bench session comes from 127.0.0.1
        "streaming": {"max_clients": 500, "max_sessions_per_address": 0,
                      "default_model": model},
        "models_root": str(models_root),
        "audio_encoder_path": "audio_encoder.onnx",
        "models": {model: spec},
    }
    path.write_text(json.dumps(raw, indent=1) + "\n")
    return path


def junit_report(path: Path) -> dict[str, Any]:
    """Counts, failures and every test's recorded figures (record_property) from pytest's
    JUnit XML."""
    root = ET.parse(path).getroot()
    cases = []
    counts = {"passed": 0, "failed": 0, "skipped": 0}
    for case in root.iter("testcase"):
        outcome, message = "passed", ""
        for tag in ("failure", "error", "skipped"):
            node = case.find(tag)
            if node is not None:
                outcome = "skipped" if tag == "skipped" else "failed"
                message = (node.get("message") or "")[:500]
        counts[outcome] += 1
        figures = {p.get("name"): _number(p.get("value", "")) for p in case.iter("property")}
        cases.append({"test": f"{case.get('classname', '').rsplit('.', 1)[-1]}::{case.get('name')}",
                      "outcome": outcome, "seconds": round(float(case.get("time", 0)), 2),
                      **({"message": message} if message else {}),
                      **({"figures": figures} if figures else {})})
    return {**counts, "tests": cases}


def _number(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def e2e_figures(result: dict[str, Any]) -> dict[str, Any]:
    """What the issue asks of an end-to-end run: frames/s, its ratio to ONNX Runtime alone,
    the stages, the cores each process keeps busy and the cores per 1,000 frames/s that
    paste + JPEG take (from the stage times and from the compositors' CPU)."""
    batch, fps = result["batch"], result["fps"]
    stages, cpu = result["stage_ms"], result.get("cpu_ms_per_request", {})
    requests_per_s = fps / batch if batch else 0.0
    compositor_ms = sum(v for k, v in cpu.items() if k.startswith("compositor"))
    return {
        "fps": fps, "ort_fps": result.get("ort_fps"), "ort_ratio": result.get("ort_ratio"),
        "p50_ms": result["p50_ms"], "p99_ms": result["p99_ms"],
        "requests": result["requests"], "errors": result["errors"],
        "mean_run_frames": result.get("mean_run_frames"), "stage_ms": stages,
        "cores_busy": {role: round(ms * requests_per_s / 1000, 2) for role, ms in cpu.items()},
        "paste_jpeg_ms_per_frame": round((stages["paste"] + stages["jpeg"]) / batch, 3),
        # a stage of t ms per frame at 1,000 frames/s keeps t cores busy
        "cores_per_1000_fps_paste_jpeg": round((stages["paste"] + stages["jpeg"]) / batch, 2),
        "cores_per_1000_fps_compositors": round(compositor_ms / batch, 2),
        # what the whole server takes (with compositor.device gpu the paste and JPEG
        # move into the gpu_worker's process and onto its device)
        "cores_per_1000_fps_gpu_worker": round(sum(
            v for k, v in cpu.items() if k.startswith("gpu_worker")) / batch, 2),
        "cores_per_1000_fps_server": round(sum(cpu.values()) / batch, 2),
    }


def overhead_figures(result: dict[str, Any]) -> dict[str, Any]:
    """The pipeline's own cost (`lipsync bench --compare inprocess`): the server's CPU per
    request, every role's, against the same engine's in one process, one request at a time,
    on the same device and config."""
    if "cpu_ratio" not in result:
        raise StepFailed("the server's CPU was not measured (its ops socket did not answer)")
    return {key: result[key] for key in (
        "batch", "concurrency", "requests", "errors", "fps", "baseline_fps", "baseline_backend",
        "cpu_ms_per_request", "server_cpu_ms_per_request", "baseline_cpu_ms_per_request",
        "cpu_ratio")}


def _held(result: dict[str, Any]) -> dict[str, Any]:
    """What every streaming run reports: its sessions and how many held 25 fps."""
    per = result.get("per_session", [])
    return {"sessions": result["sessions"], "seconds": result["seconds"],
            "holding_25fps": sum(bool(s["holds_25fps"]) for s in per),
            "all_hold_25fps": result["all_hold_25fps"], "min_fps": result["min_fps"],
            "errors": result["errors"]}


def stream_figures(result: dict[str, Any]) -> dict[str, Any]:
    return {**_held(result), "fps_total": result.get("fps"),
            "max_p99_latency_ms": result["max_p99_latency_ms"],
            "max_live_p99_latency_ms": result.get("max_live_p99_latency_ms"),
            "stage_ms": result.get("stage_ms", {})}


def live_figures(result: dict[str, Any]) -> dict[str, Any]:
    return {**_held(result), "refused": result["refused"],
            "speech_frames": result["speech_frames"], "missed_speech": result["missed_speech"],
            "first_speech_ms_p99": result["first_speech_ms_p99"],
            "jitter_ms_p99": result["jitter_ms_p99"], "cpu_per_s": result.get("cpu_per_s", {})}
