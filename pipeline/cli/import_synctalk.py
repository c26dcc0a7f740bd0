"""`lipsync import-synctalk`: a SyncTalk-2D training run becomes a served avatar, in one
command and without PyTorch.

Reads ROOT's checkpoint/NAME/<epoch>.pth (the highest epoch), the shared audio encoder
model/checkpoints/audio_visual_encoder.pth and dataset/NAME's frames and landmarks; writes
the model folder (pipeline/importer/build.py) after loading it and rendering one frame; then
prints its `models:` entry, or with --config adds it to that file (a backup kept).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pipeline.config import DEFAULT_CONFIG_PATH, ConfigError, load_config
from pipeline.importer.build import (
    ENCODER_FILE,
    FRAMES_DIR,
    RECTS_FILE,
    UNET_FILE,
    Imported,
    import_training_run,
)
from pipeline.importer.config_entry import ConfigEdit, EntryError, ModelEntry, plan_entry
from pipeline.importer.training_run import ImportFailed

PROG = "lipsync import-synctalk"


def model_entry(model_id: str, out: Path, frames: int, models_root: Path) -> ModelEntry:
    """The `models:` entry of an imported folder; paths relative to `models_root` when the
    folder lies under it."""
    folder = out.resolve()
    try:
        base = str(folder.relative_to(models_root.resolve()))
    except ValueError:
        base = str(folder)
    return ModelEntry(model_id, {
        "model_path": f"{base}/{UNET_FILE}",
        "audio_encoder_path": f"{base}/{ENCODER_FILE}",
        "background_dir": f"{base}/{FRAMES_DIR}",
        "crop_rects_path": f"{base}/{RECTS_FILE}",
        "num_frames": frames,
        "preload_model": False,
        "composite_mode": "synctalk",
    })


def _models_root(config: Path | None) -> Path:
    """The models_root the entry's paths are relative to: --config's, else the default
    config's (what `lipsync serve` reads), else ./models."""
    path = config or DEFAULT_CONFIG_PATH
    if config is None and not path.is_file():
        return Path("models").resolve()
    try:
        return load_config(path).models_root
    except ConfigError as exc:
        raise ImportFailed(f"bad config: {exc}") from None


def cmd_import_synctalk(args: argparse.Namespace) -> int:
    """The command; exit 0 only once the model loaded and rendered a frame, 2 with one line
    on any error (nothing written then)."""
    from tqdm import tqdm

    model_id = args.name or args.run_name
    try:
        if not model_id.strip():
            raise ImportFailed("--name must not be empty")
        models_root = _models_root(args.config)
        out = args.out or models_root / model_id
        edit: ConfigEdit | None = None
        if args.config is not None:  # refused before any work when the entry cannot go in
            plan_entry(args.config, model_entry(model_id, out, 1, models_root), args.force)
        with tqdm(desc="importing frames", unit="frame", disable=None, file=sys.stderr) as bar:
            def progress(done: int, total: int) -> None:
                bar.total = total
                bar.update(done - bar.n)

            imported = import_training_run(args.root, args.run_name, out, args.checkpoint,
                                           args.audio_encoder, args.smooth, args.force, progress)
        entry = model_entry(model_id, imported.out, imported.frames, models_root)
        if args.config is not None:
            edit = plan_entry(args.config, entry, args.force)
            backup = edit.write()
    except (ImportFailed, EntryError) as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted; nothing was installed", file=sys.stderr)
        return 130
    print(summary(model_id, imported))
    if edit is not None:
        print(f"# added to {args.config} (previous file: {backup}); LoadModel '{model_id}' "
              "or restart the server to serve it")
    else:
        print("# add under `models:` in your config, then LoadModel or restart the server")
    print(entry.block(), end="")
    return 0


def summary(model_id: str, imported: Imported) -> str:
    return (f"imported {model_id}: {imported.frames} frames, {imported.parameters / 1e6:.2f} M "
            f"parameters, {imported.seconds:.1f} s -> {imported.out}")


def register(sub: argparse._SubParsersAction) -> None:
    """Add the `import-synctalk` subcommand to the `lipsync` parser."""
    p = sub.add_parser("import-synctalk", help="make a SyncTalk-2D training run a served avatar",
                       description=__doc__.split("\n\n")[0])
    p.add_argument("root", type=Path, metavar="ROOT", help="the SyncTalk-2D training run")
    p.add_argument("run_name", metavar="NAME", help="the avatar's name in it (checkpoint/NAME, "
                   "dataset/NAME)")
    p.add_argument("--name", help="model id (default: NAME)")
    p.add_argument("--out", type=Path, help="model folder (default: models_root/ID)")
    p.add_argument("--config", type=Path, help="add the model's entry to this config file "
                   "(a backup is kept; without it the entry is printed)")
    p.add_argument("--checkpoint", type=Path, help="the UNet checkpoint (.pth, .safetensors or "
                   ".onnx; default: the highest checkpoint/NAME/<epoch>.pth)")
    p.add_argument("--audio-encoder", type=Path, help="the audio encoder (.pth, .safetensors or "
                   ".onnx; default: ROOT/model/checkpoints/audio_visual_encoder.pth)")
    p.add_argument("--smooth", type=int, default=1, metavar="N",
                   help="average the crop rectangles over N frames (jittery landmarks; "
                        "default 1: off)")
    p.add_argument("--force", action="store_true",
                   help="replace an existing model folder and config entry of that id")
    p.set_defaults(func=cmd_import_synctalk)
