"""The demo avatar and the bench model, built where the config points at them when they
are missing (`lipsync serve` on a fresh machine, `lipsync demo-assets`, the bench)."""
from __future__ import annotations

import logging
from pathlib import Path

from pipeline.config import Config

log = logging.getLogger("lipsync")


def ensure_demo_assets(cfg: Config, force: bool = False, bench_model: bool = False) -> bool:
    """Build the demo avatar and graphs where the config points at their default places,
    and the bench model when asked or when the config's `bench` model lacks its file.

    Returns True when something was built. Models elsewhere are the user's and untouched.
    """
    from pipeline.demo.assets import (
        DEMO_MODEL_ID,
        NUM_FRAMES,
        build_demo_assets,
        demo_asset_paths,
        demo_assets_present,
    )
    from pipeline.demo.bench_model import BENCH_MODEL_ID, bench_model_path, write_bench_model

    demo = demo_asset_paths(cfg.models_root)
    model = cfg.models.get(DEMO_MODEL_ID)
    bench = cfg.models.get(BENCH_MODEL_ID)
    uses_demo = cfg.audio_encoder_path == demo.audio_encoder_path or (
        model is not None and model.model_path == demo.unet_path) or (
        bench is not None and bench.background_dir == demo.background_dir)
    built = False
    # as many frames as the config's models on the demo's frames ask for (a test avatar, or
    # copies of it under other names, may use fewer)
    frames = max((m.num_frames for m in cfg.models.values()
                  if m.background_dir == demo.background_dir), default=NUM_FRAMES)
    if uses_demo and (force or not demo_assets_present(cfg.models_root, frames)):
        from tqdm import tqdm

        with tqdm(desc="building demo avatar", unit="frame", disable=None) as bar:
            def progress(done: int, total: int) -> None:
                bar.total = total
                bar.update(done - bar.n)
            build_demo_assets(cfg.models_root, num_frames=frames, force=force, progress=progress)
        log.info("demo assets written to %s", cfg.models_root)
        built = True
    target = bench_model_path(cfg.models_root)
    configured = bench is not None and bench.model_path == target
    if (bench_model or configured) and (force or not target.is_file()):
        write_bench_model(target)
        log.info("bench model (SyncTalk-2D UNet size) written to %s", target)
        built = True
    return built


def ensure_model(cfg_path: Path, model_id: str) -> None:
    """`--model bench` builds the bench UNet (and the demo frames it uses) when missing."""
    from pipeline.config import load_config
    from pipeline.demo.bench_model import BENCH_MODEL_ID

    cfg = load_config(cfg_path)
    if model_id not in cfg.models:
        raise SystemExit(f"lipsync bench: model '{model_id}' is not in {cfg_path}")
    ensure_demo_assets(cfg, bench_model=model_id == BENCH_MODEL_ID)
