"""Start N boxes (`lipsync serve`) and HAProxy (configured by `lipsync lb-config`) on this
machine, to measure scale-out (docs/benchmarks.md, "Scale-out behind HAProxy").

    .venv/bin/python scripts/scaleout.py --boxes 3 --workdir /tmp/scaleout3

writes WORKDIR/config.yaml: the --config (default: the repository's config.yaml) with its
`demo` model copied as each of --avatars (loaded on demand, so the balancer decides where)
and server.drain_delay_s for the balancer; starts the boxes and haproxy; prints one JSON
line with the balancer's and each box's addresses; runs until Ctrl-C or SIGTERM. Drive it
with `lipsync bench --config WORKDIR/config.yaml --address ADDRESS --model A,B,...`.
"""
from __future__ import annotations

import argparse
import json
import signal
import sys
import tempfile
import threading
from pathlib import Path

import yaml

from pipeline.bench.local_cluster import LocalCluster, find_haproxy
from pipeline.config import load_config
from pipeline.demo.ensure import ensure_demo_assets

REPO = Path(__file__).resolve().parents[1]
AVATARS = "anna,ben,carla,dev,emil,fay"


def cluster_config(base: Path, avatars: list[str], drain_delay_s: float, workdir: Path) -> Path:
    """`base` with `avatars` as copies of its demo model and its paths made absolute."""
    cfg = load_config(base)
    raw = yaml.safe_load(base.read_text()) or {}
    if "demo" not in raw.get("models", {}):
        raise SystemExit(f"scaleout: {base} has no `demo` model to copy")
    avatar = {**raw["models"]["demo"], "preload_model": False, "preload_backgrounds": False}
    raw["models"] = {name: dict(avatar) for name in avatars}
    raw["models_root"] = str(cfg.models_root)
    raw["server"] = {**(raw.get("server") or {}), "drain_delay_s": drain_delay_s}
    raw["runtime"] = {**(raw.get("runtime") or {}), "dir": str(workdir / "run"),
                      "instance": "scaleout"}
    raw["streaming"] = {**(raw.get("streaming") or {}), "default_model": avatars[0]}
    path = workdir / "config.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, default=REPO / "config.yaml")
    parser.add_argument("--boxes", type=int, default=3)
    parser.add_argument("--avatars", default=AVATARS, help=f"model ids (default {AVATARS})")
    parser.add_argument("--drain-delay-s", type=float, default=1.5)
    parser.add_argument("--workdir", type=Path, help="configs and logs (default: a temp dir)")
    args = parser.parse_args()
    if args.boxes < 1:
        parser.error("--boxes must be >= 1")
    if find_haproxy() is None:
        parser.error("haproxy is not installed (Debian: apt-get install haproxy)")
    workdir = (args.workdir or Path(tempfile.mkdtemp(prefix="lipsync-scaleout-"))).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    config = cluster_config(args.config.resolve(), args.avatars.split(","), args.drain_delay_s,
                            workdir)
    ensure_demo_assets(load_config(config))  # once, before the boxes would race to build it
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    with LocalCluster(config, args.boxes, workdir) as cluster:
        assert cluster.balancer is not None
        print(json.dumps({
            "config": str(config), "workdir": str(workdir),
            "balancer": {"grpc": cluster.balancer.grpc_address,
                         "ws": cluster.balancer.ws_address,
                         "stats": f"http://127.0.0.1:{cluster.balancer.stats_port}/"},
            "boxes": [{"grpc": box.server.address, "ws": f"127.0.0.1:{box.server.ws_port}",
                       "metrics": box.metrics_port, "log": str(box.server.log_path)}
                      for box in cluster.boxes]}), flush=True)
        stop.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
