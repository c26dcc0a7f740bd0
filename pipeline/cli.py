"""The `lipsync` command: serve, role, demo-assets, prepare-avatar, render, stats, bench,
lb-config."""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from pipeline import lb_config, ops_client, prepare_avatar, render, roles
from pipeline.config import DEFAULT_CONFIG_PATH, Config, ConfigError, load_config
from pipeline.process import setup_logging

log = logging.getLogger("lipsync")


def _load(args: argparse.Namespace) -> Config:
    try:
        cfg = load_config(args.config)
    except ConfigError as exc:
        sys.exit(f"lipsync: bad config: {exc}")
    return cfg.with_ports(getattr(args, "grpc_port", None), getattr(args, "ws_port", None))


def ensure_demo_assets(cfg: Config, force: bool = False, bench_model: bool = False) -> bool:
    """Build the demo avatar and graphs where the config points at their default places,
    and the bench model when asked or when the config's `bench` model lacks its file.

    Returns True when something was built. Models elsewhere are the user's and untouched.
    """
    from pipeline.demo.assets import DEMO_MODEL_ID, build_demo_assets, demo_asset_paths, demo_assets_present
    from pipeline.demo.bench_model import BENCH_MODEL_ID, bench_model_path, write_bench_model

    demo = demo_asset_paths(cfg.models_root)
    model = cfg.models.get(DEMO_MODEL_ID)
    bench = cfg.models.get(BENCH_MODEL_ID)
    uses_demo = cfg.audio_encoder_path == demo.audio_encoder_path or (
        model is not None and model.model_path == demo.unet_path) or (
        bench is not None and bench.background_dir == demo.background_dir)
    built = False
    if uses_demo and (force or not demo_assets_present(cfg.models_root)):
        from tqdm import tqdm

        with tqdm(desc="building demo avatar", unit="frame", disable=None) as bar:
            def progress(done: int, total: int) -> None:
                bar.total = total
                bar.update(done - bar.n)
            build_demo_assets(cfg.models_root, force=force, progress=progress)
        log.info("demo assets written to %s", cfg.models_root)
        built = True
    target = bench_model_path(cfg.models_root)
    configured = bench is not None and bench.model_path == target
    if (bench_model or configured) and (force or not target.is_file()):
        write_bench_model(target)
        log.info("bench model (SyncTalk-2D UNet size) written to %s", target)
        built = True
    return built


def cmd_serve(args: argparse.Namespace) -> int:
    from pipeline.supervisor import Supervisor

    cfg = _load(args)
    ensure_demo_assets(cfg)
    try:
        supervisor = Supervisor(cfg)
    except ValueError as exc:
        sys.exit(f"lipsync: {exc}")
    return supervisor.run()


def cmd_demo_assets(args: argparse.Namespace) -> int:
    cfg = _load(args)
    if not ensure_demo_assets(cfg, force=args.force, bench_model=args.bench_model):
        print(f"demo assets already present in {cfg.models_root}")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from pipeline.bench import run_bench

    return run_bench(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lipsync", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    def with_config(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
        p.add_argument("--config", type=Path, default=DEFAULT_CONFIG_PATH,
                       help=f"config file (default {DEFAULT_CONFIG_PATH})")
        return p

    serve = with_config(sub.add_parser("serve", help="run the server (all roles)"))
    serve.add_argument("--grpc-port", type=int, help="override server.port")
    serve.add_argument("--ws-port", type=int, help="override server.ws_port")
    serve.set_defaults(func=cmd_serve)

    demo = with_config(sub.add_parser("demo-assets", help="build the built-in demo avatar"))
    demo.add_argument("--force", action="store_true", help="rebuild even if present")
    demo.add_argument("--bench-model", action="store_true",
                      help="also build the bench model: a UNet of SyncTalk-2D's architecture "
                           "and size (12.2 M parameters, 9.8 GFLOPs/frame), for performance work")
    demo.set_defaults(func=cmd_demo_assets)

    for register in (prepare_avatar.register, render.register, ops_client.register,
                     roles.register, lb_config.register):
        register(sub)

    bench = with_config(sub.add_parser("bench", help="measure frames/s and latency"))
    bench.add_argument("--address", help="a running server (host:port); default: "
                       "$GRPC_SERVER, else start one")
    bench.add_argument("--model", default="demo",
                       help="demo, or bench (SyncTalk-2D-sized UNet, built when missing); "
                            "ID,ID,...: client i sends model i mod n (spreads the load over "
                            "a balancer's boxes)")
    bench.add_argument("--batch", type=int, default=8)
    bench.add_argument("--concurrency", type=int, default=4)
    bench.add_argument("--requests", type=int, help="measured requests (default 40)")
    bench.add_argument("--visual", choices=("client", "server"), default="client",
                       help="client: requests carry the visual tensors (SyncTalk-2D clients); "
                            "server: audio only, the server builds them from the avatar")
    bench.add_argument("--duration", type=float, metavar="S",
                       help="measure for S seconds instead of a number of requests")
    bench.add_argument("--compare", action="append", choices=("inprocess", "ort"),
                       help="inprocess: the same stages in this process, one request after "
                            "another, and the ratio; ort: the UNet session alone at the same "
                            "batch (repeatable)")
    bench.add_argument("--rounds", type=int, default=3,
                       help="--compare inprocess: alternate pipeline and baseline this many "
                            "times over the requests")
    bench.add_argument("--probe", type=int, default=10, metavar="N",
                       help="then N requests one at a time: latency minus stage compute "
                            "(0: skip)")
    bench.add_argument("--warmup", type=int, default=2, help="requests per client not measured")
    bench.add_argument("--json", action="store_true", help="print one JSON object")
    bench.add_argument("--load-cycles", type=int, metavar="N",
                       help="LoadModel/UnloadModel N times; load/unload times and whether "
                            "device memory returns to its baseline")
    bench.add_argument("--gpu", type=int, default=0, help="device for --load-cycles")
    bench.add_argument("--stream", action="store_true",
                       help="real-time WebSocket sessions instead of gRPC batches "
                            "(--address is then the WebSocket host:port)")
    bench.add_argument("--sessions", type=int, default=1, help="--stream: concurrent sessions")
    bench.add_argument("--seconds", type=float, default=20.0, help="--stream: audio per session")
    bench.add_argument("--chunk-ms", type=float, default=40.0, help="--stream: audio per message")
    bench.add_argument("--stages", action="store_true",
                       help="time each stage in this process (no server): mel, encoder, "
                            "visual input, UNet, paste, JPEG")
    bench.set_defaults(func=cmd_bench)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    setup_logging("lipsync")
    sys.exit(args.func(args))


if __name__ == "__main__":
    main()
