"""Figures every benchmark reports: percentiles, and what the server says about itself
through its ops socket (stats, the CPU each process spent)."""
from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import numpy as np


def percentile(values: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile (numpy's default); 0.0 for no values."""
    return float(np.percentile(values, q)) if len(values) else 0.0


def ops_stats(ops_endpoint: str | None) -> dict[str, Any] | None:
    """The server's ops-socket stats; None when the socket does not answer (a server run
    with another config than the bench's)."""
    from pipeline.cli.stats import fetch

    if ops_endpoint is None:
        return None
    try:
        return fetch(ops_endpoint, timeout_s=2.0)
    except TimeoutError:
        return None


def role_cpu_seconds(ops_endpoint: str | None) -> dict[str, float]:
    """CPU seconds (user + system) used so far by each server process, from the ops socket,
    and by this process (`client`: the bench's gRPC clients); server roles are absent
    when the socket does not answer."""
    cpu = {"client": time.process_time()}
    stats = ops_stats(ops_endpoint)
    if stats is None:
        return cpu
    cpu["frontend"] = stats["frontend"].get("cpu_s", 0.0)
    for kind in ("gpu_workers", "compositors"):
        for p in stats[kind]:
            cpu[f"{kind[:-1]} {p['index']}"] = p.get("cpu_s", 0.0)
    return cpu
