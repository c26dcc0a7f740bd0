"""Which roles are alive, from their heartbeats and announcements (no process): the events
each observation implies, and silence judged on the frontend's awake clock."""
from __future__ import annotations

import asyncio
from pathlib import Path

from pipeline import messages as msg
from pipeline.config import parse_config
from pipeline.frontend.liveness import CompositorLost, Liveness, WorkerHolds, WorkerLost
from tests.unit.frontend.fakes import Clock


def view(tmp_path: Path, workers: int = 1, compositors: int = 2) -> Liveness:
    cfg = parse_config({"gpus": {"count": workers}, "compositor": {"pool_size": compositors},
                        "runtime": {"heartbeat_s": 0.5}, "models": {}}, base_dir=tmp_path)
    return Liveness(cfg)


def beat(role: str, index: int, pid: int, **fields: object) -> msg.Heartbeat:
    return msg.Heartbeat(role=role, index=index, pid=pid, **fields)  # type: ignore[arg-type]


def test_every_role_reported_once_each_has_beaten(tmp_path: Path, clock: Clock) -> None:
    """all_reported is set when the worker and the whole compositor pool have been heard;
    a worker's heartbeat says what it holds."""
    async def scenario() -> tuple[bool, list, bool]:
        live = view(tmp_path)
        events = live.heard(beat("gpu_worker", 0, 10, loaded_models={"demo": 5}, cuda=True))
        before = live.all_reported.is_set()
        live.heard(beat("compositor", 0, 20))
        live.heard(beat("compositor", 1, 21))
        return before, events, live.all_reported.is_set()

    before, events, after = asyncio.run(scenario())
    assert not before and after
    assert events == [WorkerHolds(0, {"demo": 5})]


def test_a_new_pid_is_a_restart_and_fails_what_the_old_one_held(tmp_path: Path,
                                                              clock: Clock) -> None:
    """A worker's pid changes: WorkerLost(restarted) and a restart counted; a compositor's:
    CompositorLost (its jobs go to the others)."""
    live = view(tmp_path)
    live.heard(beat("gpu_worker", 0, 10))
    live.heard(beat("compositor", 1, 20))
    events = live.heard(beat("gpu_worker", 0, 11))
    assert events[0] == WorkerLost(0, "gpu_worker 0 restarted", True)
    assert live.workers[0].restarts == 1
    assert live.heard(beat("compositor", 1, 22)) == [CompositorLost(1, "compositor 1 restarted")]


def test_an_announced_death_is_dead_now_and_its_last_beats_are_not_believed(
        tmp_path: Path, clock: Clock) -> None:
    """RoleDown from the worker's own pid: WorkerLost at once; a heartbeat of that pid still in
    flight does not bring it back; one of its successor does. A stale RoleDown (another
    pid) changes nothing."""
    live = view(tmp_path)
    live.heard(beat("gpu_worker", 0, 10))
    assert live.announced(msg.RoleDown("gpu_worker", 0, 99, "stale")) == []
    (lost,) = live.announced(msg.RoleDown("gpu_worker", 0, 10, "CUDA error"))
    assert lost == WorkerLost(0, "gpu_worker 0 failed: CUDA error", True)
    assert live.heard(beat("gpu_worker", 0, 10)) == [] and live.worker(0) is None
    live.heard(beat("gpu_worker", 0, 12))
    assert live.worker(0) is not None
    live.heard(beat("compositor", 0, 20))
    assert live.announced(msg.RoleDown("compositor", 0, 20, "killed")) == [
        CompositorLost(0, "compositor 0 failed: killed")]


def test_silence_beyond_three_heartbeats_is_death_once(tmp_path: Path, clock: Clock) -> None:
    """A role not heard for 3 heartbeats (checked twice a heartbeat): one WorkerLost (not
    restarted: it may still be computing) or CompositorLost; the box is then not healthy."""
    live = view(tmp_path, compositors=1)
    live.heard(beat("gpu_worker", 0, 10))
    live.heard(beat("compositor", 0, 20))
    assert live.healthy()
    events = []
    for _ in range(4):  # 2 s, checked every 0.25 s
        for _ in range(2):
            clock.now += 0.25
            if _ == 0:
                live.heard(beat("compositor", 0, 20))
            events += live.check()
    assert events == [WorkerLost(0, "gpu_worker 0 is unavailable (no heartbeat)", False)]
    assert not live.healthy() and live.worker(0) is None
    events = []
    for _ in range(8):
        clock.now += 0.25
        events += live.check()
    assert events == [CompositorLost(0, "compositor 0 is unavailable (no heartbeat)")]


def test_a_frozen_frontend_does_not_take_its_own_stall_for_its_peers_silence(
        tmp_path: Path, clock: Clock) -> None:
    """The frontend stops for 5 s (SIGSTOP, a stalled loop): right after waking, before and
    after its first check, its peers are alive, and their heartbeats of the frozen time,
    read from its inbox, keep them so. A peer that stays silent after the wake-up is found
    within its 3 heartbeats of awake time."""
    live = view(tmp_path, compositors=1)
    live.heard(beat("gpu_worker", 0, 10))
    live.heard(beat("compositor", 0, 20))
    live.check()
    clock.now += 5.0                                   # frozen
    assert live.worker(0) is not None and live.healthy()
    assert live.check() == []                          # the stall is not their silence
    live.heard(beat("compositor", 0, 20))              # its beats waited in the inbox
    events = []
    for _ in range(8):                                 # awake, the worker stays silent
        clock.now += 0.25
        live.heard(beat("compositor", 0, 20))
        events += live.check()
    assert events == [WorkerLost(0, "gpu_worker 0 is unavailable (no heartbeat)", False)]


def test_what_the_views_report(tmp_path: Path, clock: Clock) -> None:
    """The roles' pids (the capacity samples them), whether a GPU runs, and the snapshot."""
    live = view(tmp_path, workers=2)
    live.heard(beat("gpu_worker", 0, 10, cuda=True, queue_depth=3))
    live.heard(beat("compositor", 0, 20))
    assert sorted(live.role_pids()) == [10, 20] and live.cuda()
    snap = live.snapshot()
    assert snap["gpu_workers"][0]["queue_depth"] == 3 and snap["gpu_workers"][0]["alive"]
    assert not snap["gpu_workers"][1]["alive"] and snap["compositors"][0]["pid"] == 20
    assert not live.all_alive()
