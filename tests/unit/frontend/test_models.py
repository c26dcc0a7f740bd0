"""The model lifecycle (no process): loads warmed up and coalesced, waiters granted at READY,
eviction by count, by memory and after draining, failed loads, unload, idle unload, a
restarted worker, reconciliation with what workers report, placement and the views. The
worker tier, the liveness view and the warm-up runner are fakes typed by the registry's
Protocols."""
from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest

from pipeline.config import Config
from pipeline.frontend.errors import Failed, Unavailable
from pipeline.frontend.metrics import Metrics
from pipeline.frontend.models import (
    FAILED,
    LOADING,
    READY,
    UNLOADED,
    UNLOADING,
    ModelRegistry,
    WarmUpRunner,
    WorkerControls,
    WorkerViews,
)
from tests.unit.frontend.fakes import GB, Views, WarmUps, Workers, config, run, until


class World:
    """A registry and its fakes, built on the running loop."""

    def __init__(self, cfg: Config) -> None:
        self.journal: list[str] = []
        self.workers = Workers(self.journal)
        self.warmups = WarmUps(self.journal)
        self.views = Views(cfg.gpus.count)
        self.metrics = Metrics()
        controls: WorkerControls = self.workers
        runner: WarmUpRunner = self.warmups
        views: WorkerViews = self.views
        self.registry = ModelRegistry(cfg, controls, runner, views, self.metrics)
        self.warmups.state = lambda mid: self.registry.models[mid].state

    def state(self, model_id: str) -> str:
        return self.registry.models[model_id].state

    def sent(self, entry: str) -> int:
        return self.journal.count(entry)

    async def request(self, model_id: str, timeout: float = 10.0,
                      hold: asyncio.Event | None = None, tag: str = "") -> bool:
        """One request's use of the model (as the router takes it): journals the model's
        state while it holds the lease; True when it loaded the model."""
        registry = self.registry
        async with registry.lease(model_id, time.monotonic() + timeout) as lease:
            model = registry.models[model_id]
            self.journal.append(f"request {model_id}{tag} ({model.state}@{lease.worker})")
            if hold is not None:
                await hold.wait()
            return lease.loaded_now


