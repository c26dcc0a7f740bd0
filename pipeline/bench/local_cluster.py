"""Several boxes (`lipsync serve`) on this machine behind a real HAProxy configured by
`lipsync lb-config`: what the scale-out test and scripts/scaleout.py start.

Each box runs the one given config with its own `runtime.instance` and metrics port (its
gRPC and WebSocket ports are picked by ServerProcess), as separate machines would.
"""
from __future__ import annotations

import csv
import io
import os
import shutil
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Self

import yaml

from pipeline.bench.local_server import ServerProcess, free_port
from pipeline.config import load_config

# Debian installs haproxy in /usr/sbin, which is not on an ordinary user's PATH
HAPROXY_SEARCH_PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])


def find_haproxy() -> str | None:
    return shutil.which("haproxy", path=HAPROXY_SEARCH_PATH)


def box_config(base: Path, out: Path, instance: str, metrics_port: int) -> Path:
    """`base` with this box's instance name and metrics port; paths made absolute, since
    the copy lives elsewhere."""
    cfg = load_config(base)  # validates, and resolves models_root and runtime.dir
    raw = yaml.safe_load(base.read_text()) or {}
    raw["models_root"] = str(cfg.models_root)
    raw["runtime"] = {**(raw.get("runtime") or {}), "dir": str(cfg.runtime.dir),
                      "instance": instance}
    raw["ops"] = {**(raw.get("ops") or {}), "endpoint": "", "metrics_host": "127.0.0.1",
                  "metrics_port": metrics_port}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(yaml.safe_dump(raw))
    return out


class Box:
    """One `lipsync serve` of the cluster."""

    def __init__(self, index: int, config: Path, workdir: Path) -> None:
        self.index = index
        self.metrics_port = free_port()
        instance = f"{load_config(config).runtime.instance}_box{index}"
        self.config = box_config(config, workdir / f"box{index}.yaml", instance,
                                 self.metrics_port)
        self.server = ServerProcess(self.config, log_path=workdir / f"box{index}.log")

    @property
    def spec(self) -> str:
        s = self.server
        return f"127.0.0.1:{s.grpc_port}:{s.ws_port}:{self.metrics_port}"


class Balancer:
    """haproxy in the foreground with the config `lipsync lb-config` prints."""

    def __init__(self, boxes: list[Box], workdir: Path) -> None:
        self.grpc_port, self.ws_port, self.stats_port = free_port(), free_port(), free_port()
        self.grpc_address = f"127.0.0.1:{self.grpc_port}"
        self.ws_address = f"127.0.0.1:{self.ws_port}"
        self.config = workdir / "haproxy.cfg"
        self.log_path = workdir / "haproxy.log"
        generated = subprocess.run(
            [sys.executable, "-m", "pipeline.cli", "lb-config",
             "--listen-grpc", f"127.0.0.1:{self.grpc_port}",
             "--listen-ws", f"127.0.0.1:{self.ws_port}",
             "--stats-port", str(self.stats_port),
             *[arg for box in boxes for arg in ("--box", box.spec)]],
            capture_output=True, text=True, timeout=60, check=True)
        self.config.write_text(generated.stdout)
        self.boxes = [box.spec for box in boxes]
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout_s: float = 30.0) -> None:
        haproxy = find_haproxy()
        if haproxy is None:
            raise FileNotFoundError("haproxy is not installed (Debian: apt-get install haproxy)")
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen([haproxy, "-db", "-f", str(self.config)],
                                         stdout=log, stderr=subprocess.STDOUT)
        self.wait(lambda states: all(v == "UP" for v in states.values()), timeout_s)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def stats(self) -> list[dict[str, str]]:
        """The stats page as CSV rows (pxname, svname, status, stot, ...)."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.stats_port}/;csv",
                                    timeout=5) as resp:
            text = resp.read().decode().lstrip("# ")
        return list(csv.DictReader(io.StringIO(text)))

    def server_states(self, backend: str = "grpc_by_model") -> dict[str, str]:
        """{box name: UP / DOWN / ...} of one backend."""
        return {row["svname"]: row["status"] for row in self.stats()
                if row["pxname"] == backend and row["svname"] not in ("FRONTEND", "BACKEND")}

    def wait(self, until: Callable[[dict[str, str]], bool], timeout_s: float) -> dict[str, str]:
        """Poll the servers' states until `until(states)` holds; the states then."""
        deadline = time.monotonic() + timeout_s
        while True:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"haproxy exited with {self.proc.returncode}:\n"
                                   + self.log_path.read_text(errors="replace")[-3000:])
            try:
                states = self.server_states()
                if until(states):
                    return states
            except OSError:
                states = {}
            if time.monotonic() > deadline:
                raise TimeoutError(f"haproxy servers not as expected after {timeout_s} s: "
                                   f"{states}")
            time.sleep(0.05)


class LocalCluster:
    """`boxes` servers of `config` behind one HAProxy; a context manager."""

    def __init__(self, config: Path, boxes: int, workdir: Path) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        self.boxes = [Box(i, config, workdir) for i in range(1, boxes + 1)]
        self.balancer: Balancer | None = None
        self.workdir = workdir

    def __enter__(self) -> Self:
        try:
            with ThreadPoolExecutor(len(self.boxes)) as pool:  # they start side by side
                list(pool.map(lambda box: box.server.start(), self.boxes))
            self.balancer = Balancer(self.boxes, self.workdir)
            self.balancer.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        if self.balancer is not None:
            self.balancer.stop()
        with ThreadPoolExecutor(len(self.boxes)) as pool:
            list(pool.map(lambda box: box.server.stop(), self.boxes))
