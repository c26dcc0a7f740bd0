"""The event loop's lag probe: a loop held longer than the probe's period is seen."""
from __future__ import annotations

import asyncio
import time

from pipeline.frontend.metrics import Metrics
from pipeline.frontend.telemetry import LAG_PROBE_S, watch_loop_lag


def test_a_held_loop_is_measured_by_at_least_the_hold_less_one_period() -> None:
    hold_s = 4 * LAG_PROBE_S

    async def run() -> Metrics:
        metrics = Metrics()
        probe = asyncio.create_task(watch_loop_lag(metrics))
        await asyncio.sleep(2.5 * LAG_PROBE_S)  # a few probes on a free loop
        time.sleep(hold_s)                      # the loop held: no timer can run
        await asyncio.sleep(2.5 * LAG_PROBE_S)
        probe.cancel()
        return metrics

    metrics = asyncio.run(run())
    # the timer due during the hold ran at its end: late by >= the hold less one period
    assert metrics.loop_lag_max_s >= hold_s - LAG_PROBE_S - 0.01
    assert metrics.loop_lag._sum.get() >= hold_s - LAG_PROBE_S - 0.01  # exported too
