"""The model lifecycle, decided in one place: which worker holds which avatar, loading
(coalesced, warmed up end to end), LRU eviction under `capacity.max_models` (server) and
`capacity.max_memory_gb` (per device), idle unload, and the per-model statistics.

States: unloaded -> loading -> ready -> unloading -> unloaded, or loading -> failed.
A model with requests in flight is never unloaded: eviction only picks idle models and
marks its victim `unloading` before the first await, so no new request can reach it.
All of this runs on the frontend's event loop: no locks.
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, Protocol

from pipeline import messages as msg
from pipeline.config import Config
from pipeline.frontend.errors import Failed, Overloaded, Unavailable
from pipeline.frontend.inflight import InferResult
from pipeline.frontend.liveness import RoleView
from pipeline.frontend.metrics import Metrics
from pipeline.frontend.validation import InferInput

log = logging.getLogger(__name__)

UNLOADED, LOADING, READY, UNLOADING, FAILED = "unloaded", "loading", "ready", "unloading", "failed"
WARMUPS = 2  # the first run of a fresh model is slower: the second seeds the frame budget


class WorkerControls(Protocol):
    """LoadModel / UnloadModel calls to a worker (the worker client)."""

    async def control(self, worker: int, worker_pid: int, kind: type, model_id: str,
                      timeout: float) -> msg.ControlReply: ...


class WorkerViews(Protocol):
    """Which workers are alive and what they report (the liveness view)."""

    workers: list[RoleView]

    def worker(self, index: int) -> RoleView | None: ...


class WarmUpRunner(Protocol):
    """Runs a request on a given worker, admitted and measured (the router's runner)."""

    async def run(self, worker: int, req: InferInput, deadline: float) -> InferResult: ...


@dataclass(eq=False)
class Waiter:
    """A request waiting for its model; granted its use when the model becomes READY."""

    granted: bool = False


@dataclass
class ModelView:
    """What the frontend knows of one configured model."""

    model_id: str
    state: str = UNLOADED
    worker: int = -1
    memory_bytes: int = 0
    last_memory_bytes: int = 0     # measured at its last load: the estimate for the next one
    error: str = ""
    request_count: int = 0
    total_inference_ns: int = 0
    last_used: float = 0.0         # unix seconds
    last_used_mono: float = 0.0
    inflight: int = 0
    reserved: bool = False         # a load that has made room for itself
    touched: bool = False          # this frontend has loaded or unloaded it
    load_task: asyncio.Task[int] | None = None
    waiters: set[Waiter] = field(default_factory=set)
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    def set_state(self, state: str) -> None:
        self.state = state
        self.changed.set()
        self.changed = asyncio.Event()

    @property
    def placed(self) -> bool:
        """Holds (or has room reserved for, or is giving back) memory on a worker. A load
        still waiting for room does not count, or waiting loads could block each other."""
        return self.state in (READY, UNLOADING) or (self.state == LOADING and self.reserved)


@dataclass(frozen=True)
class Lease:
    worker: int
    loaded_now: bool
    load_ns: int


class ModelRegistry:
    def __init__(self, cfg: Config, client: WorkerControls, runner: WarmUpRunner,
                 liveness: WorkerViews, metrics: Metrics) -> None:
        self.cfg = cfg
        self.client = client
        self.runner = runner
        self.liveness = liveness
        self.metrics = metrics
        self.models = {mid: ModelView(mid) for mid in cfg.models}
        self._changed = asyncio.Event()  # some model changed state: capacity may have freed
        self._idle_task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self.cfg.capacity.idle_timeout_minutes > 0:
            self._idle_task = asyncio.create_task(self._unload_idle())

    async def close(self) -> None:
        if self._idle_task is not None:
            self._idle_task.cancel()
            await asyncio.gather(self._idle_task, return_exceptions=True)

    def count(self, model_id: str, inference_ns: int) -> None:
        """One more request served by the model (ListModels' and GetModelStats' figures)."""
        model = self.models[model_id]
        model.request_count += 1
        model.total_inference_ns += inference_ns

    @asynccontextmanager
    async def lease(self, model_id: str, deadline: float) -> AsyncIterator[Lease]:
        """The model, ready on its worker and marked in use for the duration.

        A request that waits for the model is granted its use the moment the model becomes
        READY (in the same step), so that no other load can evict the model before the
        requests it was loaded for have run: eviction then always makes progress.
        """
        model = self.models[model_id]
        loaded_now, load_ns = False, 0
        waiter = Waiter()
        if model.state == READY:
            model.inflight += 1
            waiter.granted = True
        else:
            model.waiters.add(waiter)
        try:
            while not waiter.granted:
                if model.state in (UNLOADED, FAILED):
                    t0 = time.monotonic_ns()
                    async with asyncio.timeout(deadline - time.monotonic()):
                        await asyncio.shield(self._load(model, None))
                    loaded_now, load_ns = True, time.monotonic_ns() - t0
                elif model.state == LOADING and model.load_task is not None:
                    loaded_now = True
                    t0 = time.monotonic_ns()
                    async with asyncio.timeout(deadline - time.monotonic()):
                        await asyncio.shield(model.load_task)
                    load_ns = time.monotonic_ns() - t0
                else:  # unloading, or ready for others: wait for the next transition
                    async with asyncio.timeout(deadline - time.monotonic()):
                        await model.changed.wait()
        except BaseException:
            model.waiters.discard(waiter)
            if waiter.granted:  # granted while this request gave up: give it back
                self._release_use(model)
            raise
        try:
            yield Lease(model.worker, loaded_now, load_ns)
        finally:
            self._release_use(model)

    def _release_use(self, model: ModelView) -> None:
        model.inflight -= 1
        model.last_used, model.last_used_mono = time.time(), time.monotonic()
        if model.inflight == 0:
            model.changed.set()
            model.changed = asyncio.Event()

    # ---- load --------------------------------------------------------------------------

    def _load(self, model: ModelView, preferred: int | None) -> asyncio.Task[int]:
        """The model's load, started now or already under way (concurrent loads coalesce)."""
        if model.load_task is None or model.load_task.done():
            deadline = time.monotonic() + self.cfg.server.request_timeout_s
            model.load_task = asyncio.create_task(self._do_load(model, preferred, deadline))
        return model.load_task

    async def load(self, model_id: str, preferred: int | None) -> int:
        """LoadModel: the worker index the model is ready on. Raises Failed."""
        model = self.models[model_id]
        while model.state == UNLOADING:
            await model.changed.wait()
        if model.state == READY:
            return model.worker
        return await asyncio.shield(self._load(model, preferred))

    async def _do_load(self, model: ModelView, preferred: int | None, deadline: float) -> int:
        config = self.cfg.models[model.model_id]
        if preferred is None:
            preferred = config.preferred_gpu
        started = time.monotonic()
        model.touched = True
        worker = self._choose_worker(preferred)
        model.worker, model.error = worker, ""
        self._transition(model, LOADING)
        try:
            await self._make_room(worker, model, model.last_memory_bytes, deadline)
            reply = await self._control(worker, msg.LoadModel, model.model_id)
            if not reply.ok:
                raise Failed(reply.error)
            model.memory_bytes = model.last_memory_bytes = reply.memory_bytes
            # ready only once a batch has gone through encoder, UNet and a compositor
            for _ in range(WARMUPS):
                await self.runner.run(worker, InferInput.warmup_of(model.model_id),
                                      time.monotonic() + self.cfg.runtime.start_timeout_s)
            # the measured size may exceed the estimate
            await self._make_room(worker, model, 0, deadline)
        except Exception as exc:
            error = str(exc) or type(exc).__name__
            log.error("loading %s on gpu_worker %d failed: %s", model.model_id, worker, error)
            await self._discard(model, worker)
            model.error, model.worker, model.memory_bytes = error, -1, 0
            self._transition(model, FAILED)
            if isinstance(exc, Failed) and error.startswith("Failed to load model"):
                raise
            raise Failed(f"Failed to load model '{model.model_id}': {error}") from exc
        model.last_used, model.last_used_mono = time.time(), time.monotonic()
        self._transition(model, READY)
        self.metrics.model_loaded(time.monotonic() - started)
        log.info("%s ready on gpu_worker %d (%.1f MB)", model.model_id, worker,
                 model.memory_bytes / 2**20)
        return worker

    async def _discard(self, model: ModelView, worker: int) -> None:
        """After a failed load, make sure the worker holds nothing of the model."""
        try:
            await self._control(worker, msg.UnloadModel, model.model_id)
        except Exception:
            pass  # a dead worker holds nothing; an unknown model is the normal case

    async def _control(self, worker: int, kind: type, model_id: str) -> msg.ControlReply:
        view = self.liveness.worker(worker)
        if view is None:
            raise Unavailable(f"gpu_worker {worker} is unavailable (restarting or not answering)")
        return await self.client.control(worker, view.pid, kind, model_id,
                                         self.cfg.runtime.start_timeout_s)

    def _choose_worker(self, preferred: int) -> int:
        """The requested device, else the one whose models hold the least measured memory
        (then fewer models, then less device memory in use)."""
        workers = self.liveness.workers
        if 0 <= preferred < len(workers):
            return preferred
        held, counts = [0] * len(workers), [0] * len(workers)
        for m in self.models.values():
            if m.placed and m.worker >= 0:
                held[m.worker] += max(m.memory_bytes, m.last_memory_bytes)
                counts[m.worker] += 1
        return min(range(len(workers)),
                   key=lambda w: (held[w], counts[w], workers[w].device_memory_used_bytes, w))

    # ---- capacity ----------------------------------------------------------------------

    async def _make_room(self, worker: int, incoming: ModelView, incoming_bytes: int,
                         deadline: float) -> None:
        """Evict until `incoming` fits both limits: the least recently used idle model
        first; if every candidate is busy, the least recently used one is drained (no new
        requests reach it, those in flight finish) and then evicted, so a waiting load is
        never starved by traffic on the loaded models."""
        budget = int(self.cfg.capacity.max_memory_gb * 2**30)
        while True:
            others = [m for m in self.models.values() if m.placed and m is not incoming]
            on_device = [m for m in others if m.worker == worker]
            device_bytes = (sum(m.memory_bytes for m in on_device) + incoming_bytes
                            + (incoming.memory_bytes if incoming.state == LOADING else 0))
            too_many = len(others) + 1 > self.cfg.capacity.max_models
            too_big = device_bytes > budget
            if not too_many and not too_big:
                incoming.reserved = True  # before any await: the next load counts us
                return
            if too_big and not on_device:
                raise Failed(f"it needs {device_bytes / 2**30:.2f} GB on gpu {worker}, over "
                             f"capacity.max_memory_gb {self.cfg.capacity.max_memory_gb}")
            candidates = [m for m in (others if too_many else on_device) if m.state == READY]
            if not candidates:  # the others are loading or unloading: wait for one of them
                self._changed.clear()
                try:
                    async with asyncio.timeout(deadline - time.monotonic()):
                        await self._changed.wait()
                except TimeoutError:
                    raise Overloaded("no model could be evicted before the deadline") from None
                continue
            idle = [m for m in candidates if m.inflight == 0]
            victim = min(idle or candidates, key=lambda m: m.last_used_mono)
            log.info("evicting %s from gpu_worker %d (least recently used%s)", victim.model_id,
                     victim.worker, "" if idle else ", after its requests in flight")
            await self._unload(victim, evicted=True)

    async def unload(self, model_id: str) -> None:
        """UnloadModel: waits for a load under way and for requests in flight. Raises Failed."""
        model = self.models[model_id]
        if model.state == LOADING and model.load_task is not None:
            await asyncio.gather(model.load_task, return_exceptions=True)
        if model.state != READY:
            raise Failed(f"Failed to unload model: model '{model_id}' not loaded")
        await self._unload(model)

    async def _unload(self, model: ModelView, evicted: bool = False) -> None:
        model.touched = True
        self._transition(model, UNLOADING)  # before any await: no new request can lease it now
        while model.inflight:
            await model.changed.wait()
        started = time.monotonic()
        try:
            reply = await self._control(model.worker, msg.UnloadModel, model.model_id)
            if not reply.ok:
                log.warning("unloading %s: %s", model.model_id, reply.error)
        finally:
            model.worker, model.memory_bytes = -1, 0
            self._transition(model, UNLOADED)
            self.metrics.model_unloaded(time.monotonic() - started, evicted)

    async def _unload_idle(self) -> None:
        timeout = self.cfg.capacity.idle_timeout_minutes * 60
        while True:
            await asyncio.sleep(min(10.0, timeout / 4))
            now = time.monotonic()
            for model in list(self.models.values()):
                if (model.state == READY and model.inflight == 0
                        and now - model.last_used_mono > timeout):
                    log.info("unloading %s: idle for %.0f s", model.model_id,
                             now - model.last_used_mono)
                    try:
                        await self._unload(model)
                    except Exception:
                        log.exception("idle unload of %s failed", model.model_id)

    def _transition(self, model: ModelView, state: str) -> None:
        if state in (UNLOADED, FAILED):
            model.reserved = False
        if state == READY:  # the requests that waited for it hold it from this step on
            for waiter in model.waiters:
                waiter.granted = True
            model.inflight += len(model.waiters)
            model.waiters.clear()
        model.set_state(state)
        self._changed.set()

    def worker_restarted(self, worker: int) -> None:
        """A restarted worker holds nothing: its models are unloaded (reloaded on demand)."""
        for model in self.models.values():
            if model.worker == worker and model.state in (READY, UNLOADING):
                model.worker, model.memory_bytes = -1, 0
                self._transition(model, UNLOADED)
        # a load under way there fails by itself (its control or warm-up is failed)

    def reconcile(self, worker: int, held: dict[str, int]) -> None:
        """Adopt the models a worker reports holding that this frontend has never loaded
        or unloaded: a frontend that restarted would otherwise show them UNLOADED, be
        unable to unload them, and undercount capacity. (Models this frontend has touched
        follow its own loads and unloads, which a heartbeat in flight could contradict.)"""
        for model_id, memory in held.items():
            model = self.models.get(model_id)
            if model is None or model.touched or model.state not in (UNLOADED, FAILED):
                continue
            model.worker, model.memory_bytes = worker, memory
            model.last_memory_bytes, model.reserved, model.error = memory, True, ""
            model.last_used, model.last_used_mono = time.time(), time.monotonic()
            self._transition(model, READY)
            log.info("%s is loaded on gpu_worker %d (%.1f MB): adopted", model_id, worker,
                     memory / 2**20)

    # ---- views -------------------------------------------------------------------------

    def snapshot(self) -> dict[str, dict[str, Any]]:
        """Every model as the ops socket reports it."""
        return {m.model_id: {"state": m.state, "gpu_id": m.worker, "memory_bytes": m.memory_bytes,
                             "requests": m.request_count, "inflight": m.inflight,
                             "error": m.error} for m in self.models.values()}

    def views(self) -> list[ModelView]:
        """Every configured model, by id (what ListModels and GetModelStats answer from)."""
        return sorted(self.models.values(), key=lambda m: m.model_id)

    def loaded_count(self) -> int:
        return sum(m.state == READY for m in self.models.values())
