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
from pipeline.frontend.router import Router
from pipeline.frontend.validation import ValidRequest


class HeldWorkers:
    """The worker tier's client and in-flight table in one: answers every control at once;
    holds every request until `release` is set (the warm-up of a load goes through)."""

    def __init__(self) -> None:
        self.release = asyncio.Event()

    async def control(self, worker: int, pid: int, kind: type, model_id: str,
                      timeout: float) -> msg.ControlReply:
        return msg.ControlReply(0, ok=True, gpu_id=worker, memory_bytes=1)

    async def submit(self, worker: int, req: ValidRequest, deadline: float) -> InferResult:
        if req.visual is not None:  # the warm-up has no visual tensor
            await self.release.wait()
        done = msg.InferDone(0, 0, 0, 0, 0, 0, 0, False, 0, 0)
        return InferResult([b""] * req.batch_size, done, 0, 0, 0, 0, 0)


def request(mb: int) -> ValidRequest:
    floats = mb * 2**20 // 4
    return ValidRequest(model_id="demo", batch_size=1, start_frame_idx=0,
                        visual=np.zeros(floats, np.float32), audio=np.zeros(16, np.float32),
                        sample_rate=16000, features=None)


@pytest.mark.parametrize("budget_mb, sizes, admitted", [
    (64, [20, 20, 20, 20], 3),        # the fourth would pass 64 MB
    (64, [100], 1),                   # one request alone is never refused for its size
    (1024, [20] * 6, 4),              # max_inflight_requests (4) binds first
])
def test_requests_are_admitted_by_count_and_bytes(tmp_path: Path, budget_mb: int,
                                                  sizes: list[int], admitted: int) -> None:
    """Requests over server.max_inflight_mb (beyond the first) or over
    max_inflight_requests are refused at once with Overloaded; the rest are served."""
    cfg = parse_config({"server": {"max_inflight_mb": budget_mb, "max_inflight_requests": 4},
                        "models": {"demo": {"model_path": "u.onnx", "background_dir": "f",
                                            "crop_rects_path": "r.json", "num_frames": 4}}},
                       base_dir=tmp_path)

    async def scenario() -> tuple[int, int]:
        workers, liveness, metrics = HeldWorkers(), Liveness(cfg), Metrics()
        liveness.heard(msg.Heartbeat(role="gpu_worker", index=0, pid=1))
        registry = ModelRegistry(cfg, workers, workers, liveness, metrics)  # type: ignore[arg-type]
        router = Router(cfg, registry, workers, metrics, FrameBudget(cfg))  # type: ignore[arg-type]
        await registry.load("demo", None)
        tasks = [asyncio.create_task(router.infer(request(mb), 30)) for mb in sizes]
        await asyncio.sleep(0.05)
        workers.release.set()
        results = await asyncio.gather(*tasks, return_exceptions=True)
        refused = sum(isinstance(r, Overloaded) for r in results)
        return len(results) - refused, refused

    served, refused = asyncio.run(scenario())
    assert (served, refused) == (admitted, len(sizes) - admitted)
