"""The demo avatar and the bench model, built where the config points at them when they
are missing (`lipsync serve` on a fresh machine, `lipsync demo-assets`, the bench)."""
from __future__ import annotations

import logging
from pathlib import Path

from pipeline.config import Config

log = logging.getLogger("lipsync")


def ensure_demo_assets(cfg: Config, force: bool = False, bench_model: bool = False) -> bool:
    """Build the demo avatar when a model of the config uses its files, and the bench model
    when asked or when the config's `bench` model lacks its file.

    Returns True when something was built. Nothing else is written: a config that serves no
    model on the demo's files gets no `demo/` (its audio encoder at the default place is
    the user's, whatever it holds), and no file the server did not write is replaced
    (DemoAssetsError names one that is in the way).
    """
    from pipeline.demo.assets import (
        NUM_FRAMES,
        build_demo_assets,
        demo_asset_paths,
        demo_assets_present,
    )
    from pipeline.demo.bench_model import BENCH_MODEL_ID, bench_model_path, write_bench_model

    demo = demo_asset_paths(cfg.models_root)
    on_demo = [m for m in cfg.models.values()
               if demo.unet_path == m.model_path or demo.background_dir == m.background_dir
               or demo.crop_rects_path == m.crop_rects_path]
    encoder = cfg.audio_encoder_path == demo.audio_encoder_path
    built = False
    # as many frames as the config's models on the demo's frames ask for (a test avatar, or
    # copies of it under other names, may use fewer)
    frames = max((m.num_frames for m in on_demo if m.background_dir == demo.background_dir),
                 default=NUM_FRAMES)
    if on_demo and (force or not demo_assets_present(cfg.models_root, frames, encoder)):
        from tqdm import tqdm

        with tqdm(desc="building demo avatar", unit="frame", disable=None) as bar:
            def progress(done: int, total: int) -> None:
                bar.total = total
                bar.update(done - bar.n)
            build_demo_assets(cfg.models_root, num_frames=frames, force=force, progress=progress,
                              encoder=encoder)
        log.info("demo assets written to %s", cfg.models_root)
        built = True
    bench = cfg.models.get(BENCH_MODEL_ID)
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
