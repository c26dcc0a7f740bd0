"""`lipsync bench --providers cpu,openvino`: the same measurement against one server per
provider, in alternating rounds of one run, so a slow spell of a shared machine hits each
alike: InferBatchComposite frames/s (gRPC mode), or the live sweep's largest session count
holding 25 fps (`--stream --live --sweep ...`).

Each server is `lipsync serve` on the given config with `gpus.provider` (and, with
`--precision`, `gpus.unet_precision`) replaced, in a runtime directory of its own; the
servers run side by side and the one not measured idles. An entry PROVIDER:THREADS also
fixes `gpus.intra_op_threads` (`openvino:1,openvino:2,openvino:0` compares thread counts,
0 being the measured plan).
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import yaml

from pipeline.bench import live_load
from pipeline.bench.grpc_load import Clients, Measured
from pipeline.bench.local_server import ServerProcess
from pipeline.bench.streams import SETTLE_S, largest_holding, sweep_sizes
from pipeline.client import build_request
from pipeline.config import load_config
from pipeline.demo.ensure import ensure_model
from pipeline.runtime.addresses import Addresses


def provider_config(config: Path, entry: str, precision: str, folder: Path) -> Path:
    """A copy of `config` in `folder` that runs `entry` (PROVIDER or PROVIDER:THREADS; and
    `precision`, when given): paths made absolute, its own runtime directory and instance,
    no metrics port."""
    cfg = load_config(config)
    provider, _, threads = entry.partition(":")
    raw = yaml.safe_load(config.read_text()) or {}
    raw["models_root"] = str(cfg.models_root)
    raw.setdefault("gpus", {})["provider"] = provider
    if threads:
        raw["gpus"]["intra_op_threads"] = int(threads)
    if precision:
        raw["gpus"]["unet_precision"] = precision
    raw.setdefault("runtime", {}).update(
        dir=str(folder / "run"), instance=f"{cfg.runtime.instance}{provider}{threads}")
    raw.setdefault("ops", {}).update(metrics_port=0, endpoint="")
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def start_servers(stack: ExitStack, config: Path, providers: list[str],
                  precision: str) -> dict[str, ServerProcess]:
    servers = {}
    for provider in providers:
        folder = Path(tempfile.mkdtemp(prefix=f"lipsync-bench-{provider.replace(':', '-')}-"))
        path = provider_config(config, provider, precision, folder)
        servers[provider] = stack.enter_context(
            ServerProcess(path, log_path=folder / "server.log"))
    return servers


def run_providers(args: argparse.Namespace) -> int:
    providers = [p for p in args.providers.split(",") if p]
    if len(providers) < 2 or len(set(providers)) != len(providers) or not all(
            p.partition(":")[0] in ("cpu", "openvino", "cuda")
            and (p.partition(":")[2] or "0").isdigit() for p in providers):
        raise SystemExit("lipsync bench --providers: two or more different entries, each "
                         "cpu, openvino or cuda, optionally :THREADS")
    if args.rounds < 1 or (not args.stream and (args.duration is None or args.duration <= 0)):
        raise SystemExit("lipsync bench --providers: measures --duration S (> 0) per provider "
                         "(or the live sweep, --stream --live), in --rounds alternating rounds")
    ensure_model(args.config, args.model)
    with ExitStack() as stack:
        servers = start_servers(stack, args.config, providers, args.precision)
        result = (_live(args, servers) if args.stream else _batch(args, servers))
    result.update(model=args.model, rounds=args.rounds, providers=providers)
    first = providers[0]
    key = "largest_holding_25fps" if args.stream else "fps"
    for provider in providers[1:]:
        ratio = result[provider][key] / result[first][key] if result[first][key] else None
        result[f"ratio_{provider}_vs_{first}"] = None if ratio is None else round(ratio, 3)
    print(json.dumps(result) if args.json else _text(result, providers, key))
    return 0


def _batch(args: argparse.Namespace, servers: dict[str, ServerProcess]) -> dict[str, Any]:
    """frames/s of each server over the same requests, `rounds` alternating stretches of
    duration / rounds each."""
    request = build_request(args.config, args.model, args.batch, start=0,
                            client_visual=args.visual == "client")
    clients = {p: Clients(s.address, request, args.concurrency, args.warmup,
                          Addresses.of(load_config(s.config)).ops) for p, s in servers.items()}
    measured = {p: Measured() for p in servers}
    per_round: dict[str, list[float]] = {p: [] for p in servers}
    try:
        for _ in range(args.rounds):
            for provider, client in clients.items():
                stretch = client.run(None, args.duration / args.rounds)
                per_round[provider].append(stretch.summary(args.batch, args.concurrency)["fps"])
                measured[provider] = measured[provider].add(stretch)
    finally:
        for client in clients.values():
            client.close()
    return {"visual": args.visual, **{p: {**m.summary(args.batch, args.concurrency),
                                          "fps_per_round": per_round[p],
                                          "backend": _backend(servers[p]),
                                          "capacity": _stats(servers[p])["capacity"]}
                                       for p, m in measured.items()}}


def _live(args: argparse.Namespace, servers: dict[str, ServerProcess]) -> dict[str, Any]:
    """The live sweep on each server, `rounds` times alternating: per round the largest
    session count holding 25 fps; the figure is the median over the rounds."""
    if not args.live:
        raise SystemExit("lipsync bench --providers --stream: the live sweep (--live)")
    sizes = sweep_sizes(args.sweep, args.sessions)
    held: dict[str, list[int]] = {p: [] for p in servers}
    runs: dict[str, list[list[dict[str, Any]]]] = {p: [] for p in servers}
    capacity: dict[str, list[dict[str, Any]]] = {p: [] for p in servers}
    for _ in range(args.rounds):
        for provider, server in servers.items():
            ops = Addresses.of(load_config(server.config)).ops
            url = f"ws://127.0.0.1:{server.ws_port}/audio?model={args.model}&mode=live"
            rows = []
            for sessions in sizes:
                rows.append(live_load.run_live(url, sessions, args.seconds, args.speaking,
                                               args.interrupts, ops, args.pauses_as_silence))
                time.sleep(SETTLE_S)
            held[provider].append(largest_holding(rows))
            capacity[provider].append(_stats(server)["capacity"])
            runs[provider].append([{k: r[k] for k in ("sessions", "min_fps", "all_hold_25fps",
                                                      "refused", "missed_speech")
                                    if k in r} for r in rows])
    return {"speaking": args.speaking, "seconds": args.seconds, "sweep": sizes,
            **{p: {"largest_holding_25fps": statistics.median(held[p]),
                   "largest_per_round": held[p], "runs": runs[p],
                   # the frame budget the server measured (speech frames/s it sustains)
                   "capacity_per_round": capacity[p],
                   "backend": _backend(servers[p])} for p in servers}}


def _stats(server: ServerProcess) -> dict[str, Any]:
    from pipeline.cli.stats import fetch

    return fetch(Addresses.of(load_config(server.config)).ops)


def _backend(server: ServerProcess) -> str:
    """What the server's worker 0 says it runs (its heartbeat, via the ops socket)."""
    worker = _stats(server)["gpu_workers"][0]
    plan = worker.get("thread_plan") or {}
    return (f"{worker.get('backend', '?')} {worker.get('precision', '?')} "
            f"x{worker.get('threads', 0)} (CPU ms per frame {plan.get('cpu_ms_per_frame')})")


def _text(result: dict[str, Any], providers: list[str], key: str) -> str:
    lines = [f"model {result['model']}, {result['rounds']} alternating rounds"]
    for p in providers:
        r = result[p]
        extra = (f"per round {r['largest_per_round']}" if key != "fps"
                 else f"per round {r['fps_per_round']}, p50 {r['p50_ms']} ms, "
                      f"errors {r['errors']}")
        lines.append(f"{p:<9} ({r['backend']}): {key} {r[key]}   {extra}")
    lines += [f"{k}: {v}" for k, v in result.items() if k.startswith("ratio_")]
    return "\n".join(lines)
