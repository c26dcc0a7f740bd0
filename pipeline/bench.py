"""`lipsync bench`: drive InferBatchComposite with C concurrent clients and report
frames/s, latency percentiles and the mean stage timings the server measured.

Inputs are what a real client sends: SyncTalk visual tensors built from the avatar's own
frames and crop rects, and (B + 15) x 40 ms of speech-like audio per request.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import threading
import time
from contextlib import ExitStack
from pathlib import Path

import cv2
import numpy as np

from pipeline.config import load_config
from pipeline.gpu_worker.avatar import find_frame, load_crop_rects
from pipeline.gpu_worker.visual import visual_input
from pipeline.launcher import ServerProcess, channel
from pipeline.rpc import monolithic_pb2 as pb
from pipeline.rpc import monolithic_pb2_grpc as pb_grpc


def speech_like_audio(seconds: float, sample_rate: int = 16000, seed: int = 0) -> np.ndarray:
    """Voiced bursts with pauses: a pitch harmonic series under a 3 Hz syllable envelope."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * sample_rate)) / sample_rate
    voice = sum(np.sin(2 * np.pi * 140 * k * t) / k for k in range(1, 12))
    envelope = np.clip(np.sin(2 * np.pi * 3 * t), 0, None) ** 2
    return (0.3 * envelope * voice + 0.01 * rng.standard_normal(t.size)).astype(np.float32)


def build_request(cfg_path: Path, model_id: str, batch: int, start: int) -> pb.CompositeBatchRequest:
    cfg = load_config(cfg_path)
    model = cfg.models[model_id]
    rects = load_crop_rects(model.crop_rects_path)
    names = {p.name for p in model.background_dir.iterdir()}
    visual = np.empty((batch, 6, 320, 320), np.float32)
    for i in range(batch):
        idx = (start + i) % model.num_frames
        frame = cv2.imread(str(find_frame(model.background_dir, idx, names)))
        visual_input(frame, tuple(int(v) for v in rects[idx]), out=visual[i])
    audio = speech_like_audio((batch + 15) * 0.04)
    return pb.CompositeBatchRequest(model_id=model_id, visual_frames=visual.tobytes(),
                                    raw_audio=audio.tobytes(), batch_size=batch,
                                    start_frame_idx=start, sample_rate=16000)


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else 0.0


def drive(address: str, request: pb.CompositeBatchRequest, concurrency: int, requests: int,
          warmup: int) -> dict[str, object]:
    """Send `requests` measured requests from `concurrency` threads; return the figures."""
    latencies: list[float] = []
    stages: dict[str, list[float]] = {k: [] for k in
                                      ("audio", "inference", "composite", "server_total")}
    errors: list[str] = []
    lock = threading.Lock()
    counter = iter(range(requests))

    def client() -> None:
        with channel(address) as ch:
            stub = pb_grpc.MonolithicServiceStub(ch)
            for _ in range(warmup):
                stub.InferBatchComposite(request, timeout=120)
            barrier.wait()
            while True:
                with lock:
                    if next(counter, None) is None:
                        return
                t0 = time.perf_counter()
                resp = stub.InferBatchComposite(request, timeout=120)
                dt = (time.perf_counter() - t0) * 1e3
                with lock:
                    if not resp.success:
                        errors.append(resp.error)
                        continue
                    latencies.append(dt)
                    stages["audio"].append(resp.audio_processing_ms)
                    stages["inference"].append(resp.inference_time_ms)
                    stages["composite"].append(resp.composite_time_ms)
                    stages["server_total"].append(resp.total_time_ms)

    barrier = threading.Barrier(concurrency + 1)
    threads = [threading.Thread(target=client) for _ in range(concurrency)]
    for t in threads:
        t.start()
    barrier.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    frames = len(latencies) * request.batch_size
    return {
        "batch": request.batch_size, "concurrency": concurrency, "requests": len(latencies),
        "errors": len(errors), "first_error": errors[0] if errors else "",
        "wall_s": round(wall, 3), "fps": round(frames / wall, 2) if wall else 0.0,
        "p50_ms": round(percentile(latencies, 50), 2), "p95_ms": round(percentile(latencies, 95), 2),
        "p99_ms": round(percentile(latencies, 99), 2),
        "stage_ms": {k: round(statistics.fmean(v), 2) if v else 0.0 for k, v in stages.items()},
    }


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
    from pipeline.compositor.composite import encode_jpeg, paste
    from pipeline.gpu_worker import audio
    from pipeline.gpu_worker.avatar import load_avatar
    from pipeline.gpu_worker.sessions import AudioEncoder, UNet
    from pipeline.shm.segment import segment_name

    cfg = load_config(cfg_path)
    model = cfg.models[model_id]
    encoder = AudioEncoder.create(cfg.audio_encoder_path, "cpu", cfg.gpus.intra_op_threads)
    unet = UNet.create(model.model_path, "cpu", cfg.gpus.intra_op_threads)
    avatar = load_avatar(model, segment_name(f"bench{os.getpid()}", "bg"))
    try:
        chunk = speech_like_audio(0.64)
        samples = speech_like_audio((batch + 15) * 0.04)
        windows = audio.mel_windows(audio.melspectrogram(samples))
        features = audio.frame_features(encoder.encode(windows), batch)
        visual = np.empty((batch, 6, 320, 320), np.float32)
        prediction = np.empty((batch, 3, 320, 320), np.float32)
        avatar.visual_inputs(0, visual)
        unet.run(visual, features, prediction)
        frame = paste(avatar.frames()[0], prediction[0], avatar.rect(0), model.composite_mode)
        return {
            "mel_per_640ms_chunk": _median_ms(lambda: audio.melspectrogram(chunk), repeats),
            f"audio_features_batch{batch}": _median_ms(
                lambda: audio.frame_features(encoder.encode(audio.mel_windows(
                    audio.melspectrogram(samples))), batch), repeats),
            "encoder_windows": float(len(windows)),
            "visual_input_per_frame": _median_ms(lambda: avatar.visual_inputs(0, visual[:1]), repeats),
            f"unet_batch{batch}": _median_ms(lambda: unet.run(visual, features, prediction), repeats),
            "paste_per_frame": _median_ms(lambda: paste(avatar.frames()[0], prediction[0],
                                                        avatar.rect(0), model.composite_mode), repeats),
            "jpeg_per_frame": _median_ms(lambda: encode_jpeg(frame, cfg.jpeg_quality), repeats),
        }
    finally:
        avatar.close()


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
    if args.stream:
        from pipeline.bench_stream import run_stream_bench

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
    if args.batch < 1 or args.batch > 32 or args.concurrency < 1 or args.requests < 1:
        raise SystemExit("lipsync bench: need 1 <= --batch <= 32, --concurrency >= 1, --requests >= 1")
    request = build_request(args.config, args.model, args.batch, start=0)
    with ExitStack() as stack:
        result = drive(grpc_address(stack, args), request, args.concurrency, args.requests,
                       args.warmup)
    if args.json:
        print(json.dumps(result))
    else:
        print(f"batch {result['batch']}  concurrency {result['concurrency']}  "
              f"requests {result['requests']}  errors {result['errors']}")
        print(f"frames/s {result['fps']}   latency p50 {result['p50_ms']} ms  "
              f"p95 {result['p95_ms']} ms  p99 {result['p99_ms']} ms")
        print("mean stage ms: " + "  ".join(f"{k} {v}" for k, v in result["stage_ms"].items()))
        if result["first_error"]:
            print(f"first error: {result['first_error']}")
    return 0 if not result["errors"] else 1
