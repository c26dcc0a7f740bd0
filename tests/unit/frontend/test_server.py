"""How the frontend applies what liveness observed (no process, no socket): a lost worker's
requests and control calls fail, a restarted worker's models are forgotten, what a worker
reports holding is reconciled, a lost compositor fails nothing, and the health status follows
the roles. The real Liveness and gRPC health servicer; recording fakes for the in-flight
table, the worker client and the registry; every other part of the Frontend refuses use."""
from __future__ import annotations

import asyncio
import inspect
from pathlib import Path

from grpc_health.v1 import health as grpc_health
from grpc_health.v1 import health_pb2

from pipeline import messages as msg
from pipeline.config import Config, parse_config
from pipeline.frontend.liveness import Liveness
from pipeline.frontend.models import FAILED, READY, ModelView
from pipeline.frontend.server import Frontend, State
from pipeline.frontend.services import INFERENCE, MONOLITHIC, NOT_SERVING, SERVING
from tests.unit.frontend.fakes import Clock, run


class Unused:
    """A part of the Frontend that applying events must not touch."""

    def __init__(self, name: str) -> None:
        self._name = name

    def __getattr__(self, attr: str) -> object:
        raise AssertionError(f"_apply used {self._name}.{attr}")


class Parts:
    """The in-flight table, the worker client and the registry as _apply uses them: each
    call goes into one journal, in order."""

    def __init__(self) -> None:
        self.journal: list[str] = []
        self.models: list[ModelView] = []

    def fail_worker(self, index: int, reason: str, restarted: bool) -> None:
        self.journal.append(f"requests of {index} failed: {reason} (restarted={restarted})")

    def fail_controls(self, worker: int, error: Exception) -> None:
        self.journal.append(f"controls of {worker} failed: {type(error).__name__}: {error}")

    def worker_restarted(self, worker: int) -> None:
        self.journal.append(f"models of {worker} forgotten")

    def reconcile(self, worker: int, held: dict[str, int]) -> None:
        self.journal.append(f"{worker} holds {held}")

    def views(self) -> list[ModelView]:
        return self.models


def config(tmp_path: Path) -> Config:
    return parse_config({"gpus": {"count": 1}, "compositor": {"pool_size": 2},
                         "runtime": {"heartbeat_s": 0.5},
                         "models": {"a": {"model_path": "u.onnx", "background_dir": "f",
                                          "crop_rects_path": "r.json", "num_frames": 4,
                                          "preload_model": True}}}, base_dir=tmp_path)


def beat(role: str, index: int, pid: int, **fields: object) -> msg.Heartbeat:
    return msg.Heartbeat(role=role, index=index, pid=pid, **fields)  # type: ignore[arg-type]


def frontend(cfg: Config, parts: Parts) -> Frontend:
    """A RUNNING Frontend whose worker 0 (pid 10) and compositors 0 and 1 have reported."""
    given = {"client": parts, "inflight": parts, "registry": parts, "liveness": Liveness(cfg),
             "health": grpc_health.aio.HealthServicer()}
    names = list(inspect.signature(Frontend).parameters)[1:]
    f = Frontend(cfg, **{n: given.get(n, Unused(n)) for n in names})
    for m in (beat("gpu_worker", 0, 10, loaded_models={"a": 5}), beat("compositor", 0, 20),
              beat("compositor", 1, 21)):
        f.liveness.heard(m)
    f.state = State.RUNNING
    return f


class NoContext:
    """The RPC context of a health check: a service never set is NOT_FOUND."""

    async def abort(self, code: object, details: str = "") -> None:
        raise LookupError(code)


async def health_statuses(f: Frontend) -> set[int]:
    """The overall status and both services' (-1: not set yet)."""
    found = set()
    for name in ("", MONOLITHIC.full_name, INFERENCE.full_name):
        try:
            reply = await f.health.Check(health_pb2.HealthCheckRequest(service=name), NoContext())
            found.add(reply.status)
        except LookupError:
            found.add(-1)
    return found


async def health_is(f: Frontend, status: int) -> None:
    """Wait until the overall status and both services' read `status`."""
    while await health_statuses(f) != {status}:
        await asyncio.sleep(0.001)


async def serving(tmp_path: Path, parts: Parts) -> Frontend:
    """`frontend()` with its first liveness applied: SERVING, the journal emptied."""
    f = frontend(config(tmp_path), parts)
    f._apply([])
    await health_is(f, SERVING)
    parts.journal.clear()
    return f


def test_a_restarted_worker_fails_its_work_and_forgets_its_models(tmp_path: Path,
                                                                 clock: Clock) -> None:
    """A heartbeat from a new pid of worker 0: its requests fail as restarted (their blocks
    free), its control calls fail Unavailable, its models are forgotten, then what the new
    process holds is reconciled — in that order."""
    parts = Parts()

    async def scenario() -> None:
        f = frontend(config(tmp_path), parts)
        parts.journal.clear()
        f._on_heartbeat(beat("gpu_worker", 0, 11, loaded_models={"b": 7}), [])

    run(scenario)
    assert parts.journal == ["requests of 0 failed: gpu_worker 0 restarted (restarted=True)",
                             "controls of 0 failed: Unavailable: gpu_worker 0 restarted",
                             "models of 0 forgotten", "0 holds {'b': 7}"]


