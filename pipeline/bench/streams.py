"""`lipsync bench --stream`: one run of S WebSocket sessions (audio-driven, or live with
`--live`), or with `--sweep 1,2,4,...` one run per S against the same server, written as a
table and an SVG plot of sessions against delivered frames/s and p99 latency."""
from __future__ import annotations

import argparse
import functools
import json
import threading
import time
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from pipeline.bench import live_figures, live_load, stream_load
from pipeline.bench.grpc_load import Clients
from pipeline.bench.local_server import start_server
from pipeline.bench.plot import sweep_svg
from pipeline.client import build_request
from pipeline.config import load_config
from pipeline.runtime.addresses import Addresses

SETTLE_S = 2.0  # between the runs of a sweep: the last run's sessions closed, its frames measured


def sweep_sizes(text: str | None, sessions: int) -> list[int]:
    """The session counts to run: --sweep's list, else --sessions."""
    try:
        sizes = [int(s) for s in text.split(",") if s.strip()] if text else [sessions]
    except ValueError:
        raise SystemExit(f"lipsync bench --sweep: not a list of session counts: {text!r}") from None
    if not sizes or min(sizes) < 1:
        raise SystemExit("lipsync bench --stream: session counts must be >= 1")
    return sizes


def _latency_keys(live: bool) -> list[tuple[str, str]]:
    """(label, result key) of the latencies a sweep plots."""
    if live:
        return [("first speech frame p99", "first_speech_ms_p99"),
                ("pacing jitter p99", "jitter_ms_p99")]
    return [("frame latency p99", "max_p99_latency_ms"),
            ("first frame (max)", "max_first_frame_latency_ms")]


def sweep_table(rows: list[dict[str, Any]], live: bool) -> str:
    """A Markdown table of a sweep, one row per session count."""
    keys = _latency_keys(live)
    head = ["sessions", "refused", "min fps", *(["speech frames missed %"] if live else []),
            *(f"{label} ms" for label, _ in keys), "holds 25 fps"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        missed = [round(100 * r["missed_speech"]
                        / max(1, r["speech_frames"] + r["missed_speech"]), 1)] if live else []
        cells = [r["sessions"], r.get("refused", 0), r["min_fps"], *missed,
                 *(r[k] for _, k in keys), "yes" if r["all_hold_25fps"] else "no"]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines)


def largest_holding(rows: list[dict[str, Any]]) -> int:
    """The largest session count at which every session held 25 fps (0: none)."""
    return max((r["sessions"] for r in rows if r["all_hold_25fps"] and not r.get("refused")),
               default=0)


def with_batch_load(run: Callable[[], dict[str, Any]], grpc_address: str,
                    args: argparse.Namespace) -> dict[str, Any]:
    """`run` (a live run) while --batch-load gRPC clients send batches throughout: its result,
    with the batch clients' figures and the share of the live speech frames shown."""
    request = build_request(args.config, args.model, args.batch, start=0, client_visual=False)
    clients = Clients(grpc_address, request, args.batch_load, warmup=1)
    measured: list[Any] = []
    stop = threading.Event()

    def load() -> None:
        while not stop.is_set():
            measured.append(clients.run(None, 1.0))

    thread = threading.Thread(target=load, name="batch load")
    thread.start()
    try:
        result = run()
    finally:
        stop.set()
        thread.join()
        clients.close()
    frames = sum(m.frames for m in measured)
    wall = sum(m.wall_s for m in measured)
    shown = result["speech_frames"] / max(1, result["speech_frames"] + result["missed_speech"])
    result["batch_load"] = {"clients": args.batch_load, "batch": args.batch,
                            "fps": round(frames / wall, 1) if wall else 0.0,
                            "errors": sum(len(m.errors) for m in measured)}
    result["speech_shown_pct"] = round(100 * shown, 1)
    if not args.json:
        print(f"batch load: {args.batch_load} gRPC clients of {args.batch} frames, "
              f"{result['batch_load']['fps']} frames/s, {result['batch_load']['errors']} errors; "
              f"live sessions showed {result['speech_shown_pct']} % of their speech frames",
              flush=True)
    return result


def run_stream_bench(args: argparse.Namespace) -> int:
    """0 when every run ran (whether or not 25 fps held), 1 on errors."""
    sizes = sweep_sizes(args.sweep, args.sessions)
    if args.seconds <= 0 or args.chunk_ms <= 0 or not 0 <= args.speaking <= 1 \
            or args.interrupts < 0:
        raise SystemExit("lipsync bench --stream: need --seconds > 0, --chunk-ms > 0, "
                         "0 <= --speaking <= 1, --interrupts >= 0")
    if args.batch_load and not args.live:
        raise SystemExit("lipsync bench --batch-load: with --stream --live")
    rows = []
    with ExitStack() as stack:
        cfg = load_config(args.config)
        server = None if args.address else start_server(stack, args.config)
        address = args.address or f"127.0.0.1:{server.ws_port}"  # type: ignore[union-attr]
        grpc_address = f"{address.rpartition(':')[0]}:{server.grpc_port if server else cfg.server.port}"
        ops = Addresses.of(cfg).ops
        url = stream_load.stream_url(address, args.model)
        for k, sessions in enumerate(sizes):
            if k:
                time.sleep(SETTLE_S)
            if args.live:
                live = functools.partial(live_load.run_live, url + "&mode=live", sessions,
                                         args.seconds, args.speaking, args.interrupts, ops,
                                         args.pauses_as_silence)
                result = with_batch_load(live, grpc_address, args) if args.batch_load else live()
            else:
                result = stream_load.run_seed(url, sessions, args.seconds, args.chunk_ms,
                                              args.model, ops)
            rows.append(result)
            if not args.json:
                print((live_figures.table if args.live else stream_load.table)(result), flush=True)
    if len(sizes) == 1:
        if args.json:
            print(json.dumps(rows[0]))
        return 1 if rows[0]["errors"] else 0
    summary = {"mode": rows[0]["mode"], "seconds": args.seconds, "largest_holding_25fps":
               largest_holding(rows), "runs": rows}
    if args.live:
        summary["speaking"] = args.speaking
    plot = Path(args.plot)
    plot.write_text(sweep_svg(
        f"{summary['mode']} sessions, {args.seconds:g} s each"
        + (f", speaking {args.speaking:.0%} of the time" if args.live else ""),
        sizes, [r["min_fps"] for r in rows],
        [(label, [r[key] for r in rows]) for label, key in _latency_keys(args.live)]))
    if args.json:
        print(json.dumps(summary))
    else:
        print(f"\n{sweep_table(rows, args.live)}\n\nlargest S holding 25 fps: "
              f"{summary['largest_holding_25fps']}; plot: {plot}")
    return 1 if any(r["errors"] for r in rows) else 0
