"""`lipsync role ROLE`: one role in the foreground, as its own OS process (a systemd unit).

It runs exactly the entry function `lipsync serve` spawns for that role, with no pipe to a
parent: the role rendezvouses with the others through the config only (ipc:// endpoints
in runtime.dir, arena names from runtime.instance), reports readiness to systemd
(sd_notify, see pipeline/runtime/process.py) and stops on SIGTERM. Roles may start in any order:
the frontend waits for every role's heartbeat, and workers and compositors connect to
endpoints that appear when their peer binds.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pipeline.config import DEFAULT_CONFIG_PATH, Config, ConfigError, load_config
from pipeline.launch.common import prepare_runtime

ROLES = ("frontend", "gpu-worker", "compositor")
EX_CONFIG = 78  # sysexits.h; the units name it in RestartPreventExitStatus=


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("role", help="run one role in the foreground (a systemd unit)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("role", choices=ROLES)
    p.add_argument("--config", type=Path, default=DEFAULT_CONFIG_PATH,
                   help=f"config file (default {DEFAULT_CONFIG_PATH})")
    p.add_argument("--index", type=int, default=None,
                   help="gpu-worker: GPU index (0 .. gpus.count-1); "
                        "compositor: pool index (0 .. compositor.pool_size-1)")
    p.set_defaults(func=cmd_role)


def _fail(message: str) -> int:
    print(f"lipsync role: {message}", file=sys.stderr)
    return EX_CONFIG


def _index(role: str, index: int | None, count: int, key: str) -> int | str:
    if index is None:
        return f"{role} needs --index (0 .. {count - 1}, {key} is {count})"
    if not 0 <= index < count:
        return f"{role} --index {index} is outside 0 .. {count - 1} ({key} is {count})"
    return index


def cmd_role(args: argparse.Namespace) -> int:
    """Prepare what `lipsync serve` prepares, then run the role in this process."""
    try:
        cfg = load_config(args.config)
    except ConfigError as exc:
        return _fail(f"bad config: {exc}")
    if args.role == "frontend" and args.index not in (None, 0):
        return _fail("frontend takes no --index (there is one frontend)")
    if args.role == "gpu-worker":
        index = _index(args.role, args.index, cfg.gpus.count, "gpus.count")
    elif args.role == "compositor":
        index = _index(args.role, args.index, cfg.compositor.pool_size, "compositor.pool_size")
    else:
        index = 0
    if isinstance(index, str):
        return _fail(index)
    prepare_runtime(cfg)
    return serve_role(cfg, args.role, index)


def serve_role(cfg: Config, role: str, index: int) -> int:
    """Run the role's entry function (the one `lipsync serve` spawns) until SIGTERM."""
    if role == "frontend":
        from pipeline.frontend.server import run_frontend_process

        run_frontend_process(cfg, None)
    elif role == "gpu-worker":
        from pipeline.gpu_worker.device import resolve_provider
        from pipeline.gpu_worker.device_compositor import unavailable as device_compositor_unavailable
        from pipeline.gpu_worker.proc import run_gpu_worker_process

        try:
            # ONNX Runtime is imported here but creates no CUDA context: the worker still
            # pins CUDA_VISIBLE_DEVICES before its first session, as under `lipsync serve`
            provider = resolve_provider(cfg.gpus.provider, cfg.gpus.count)
            if cfg.compositor.device == "gpu" and (reason := device_compositor_unavailable(provider)):
                raise ValueError(reason)
        except ValueError as exc:  # no device (yet): restartable, unlike a bad config
            print(f"lipsync role: {exc}", file=sys.stderr)
            return 1
        run_gpu_worker_process(cfg, index, provider, None)
    else:
        from pipeline.compositor.proc import run_compositor_process

        run_compositor_process(cfg, index, None)
    return 0  # a failing role exits 1 from inside run_role
