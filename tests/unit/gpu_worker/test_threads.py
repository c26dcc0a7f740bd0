"""The inference-thread split of CPU workers: cores shared in proportion to each stage's
measured CPU per frame, re-planned only after enough frames, never when fixed."""
from __future__ import annotations

import pytest

from pipeline.gpu_worker import threads
from pipeline.gpu_worker.threads import ThreadPlanner, split, worker_cores


def test_split_gives_each_stage_its_share_of_the_cores() -> None:
    """threads = round(cores x unet / (unet + other)), at least 1, at most every core."""
    assert split(2, unet_s=0.060, other_s=0.010) == 2        # 1.71 -> 2
    assert split(2, unet_s=0.010, other_s=0.030) == 1        # 0.5 -> at least one
    assert split(32, unet_s=0.060, other_s=0.010) == 27      # 27.4
    assert split(32, unet_s=0.030, other_s=0.030) == 16
    assert split(8, unet_s=0.050, other_s=0.0) == 8
    assert split(4, unet_s=0.0, other_s=0.5) == 4            # nothing measured: every core


def test_worker_cores_divides_the_affinity_among_cpu_workers() -> None:
    """Each of N CPU workers plans over its share of the cores it may run on, at least one."""
    import os

    available = len(os.sched_getaffinity(0))
    assert worker_cores(1) == available
    assert worker_cores(available * 4) == 1


def test_a_plan_waits_for_enough_frames_then_follows_the_measurements(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """No plan before PLAN_FRAMES frames of UNet runs; then the measured split, once, and
    nothing while it stays the same."""
    monkeypatch.setattr(threads, "PLAN_FRAMES", 16)
    planner = ThreadPlanner(cores=4, threads=4, fixed=False)
    assert planner.planned() is None and planner.due() is None
    planner.composite(0.030)          # compositing costs as much as the UNet per frame
    planner.prepare(8, 8 * 0.010)
    planner.unet(8, 8 * 0.040)
    assert planner.due() is None      # 8 frames: too few
    planner.unet(8, 8 * 0.040)
    assert planner.planned() == 2     # 4 x 40 / (40 + 10 + 30)
    assert planner.due() == 2
    planner.threads = 2
    planner.unet(16, 16 * 0.040)
    assert planner.due() is None      # the same plan: no rebuild
    snapshot = planner.snapshot()
    assert snapshot["threads"] == 2 and snapshot["planned"] == 2
    assert snapshot["cpu_ms_per_frame"] == {"unet": 40.0, "prepare": 10.0, "composite": 30.0}


def test_a_fixed_thread_count_is_never_replanned(monkeypatch: pytest.MonkeyPatch) -> None:
    """gpus.intra_op_threads > 0 (or CUDA): measured, reported, never rebuilt."""
    monkeypatch.setattr(threads, "PLAN_FRAMES", 1)
    planner = ThreadPlanner(cores=4, threads=3, fixed=True)
    planner.composite(1.0)
    planner.unet(10, 0.1)
    assert planner.planned() == 1 and planner.due() is None
