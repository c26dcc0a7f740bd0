"""The request path, top to bottom: the model's lease (`Router`), then admission, the run
through the worker tier and the statistics (`Runner`). Every transport (InferBatchComposite,
the stream sessions) comes through `Router.infer`; a model's warm-up at load goes through
the `Runner` too (it has no lease yet: the model is not ready until it has run).
"""
from __future__ import annotations

import time
from typing import Protocol

from pipeline.config import Config
from pipeline.frontend.capacity import FrameBudget
from pipeline.frontend.errors import FAILURE_REASONS, Failed, Overloaded, Unavailable
from pipeline.frontend.heap import HeapTrim
from pipeline.frontend.inflight import InferResult
from pipeline.frontend.metrics import Metrics
from pipeline.frontend.models import Lease, ModelRegistry
from pipeline.frontend.validation import InferInput


class RequestTable(Protocol):
    """What the runner needs of the in-flight table: a request run on a worker, and a
    model's background frames from it."""

    async def submit(self, worker: int, req: InferInput, deadline: float) -> InferResult: ...

    async def background_jpegs(self, worker: int, model_id: str, indices: tuple[int, ...],
                          deadline: float) -> list[bytes]: ...


class Runner:
    """One request on a given worker: admitted (or refused at once), run, measured."""

    def __init__(self, cfg: Config, inflight: RequestTable, metrics: Metrics,
                 budget: FrameBudget, heap: HeapTrim | None = None) -> None:
        self.cfg = cfg
        self.inflight = inflight
        self.metrics = metrics
        self.budget = budget
        self.admitted = 0
        self.admitted_bytes = 0
        self.heap = heap or HeapTrim()  # buffers kept warm while requests are admitted

    async def run(self, worker: int, req: InferInput, deadline: float) -> InferResult:
        size = self._admit(req)
        try:
            result = await self.inflight.submit(worker, req, deadline)
        finally:
            self._release(size)
        if req.warmup:
            self.metrics.warmup_done(req.model_id)
        else:
            self.metrics.request_done(req.model_id, result)
        self.budget.observe(result, live=req.live, warmup=req.warmup)
        return result

    def _admit(self, req: InferInput) -> int:
        """Count the request in, or refuse it at once: by requests and by tensor bytes (one
        request alone is always admitted, whatever its size). A live session's request is
        never refused for batch load: its session was admitted against the frame budget."""
        server = self.cfg.server
        if not req.live and self.admitted >= server.max_inflight_requests:
            raise Overloaded(f"server busy: {self.admitted} requests in flight")
        size = req.nbytes
        if not req.live and self.admitted and \
                self.admitted_bytes + size > server.max_inflight_mb * 2**20:
            raise Overloaded(f"server busy: {self.admitted_bytes / 2**20:.0f} MB of requests in "
                             f"flight (server.max_inflight_mb {server.max_inflight_mb})")
        self.admitted += 1
        self.admitted_bytes += size
        self.heap.hold()
        return size

    def _release(self, size: int) -> None:
        self.admitted -= 1
        self.admitted_bytes -= size
        self.heap.release()


class Router:
    def __init__(self, registry: ModelRegistry, runner: Runner) -> None:
        self.registry = registry
        self.runner = runner

    async def infer(self, req: InferInput, timeout: float) -> tuple[InferResult, Lease]:
        """Run one request on the worker holding its model (loading it first if needed)."""
        deadline = time.monotonic() + timeout
        try:
            async with self.registry.lease(req.model_id, deadline) as lease:
                result = await self.runner.run(lease.worker, req, deadline)
        except (Failed, Overloaded, Unavailable, TimeoutError) as exc:
            self.runner.metrics.request_failed(FAILURE_REASONS[type(exc)])
            raise
        self.registry.count(req.model_id, result.done.inference_ns)
        return result, lease

    async def background_jpegs(self, model_id: str, indices: tuple[int, ...],
                          timeout: float) -> list[bytes]:
        """JPEGs of the model's background frames as they are (a live session's idle
        frames), from the worker that holds it (loaded first if needed)."""
        deadline = time.monotonic() + timeout
        async with self.registry.lease(model_id, deadline) as lease:
            return await self.runner.inflight.background_jpegs(lease.worker, model_id, indices, deadline)
