"""What the pipeline is held against: the same stages in this one process, one request
after another (`--compare inprocess`), the UNet session alone (`--compare ort`), and each
stage timed on its own (`--stages`)."""
from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.bench.grpc_load import Clients, Measured
from pipeline.client import speech_like_audio
from pipeline.config import load_config
from pipeline.frontend.wire import parse_composite_request
from pipeline.rpc import monolithic_pb2 as pb
from pipeline.synctalk import SAMPLE_RATE


def compare_inprocess(address: str, request: pb.CompositeBatchRequest, concurrency: int,
                      requests: int, warmup: int, rounds: int, cfg_path: Path,
                      ops_endpoint: str | None = None) -> tuple[Measured, dict[str, Any]]:
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
        "baseline_requests": len(runs), "rounds": rounds, "baseline_backend": baseline.backend,
        "baseline_cpu_ms_per_request": round(baseline_cpu * 1e3 / len(runs), 2),
        "baseline_stage_ms": {k: round(statistics.fmean(r[k] for r in runs) / 1e6, 2)
                              for k in runs[0]}}


def ort_only(cfg_path: Path, model_id: str, batch: int, seconds: float) -> dict[str, Any]:
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
    from pipeline.compositor.composite import paste
    from pipeline.compositor.jpeg_splice import BackgroundJpegs, encode_jpeg
    from pipeline.gpu_worker import audio
    from pipeline.gpu_worker import mel as mel_math

    cfg = load_config(cfg_path)
    stages = InProcessEngine(cfg_path, model_id, None, cfg.gpus.intra_op_threads)
    encoder, unet, avatar = stages.encoder, stages.unet, stages.avatar
    mode = stages.model.composite_mode
    try:
        chunk = speech_like_audio(0.64)
        samples = speech_like_audio((batch + 15) * 0.04)
        windows = audio.mel_windows(mel_math.melspectrogram(samples))
        features = audio.frame_features(encoder.encode(windows), batch)
        visual = np.empty((batch, 6, 320, 320), np.float32)
        prediction = np.empty((batch, 3, 320, 320), np.float32)
        avatar.visual_inputs(range(len(visual)), visual)
        unet.run(visual, features, prediction)
        background, rect = avatar.frames()[0], avatar.rect(0)
        frame = paste(background, prediction[0], rect, mode)
        kept, key = BackgroundJpegs(2**30), ("stages", 0, cfg.jpeg_quality)
        kept.background(key, background)  # as a compositor holds it after its first frame
        return {
            "mel_per_640ms_chunk": _median_ms(lambda: mel_math.melspectrogram(chunk), repeats),
            f"audio_features_batch{batch}": _median_ms(
                lambda: audio.request_features(encoder.encode, samples, SAMPLE_RATE, batch),
                repeats),
            "encoder_windows": float(len(windows)),
            "visual_input_per_frame": _median_ms(lambda: avatar.visual_inputs([0], visual[:1]), repeats),
            f"unet_batch{batch}": _median_ms(lambda: unet.run(visual, features, prediction), repeats),
            "paste_per_frame": _median_ms(lambda: paste(background, prediction[0], rect, mode),
                                          repeats),
            "jpeg_per_frame": _median_ms(lambda: encode_jpeg(frame, cfg.jpeg_quality), repeats),
            # what a compositor does: the paste and the JPEG of the rect's segments only
            "paste_jpeg_patch_per_frame": _median_ms(lambda: kept.frame(
                key, background, rect, lambda pixels, r: paste(pixels, prediction[0], r, mode)),
                repeats),
        }
    finally:
        stages.close()
