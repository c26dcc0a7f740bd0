"""scripts/grpc_floor.py: the gRPC floor under the frontend's CPU figure is measured, for
each of its four servers, from real calls, at the rate asked for."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from pipeline.bench.local_server import free_port
from tests.conftest import write_config

REPO = Path(__file__).resolve().parents[2]


def test_each_server_answers_every_call_and_its_cpu_is_counted(tmp_path: Path,
                                                               small_models_root: Path) -> None:
    config = write_config(tmp_path / "config.yaml", small_models_root)
    done = subprocess.run([sys.executable, str(REPO / "scripts" / "grpc_floor.py"), "--config",
                           str(config), "--calls", "300", "--concurrency", "2",
                           "--rate", "400", "--port", str(free_port())],
                          capture_output=True, text=True, timeout=120, cwd=REPO)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert (result["calls"], result["concurrency"], result["rate"]) == (300, 2, 400)
    for mode in ("bytes", "protobuf", "frontend", "frontend+zmq"):
        figures = result[mode]
        # 300 calls of a 59 KB request and a 280 KB response: tens of clock ticks
        assert 0 < figures["server_cpu_ms_per_call"] < 100, (mode, figures)
        # each client waits concurrency / rate after every answer: never faster than asked
        assert 0 < figures["calls_per_s"] <= 400 * 1.05, (mode, figures)
