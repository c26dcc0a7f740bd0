"""The short table scripts/gpu-suite prints last (the device call's reply keeps the end of
the output): steps, ORT-only frames/s, end to end, the pipeline's own cost, streaming, fp16,
tests, targets."""
from __future__ import annotations

from typing import Any

# the targets (docs/benchmarks.md, "GPU (H200)")
TARGET_RATIO, TARGET_FPS, TARGET_SESSIONS = 0.9, 1500.0, 60
TARGET_CPU_RATIO = 1.10  # the server's CPU per request over the in-process engine's


def _results(report: dict[str, Any], prefix: str) -> list[tuple[str, dict[str, Any]]]:
    return [(s["name"], s["result"]) for s in report["steps"]
            if s["name"].startswith(prefix) and s["status"] == "ok" and s.get("result")]


def _figures(tests: dict[str, Any], prefix: str) -> dict[str, Any]:
    """The recorded figures of the first test whose name starts with `prefix`."""
    return next((c.get("figures", {}) for c in tests.get("tests", [])
                 if c["test"].startswith(prefix)), {})


def table(report: dict[str, Any]) -> str:
    kind = "DRY RUN on the CPU provider (no GPU figures)" if report["dry_run"] else "on the GPU"
    out = [f"== gpu-suite {kind}"
           f" · {report['date']} · {report['elapsed_s']} s of {report['budget_s']:.0f}"]
    probe = dict(_results(report, "probe")).get("probe", {})
    if probe:
        out.append(f"device: {probe.get('device') or 'none'} · {probe.get('package')} "
                   f"{probe.get('onnxruntime')} (CUDA {probe.get('built_for_cuda')}) · session "
                   f"{probe.get('session_providers', ['?'])[0]} · libraries from "
                   f"{probe.get('cuda_libraries_from')}")
    out.append("steps: " + ", ".join(
        f"{s['name']} {s['status']}" + (f" ({s['reason'][:60]})" if s["status"] == "failed" else "")
        for s in report["steps"]))

    unet = dict(_results(report, "unet")).get("unet")
    if unet:
        rows = [r for r in unet["throughput"] if "ort_fps" in r]
        batches = sorted({r["batch"] for r in rows})
        out.append(f"ORT-only UNet frames/s ({unet['model']}, {unet['provider']}): " +
                   "  ".join(f"b{b:<6}" for b in batches))
        for variant in dict.fromkeys(r["variant"] for r in rows):
            fps = {r["batch"]: r["ort_fps"] for r in rows if r["variant"] == variant}
            out.append(f"  {variant:12s} " + "  ".join(f"{fps.get(b, 0):<7.1f}" for b in batches))
        prec = unet.get("precision")
        if prec:
            out.append(f"fp16 vs fp32 ({prec['batch']} composited frames): PSNR min "
                       f"{prec['psnr_db_min']} dB (target >= 40), prediction max abs diff "
                       f"{prec['prediction_max_abs_diff']}")

    e2e = _results(report, "e2e")
    if e2e:
        out.append("end to end: config                 fps    ORT fps  ratio  p50 ms  "
                   "cores/1000fps: paste+JPEG  compositors  server")
        for name, r in e2e:
            out.append(f"  {name[4:]:31s} {r['fps']:<7} {r['ort_fps']!s:<8} {r['ort_ratio']!s:<6} "
                       f"{r['p50_ms']:<7} {r['cores_per_1000_fps_paste_jpeg']:<26} "
                       f"{r['cores_per_1000_fps_compositors']:<12} "
                       f"{r.get('cores_per_1000_fps_server', '?')}")
    overhead = _results(report, "overhead")
    for name, r in overhead:
        out.append(f"pipeline's own cost ({name.removeprefix('overhead ')}, batch {r['batch']}"
                   f" x {r['concurrency']}): server CPU {r['server_cpu_ms_per_request']} ms a "
                   f"request vs in-process {r['baseline_cpu_ms_per_request']} "
                   f"({r['baseline_backend']}): ratio {r['cpu_ratio']}")
    streams = _results(report, "stream")
    if streams:
        held = [r["sessions"] for _, r in streams if r["all_hold_25fps"]]
        out.append("streaming at 25 fps: " + ", ".join(
            f"{r['sessions']} sessions {r['holding_25fps']}/{r['sessions']} hold"
            for _, r in streams) + f" -> most held: {max(held, default=0)}")
    lives = _results(report, "live")
    if lives:
        out.append("live, half speaking: " + ", ".join(
            f"{r['sessions']} sessions ({r['refused']} refused) "
            f"{r['holding_25fps']}/{r['sessions'] - r['refused']} hold"
            for _, r in lives))
    tests = next((s for s in report["steps"] if s["name"] == "tests"), None)
    if tests is not None:
        t = tests.get("result") or report.get("tests") or {}
        failed = [c["test"] for c in t.get("tests", []) if c["outcome"] == "failed"]
        out.append(f"tests (-m gpu): {t.get('passed', 0)} passed, {t.get('failed', 0)} failed, "
                   f"{t.get('skipped', 0)} skipped" + (f": {', '.join(failed)}" if failed else "")
                   if t else f"tests: {tests['status']} {tests.get('reason', '')}")
    # the tests step's record, also when a test failed (then the step has no result)
    record = ((tests or {}).get("result") or report.get("tests") or {})
    device = _figures(record, "test_device_compositor::test_device_frames_equal_the_compositors")
    if device:
        out.append("paste + JPEG per frame, on the device vs the compositors (ms wall, ms CPU): " +
                   "; ".join(f"{mode} {device.get(f'{mode}_device_ms_per_frame')}, "
                             f"{device.get(f'{mode}_device_cpu_ms_per_frame')} vs "
                             f"{device.get(f'{mode}_compositor_ms_per_frame')}, "
                             f"{device.get(f'{mode}_compositor_cpu_ms_per_frame')}, worst "
                             f"{device.get(f'{mode}_worst_frame_psnr_db')} dB"
                             for mode in ("synctalk", "stretch")))
    if report["dry_run"]:
        out.append("targets: not judged (CPU dry run)")
    elif e2e:
        best = max((r for _, r in e2e), key=lambda r: r["fps"])
        ratio = best.get("ort_ratio") or 0.0
        out.append(f"targets: e2e/ORT >= {TARGET_RATIO}: {'met' if ratio >= TARGET_RATIO else 'NOT met'}"
                   f" ({ratio}); >= {TARGET_FPS:.0f} fps: "
                   f"{'met' if best['fps'] >= TARGET_FPS else 'NOT met'} ({best['fps']}); "
                   f">= {TARGET_SESSIONS} sessions: "
                   + ("met" if streams and any(r["all_hold_25fps"] and r["sessions"] >= TARGET_SESSIONS
                                               for _, r in streams) else "NOT met")
                   + "".join(f"; server/in-process CPU <= {TARGET_CPU_RATIO:.2f}: "
                             f"{'met' if r['cpu_ratio'] <= TARGET_CPU_RATIO else 'NOT met'}"
                             f" ({r['cpu_ratio']})" for _, r in overhead))
    return "\n".join(out)
