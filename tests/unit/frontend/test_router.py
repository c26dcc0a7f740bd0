"""The request path (no process): a request leases its model, runs on the model's worker
and is counted; a failure is counted by its reason; the freed heap is trimmed only once the
server is idle; background frames come from the worker that holds the model. The in-flight
table is a fake typed by the runner's Protocol; the registry is the real one over fakes."""
from __future__ import annotations

import asyncio
import time
from pathlib import Path

import numpy as np
import pytest

from pipeline import messages as msg
from pipeline.config import Config
from pipeline.frontend import heap as heap_module
from pipeline.frontend.capacity import FrameBudget
from pipeline.frontend.errors import Failed, Overloaded, Unavailable
from pipeline.frontend.heap import HeapTrim
from pipeline.frontend.inflight import InferResult
from pipeline.frontend.metrics import Metrics
from pipeline.frontend.models import ModelRegistry
from pipeline.frontend.router import RequestTable, Router, Runner
from pipeline.frontend.validation import InferInput
from tests.unit.frontend.fakes import Views, Workers, config, run, until


class Table:
    """The in-flight table: answers a request with its frames (the next request waits for the
    first of `holds`, if any) or raises `error`; records the background frames asked."""

    def __init__(self) -> None:
        self.error: BaseException | None = None
        self.holds: list[asyncio.Event] = []
        self.workers: list[int] = []
        self.backgrounds_asked: list[tuple[int, str, tuple[int, ...]]] = []

    async def submit(self, worker: int, req: InferInput, deadline: float) -> InferResult:
        self.workers.append(worker)
        if self.holds and not req.warmup:
            await self.holds.pop(0).wait()
        if self.error is not None and not req.warmup:
            raise self.error
        done = msg.InferDone(0, worker, 0, 0, 0, 0, inference_ns=7000, composite_start_ns=0,
                             run_frames=req.batch_size)
        return InferResult([b"jpeg"] * req.batch_size, done, 0, 0, 0, 0, 0)

    async def background_jpegs(self, worker: int, model_id: str, indices: tuple[int, ...],
                          deadline: float) -> list[bytes]:
        self.backgrounds_asked.append((worker, model_id, indices))
        return [b"bg%d" % i for i in indices]


class RequestPath:
    """A router over the real registry and runner, the worker tier faked."""

    def __init__(self, cfg: Config, heap: HeapTrim | None = None) -> None:
        self.table, self.metrics = Table(), Metrics()
        table: RequestTable = self.table
        self.runner = Runner(cfg, table, self.metrics, FrameBudget(cfg), heap)
        self.registry = ModelRegistry(cfg, Workers([]), self.runner, Views(cfg.gpus.count),
                                      self.metrics)
        self.router = Router(self.registry, self.runner)

    def sample(self, name: str, **labels: str) -> float | None:
        return self.metrics.registry.get_sample_value(name, labels)


def request(batch: int = 2) -> InferInput:
    return InferInput("a", batch, 0, None, np.zeros(10240, np.float32), 16000, None)


def test_a_request_loads_its_model_runs_on_its_worker_and_is_counted(tmp_path: Path) -> None:
    """The first request loads the model (two warm-ups counted as warm-ups, not requests)
    and runs on its worker; the second finds it loaded; both are counted for the model and
    nothing stays admitted."""
    cfg = config(tmp_path, {"a": {"preferred_gpu": 1}}, gpus=2)

    async def scenario() -> tuple[RequestPath, list[bool]]:
        p = RequestPath(cfg)
        loaded = []
        for _ in range(2):
            result, lease = await p.router.infer(request(), 10)
            assert result.frames == [b"jpeg", b"jpeg"] and lease.worker == 1
            loaded.append(lease.loaded_now)
        return p, loaded

    p, loaded = run(scenario)
    assert loaded == [True, False] and p.table.workers == [1, 1, 1, 1]
    assert p.sample("lipsync_model_warmups_total", model="a") == 2
    assert p.sample("lipsync_requests_total", model="a") == 2
    model = p.registry.models["a"]
    assert (model.request_count, model.total_inference_ns, model.inflight) == (2, 14000, 0)
    assert (p.runner.admitted, p.runner.admitted_bytes) == (0, 0)


@pytest.mark.parametrize("error, reason", [(Failed("Model 'a' not loaded"), "failed"),
                                           (Overloaded("server busy"), "overloaded"),
                                           (Unavailable("gpu_worker 0 restarted"), "unavailable"),
                                           (TimeoutError(), "timeout")])
def test_a_failed_request_is_counted_by_its_reason(tmp_path: Path, error: Exception,
                                                   reason: str) -> None:
    """A request that fails raises its error, is counted under its reason, not as served,
    and leaves neither admission nor the model's lease held."""
    cfg = config(tmp_path)

    async def scenario() -> RequestPath:
        p = RequestPath(cfg)
        p.table.error = error
        with pytest.raises(type(error)):
            await p.router.infer(request(), 10)
        return p

    p = run(scenario)
    assert p.metrics.failures == {reason: 1}
    assert p.sample("lipsync_request_failures_total", reason=reason) == 1
    assert p.registry.models["a"].request_count == 0 and p.registry.models["a"].inflight == 0
    assert p.runner.admitted == 0


def test_the_freed_heap_is_trimmed_only_once_the_server_is_idle(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """After the last request in flight finishes, the heap is trimmed once the server stayed
    idle for a moment; a request arriving in that moment puts the trim off until it ends,
    and one finishing beside it does not bring it back."""
    trims: list[float] = []
    monkeypatch.setattr(heap_module, "release_free_heap", lambda: trims.append(time.time()))
    cfg = config(tmp_path)

    async def scenario() -> None:
        p = RequestPath(cfg, HeapTrim(0.1))
        await p.registry.load("a", None)
        await until(lambda: len(trims) == 1)     # the warm-ups' own
        await p.router.infer(request(), 10)
        hold = asyncio.Event()
        p.table.holds.append(hold)
        busy = asyncio.create_task(p.router.infer(request(), 10))
        await until(lambda: p.runner.admitted == 1)
        await p.router.infer(request(), 10)      # served beside it
        await asyncio.sleep(0.3)
        assert len(trims) == 1                   # not while a request is in flight
        hold.set()
        await busy
        await until(lambda: len(trims) == 2)
        await asyncio.sleep(0.2)
        assert len(trims) == 2

    run(scenario)


def test_background_frames_come_from_the_worker_holding_the_model(tmp_path: Path) -> None:
    """Router.background_jpegs loads the model if needed and asks its worker for the frames; the
    model's lease is given back."""
    cfg = config(tmp_path, {"a": {"preferred_gpu": 1}}, gpus=2)

    async def scenario() -> tuple[RequestPath, list[bytes]]:
        p = RequestPath(cfg)
        return p, await p.router.background_jpegs("a", (3, 4), 10)

    p, frames = run(scenario)
    assert frames == [b"bg3", b"bg4"]
    assert p.table.backgrounds_asked == [(1, "a", (3, 4))]
    assert p.registry.models["a"].inflight == 0
