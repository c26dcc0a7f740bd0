"""Fakes for the frontend core's unit tests, typed by the Protocols of the parts they stand
in for (the worker tier's controls, the liveness view, the warm-up runner), and the helpers
that run a scenario on a fresh event loop."""
from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

from pipeline import messages as msg
from pipeline.config import Config, parse_config
from pipeline.frontend.errors import Unavailable
from pipeline.frontend.inflight import InferResult
from pipeline.frontend.liveness import RoleView
from pipeline.frontend.validation import InferInput

GB = 2**30
T = TypeVar("T")


class Workers:
    """The worker tier's controls: LoadModel answers with the model's memory (or its error),
    UnloadModel with ok (or refuses, or raises, for the models listed); every call goes into
    the journal; a gate holds a model's load."""

    def __init__(self, journal: list[str]) -> None:
        self.journal = journal
        self.memory: dict[str, int] = {}
        self.errors: dict[str, str] = {}
        self.gates: dict[str, asyncio.Event] = {}
        self.raise_on_unload: set[str] = set()
        self.refuse_unload: set[str] = set()
        self.pids: list[int] = []

    async def control(self, worker: int, worker_pid: int, kind: type, model_id: str,
                      timeout: float) -> msg.ControlReply:
        self.journal.append(f"{kind.__name__} {model_id}@{worker}")
        self.pids.append(worker_pid)
        if kind is msg.UnloadModel:
            if model_id in self.raise_on_unload:
                raise Unavailable("gpu_worker did not answer")
            if model_id in self.refuse_unload:
                return msg.ControlReply(0, ok=False, error=f"Model '{model_id}' not loaded")
            return msg.ControlReply(0, ok=True, gpu_id=worker)
        gate = self.gates.get(model_id)
        if gate is not None:
            await gate.wait()
        if model_id in self.errors:
            return msg.ControlReply(0, ok=False, error=self.errors[model_id])
        return msg.ControlReply(0, ok=True, gpu_id=worker,
                                memory_bytes=self.memory.get(model_id, GB // 4))


class WarmUps:
    """The router's runner as the registry uses it: journals each warm-up with the model's
    state at that moment; fails them all while `error` is set."""

    def __init__(self, journal: list[str]) -> None:
        self.journal = journal
        self.error: Exception | None = None
        self.state: Callable[[str], str] = lambda _: "?"

    async def run(self, worker: int, req: InferInput, deadline: float) -> InferResult:
        assert req.warmup and req.batch_size == 1
        self.journal.append(f"warm-up {req.model_id}@{worker} ({self.state(req.model_id)})")
        if self.error is not None:
            raise self.error
        done = msg.InferDone(0, worker, 0, 0, 0, 0, 0, 0, 1)
        return InferResult([b"jpeg"], done, 0, 0, 0, 0, 0)


class Views:
    """The liveness view: workers alive unless listed in `down`."""

    def __init__(self, count: int) -> None:
        self.workers = [RoleView(pid=100 + i) for i in range(count)]
        self.down: set[int] = set()

    def worker(self, index: int) -> RoleView | None:
        return None if index in self.down else self.workers[index]




def config(tmp_path: Path, models: dict[str, dict[str, Any]] | None = None, gpus: int = 1,
           timeout_s: float = 60.0, **capacity: Any) -> Config:
    """Models a, b, c (or those given, with their settings) on `gpus` workers, with these
    capacity settings and request timeout."""
    spec = {"model_path": "u.onnx", "background_dir": "f", "crop_rects_path": "r.json",
            "num_frames": 4}
    models = {"a": {}, "b": {}, "c": {}} if models is None else models
    return parse_config({"gpus": {"count": gpus}, "capacity": capacity,
                         "server": {"request_timeout_s": timeout_s},
                         "runtime": {"start_timeout_s": 10},
                         "models": {m: {**spec, **extra} for m, extra in models.items()}},
                        base_dir=tmp_path)


def run(scenario: Callable[[], Awaitable[T]]) -> T:
    """The scenario on a fresh loop, bounded: a hang fails the test instead of the suite."""
    async def bounded() -> T:
        async with asyncio.timeout(20):
            return await scenario()
    return asyncio.run(bounded())


async def until(condition: Callable[[], bool]) -> None:
    """Yield to the loop until the condition holds (bounded by run's timeout)."""
    while not condition():
        await asyncio.sleep(0.001)


class Clock:
    """time.monotonic of the liveness module alone, moved by hand (the loop keeps its own):
    the `clock` fixture (conftest.py) puts it in place."""

    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now
