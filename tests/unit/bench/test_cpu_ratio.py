"""`lipsync bench --compare inprocess`'s one figure of the pipeline's own cost."""
from __future__ import annotations

from pipeline.bench.main import cpu_ratio


def test_the_server_side_is_every_role_but_not_the_clients() -> None:
    cpu = {"client": 1.0, "frontend": 2.5, "gpu_worker 0": 18.0, "compositor 0": 11.0,
           "compositor 1": 11.5, "total": 44.0}
    assert cpu_ratio(cpu, 37.0) == {"server_cpu_ms_per_request": 43.0, "cpu_ratio": 1.162}


def test_no_ratio_without_the_roles_cpu() -> None:
    # a server run with another config than the bench's: its ops socket is not the one asked
    assert cpu_ratio({"client": 1.0, "total": 1.0}, 37.0) == {}
    assert cpu_ratio({}, 37.0) == {}
