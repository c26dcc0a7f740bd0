"""The `lipsync` command: serve, role, demo-assets, import-synctalk, prepare-avatar, render,
stats, bench, lb-config, livekit-avatar."""
from __future__ import annotations

import argparse
import logging
import signal
import sys
from pathlib import Path

from pipeline.cli import import_synctalk, lb_config, livekit_avatar, prepare_avatar, render, stats
from pipeline.client import add_security_arguments, apply_security_arguments
from pipeline.config import DEFAULT_CONFIG_PATH, Config, ConfigError, load_config
from pipeline.demo.ensure import ensure_demo_assets
from pipeline.demo.owned import DemoAssetsError
from pipeline.launch import standalone
from pipeline.runtime.logs import setup_logging

log = logging.getLogger("lipsync")


def _load(args: argparse.Namespace) -> Config:
    try:
        return load_config(args.config).with_ports(
            getattr(args, "grpc_port", None), getattr(args, "ws_port", None),
            getattr(args, "metrics_port", None))
    except ConfigError as exc:
        sys.exit(f"lipsync: bad config: {exc}")


def cmd_serve(args: argparse.Namespace) -> int:
    from pipeline.frontend.inflight import check_arena_fits
    from pipeline.frontend.ports import check_free
    from pipeline.launch.supervisor import Supervisor
    from pipeline.runtime.addresses import Addresses
    from pipeline.runtime.process import RoleError, check_role_free

    cfg = _load(args)
    try:
        # before building anything: another server of this instance, a taken port or a
        # /dev/shm without room for the arena fails at once
        check_role_free(Addresses.of(cfg).role_lock("frontend"))
        check_free(cfg)
        check_arena_fits(cfg)
        ensure_demo_assets(cfg)
        supervisor = Supervisor(cfg, stop_with_parent=args.stop_with_parent)
    except (ValueError, RoleError) as exc:
        sys.exit(f"lipsync: {exc}")
    return supervisor.serve()


def cmd_demo_assets(args: argparse.Namespace) -> int:
    cfg = _load(args)
    try:
        built = ensure_demo_assets(cfg, force=args.force, bench_model=args.bench_model)
    except DemoAssetsError as exc:
        sys.exit(f"lipsync: {exc}")
    if not built:
        print(f"demo assets already present in {cfg.models_root}")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from pipeline.bench.main import run_bench

    apply_security_arguments(args)
    load_config(args.config)  # a bad one stops here (main says why), before any server starts
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
    serve.add_argument("--metrics-port", type=int,
                       help="override ops.metrics_port (/metrics; 0 turns it off)")
    serve.add_argument("--stop-with-parent", action="store_true",
                       help="stop (as on SIGTERM) when the process that started it exits, "
                            "however it exits (lipsync bench's own servers)")
    serve.set_defaults(func=cmd_serve)

    demo = with_config(sub.add_parser("demo-assets", help="build the built-in demo avatar"))
    demo.add_argument("--force", action="store_true", help="rebuild even if present")
    demo.add_argument("--bench-model", action="store_true",
                      help="also build the bench model: a UNet of SyncTalk-2D's architecture "
                           "and size (12.2 M parameters, 9.8 GFLOPs/frame), for performance work")
    demo.set_defaults(func=cmd_demo_assets)

    for register in (import_synctalk.register, prepare_avatar.register, render.register,
                     stats.register, standalone.register, lb_config.register,
                     livekit_avatar.register):
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
    bench.add_argument("--ort-seconds", type=float, default=5.0, metavar="S",
                       help="--compare ort: seconds of UNet runs measured")
    bench.add_argument("--rounds", type=int, default=3,
                       help="--compare inprocess / --providers: alternate the pipeline and "
                            "what it is compared with this many times")
    bench.add_argument("--providers", metavar="P,P,...",
                       help="one server per provider (cpu, openvino, cuda), measured in "
                            "--rounds alternating rounds of --duration / rounds (or the live "
                            "sweep, with --stream --live); ratios to the first")
    bench.add_argument("--precision", default="",
                       help="--providers: gpus.unet_precision of every server (default: "
                            "the config's)")
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
    bench.add_argument("--live", action="store_true",
                       help="--stream: live sessions (?mode=live): a 25 fps video from the "
                            "handshake, idle frames in silence")
    bench.add_argument("--speaking", type=float, default=0.5, metavar="F",
                       help="--live: the share of the time each session speaks, utterances "
                            "staggered over the sessions admitted (0: idle only, 1: all the time)")
    bench.add_argument("--pauses-as-silence", action="store_true",
                       help="--live: speaking sessions stream all along, their pauses sent as "
                            "silent audio (a call; what streaming.skip_silent_frames saves on)")
    bench.add_argument("--interrupts", type=int, default=0, metavar="N",
                       help="--live: one more session speaks and interrupts itself N times "
                            "(interrupt latency p50/p99)")
    bench.add_argument("--batch-load", type=int, default=0, metavar="N",
                       help="--live: N gRPC clients send --batch frame requests (server-built "
                            "visual) all the while: do admitted live sessions keep their speech "
                            "frames under batch load?")
    bench.add_argument("--sweep", metavar="S,S,...",
                       help="--stream: one run per session count against the same server; a "
                            "table, the largest count holding 25 fps, and a plot (--plot)")
    bench.add_argument("--plot", default="stream-sweep.svg", metavar="SVG",
                       help="--sweep: where the plot goes (default stream-sweep.svg)")
    bench.add_argument("--stages", action="store_true",
                       help="time each stage in this process (no server): mel, encoder, "
                            "visual input, UNet, paste, JPEG")
    add_security_arguments(bench)
    bench.set_defaults(func=cmd_bench)
    return parser


def _exit_on_sigterm(signum: int, _frame: object) -> None:
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    setup_logging("lipsync")
    # SIGTERM (`timeout`, a cancelled job) ends a command as Ctrl-C does: its clean-up runs
    # (a bench stops the server it started and frees its shared memory); `serve` and `role`
    # install their own handlers
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    try:
        sys.exit(args.func(args))
    except ConfigError as exc:  # any command's --config: one line, not a traceback
        sys.exit(f"lipsync {args.command}: bad config: {exc}")
    except DemoAssetsError as exc:
        sys.exit(f"lipsync {args.command}: {exc}")


if __name__ == "__main__":
    main()
