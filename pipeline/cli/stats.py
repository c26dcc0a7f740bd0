"""`lipsync stats`: ask the frontend's ops socket for the stats of every role."""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import zmq

from pipeline.config import DEFAULT_CONFIG_PATH, ConfigError, load_config
from pipeline.runtime.addresses import Addresses

PROG = "lipsync stats"


def fetch(endpoint: str, timeout_s: float = 3.0, command: str = "stats") -> dict[str, Any]:
    """One request to the ops socket; TimeoutError when nothing answers."""
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()
    sock = ctx.socket(zmq.REQ)
    sock.setsockopt(zmq.LINGER, 0)
    try:
        sock.connect(endpoint)
        sock.send(json.dumps({"cmd": command}).encode())
        if not sock.poll(int(timeout_s * 1000)):
            raise TimeoutError(f"no answer from {endpoint} within {timeout_s:.0f} s "
                               "(is `lipsync serve` running with this config?)")
        return json.loads(sock.recv())
    finally:
        sock.close(0)


def _mb(n: int) -> str:
    return f"{n / 2**20:.0f} MB"


def _process_row(role: str, p: dict[str, Any]) -> str:
    if p.get("gone") or not p.get("pid"):
        return f"{role:<14} {'-':>7} {'down':>6}"
    return (f"{role:<14} {p['pid']:>7} {p.get('cpu_percent', 0):>5.0f}% {_mb(p.get('rss_bytes', 0)):>9} "
            f"{p.get('uptime_s', 0):>9.0f}s {p.get('restarts', 0):>8}")


def _backend(worker: dict[str, Any]) -> str:
    """E.g. "openvino bf16 ×2" (x threads on a CPU worker)."""
    if not worker.get("backend"):
        return "-"
    threads = f" ×{worker['threads']}" if worker.get("threads") and not worker.get("cuda") else ""
    return f"{worker['backend']} {worker['precision']}{threads}"


def _thread_plan(index: int, plan: dict[str, Any]) -> str:
    cpu = plan.get("cpu_ms_per_frame", {})
    measured = "  ".join(f"{k} {'-' if v is None else f'{v:.1f}'}" for k, v in cpu.items())
    return (f"gpu_worker {index} threads {plan.get('threads')} of {plan.get('cores')} cores "
            f"({'fixed' if plan.get('fixed') else 'planned ' + str(plan.get('planned') or '-')}"
            f"; CPU ms per frame: {measured})")


def format_stats(stats: dict[str, Any]) -> str:
    """The stats as tables for a terminal."""
    lines = [f"lipsync instance {stats['instance']}  frames {stats['frames']}  "
             f"evictions {stats['evictions']} ({stats['evictions_last_minute']} in the last "
             f"minute)  failures {stats['failures'] or 0}",
             "", f"{'process':<14} {'pid':>7} {'cpu':>6} {'rss':>9} {'uptime':>10} {'restarts':>8}",
             _process_row("frontend", stats["frontend"])]
    lines += [_process_row(f"gpu_worker {w['index']}", w) for w in stats["gpu_workers"]]
    lines += [_process_row(f"compositor {c['index']}", c) for c in stats["compositors"]]
    lines += ["", f"{'gpu_worker':<11} {'queue':>6} {'inflight':>9} {'memory':>9}  "
              f"{'backend':<26} models"]
    for w in stats["gpu_workers"]:
        lines.append(f"{w['index']:<11} {w['queue_depth']:>6} {w['inflight']:>9} "
                     f"{_mb(w['device_memory_used_bytes']):>9}  {_backend(w):<26} "
                     f"{', '.join(w['models']) or '-'}")
    for w in stats["gpu_workers"]:
        if w.get("thread_plan"):
            lines.append(_thread_plan(w["index"], w["thread_plan"]))
    stages = ("queue", "audio", "encoder", "visual", "unet", "composite", "jpeg")
    lines += ["", f"{'model':<12} {'state':<9} {'gpu':>3} {'requests':>8} {'memory':>8}  "
              + "  ".join(f"{s:>9}" for s in stages) + "   (mean ms per request)"]
    for name, m in sorted(stats["models"].items()):
        means = []
        for s in stages:
            c = m["stages"][s]
            means.append(f"{c['ns'] / c['count'] / 1e6:>9.2f}" if c["count"] else f"{'-':>9}")
        lines.append(f"{name:<12} {m['state']:<9} {m['gpu_id']:>3} {m['requests']:>8} "
                     f"{_mb(m['memory_bytes']):>8}  " + "  ".join(means))
    a = stats["arena"]
    lines += ["", f"shared memory arena {a['name']}: {_mb(a['used_bytes'])} of "
              f"{_mb(a['capacity_bytes'])} in {a['blocks']} block(s);  requests in flight "
              f"{stats['frontend']['inflight_requests']}"]
    lines += [_sessions_line(stats.get("streams", {})), _capacity_line(stats["capacity"])]
    return "\n".join(lines)


def _sessions_line(streams: dict[str, int]) -> str:
    by = ", ".join(f"{k} {v}" for k, v in sorted(streams.items()) if k != "sessions")
    return f"stream sessions {streams.get('sessions', 0)}" + (f" ({by})" if by else "")


def _capacity_line(c: dict[str, Any]) -> str:
    """The live budget and what limits it (the same words a refused session is told)."""
    budget = "not measured yet" if c["budget_fps"] is None else f"{c['budget_fps']:g} frames/s"
    why = c["limit"] if c["limit"].startswith("streaming.") else \
        f"{c['limit']}; streaming.capacity_fps overrides"
    return (f"live capacity {budget} ({why}): {c['used_fps']:g} in use, {c['live_sessions']} "
            f"live session(s) expected to need {c['expected_fps']:g}, {c['refused']} refused")


def cmd_stats(args: argparse.Namespace) -> int:
    try:
        endpoint = args.endpoint or Addresses.of(load_config(args.config)).ops
    except ConfigError as exc:
        print(f"{PROG}: bad config: {exc}", file=sys.stderr)
        return 2
    try:
        while True:
            stats = fetch(endpoint)
            if args.json:
                print(json.dumps(stats, indent=None if args.watch else 2), flush=True)
            else:
                if args.watch:
                    print("\033[2J\033[H", end="")
                print(format_stats(stats), flush=True)
            if not args.watch:
                return 0
            time.sleep(args.interval)
    except TimeoutError as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("stats", help="stats of every role, from the ops socket")
    p.add_argument("--config", type=Path, default=DEFAULT_CONFIG_PATH)
    p.add_argument("--endpoint", help="ops socket (default: from the config)")
    p.add_argument("--json", action="store_true", help="raw JSON")
    p.add_argument("--watch", action="store_true", help="refresh until Ctrl-C")
    p.add_argument("--interval", type=float, default=1.0, help="--watch refresh seconds")
    p.set_defaults(func=cmd_stats)
