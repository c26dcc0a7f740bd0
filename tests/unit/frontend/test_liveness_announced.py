"""A death told twice (the role's own RoleDown, then the supervisor's) is acted on once."""
from __future__ import annotations

from pathlib import Path

from pipeline import messages as msg
from pipeline.config import parse_config
from pipeline.frontend.liveness import Liveness, WorkerLost


def test_a_death_announced_twice_fails_the_worker_once() -> None:
    """The second RoleDown of the same pid (the supervisor's, after the role's own) yields
    no event; one of a later pid does."""
    cfg = parse_config({}, base_dir=Path("/srv/lipsync"))
    liveness = Liveness(cfg)
    liveness.heard(msg.Heartbeat(role="gpu_worker", index=0, pid=100))
    own = liveness.announced(msg.RoleDown("gpu_worker", 0, 100, "ValueError: bad"))
    again = liveness.announced(msg.RoleDown("gpu_worker", 0, 100, "exited with code 1"))
    assert [type(e) for e in own] == [WorkerLost] and again == []
    liveness.heard(msg.Heartbeat(role="gpu_worker", index=0, pid=101))
    assert [type(e) for e in liveness.announced(
        msg.RoleDown("gpu_worker", 0, 101, "killed by SIGKILL"))] == [WorkerLost]
