"""Admission of the frontend's request path, against an in-process stand-in for the worker
tier: requests are bounded by count and by the bytes of their tensors."""
from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest

from pipeline import messages as msg
from pipeline.config import parse_config
from pipeline.frontend.capacity import FrameBudget
from pipeline.frontend.errors import Overloaded
from pipeline.frontend.inflight import InferResult
from pipeline.frontend.liveness import Liveness
from pipeline.frontend.metrics import Metrics
from pipeline.frontend.models import ModelRegistry
from pipeline.frontend.router import Router, Runner
from pipeline.frontend.validation import InferInput


class HeldWorkers:
    """The worker tier's client and in-flight table in one: answers every control at once;
    holds every request until `release` is set (the warm-up of a load goes through)."""

    def __init__(self) -> None:
        self.release = asyncio.Event()

    async def control(self, worker: int, pid: int, kind: type, model_id: str,
                      timeout: float) -> msg.ControlReply:
        return msg.ControlReply(0, ok=True, gpu_id=worker, memory_bytes=1)

    async def submit(self, worker: int, req: InferInput, deadline: float) -> InferResult:
        if not req.warmup:
            await self.release.wait()
        done = msg.InferDone(0, 0, 0, 0, 0, 0, 0, False, 0, 0)
        return InferResult([b""] * req.batch_size, done, 0, 0, 0, 0, 0)


def request(mb: int, live: bool = False) -> InferInput:
    floats = mb * 2**20 // 4
    return InferInput(model_id="demo", batch_size=1, start_frame_idx=0,
                      visual=np.zeros(floats, np.float32), audio=np.zeros(16, np.float32),
                      sample_rate=16000, features=None, live=live)


@pytest.mark.parametrize("budget_mb, sizes, admitted, live", [
    (64, [20, 20, 20, 20], 3, False),  # the fourth would pass 64 MB
    (64, [100], 1, False),             # one request alone is never refused for its size
    (1024, [20] * 6, 4, False),        # max_inflight_requests (4) binds first
    (64, [20] * 6, 6, True),           # a live session's requests: never refused for load
])
def test_requests_are_admitted_by_count_and_bytes(tmp_path: Path, budget_mb: int,
                                                  sizes: list[int], admitted: int,
                                                  live: bool) -> None:
    """Requests over server.max_inflight_mb (beyond the first) or over
    max_inflight_requests are refused at once with Overloaded; the rest are served. A live
    session's requests are not refused for batch load (the session was admitted)."""
    cfg = parse_config({"server": {"max_inflight_mb": budget_mb, "max_inflight_requests": 4},
                        "models": {"demo": {"model_path": "u.onnx", "background_dir": "f",
                                            "crop_rects_path": "r.json", "num_frames": 4}}},
                       base_dir=tmp_path)

    async def scenario() -> tuple[int, int]:
        workers, liveness, metrics = HeldWorkers(), Liveness(cfg), Metrics()
        liveness.heard(msg.Heartbeat(role="gpu_worker", index=0, pid=1))
        runner = Runner(cfg, workers, metrics, FrameBudget(cfg))  # type: ignore[arg-type]
        registry = ModelRegistry(cfg, workers, runner, liveness, metrics)
        router = Router(registry, runner)
        await registry.load("demo", None)
        tasks = [asyncio.create_task(router.infer(request(mb, live), 30)) for mb in sizes]
        await asyncio.sleep(0.05)
        workers.release.set()
        results = await asyncio.gather(*tasks, return_exceptions=True)
        refused = sum(isinstance(r, Overloaded) for r in results)
        return len(results) - refused, refused

    served, refused = asyncio.run(scenario())
    assert (served, refused) == (admitted, len(sizes) - admitted)
