"""`lipsync bench`: drive InferBatchComposite with C concurrent clients and report
frames/s, latency percentiles, the stage timings the server measured and the CPU each
process spent; `--compare inprocess` runs the same stages in this one process, one request
after another, `--compare ort` the UNet session alone (docs/benchmarks.md).

Inputs are what a real client sends: SyncTalk visual tensors built from the avatar's own
frames and crop rects (or none: the server builds them), and (B + 15) x 40 ms of
speech-like audio per request.
"""
from __future__ import annotations

import argparse
import json
import os
from contextlib import ExitStack
from typing import Any

from pipeline.bench.baselines import compare_inprocess, ort_only, stage_timings
from pipeline.bench.grpc_load import drive, load_cycles, single_requests
from pipeline.bench.local_server import start_server
from pipeline.client import build_request
from pipeline.config import load_config
from pipeline.demo.ensure import ensure_model
from pipeline.runtime.addresses import Addresses


def run_stages(args: argparse.Namespace) -> int:
    timings = stage_timings(args.config, args.model, args.batch)
    if args.json:
        print(json.dumps({k: round(v, 3) for k, v in timings.items()}))
    else:
        for name, ms in timings.items():
            print(f"{name:28s} {ms:10.3f}" + ("" if name == "encoder_windows" else " ms"))
    return 0


def grpc_address(stack: ExitStack, args: argparse.Namespace) -> str:
    """--address, else $GRPC_SERVER, else a server started for this run."""
    return (args.address or os.environ.get("GRPC_SERVER")
            or start_server(stack, args.config).address)


def run_bench(args: argparse.Namespace) -> int:
    if args.providers:
        from pipeline.bench.providers import run_providers

        return run_providers(args)
    if "," in args.model and (args.stream or args.stages or args.load_cycles):
        raise SystemExit("lipsync bench: several --model ids are for gRPC batch runs only")
    if args.stream:
        from pipeline.bench.streams import run_stream_bench

        return run_stream_bench(args)
    if args.stages:
        return run_stages(args)
    if args.load_cycles:
        with ExitStack() as stack:
            result = load_cycles(grpc_address(stack, args), args.model, args.load_cycles,
                                 args.gpu)
        print(json.dumps(result) if args.json else
              "\n".join(f"{k:32s} {v}" for k, v in result.items()))
        return 0
    if (not 1 <= args.batch <= 32 or args.concurrency < 1 or (args.requests or 1) < 1
            or (args.duration is not None and args.duration <= 0) or args.rounds < 1
            or args.probe < 0 or args.ort_seconds <= 0):
        raise SystemExit("lipsync bench: need 1 <= --batch <= 32, --concurrency >= 1, "
                         "--requests >= 1, --duration > 0, --rounds >= 1, --probe >= 0, "
                         "--ort-seconds > 0")
    requests = None if args.duration else (args.requests or 40)
    compare = set(args.compare or ())
    if "inprocess" in compare and requests is None:
        raise SystemExit("lipsync bench: --compare inprocess runs a number of requests "
                         "(--requests), not --duration")
    models = args.model.split(",")
    if len(models) > 1 and compare:
        raise SystemExit("lipsync bench: --compare measures one --model")
    for model in models:
        ensure_model(args.config, model)
    per_model = [build_request(args.config, model, args.batch, start=0,
                               client_visual=args.visual == "client") for model in models]
    request = per_model[0]
    ops = Addresses.of(load_config(args.config)).ops
    with ExitStack() as stack:
        address = grpc_address(stack, args)
        if "inprocess" in compare:
            assert requests is not None  # refused above
            measured, baseline = compare_inprocess(address, request, args.concurrency,
                                                   requests, args.warmup,
                                                   args.rounds, args.config, ops)
            result = measured.summary(args.batch, args.concurrency)
            result.update(baseline)
            result["ratio"] = round(result["fps"] / result["baseline_fps"], 3)
            result.update(cpu_ratio(result["cpu_ms_per_request"],
                                    result["baseline_cpu_ms_per_request"]))
        else:
            result = drive(address, per_model, args.concurrency, requests, args.duration,
                           args.warmup, ops)
        if args.probe:
            result["single_request"] = single_requests(address, request, args.probe)
    result["model"] = args.model
    result["visual"] = args.visual
    if "ort" in compare:
        result.update(ort_only(args.config, args.model, args.batch, args.ort_seconds))
        result["ort_ratio"] = round(result["fps"] / result["ort_fps"], 3)
    if args.json:
        print(json.dumps(result))
    else:
        print_result(result)
    return 0 if not result["errors"] else 1


def cpu_ratio(cpu_ms: dict[str, float], baseline_ms: float) -> dict[str, float]:
    """The server's CPU per request (every role's, not the bench's clients') and its ratio
    to the in-process engine's: the pipeline's own cost in one figure. Empty when the
    server's ops socket did not answer (no role's CPU is known)."""
    server_ms = sum(ms for role, ms in cpu_ms.items() if role not in ("client", "total"))
    if not server_ms or baseline_ms <= 0:
        return {}
    return {"server_cpu_ms_per_request": round(server_ms, 2),
            "cpu_ratio": round(server_ms / baseline_ms, 3)}


def print_result(result: dict[str, Any]) -> None:
    print(f"model {result['model']}  batch {result['batch']}  concurrency {result['concurrency']}"
          f"  requests {result['requests']}  errors {result['errors']}")
    print(f"frames/s {result['fps']}   latency p50 {result['p50_ms']} ms  "
          f"p95 {result['p95_ms']} ms  p99 {result['p99_ms']} ms")
    print("mean stage ms: " + "  ".join(f"{k} {v}" for k, v in result["stage_ms"].items())
          + f"   mean UNet run {result['mean_run_frames']} frames")
    if result.get("cpu_ms_per_request"):
        print("CPU ms per request: " + "  ".join(
            f"{k} {v}" for k, v in result["cpu_ms_per_request"].items()))
    if "single_request" in result:
        s = result["single_request"]
        print(f"one request at a time: latency p50 {s['latency_ms_p50']} ms, stage compute "
              f"{s['compute_ms_mean']} ms, overhead p50 {s['overhead_ms_p50']} ms")
    if "baseline_fps" in result:
        print(f"in-process baseline ({result['baseline_backend']}): {result['baseline_fps']} frames/s "
              f"(stage ms {result['baseline_stage_ms']}, CPU ms per request "
              f"{result['baseline_cpu_ms_per_request']})   ratio {result['ratio']} "
              f"({result['rounds']} alternating rounds)")
    if "cpu_ratio" in result:
        print(f"server CPU per request {result['server_cpu_ms_per_request']} ms: "
              f"{result['cpu_ratio']}x the in-process engine's")
    if "ort_fps" in result:
        print(f"ONNX Runtime alone ({result['provider']}): {result['ort_fps']} frames/s   "
              f"ratio {result['ort_ratio']}")
    if result["first_error"]:
        print(f"first error: {result['first_error']}")
