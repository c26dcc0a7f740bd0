"""The UNet alone on an avatar's model: frames/s of each backend, precision and CUDA-graph
variant, and a precision checked against ONNX Runtime's fp32 on composited frames.

`python -m pipeline.bench.unet --json` prints one object: `throughput` (per provider,
variant and batch: `ort_fps`, `ort_ms_per_run`; inputs and output resident, nothing else
runs; with several providers or variants every batch measures them in alternating rounds
in this one process, so a slow spell of a shared machine hits each alike) and, with
`--precision-check B`, `precision` (B frames of the avatar through the real audio encoder
and two UNets, pasted into their backgrounds: the PSNR of the candidate's frames against the
reference's and the predictions' max abs diff; by default fp16 against fp32 on the config's
provider, with `--providers cpu,openvino` OpenVINO's precision against ONNX Runtime fp32).
`lipsync bench --compare ort` uses the same throughput loop; scripts/gpu-suite runs both on
the GPU.
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
from pipeline.gpu_worker.unet import UNetRunner, load_unet
from pipeline.synctalk import AUDIO_SHAPE, PREDICTION_SHAPE, SAMPLE_RATE, VISUAL_SHAPE

# name -> (gpus.unet_precision, gpus.cuda_graphs); "+static": OpenVINO compiled for each
# batch size instead of the dynamic batch the worker runs (what the choice was measured on)
VARIANTS: dict[str, tuple[str, bool]] = {
    "fp32": ("fp32", False), "tf32": ("tf32", False), "fp16": ("fp16", False),
    "bf16": ("bf16", False), "fp32+graphs": ("fp32", True), "fp16+graphs": ("fp16", True),
    "fp32+static": ("fp32", False), "bf16+static": ("bf16", False)}
# what each provider runs of them
PROVIDER_VARIANTS: dict[str, tuple[str, ...]] = {
    "cuda": ("fp32", "tf32", "fp16", "fp32+graphs", "fp16+graphs"),
    "cpu": ("fp32", "fp16"), "openvino": ("fp32", "bf16", "fp32+static", "bf16+static")}
DEFAULT_VARIANTS = ("fp32", "tf32", "fp16", "bf16", "fp32+graphs", "fp16+graphs")
ROUNDS = 3


def _step(unet: UNetRunner, provider: Resolved, batch: int) -> Callable[[], None]:
    """One UNet run at `batch` on resident random inputs: bound device memory on CUDA, the
    captured graph's static buffers with graphs, plain arrays on the CPU (what the engine
    hands it: the run reads and writes them in place)."""
    from pipeline.gpu_worker.cuda_graphs import GraphedUNet, bucket_for

    rng = np.random.default_rng(0)
    visual = rng.random((batch, *VISUAL_SHAPE), np.float32)
    audio = rng.standard_normal((batch, *AUDIO_SHAPE)).astype(np.float32)
    out = np.empty((batch, *PREDICTION_SHAPE), np.float32)
    if isinstance(unet, GraphedUNet):
        # the inputs go into its static device buffers once; each step replays the graph
        unet.run(visual, audio, out)
        bucket = bucket_for(batch, unet.buckets)
        return lambda: unet.replay(bucket)
    if provider != "cuda":
        return lambda: unet.run(visual, audio, out)
    import onnxruntime as ort

    from pipeline.gpu_worker.sessions import UNet

    assert isinstance(unet, UNet)
    session = unet.session
    binding = session.io_binding()
    binding.bind_ortvalue_input(unet.visual_name, ort.OrtValue.ortvalue_from_numpy(visual, "cuda", 0))
    binding.bind_ortvalue_input(unet.audio_name, ort.OrtValue.ortvalue_from_numpy(audio, "cuda", 0))
    binding.bind_ortvalue_output(unet.output_name, ort.OrtValue.ortvalue_from_shape_and_type(
        [batch, *PREDICTION_SHAPE], np.float32, "cuda", 0))
    return lambda: session.run_with_iobinding(binding)


def _timed(step: Callable[[], None], seconds: float) -> tuple[int, float]:
    """(runs, wall seconds) of `step` for `seconds`, at least 3 runs."""
    runs = 0
    t0 = time.perf_counter()
    while runs < 3 or time.perf_counter() - t0 < seconds:
        step()
        runs += 1
    return runs, time.perf_counter() - t0


def _figures(runs: int, wall: float, batch: int) -> dict[str, object]:
    return {"ort_fps": round(runs * batch / wall, 2), "ort_ms_per_run": round(wall / runs * 1e3, 3)}


def unet_throughput(unet: UNetRunner, provider: Resolved, batch: int,
                    seconds: float) -> dict[str, object]:
    """frames/s of `unet` alone at `batch`: inputs and output resident (device memory on
    CUDA), random inputs, 3 warm-up runs, then `seconds` of runs."""
    step = _step(unet, provider, batch)
    for _ in range(3):
        step()
    return {**_figures(*_timed(step, seconds), batch), "provider": provider}


def variant_throughput(model_path: Path, providers: list[Resolved], variants: list[str],
                       batches: list[int], seconds: float,
                       threads: int = 0) -> list[dict[str, object]]:
    """frames/s of every provider's variants at every batch (one session each), measured
    in ROUNDS alternating rounds of seconds / ROUNDS when there is more than one."""
    rows: list[dict[str, object]] = []
    unets: dict[tuple[Resolved, str], UNetRunner] = {}
    static: dict[tuple[Resolved, str], str] = {}  # compiled per batch below
    for provider in providers:
        for name in variants:
            if "/" in name:  # "provider/variant": that provider only
                only, name = name.split("/", 1)
                if only != provider:
                    continue
            precision, graphs = VARIANTS[name]
            if name not in PROVIDER_VARIANTS[provider]:
                rows.append({"provider": provider, "variant": name,
                             "skipped": f"the {provider} provider does not run {name}"})
                continue
            if name.endswith("+static"):
                static[provider, name] = precision
            else:
                unets[provider, name] = load_unet(model_path, provider, threads, precision, graphs)
    rounds = ROUNDS if len(unets) + len(static) > 1 else 1
    for batch in batches:
        per_batch = dict(unets)
        for key, precision in static.items():
            from pipeline.gpu_worker.openvino_runtime import OpenVinoUNet, compile_model

            per_batch[key] = OpenVinoUNet(compile_model(model_path, precision, threads, batch))
        steps = {key: _step(unet, key[0], batch) for key, unet in per_batch.items()}
        for step in steps.values():
            for _ in range(3):
                step()
        totals = {key: [0, 0.0] for key in steps}
        for _ in range(rounds):
            for key, step in steps.items():
                runs, wall = _timed(step, seconds / rounds)
                totals[key][0] += runs
                totals[key][1] += wall
        rows += [{"provider": provider, "variant": name, "batch": batch, "rounds": rounds,
                  **_figures(int(runs), wall, batch)}
                 for (provider, name), (runs, wall) in totals.items()]
    return rows


def precision_check(cfg_path: Path, model_id: str, provider: Resolved, batch: int,
                    start: int = 0, reference: tuple[Resolved, str] | None = None,
                    candidate: tuple[Resolved, str] | None = None) -> dict[str, object]:
    """`batch` frames of the avatar (speech-like audio through the real encoder, the
    server-built visual input) through the `reference` (default: `provider` fp32) and the
    `candidate` (default: `provider` fp16) UNet, each prediction pasted into its
    background: PSNR of the candidate's frames against the reference's, prediction diffs."""
    from pipeline.client import speech_like_audio
    from pipeline.compositor.composite import paste
    from pipeline.gpu_worker import audio
    from pipeline.gpu_worker.avatar import load_avatar
    from pipeline.gpu_worker.unet import load_audio_encoder
    from pipeline.shm.segment import segment_name

    reference = reference or (provider, "fp32")
    candidate = candidate or (provider, "fp16")
    cfg = load_config(cfg_path)
    model = cfg.models[model_id]
    # the features are the reference's (float32 on every backend): the UNet is compared
    encoder = load_audio_encoder(cfg.audio_encoder_of(model), reference[0])
    samples = speech_like_audio((batch + 15) * 0.04)
    features = audio.request_features(encoder.encode, samples, SAMPLE_RATE, batch)
    avatar = load_avatar(model, segment_name(f"prec{os.getpid()}", "bg"))
    try:
        visual = avatar.visual_inputs(range(start, start + batch),
                                      np.empty((batch, *VISUAL_SHAPE), np.float32))
        predictions = []
        for runs_on, precision in (reference, candidate):
            out = np.empty((batch, *PREDICTION_SHAPE), np.float32)
            load_unet(model.model_path, runs_on, precision=precision).run(visual, features, out)
            predictions.append(out)
        frames = avatar.frames()
        psnrs = []
        for i in range(batch):
            index = (start + i) % avatar.num_frames
            composited = [paste(frames[index], p[i], avatar.rect(start + i),
                                model.composite_mode) for p in predictions]
            psnrs.append(psnr_db(composited[0], composited[1]))
    finally:
        avatar.close()
    diff = np.abs(predictions[0].astype(np.float64) - predictions[1])
    return {"model": model_id, "provider": candidate[0], "batch": batch,
            "reference": "/".join(reference), "candidate": "/".join(candidate),
            "psnr_db_min": round(min(psnrs), 2),
            "psnr_db_mean": round(float(np.mean([min(p, 200.0) for p in psnrs])), 2),
            "prediction_max_abs_diff": round(max_abs_diff(*predictions), 6),
            "prediction_mean_abs_diff": round(float(diff.mean()), 7)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pipeline.bench.unet", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", type=Path, default=DEFAULT_CONFIG_PATH)
    p.add_argument("--model", default="bench", help="a configured model (default: bench)")
    p.add_argument("--providers", default="",
                   help="comma-separated, of cuda, cpu, openvino (default: the config's)")
    p.add_argument("--variants", default="",
                   help=f"comma-separated, of {', '.join(VARIANTS)}, each alone or as "
                        "PROVIDER/VARIANT (default: every one the providers run)")
    p.add_argument("--batches", default="1,8,32", help="comma-separated batch sizes")
    p.add_argument("--seconds", type=float, default=2.0, help="measured seconds per batch")
    p.add_argument("--threads", type=int, default=0,
                   help="CPU threads per run (0: the runtime's default, every core)")
    p.add_argument("--precision-check", type=int, default=0, metavar="B",
                   help="also compare a precision with fp32 on B composited frames (0: skip)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    args = p.parse_args(argv)
    cfg_providers = [v for v in args.providers.split(",") if v]
    batches = [int(b) for b in args.batches.split(",") if b]
    unknown = sorted(set(cfg_providers) - set(PROVIDER_VARIANTS))
    if unknown or not all(1 <= b <= 32 for b in batches) or args.seconds <= 0 or args.threads < 0:
        raise SystemExit(f"bench_unet: unknown providers {unknown}, or a batch outside 1-32, "
                         "or --seconds <= 0, or --threads < 0")
    from pipeline.demo.ensure import ensure_model

    ensure_model(args.config, args.model)
    cfg = load_config(args.config)
    providers: list[Resolved] = [resolve_provider(v, 1) for v in cfg_providers] or [
        resolve_provider(cfg.gpus.provider, 1)]
    variants = [v for v in args.variants.split(",") if v] or list(dict.fromkeys(
        v for prov in providers for v in PROVIDER_VARIANTS[prov] if v in DEFAULT_VARIANTS))
    names = {v.rsplit("/", 1)[-1] for v in variants}
    if names - set(VARIANTS):
        raise SystemExit(f"bench_unet: unknown variants {sorted(names - set(VARIANTS))}")
    result: dict[str, object] = {"model": args.model, "provider": providers[0],
                                 "throughput": variant_throughput(
                                     cfg.models[args.model].model_path, providers, variants,
                                     batches, args.seconds, args.threads)}
    if args.precision_check:
        if len(providers) > 1:  # every other provider's lowest precision against the first's fp32
            result["precision"] = [precision_check(
                args.config, args.model, providers[0], args.precision_check,
                reference=(providers[0], "fp32"), candidate=(prov, name))
                for prov in providers[1:] for name in PROVIDER_VARIANTS[prov]
                if (name in variants or f"{prov}/{name}" in variants) and name in DEFAULT_VARIANTS]
        else:
            result["precision"] = precision_check(args.config, args.model, providers[0],
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