def test_a_load_is_ready_only_after_its_warm_ups_ran_on_its_worker(tmp_path: Path) -> None:
    """LoadModel goes to the chosen worker (its pid), two warm-ups run there while the model
    is still loading, then it is READY with the memory the worker measured."""
    cfg = config(tmp_path, {"a": {"preferred_gpu": 1}}, gpus=2)

    async def scenario() -> World:
        w = World(cfg)
        w.workers.memory["a"] = 3 * GB // 8
        assert await w.registry.load("a", None) == 1
        return w

    w = run(scenario)
    assert w.journal == ["LoadModel a@1", "warm-up a@1 (loading)", "warm-up a@1 (loading)"]
    assert w.workers.pids == [101]
    model = w.registry.models["a"]
    assert (model.state, model.worker, model.memory_bytes, model.last_memory_bytes) == \
        (READY, 1, 3 * GB // 8, 3 * GB // 8)
    assert w.registry.loaded_count() == 1


def test_concurrent_loads_and_requests_of_one_model_share_one_load(tmp_path: Path) -> None:
    """Three LoadModel calls and three requests arriving before and during the load: one
    LoadModel to the worker, one pair of warm-ups; every caller gets the model, the requests
    say they waited for a load, and nothing stays counted in flight. A LoadModel of the
    ready model asks the worker nothing."""
    cfg = config(tmp_path)

    async def scenario() -> tuple[World, list[Any]]:
        w = World(cfg)
        w.workers.gates["a"] = gate = asyncio.Event()
        tasks = [asyncio.create_task(w.registry.load("a", None)) for _ in range(3)]
        tasks += [asyncio.create_task(w.request("a")) for _ in range(2)]
        await until(lambda: w.state("a") == LOADING)
        tasks.append(asyncio.create_task(w.request("a")))
        await asyncio.sleep(0.01)
        gate.set()
        results = await asyncio.gather(*tasks)
        return w, [*results, await w.registry.load("a", None)]

    w, results = run(scenario)
    assert results == [0, 0, 0, True, True, True, 0]
    assert w.sent("LoadModel a@0") == 1 and w.sent("warm-up a@0 (loading)") == 2
    assert w.sent("request a (ready@0)") == 3
    assert w.registry.models["a"].inflight == 0


def test_requests_waiting_for_a_load_run_before_another_load_can_evict_it(tmp_path: Path) -> None:
    """With room for one model: a request waits for a's load while b's load waits for room.
    The request is granted a the moment it is READY, so b's eviction of a drains it: the
    request runs on a before a is unloaded, and a is loaded only once (no ping-pong)."""
    cfg = config(tmp_path, max_models=1)

    async def scenario() -> World:
        w = World(cfg)
        w.workers.gates["a"] = gate = asyncio.Event()
        request = asyncio.create_task(w.request("a"))
        await until(lambda: w.sent("LoadModel a@0") == 1)
        load_b = asyncio.create_task(w.registry.load("b", None))
        await asyncio.sleep(0.01)
        assert w.state("b") == LOADING and w.sent("LoadModel b@0") == 0  # waits for room
        gate.set()
        await asyncio.gather(request, load_b)
        return w

    w = run(scenario)
    assert w.journal == ["LoadModel a@0", "warm-up a@0 (loading)", "warm-up a@0 (loading)",
                         "request a (unloading@0)", "UnloadModel a@0",  # drained
                         "LoadModel b@0", "warm-up b@0 (loading)", "warm-up b@0 (loading)"]
    assert (w.state("a"), w.state("b")) == (UNLOADED, READY)


def test_the_least_recently_used_idle_model_is_evicted_over_max_models(tmp_path: Path) -> None:
    """max_models 2 holding a and b, a used since: loading c evicts b (counted as an
    eviction), not a. Then a, now the least recently used, has a request in flight: loading
    b evicts the idle c instead of draining a."""
    cfg = config(tmp_path, max_models=2)

    async def scenario() -> World:
        w = World(cfg)
        await w.registry.load("a", None)
        await w.registry.load("b", None)
        await w.request("a")
        await w.registry.load("c", None)
        assert [w.state(m) for m in "abc"] == [READY, UNLOADED, READY]
        hold = asyncio.Event()
        busy = asyncio.create_task(w.request("a", hold=hold))
        await until(lambda: w.registry.models["a"].inflight == 1)
        await w.registry.load("b", None)
        hold.set()
        await busy
        return w

    w = run(scenario)
    assert [w.state(m) for m in "abc"] == [READY, READY, UNLOADED]
    assert w.sent("UnloadModel b@0") == 1 and w.sent("UnloadModel c@0") == 1
    assert w.sent("UnloadModel a@0") == 0 and w.metrics.evictions == 2


def test_the_memory_budget_evicts_on_the_same_device_measured_then_estimated(
        tmp_path: Path) -> None:
    """max_memory_gb 1 per device, models of 0.6 GB: b's measured size pushes a (same
    device) out after b's load, c on the other device stays; a's next load uses its last
    measured size and makes room before its LoadModel is sent."""
    cfg = config(tmp_path, {"a": {"preferred_gpu": 0}, "b": {"preferred_gpu": 0},
                            "c": {"preferred_gpu": 1}}, gpus=2, max_memory_gb=1.0)

    async def scenario() -> World:
        w = World(cfg)
        w.workers.memory = {m: int(0.6 * GB) for m in "abc"}
        for m in "cab":
            await w.registry.load(m, None)
        assert [w.state(m) for m in "abc"] == [UNLOADED, READY, READY]
        w.journal.clear()
        await w.registry.load("a", None)
        return w

    w = run(scenario)
    assert w.journal[:2] == ["UnloadModel b@0", "LoadModel a@0"]
    assert [w.state(m) for m in "abc"] == [READY, UNLOADED, READY]
    assert w.metrics.evictions == 2


def test_a_model_bigger_than_the_budget_fails_its_load_and_is_discarded(tmp_path: Path) -> None:
    """A model measured at 1.5 GB under max_memory_gb 1: the load fails saying why, the
    worker is told to drop it, and the model is FAILED with that error, on no worker."""
    cfg = config(tmp_path, max_memory_gb=1.0)

    async def scenario() -> tuple[World, str]:
        w = World(cfg)
        w.workers.memory["a"] = int(1.5 * GB)
        with pytest.raises(Failed) as failed:
            await w.registry.load("a", None)
        return w, str(failed.value)

    w, error = run(scenario)
    assert error == ("Failed to load model 'a': it needs 1.50 GB on gpu 0, over "
                     "capacity.max_memory_gb 1.0")
    model = w.registry.models["a"]
    assert (model.state, model.worker, model.memory_bytes) == (FAILED, -1, 0)
    assert model.error.startswith("it needs 1.50 GB")
    assert w.journal[-1] == "UnloadModel a@0"


def test_a_busy_model_is_drained_then_evicted_and_takes_no_new_request(tmp_path: Path) -> None:
    """With room for one model, a in use: b's load marks a UNLOADING at once, a new request
    for a waits, the request in flight finishes, then a is unloaded and b loaded; the
    waiting request then gets a back (evicting b)."""
    cfg = config(tmp_path, max_models=1)

    async def scenario() -> World:
        w = World(cfg)
        await w.registry.load("a", None)
        hold = asyncio.Event()
        first = asyncio.create_task(w.request("a", hold=hold, tag="#1"))
        await until(lambda: w.registry.models["a"].inflight == 1)
        load_b = asyncio.create_task(w.registry.load("b", None))
        await until(lambda: w.state("a") == UNLOADING)
        second = asyncio.create_task(w.request("a", tag="#2"))
        await asyncio.sleep(0.01)
        assert w.sent("UnloadModel a@0") == 0 and w.sent("request a#2 (ready@0)") == 0
        hold.set()
        await asyncio.gather(first, load_b, second)
        return w

    w = run(scenario)
    order = [w.journal.index(e) for e in ("request a#1 (ready@0)", "UnloadModel a@0",
                                          "LoadModel b@0", "UnloadModel b@0",
                                          "request a#2 (ready@0)")]
    assert order == sorted(order)
    assert w.sent("LoadModel a@0") == 2 and w.metrics.evictions == 2


def test_a_load_with_nothing_evictable_before_its_deadline_fails(tmp_path: Path) -> None:
    """With room for one model and that one still loading past b's deadline: b's load fails
    with a clear error and b is FAILED; a's load is not disturbed."""
    cfg = config(tmp_path, max_models=1, timeout_s=0.2)

    async def scenario() -> tuple[World, str]:
        w = World(cfg)
        w.workers.gates["a"] = gate = asyncio.Event()
        load_a = asyncio.create_task(w.registry.load("a", None))
        await until(lambda: w.sent("LoadModel a@0") == 1)
        with pytest.raises(Failed) as failed:
            await w.registry.load("b", None)
        gate.set()
        await load_a
        return w, str(failed.value)

    w, error = run(scenario)
    assert error == "Failed to load model 'b': no model could be evicted before the deadline"
    assert (w.state("a"), w.state("b")) == (READY, FAILED)


@pytest.mark.parametrize("reply_error, expected", [
    ("no such file", "Failed to load model 'a': no such file"),
    ("Failed to load model 'a': bad graph", "Failed to load model 'a': bad graph"),
])
def test_a_refused_load_fails_is_discarded_and_can_be_retried(tmp_path: Path, reply_error: str,
                                                              expected: str) -> None:
    """The worker refuses the load: Failed with one "Failed to load model" prefix, the model
    FAILED with its error and dropped by the worker; the next request loads it again and
    clears the error."""
    cfg = config(tmp_path)

    async def scenario() -> tuple[World, str, str]:
        w = World(cfg)
        w.workers.errors["a"] = reply_error
        with pytest.raises(Failed) as failed:
            await w.registry.load("a", None)
        error = w.registry.models["a"].error
        del w.workers.errors["a"]
        assert await w.request("a")
        return w, str(failed.value), error

    w, raised, error = run(scenario)
    assert raised == expected and error == reply_error
    assert w.journal[:2] == ["LoadModel a@0", "UnloadModel a@0"]
    model = w.registry.models["a"]
    assert (model.state, model.error, model.worker) == (READY, "", 0)


def test_a_failed_warm_up_or_a_dead_worker_fails_the_load(tmp_path: Path) -> None:
    """A warm-up that fails (the worker died under it) fails the load with its reason; so
    does a worker that is not alive when the load begins."""
    cfg = config(tmp_path)

    async def scenario() -> tuple[World, list[str]]:
        w = World(cfg)
        errors = []
        w.warmups.error = Unavailable("gpu_worker 0 restarted; request failed")
        with pytest.raises(Failed) as failed:
            await w.registry.load("a", None)
        errors.append(str(failed.value))
        w.warmups.error = None
        w.views.down.add(0)
        with pytest.raises(Failed) as failed:
            await w.registry.load("b", None)
        errors.append(str(failed.value))
        return w, errors

    w, errors = run(scenario)
    assert errors == [
        "Failed to load model 'a': gpu_worker 0 restarted; request failed",
        "Failed to load model 'b': gpu_worker 0 is unavailable (restarting or not answering)"]
    assert (w.state("a"), w.state("b")) == (FAILED, FAILED)
    assert w.sent("LoadModel b@0") == 0


def test_unload_waits_for_the_requests_in_flight(tmp_path: Path) -> None:
    """UnloadModel of a model in use: UNLOADING at once, the worker told only once the
    request finished (and the model unloaded even if the worker says it did not hold it);
    a LoadModel meanwhile waits and loads it again; unloading a model that is not loaded
    fails saying so; an unload not counted as an eviction."""
    cfg = config(tmp_path)

    async def scenario() -> tuple[World, str]:
        w = World(cfg)
        await w.registry.load("a", None)
        w.workers.refuse_unload.add("a")
        hold = asyncio.Event()
        request = asyncio.create_task(w.request("a", hold=hold))
        await until(lambda: w.registry.models["a"].inflight == 1)
        unload = asyncio.create_task(w.registry.unload("a"))
        await until(lambda: w.state("a") == UNLOADING)
        reload = asyncio.create_task(w.registry.load("a", None))
        await asyncio.sleep(0.01)
        assert w.sent("UnloadModel a@0") == 0 and w.sent("LoadModel a@0") == 1
        hold.set()
        await asyncio.gather(request, unload, reload)
        with pytest.raises(Failed) as failed:
            await w.registry.unload("b")
        return w, str(failed.value)

    w, error = run(scenario)
    assert error == "Failed to unload model: model 'b' not loaded"
    assert w.journal[-3:] == ["LoadModel a@0", "warm-up a@0 (loading)", "warm-up a@0 (loading)"]
    assert w.sent("UnloadModel a@0") == 1 and w.state("a") == READY
    assert w.metrics.evictions == 0


def test_unload_during_a_load_waits_for_it_then_unloads(tmp_path: Path) -> None:
    """UnloadModel while the model loads: the load completes, then the model is unloaded."""
    cfg = config(tmp_path)

    async def scenario() -> World:
        w = World(cfg)
        w.workers.gates["a"] = gate = asyncio.Event()
        load = asyncio.create_task(w.registry.load("a", None))
        await until(lambda: w.sent("LoadModel a@0") == 1)
        unload = asyncio.create_task(w.registry.unload("a"))
        await asyncio.sleep(0.01)
        gate.set()
        await asyncio.gather(load, unload)
        return w

    w = run(scenario)
    assert w.journal[-1] == "UnloadModel a@0" and w.state("a") == UNLOADED


def test_idle_models_are_unloaded_and_busy_ones_kept(tmp_path: Path) -> None:
    """idle_timeout_minutes: idle models are unloaded (one whose unload raises is still
    marked unloaded, and the others still go); a model with a request in flight stays;
    close() stops the idle unloads."""
    cfg = config(tmp_path, idle_timeout_minutes=0.002)  # 0.12 s

    async def scenario() -> World:
        w = World(cfg)
        for m in "abc":
            await w.registry.load(m, None)
        w.workers.raise_on_unload.add("a")
        hold = asyncio.Event()
        request = asyncio.create_task(w.request("c", hold=hold))
        w.registry.start()
        await until(lambda: w.state("a") == UNLOADED and w.state("b") == UNLOADED)
        await asyncio.sleep(0.2)
        assert w.state("c") == READY
        hold.set()
        await request
        await w.registry.close()
        await asyncio.sleep(0.3)  # c idle past its timeout: only a stopped loop keeps it
        return w

    w = run(scenario)
    assert w.sent("UnloadModel a@0") == 1 and w.sent("UnloadModel b@0") == 1
    assert w.sent("UnloadModel c@0") == 0 and w.state("c") == READY


def test_a_restarted_worker_holds_nothing_and_its_models_reload_on_demand(tmp_path: Path) -> None:
    """worker_restarted(0): its models become UNLOADED on no worker, the other worker's stay;
    the next request loads the model again."""
    cfg = config(tmp_path, {"a": {"preferred_gpu": 0}, "b": {"preferred_gpu": 1}}, gpus=2)

    async def scenario() -> World:
        w = World(cfg)
        await w.registry.load("a", None)
        await w.registry.load("b", None)
        w.registry.worker_restarted(0)
        model = w.registry.models["a"]
        assert (model.state, model.worker, model.memory_bytes) == (UNLOADED, -1, 0)
        assert w.state("b") == READY
        assert await w.request("a")
        return w

    w = run(scenario)
    assert w.sent("LoadModel a@0") == 2 and w.state("a") == READY


def test_reconcile_adopts_only_models_this_frontend_never_touched(tmp_path: Path) -> None:
    """A worker reports holding a (never touched here), b (unloaded here, the report is
    stale) and an unknown id: a is adopted READY with its memory and counts against
    max_models (loading c evicts it from that worker); b and the unknown id are ignored."""
    cfg = config(tmp_path, gpus=2, max_models=2)

    async def scenario() -> World:
        w = World(cfg)
        await w.registry.load("b", None)
        await w.registry.unload("b")
        w.registry.reconcile(1, {"a": 5 * 2**20, "b": 7, "zzz": 1})
        model = w.registry.models["a"]
        assert (model.state, model.worker, model.memory_bytes) == (READY, 1, 5 * 2**20)
        assert w.state("b") == UNLOADED and "zzz" not in w.registry.models
        await w.registry.load("b", None)
        await w.registry.load("c", None)
        return w

    w = run(scenario)
    assert w.sent("UnloadModel a@1") == 1 and w.state("a") == UNLOADED


def test_placement_takes_the_preferred_device_else_the_least_loaded(tmp_path: Path) -> None:
    """A valid preferred device is taken as asked; otherwise the device whose models hold the
    least memory, then with fewer models, then with less device memory in use."""
    cfg = config(tmp_path, {m: {} for m in "abcde"}, gpus=3)

    async def scenario() -> list[int]:
        w = World(cfg)
        w.workers.memory = {"a": GB // 4, "b": GB // 2, "c": GB // 8, "d": GB, "e": 1}
        w.views.workers[0].device_memory_used_bytes = 5 * GB
        return [await w.registry.load("a", None),   # all empty: less device memory in use
                await w.registry.load("b", 7),      # out of range: least loaded
                await w.registry.load("c", None),   # the one holding nothing
                await w.registry.load("d", 2),      # as asked
                await w.registry.load("e", -1)]     # 1/8 GB on 0, 1/4 on 1, 1.5 GB on 2

    assert run(scenario) == [1, 2, 0, 2, 0]


def test_the_views_report_state_requests_and_memory(tmp_path: Path) -> None:
    """snapshot(), views() (by id) and count() report what each model did."""
    cfg = config(tmp_path, {"b": {}, "a": {}})

    async def scenario() -> World:
        w = World(cfg)
        await w.registry.load("a", None)
        w.registry.count("a", 1000)
        w.registry.count("a", 500)
        return w

    w = run(scenario)
    assert w.registry.snapshot() == {
        "a": {"state": READY, "gpu_id": 0, "memory_bytes": GB // 4, "requests": 2,
              "inflight": 0, "error": ""},
        "b": {"state": UNLOADED, "gpu_id": -1, "memory_bytes": 0, "requests": 0,
              "inflight": 0, "error": ""}}
    assert [m.model_id for m in w.registry.views()] == ["a", "b"]
    assert w.registry.models["a"].total_inference_ns == 1500


def test_a_request_that_gives_up_while_waiting_leaves_nothing_behind(tmp_path: Path) -> None:
    """A request waiting for a model being unloaded times out and leaves no waiter; one
    cancelled in the very step its model became READY (granted) gives its use back, so the
    model can still be unloaded."""
    cfg = config(tmp_path)

    async def scenario() -> World:
        w = World(cfg)
        await w.registry.load("a", None)
        hold = asyncio.Event()
        first = asyncio.create_task(w.request("a", hold=hold))
        await until(lambda: w.registry.models["a"].inflight == 1)
        unload = asyncio.create_task(w.registry.unload("a"))
        await until(lambda: w.state("a") == UNLOADING)
        with pytest.raises(TimeoutError):
            await w.request("a", timeout=0.05)
        assert not w.registry.models["a"].waiters
        hold.set()
        await asyncio.gather(first, unload)

        w.workers.gates["b"] = gate = asyncio.Event()
        waiting = asyncio.create_task(w.request("b"))
        await until(lambda: w.sent("LoadModel b@0") == 1)
        changed = w.registry.models["b"].changed  # set by the transition to READY

        async def cancel_when_ready() -> None:
            await changed.wait()
            waiting.cancel()  # runs before the request resumes from its wait

        canceller = asyncio.create_task(cancel_when_ready())
        gate.set()
        await canceller
        with pytest.raises(asyncio.CancelledError):
            await waiting
        assert w.state("b") == READY and w.registry.models["b"].inflight == 0
        await w.registry.unload("b")
        return w

    w = run(scenario)
    assert w.state("b") == UNLOADED and "request b (ready@0)" not in w.journal
