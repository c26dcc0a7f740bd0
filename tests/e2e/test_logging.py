"""One log setup for every role: role and request id on every line, JSON lines optional."""
from __future__ import annotations

import json
import subprocess
import sys

CODE = """
import logging
from pipeline.runtime.logs import request_id, setup_logging
setup_logging("gpu_worker 3")
logging.getLogger("x").info("before")
token = request_id.set("1a2b")
logging.getLogger("x").info("during")
request_id.reset(token)
logging.getLogger("x").warning("after")
"""


def run(env: dict[str, str]) -> list[str]:
    out = subprocess.run([sys.executable, "-c", CODE], capture_output=True, text=True,
                         env={**env, "PATH": "/usr/bin:/bin"}, timeout=30, check=True)
    return out.stderr.strip().splitlines()


def test_every_line_has_role_and_request_id() -> None:
    """Text lines carry [role] and [request id] ('-' outside a request)."""
    lines = run({})
    assert len(lines) == 3
    assert all("[gpu_worker 3]" in line for line in lines)
    assert "[-] x: before" in lines[0]
    assert "[1a2b] x: during" in lines[1]
    assert "WARNING [gpu_worker 3] [-] x: after" in lines[2]


def test_json_lines_when_asked() -> None:
    """LIPSYNC_LOG_JSON=1: one JSON object per line with the same fields."""
    entries = [json.loads(line) for line in run({"LIPSYNC_LOG_JSON": "1"})]
    assert [(e["role"], e["request"], e["message"], e["level"]) for e in entries] == [
        ("gpu_worker 3", "-", "before", "INFO"), ("gpu_worker 3", "1a2b", "during", "INFO"),
        ("gpu_worker 3", "-", "after", "WARNING")]
