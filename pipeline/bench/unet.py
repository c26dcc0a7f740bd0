"""ONNX Runtime alone on an avatar's UNet: frames/s of each precision and CUDA-graph variant,
and fp16 checked against fp32 on composited frames.

`python -m pipeline.bench.unet --json` prints one object: `throughput` (per variant and
batch: `ort_fps`, `ort_ms_per_run`; inputs and output resident on the device, nothing else
runs) and, with `--precision-check B`, `precision` (B frames of the avatar through the real
audio encoder and both UNets, pasted into their backgrounds: the PSNR of the fp16 frames
against the fp32 ones and the predictions' max abs diff). `lipsync bench --compare ort`
uses the same throughput loop; scripts/gpu-suite runs both on the GPU.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from pipeline.config import DEFAULT_CONFIG_PATH, load_config
from pipeline.gpu_worker.device import Resolved, resolve_provider
from pipeline.gpu_worker.precision import max_abs_diff, psnr_db
from pipeline.gpu_worker.sessions import UNet
from pipeline.gpu_worker.unet import load_unet
from pipeline.synctalk import AUDIO_SHAPE, PREDICTION_SHAPE, VISUAL_SHAPE

# name -> (gpus.unet_precision, gpus.cuda_graphs)
VARIANTS: dict[str, tuple[str, bool]] = {
    "fp32": ("fp32", False), "tf32": ("tf32", False), "fp16": ("fp16", False),
    "fp32+graphs": ("fp32", True), "fp16+graphs": ("fp16", True)}


def unet_throughput(unet: UNet, provider: Resolved, batch: int,
                    seconds: float) -> dict[str, object]:
    """frames/s of `unet` alone at `batch`: inputs and output resident on the device (IO
    binding of device memory), random inputs, 3 warm-up runs, then `seconds` of runs."""
    import onnxruntime as ort

    from pipeline.gpu_worker.cuda_graphs import GraphedUNet, bucket_for

    rng = np.random.default_rng(0)
    visual = rng.random((batch, *VISUAL_SHAPE), np.float32)
    audio = rng.standard_normal((batch, *AUDIO_SHAPE)).astype(np.float32)
    step: Callable[[], None]
    if isinstance(unet, GraphedUNet):
        # the inputs go into its static device buffers once; each step replays the graph
        unet.run(visual, audio, np.empty((batch, *PREDICTION_SHAPE), np.float32))
        bucket = bucket_for(batch, unet.buckets)
        step = lambda: unet.replay(bucket)  # noqa: E731
    else:
        device = "cuda" if provider == "cuda" else "cpu"
        binding = unet.session.io_binding()
        binding.bind_ortvalue_input(unet.visual_name,
                                    ort.OrtValue.ortvalue_from_numpy(visual, device, 0))
        binding.bind_ortvalue_input(unet.audio_name,
                                    ort.OrtValue.ortvalue_from_numpy(audio, device, 0))
        binding.bind_ortvalue_output(unet.output_name, ort.OrtValue.ortvalue_from_shape_and_type(
            [batch, *PREDICTION_SHAPE], np.float32, device, 0))
        step = lambda: unet.session.run_with_iobinding(binding)  # noqa: E731
    for _ in range(3):
        step()
    runs = 0
    t0 = time.perf_counter()
    while runs < 3 or time.perf_counter() - t0 < seconds:
        step()
        runs += 1
    wall = time.perf_counter() - t0
    return {"ort_fps": round(runs * batch / wall, 2),
            "ort_ms_per_run": round(wall / runs * 1e3, 3), "provider": provider}


def variant_throughput(model_path: Path, provider: Resolved, variants: list[str],
                       batches: list[int], seconds: float) -> list[dict[str, object]]:
    """unet_throughput of every variant at every batch (one session per variant)."""
    rows: list[dict[str, object]] = []
    for name in variants:
        precision, graphs = VARIANTS[name]
        if graphs and provider != "cuda":
            # ignored on the CPU (load_unet says so): measuring it would repeat plain runs
            rows.append({"variant": name, "skipped": "CUDA graphs need the CUDA provider"})
            continue
        unet = load_unet(model_path, provider, precision=precision, cuda_graphs=graphs)
        for batch in batches:
            rows.append({"variant": name, "batch": batch,
                         **unet_throughput(unet, provider, batch, seconds)})
        del unet
    return rows


def precision_check(cfg_path: Path, model_id: str, provider: Resolved, batch: int,
                    start: int = 0) -> dict[str, object]:
    """`batch` frames of the avatar (speech-like audio through the real encoder, the
    server-built visual input) through the fp32 and the fp16 UNet, each prediction pasted
    into its background: PSNR of the fp16 frames against the fp32 ones, prediction diffs."""
    from pipeline.client import speech_like_audio
    from pipeline.compositor.composite import paste
    from pipeline.gpu_worker import audio
    from pipeline.gpu_worker.avatar import load_avatar
    from pipeline.gpu_worker.sessions import AudioEncoder
    from pipeline.shm.segment import segment_name

    cfg = load_config(cfg_path)
    model = cfg.models[model_id]
    encoder = AudioEncoder.create(cfg.audio_encoder_path, provider)
    samples = speech_like_audio((batch + 15) * 0.04)
    features = audio.request_features(encoder.encode, samples, audio.SAMPLE_RATE, batch)
    avatar = load_avatar(model, segment_name(f"prec{os.getpid()}", "bg"))
    try:
        visual = avatar.visual_inputs(range(start, start + batch),
                                      np.empty((batch, *VISUAL_SHAPE), np.float32))
        predictions = {}
        for precision in ("fp32", "fp16"):
            out = np.empty((batch, *PREDICTION_SHAPE), np.float32)
            load_unet(model.model_path, provider, precision=precision).run(visual, features, out)
            predictions[precision] = out
        frames = avatar.frames()
        psnrs = []
        for i in range(batch):
            index = (start + i) % avatar.num_frames
            composited = [paste(frames[index], predictions[p][i], avatar.rect(start + i),
                                model.composite_mode) for p in ("fp32", "fp16")]
            psnrs.append(psnr_db(composited[0], composited[1]))
    finally:
        avatar.close()
    diff = np.abs(predictions["fp32"].astype(np.float64) - predictions["fp16"])
    return {"model": model_id, "provider": provider, "batch": batch,
            "psnr_db_min": round(min(psnrs), 2),
            "psnr_db_mean": round(float(np.mean([min(p, 200.0) for p in psnrs])), 2),
            "prediction_max_abs_diff": round(max_abs_diff(predictions["fp32"],
                                                          predictions["fp16"]), 6),
            "prediction_mean_abs_diff": round(float(diff.mean()), 7)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pipeline.bench.unet", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", type=Path, default=DEFAULT_CONFIG_PATH)
    p.add_argument("--model", default="bench", help="a configured model (default: bench)")
    p.add_argument("--variants", default=",".join(VARIANTS),
                   help=f"comma-separated, of {', '.join(VARIANTS)}")
    p.add_argument("--batches", default="1,8,32", help="comma-separated batch sizes")
    p.add_argument("--seconds", type=float, default=2.0, help="measured seconds per batch")
    p.add_argument("--precision-check", type=int, default=0, metavar="B",
                   help="also compare fp16 with fp32 on B composited frames (0: skip)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    args = p.parse_args(argv)
    variants = [v for v in args.variants.split(",") if v]
    batches = [int(b) for b in args.batches.split(",") if b]
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown or not all(1 <= b <= 32 for b in batches) or args.seconds <= 0:
        raise SystemExit(f"bench_unet: unknown variants {unknown}, or a batch outside 1-32, "
                         "or --seconds <= 0")
    from pipeline.demo.ensure import ensure_model

    ensure_model(args.config, args.model)
    cfg = load_config(args.config)
    provider = resolve_provider(cfg.gpus.provider, 1)
    result: dict[str, object] = {"model": args.model, "provider": provider,
                                 "throughput": variant_throughput(
                                     cfg.models[args.model].model_path, provider, variants,
                                     batches, args.seconds)}
    if args.precision_check:
        result["precision"] = precision_check(args.config, args.model, provider,
                                              args.precision_check)
    if args.json:
        print(json.dumps(result))
    else:
        for row in result["throughput"]:  # type: ignore[attr-defined]
            print(row)
        if "precision" in result:
            print(result["precision"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
