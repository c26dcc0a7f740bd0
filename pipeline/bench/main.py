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
import itertools
import json
import os
import statistics
import tempfile
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pipeline.bench.local_server import ServerProcess
from pipeline.client import build_request, channel, speech_like_audio
from pipeline.config import load_config
from pipeline.frontend.wire import parse_composite_request
from pipeline.rpc import monolithic_pb2 as pb
from pipeline.rpc import monolithic_pb2_grpc as pb_grpc
from pipeline.runtime.addresses import Addresses


def percentile(values: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile (numpy's default); 0.0 for no values."""
    return float(np.percentile(values, q)) if len(values) else 0.0


INFER_METHOD = "/monolithic.MonolithicService/InferBatchComposite"
STAGES = ("queue", "input_copy", "audio", "encoder", "visual", "unet", "paste", "jpeg",
          "composite_critical")


def _stages(resp: pb.CompositeBatchResponse) -> dict[str, float]:
    """The server's per-stage ms of one response, plus its critical-path compute."""
    st = resp.stages
    stages = {name: getattr(st, f"{name}_ms") for name in STAGES}
    # what the request needed computed, in order: features, visual input, the UNet run,
    # then the busiest compositor's paste + JPEG; everything else is the pipeline's cost
    stages["compute"] = st.audio_ms + st.visual_ms + st.unet_ms + st.composite_critical_ms
    stages["server_total"] = resp.total_time_ms
    stages["run_frames"] = st.run_frames
    return stages


@dataclass
class Measured:
    """What the clients saw over one measured stretch of requests."""

    wall_s: float = 0.0
    frames: int = 0
    latencies: list[float] = field(default_factory=list)
    stages: list[dict[str, float]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    cpu_s: dict[str, float] = field(default_factory=dict)  # CPU seconds per process

    def add(self, other: Measured) -> Measured:
        cpu = {k: self.cpu_s.get(k, 0.0) + other.cpu_s.get(k, 0.0)
               for k in {*self.cpu_s, *other.cpu_s}}
        return Measured(self.wall_s + other.wall_s, self.frames + other.frames,
                        self.latencies + other.latencies, self.stages + other.stages,
                        self.errors + other.errors, cpu)

    def summary(self, batch: int, concurrency: int) -> dict[str, object]:
        stages, lat = self.stages, self.latencies
        overheads = [t - s["compute"] for t, s in zip(lat, stages)]
        return {
            "batch": batch, "concurrency": concurrency, "requests": len(lat),
            "errors": len(self.errors), "first_error": self.errors[0] if self.errors else "",
            "wall_s": round(self.wall_s, 3),
            "fps": round(self.frames / self.wall_s, 2) if self.wall_s else 0.0,
            "p50_ms": round(percentile(lat, 50), 2), "p95_ms": round(percentile(lat, 95), 2),
            "p99_ms": round(percentile(lat, 99), 2),
            "stage_ms": {k: round(statistics.fmean(s[k] for s in stages), 2) if stages else 0.0
                         for k in (*STAGES, "compute", "server_total")},
            "mean_run_frames": round(statistics.fmean(s["run_frames"] for s in stages), 2)
            if stages else 0.0,
            "overhead_ms_p50": round(percentile(overheads, 50), 2),
            # where the CPU went: ms of CPU per request, per process (and all together)
            "cpu_ms_per_request": {
                role: round(sec * 1e3 / len(lat), 2) for role, sec in
                sorted({**self.cpu_s, "total": sum(self.cpu_s.values())}.items())}
            if lat else {},
        }


def ops_stats(ops_endpoint: str | None) -> dict | None:
    """The server's ops-socket stats; None when the socket does not answer (a server run
    with another config than the bench's)."""
    from pipeline.cli.stats import fetch

    if ops_endpoint is None:
        return None
    try:
        return fetch(ops_endpoint, timeout_s=2.0)
    except TimeoutError:
        return None


def role_cpu_seconds(ops_endpoint: str | None) -> dict[str, float]:
    """CPU seconds (user + system) used so far by each server process, from the ops socket,
    and by this process (`client`: the bench's gRPC clients); server roles are absent
    when the socket does not answer."""
    cpu = {"client": time.process_time()}
    stats = ops_stats(ops_endpoint)
    if stats is None:
        return cpu
    cpu["frontend"] = stats["frontend"].get("cpu_s", 0.0)
    for kind in ("gpu_workers", "compositors"):
        for p in stats[kind]:
            cpu[f"{kind[:-1]} {p['index']}"] = p.get("cpu_s", 0.0)
    return cpu


class Clients:
    """`concurrency` gRPC clients of one server, each on its own channel, sending one
    request (serialized once: the client's protobuf encoding is not what is measured).
    Given one request per model, client i sends the (i mod n)-th: behind a balancer that
    spreads the load over the boxes the models hash to."""

    def __init__(self, address: str,
                 request: pb.CompositeBatchRequest | Sequence[pb.CompositeBatchRequest],
                 concurrency: int, warmup: int, ops_endpoint: str | None = None) -> None:
        self.ops_endpoint = ops_endpoint
        pool_of = [request] if isinstance(request, pb.CompositeBatchRequest) else list(request)
        mine = [pool_of[i % len(pool_of)] for i in range(concurrency)]
        self.batch = mine[0].batch_size
        self.wire = mine[0].SerializeToString()
        self.wires = [self.wire if r is mine[0] else r.SerializeToString() for r in mine]
        # the bytes carry no readable model_id: the channel names it (x-model-id)
        self.channels = [channel(address, r.model_id) for r in mine]
        self.calls = [ch.unary_unary(INFER_METHOD,
                                     response_deserializer=pb.CompositeBatchResponse.FromString)
                      for ch in self.channels]
        with ThreadPoolExecutor(concurrency) as pool:
            list(pool.map(lambda cw: [cw[0](cw[1], timeout=300) for _ in range(warmup)],
                          zip(self.calls, self.wires)))

    def close(self) -> None:
        for ch in self.channels:
            ch.close()

    def run(self, requests: int | None, duration: float | None) -> Measured:
        """Every client sends until `requests` were sent or `duration` seconds passed."""
        out = Measured()
        lock = threading.Lock()
        counter = itertools.count()
        barrier = threading.Barrier(len(self.calls) + 1)
        end = [float("inf")]

        def more() -> bool:
            with lock:
                n = next(counter)
            return (requests is None or n < requests) and time.perf_counter() < end[0]

        def client(call, wire: bytes) -> None:  # type: ignore[no-untyped-def]
            barrier.wait()
            while more():
                t0 = time.perf_counter()
                resp = call(wire, timeout=300)
                dt = (time.perf_counter() - t0) * 1e3
                with lock:
                    if resp.success:
                        out.latencies.append(dt)
                        out.stages.append(_stages(resp))
                    else:
                        out.errors.append(resp.error)

        threads = [threading.Thread(target=client, args=cw) for cw in zip(self.calls, self.wires)]
        for t in threads:
            t.start()
        cpu_before = role_cpu_seconds(self.ops_endpoint)
        barrier.wait()
        t0 = time.perf_counter()
        if duration is not None:
            end[0] = t0 + duration
        for t in threads:
            t.join()
        out.wall_s = time.perf_counter() - t0
        cpu_after = role_cpu_seconds(self.ops_endpoint)
        out.cpu_s = {role: cpu_after[role] - cpu_before[role]
                     for role in cpu_after if role in cpu_before}
        out.frames = len(out.latencies) * self.batch
        return out


def drive(address: str,
          request: pb.CompositeBatchRequest | Sequence[pb.CompositeBatchRequest],
          concurrency: int, requests: int | None, duration: float | None, warmup: int,
          ops_endpoint: str | None = None) -> dict[str, object]:
    """`concurrency` clients send `request` (or one of the requests each) until `requests`
    were measured or `duration` seconds passed; the figures of the measured ones."""
    clients = Clients(address, request, concurrency, warmup, ops_endpoint)
    try:
        return clients.run(requests, duration).summary(clients.batch, concurrency)
    finally:
        clients.close()


def single_requests(address: str, request: pb.CompositeBatchRequest, count: int) -> dict[str, float]:
    """`count` requests one at a time: latency, the stage compute on its critical path
    (features + visual + UNet + the busiest compositor) and the rest, the overhead (p50)."""
    result = drive(address, request, 1, count, None, warmup=1)
    return {"requests": result["requests"], "latency_ms_p50": result["p50_ms"],
            "compute_ms_mean": result["stage_ms"]["compute"],  # type: ignore[index]
            "overhead_ms_p50": result["overhead_ms_p50"]}


def compare_inprocess(address: str, request: pb.CompositeBatchRequest, concurrency: int,
                      requests: int, warmup: int, rounds: int, cfg_path: Path,
                      ops_endpoint: str | None = None) -> tuple[Measured, dict[str, object]]:
    """The pipeline and the in-process baseline over the same requests, in `rounds`
    alternating stretches (so a slow spell of a shared machine hits both alike)."""
    from pipeline.bench.inprocess import InProcessEngine

    clients = Clients(address, request, concurrency, warmup, ops_endpoint)
    baseline = InProcessEngine(cfg_path, request.model_id)
    view = parse_composite_request(clients.wire)
    measured, runs, baseline_wall, baseline_cpu = Measured(), [], 0.0, 0.0
    try:
        for _ in range(max(1, warmup)):
            baseline.run(view)
        share = max(1, requests // rounds)
        for _ in range(rounds):
            measured = measured.add(clients.run(share, None))
            t0, cpu0 = time.perf_counter(), time.process_time()
            runs += [baseline.run(view) for _ in range(share)]
            baseline_wall += time.perf_counter() - t0
            baseline_cpu += time.process_time() - cpu0
    finally:
        baseline.close()
        clients.close()
    return measured, {
        "baseline_fps": round(len(runs) * request.batch_size / baseline_wall, 2),
        "baseline_requests": len(runs), "rounds": rounds,
        "baseline_cpu_ms_per_request": round(baseline_cpu * 1e3 / len(runs), 2),
        "baseline_stage_ms": {k: round(statistics.fmean(r[k] for r in runs) / 1e6, 2)
                              for k in runs[0]}}


def ort_only(cfg_path: Path, model_id: str, batch: int, seconds: float) -> dict[str, object]:
    """frames/s of the UNet session alone at `batch` (the config's precision and CUDA
    graphs): inputs and output resident on the device, nothing else; the ceiling the
    pipeline is held to."""
    from pipeline.bench.unet import unet_throughput
    from pipeline.gpu_worker.device import resolve_provider
    from pipeline.gpu_worker.unet import load_unet

    cfg = load_config(cfg_path)
    provider = resolve_provider(cfg.gpus.provider, 1)
    gpus = cfg.gpus
    unet = load_unet(cfg.models[model_id].model_path, provider, gpus.intra_op_threads,
                       gpus.unet_precision, gpus.cuda_graphs)
    return unet_throughput(unet, provider, batch, seconds)


def _median_ms(fn, repeats: int) -> float:
    fn()  # warm
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter_ns()
        fn()
        times.append((time.perf_counter_ns() - t0) / 1e6)
    return statistics.median(times)


def stage_timings(cfg_path: Path, model_id: str, batch: int, repeats: int = 20) -> dict[str, float]:
    """Each stage of the pipeline run in this process on the real components (median ms)."""
    from pipeline.bench.inprocess import InProcessEngine
    from pipeline.compositor.composite import encode_jpeg, paste
    from pipeline.gpu_worker import audio

    cfg = load_config(cfg_path)
    stages = InProcessEngine(cfg_path, model_id, "cpu", cfg.gpus.intra_op_threads)
    encoder, unet, avatar = stages.encoder, stages.unet, stages.avatar
    mode = stages.model.composite_mode
    try:
        chunk = speech_like_audio(0.64)
        samples = speech_like_audio((batch + 15) * 0.04)
        windows = audio.mel_windows(audio.melspectrogram(samples))
        features = audio.frame_features(encoder.encode(windows), batch)
        visual = np.empty((batch, 6, 320, 320), np.float32)
        prediction = np.empty((batch, 3, 320, 320), np.float32)
        avatar.visual_inputs(range(len(visual)), visual)
        unet.run(visual, features, prediction)
        frame = paste(avatar.frames()[0], prediction[0], avatar.rect(0), mode)
        return {
            "mel_per_640ms_chunk": _median_ms(lambda: audio.melspectrogram(chunk), repeats),
            f"audio_features_batch{batch}": _median_ms(
                lambda: audio.request_features(encoder.encode, samples, audio.SAMPLE_RATE, batch),
                repeats),
            "encoder_windows": float(len(windows)),
            "visual_input_per_frame": _median_ms(lambda: avatar.visual_inputs([0], visual[:1]), repeats),
            f"unet_batch{batch}": _median_ms(lambda: unet.run(visual, features, prediction), repeats),
            "paste_per_frame": _median_ms(lambda: paste(avatar.frames()[0], prediction[0],
                                                        avatar.rect(0), mode), repeats),
            "jpeg_per_frame": _median_ms(lambda: encode_jpeg(frame, cfg.jpeg_quality), repeats),
        }
    finally:
        stages.close()


def run_stages(args: argparse.Namespace) -> int:
    timings = stage_timings(args.config, args.model, args.batch)
    if args.json:
        print(json.dumps({k: round(v, 3) for k, v in timings.items()}))
    else:
        for name, ms in timings.items():
            print(f"{name:28s} {ms:10.3f}" + ("" if name == "encoder_windows" else " ms"))
    return 0


def load_cycles(address: str, model_id: str, cycles: int, gpu: int) -> dict[str, object]:
    """LoadModel/UnloadModel `cycles` times on one device; load/unload times and that
    device's memory (Health: NVML on a GPU, the worker's private RSS on CPU) per cycle."""
    with channel(address) as ch:
        stub = pb_grpc.MonolithicServiceStub(ch)
        stub.UnloadModel(pb.UnloadModelRequest(model_id=model_id), timeout=120)

        def memory_gb() -> float:
            time.sleep(0.6)  # one heartbeat: the figure is fresh
            return stub.Health(pb.HealthRequest(), timeout=10).gpu_memory_used_gb[gpu]

        baseline = memory_gb()
        loads, unloads, after = [], [], []
        for _ in range(cycles):
            resp = stub.LoadModel(pb.LoadModelRequest(model_id=model_id, preferred_gpu=gpu),
                                  timeout=120)
            if not resp.success:
                raise SystemExit(f"lipsync bench: LoadModel failed: {resp.error}")
            loads.append(resp.load_time_ms)
            loaded = memory_gb()
            model_mb = next(m.memory_mb for m in stub.ListModels(pb.ListModelsRequest()).models
                            if m.model_id == model_id)
            t0 = time.perf_counter()
            if not stub.UnloadModel(pb.UnloadModelRequest(model_id=model_id), timeout=120).success:
                raise SystemExit("lipsync bench: UnloadModel failed")
            unloads.append((time.perf_counter() - t0) * 1e3)
            after.append(memory_gb())
    return {
        "model": model_id, "gpu": gpu, "cycles": cycles,
        "load_ms_p50": round(percentile(loads, 50), 1), "load_ms_max": round(max(loads), 1),
        "unload_ms_p50": round(percentile(unloads, 50), 1),
        "memory_gb_baseline": round(baseline, 4), "memory_gb_loaded_last": round(loaded, 4),
        "memory_gb_after_first_unload": round(after[0], 4),
        "memory_gb_after_last_unload": round(after[-1], 4),
        "memory_growth_mb_over_cycles": round((after[-1] - after[0]) * 1024, 1),
        "memory_gb_after_unload_every_10": [round(a, 4) for a in after[::10]],
        "last_model_memory_mb": model_mb,
    }


def start_server(stack: ExitStack, config: Path) -> ServerProcess:
    """A server for this bench run (its log in a temp dir), stopped when `stack` closes."""
    log = Path(tempfile.mkdtemp(prefix="lipsync-bench-")) / "server.log"
    return stack.enter_context(ServerProcess(config, log_path=log))


def grpc_address(stack: ExitStack, args: argparse.Namespace) -> str:
    """--address, else $GRPC_SERVER, else a server started for this run."""
    return (args.address or os.environ.get("GRPC_SERVER")
            or start_server(stack, args.config).address)


def run_bench(args: argparse.Namespace) -> int:
    if "," in args.model and (args.stream or args.stages or args.load_cycles):
        raise SystemExit("lipsync bench: several --model ids are for gRPC batch runs only")
    if args.stream:
        from pipeline.bench.stream_load import run_stream_bench

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
        ensure_bench_model(args.config, model)
    per_model = [build_request(args.config, model, args.batch, start=0,
                               client_visual=args.visual == "client") for model in models]
    request = per_model[0]
    ops = Addresses.of(load_config(args.config)).ops
    with ExitStack() as stack:
        address = grpc_address(stack, args)
        if "inprocess" in compare:
            measured, baseline = compare_inprocess(address, request, args.concurrency,
                                                   requests, args.warmup,  # type: ignore[arg-type]
                                                   args.rounds, args.config, ops)
            result = measured.summary(args.batch, args.concurrency)
            result.update(baseline)
            result["ratio"] = round(result["fps"] / result["baseline_fps"], 3)  # type: ignore[operator]
        else:
            result = drive(address, per_model, args.concurrency, requests, args.duration,
                           args.warmup, ops)
        if args.probe:
            result["single_request"] = single_requests(address, request, args.probe)
    result["model"] = args.model
    result["visual"] = args.visual
    if "ort" in compare:
        result.update(ort_only(args.config, args.model, args.batch, args.ort_seconds))
        result["ort_ratio"] = round(result["fps"] / result["ort_fps"], 3)  # type: ignore[operator]
    if args.json:
        print(json.dumps(result))
    else:
        print_result(result)
    return 0 if not result["errors"] else 1


def print_result(result: dict[str, object]) -> None:
    print(f"model {result['model']}  batch {result['batch']}  concurrency {result['concurrency']}"
          f"  requests {result['requests']}  errors {result['errors']}")
    print(f"frames/s {result['fps']}   latency p50 {result['p50_ms']} ms  "
          f"p95 {result['p95_ms']} ms  p99 {result['p99_ms']} ms")
    print("mean stage ms: " + "  ".join(f"{k} {v}" for k, v in result["stage_ms"].items())  # type: ignore[union-attr]
          + f"   mean UNet run {result['mean_run_frames']} frames")
    if result.get("cpu_ms_per_request"):
        print("CPU ms per request: " + "  ".join(
            f"{k} {v}" for k, v in result["cpu_ms_per_request"].items()))  # type: ignore[union-attr]
    if "single_request" in result:
        s = result["single_request"]
        print(f"one request at a time: latency p50 {s['latency_ms_p50']} ms, stage compute "  # type: ignore[index]
              f"{s['compute_ms_mean']} ms, overhead p50 {s['overhead_ms_p50']} ms")  # type: ignore[index]
    if "baseline_fps" in result:
        print(f"in-process baseline: {result['baseline_fps']} frames/s "
              f"(stage ms {result['baseline_stage_ms']}, CPU ms per request "
              f"{result['baseline_cpu_ms_per_request']})   ratio {result['ratio']} "
              f"({result['rounds']} alternating rounds)")
    if "ort_fps" in result:
        print(f"ONNX Runtime alone ({result['provider']}): {result['ort_fps']} frames/s   "
              f"ratio {result['ort_ratio']}")
    if result["first_error"]:
        print(f"first error: {result['first_error']}")


def ensure_bench_model(cfg_path: Path, model_id: str) -> None:
    """`--model bench` builds the bench UNet (and the demo frames it uses) when missing."""
    from pipeline.demo.bench_model import BENCH_MODEL_ID
    from pipeline.demo.ensure import ensure_demo_assets

    cfg = load_config(cfg_path)
    if model_id not in cfg.models:
        raise SystemExit(f"lipsync bench: model '{model_id}' is not in {cfg_path}")
    ensure_demo_assets(cfg, bench_model=model_id == BENCH_MODEL_ID)