def test_an_announced_death_fails_at_once_and_the_box_is_not_serving(tmp_path: Path,
                                                                     clock: Clock) -> None:
    """RoleDown from worker 0's pid: its requests and controls fail (blocks free: it cannot
    write any more), its models are forgotten, and health turns NOT_SERVING."""
    parts = Parts()

    async def scenario() -> Frontend:
        f = await serving(tmp_path, parts)
        f._on_role_down(msg.RoleDown("gpu_worker", 0, 10, "CUDA error"), [])
        await health_is(f, NOT_SERVING)
        return f

    f = run(scenario)
    assert parts.journal == ["requests of 0 failed: gpu_worker 0 failed: CUDA error (restarted=True)",
                             "controls of 0 failed: Unavailable: gpu_worker 0 failed: CUDA error",
                             "models of 0 forgotten"]
    assert f.not_ready_reason() == "a gpu_worker or every compositor is not alive"


def test_a_silent_worker_fails_its_work_but_keeps_its_blocks_and_models(tmp_path: Path,
                                                                        clock: Clock) -> None:
    """Worker 0 silent for three heartbeats: its requests fail as not restarted (it may
    still write their blocks), its controls fail, its models are not forgotten (it may come
    back holding them); NOT_SERVING until it is heard again, then SERVING."""
    parts = Parts()

    async def scenario() -> Frontend:
        f = await serving(tmp_path, parts)
        for _ in range(8):  # 2 s, checked twice a heartbeat; the compositors keep beating
            clock.now += 0.25
            f._on_heartbeat(beat("compositor", 0, 20), [])
            f._apply(f.liveness.check())
        await health_is(f, NOT_SERVING)
        assert f.not_ready_reason() is not None
        f._on_heartbeat(beat("gpu_worker", 0, 10, loaded_models={"a": 5}), [])
        await health_is(f, SERVING)
        return f

    f = run(scenario)
    assert parts.journal == [
        "requests of 0 failed: gpu_worker 0 is unavailable (no heartbeat) (restarted=False)",
        "controls of 0 failed: Unavailable: gpu_worker 0 is unavailable (no heartbeat)",
        "0 holds {'a': 5}"]
    assert f.not_ready_reason() is None


def test_a_lost_compositor_fails_nothing_while_another_serves(tmp_path: Path,
                                                              clock: Clock) -> None:
    """A compositor announces its death: nothing is failed (its jobs go to the others) and,
    one compositor still alive, the box stays SERVING."""
    parts = Parts()

    async def scenario() -> Frontend:
        f = await serving(tmp_path, parts)
        f._on_role_down(msg.RoleDown("compositor", 1, 21, "killed"), [])
        await health_is(f, SERVING)
        return f

    f = run(scenario)
    assert parts.journal == [] and f.not_ready_reason() is None


def test_health_is_serving_only_while_running(tmp_path: Path, clock: Clock) -> None:
    """Every role alive but the frontend still starting, or draining: NOT_SERVING and a
    503 reason; running: SERVING. Two changes decided in one step end on the last."""
    parts = Parts()

    async def scenario() -> list[str | None]:
        f = frontend(config(tmp_path), parts)
        reasons = []
        f.state = State.STARTING
        f._apply([])
        reasons.append(f.not_ready_reason())
        f.state = State.RUNNING
        f._apply([])
        reasons.append(f.not_ready_reason())
        f.state = State.DRAINING
        f._apply([])
        reasons.append(f.not_ready_reason())
        await health_is(f, NOT_SERVING)
        await asyncio.sleep(0.05)
        assert await health_statuses(f) == {NOT_SERVING}
        return reasons

    assert run(scenario) == ["starting", None, "draining"]


def test_a_failed_preloaded_model_makes_the_box_not_ready_until_it_loads(tmp_path: Path,
                                                                        clock: Clock) -> None:
    """Every role alive but the preloaded model FAILED: NOT_SERVING, the reason naming the
    model and its error; once it is ready (a LoadModel), SERVING again."""
    parts = Parts()

    async def scenario() -> tuple[str | None, str | None]:
        f = frontend(config(tmp_path), parts)
        parts.models = [ModelView("a", state=FAILED, error="bad UNet")]
        f._apply([])
        await health_is(f, NOT_SERVING)
        why = f.not_ready_reason()
        parts.models = [ModelView("a", state=READY, worker=0)]
        f._apply([])
        await health_is(f, SERVING)
        return why, f.not_ready_reason()

    why, after = run(scenario)
    assert why == "preloaded model 'a' failed to load: bad UNet" and after is None
