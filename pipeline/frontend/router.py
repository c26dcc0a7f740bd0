"""The request path, top to bottom: admission, the model's lease, the run through the
worker tier, the statistics. Every transport (InferBatchComposite, the stream sessions)
comes through `Router.infer`.
"""
from __future__ import annotations

import time

from pipeline.config import Config
from pipeline.frontend.capacity import FrameBudget
from pipeline.frontend.errors import FAILURE_REASONS, Failed, Overloaded, Unavailable
from pipeline.frontend.heap import HeapTrim
from pipeline.frontend.inflight import InferResult, InFlight
from pipeline.frontend.metrics import Metrics
from pipeline.frontend.models import Lease, ModelRegistry
from pipeline.frontend.validation import ValidRequest


class Router:
    def __init__(self, cfg: Config, registry: ModelRegistry, inflight: InFlight,
                 metrics: Metrics, budget: FrameBudget, heap: HeapTrim | None = None) -> None:
        self.cfg = cfg
        self.budget = budget
        self.registry = registry
        self.inflight = inflight
        self.metrics = metrics
        self.admitted = 0
        self.admitted_bytes = 0
        self.heap = heap or HeapTrim()  # buffers kept warm while requests are admitted

    async def infer(self, req: ValidRequest, timeout: float) -> tuple[InferResult, Lease]:
        """Run one request on the worker holding its model (loading it first if needed)."""
        size = self._admit(req)
        try:
            deadline = time.monotonic() + timeout
            async with self.registry.lease(req.model_id, deadline) as lease:
                result = await self.inflight.submit(lease.worker, req, deadline)
            self.registry.count(req.model_id, result.done.inference_ns)
            self.metrics.request_done(req.model_id, result)
            self.budget.observe(result)
            return result, lease
        except (Failed, Overloaded, Unavailable, TimeoutError) as exc:
            self.metrics.request_failed(FAILURE_REASONS[type(exc)])
            raise
        finally:
            self._release(size)

    async def backgrounds(self, model_id: str, indices: tuple[int, ...],
                          timeout: float) -> list[bytes]:
        """JPEGs of the model's background frames as they are (a live session's idle
        frames), from the worker that holds it (loaded first if needed)."""
        deadline = time.monotonic() + timeout
        async with self.registry.lease(model_id, deadline) as lease:
            return await self.inflight.backgrounds(lease.worker, model_id, indices, deadline)

    def _admit(self, req: ValidRequest) -> int:
        """Count the request in, or refuse it at once: by requests and by tensor bytes
        (one request alone is always admitted, whatever its size)."""
        server = self.cfg.server
        if self.admitted >= server.max_inflight_requests:
            raise Overloaded(f"server busy: {self.admitted} requests in flight")
        size = req.nbytes
        if self.admitted and self.admitted_bytes + size > server.max_inflight_mb * 2**20:
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
