"""A request's frames as compositor jobs: how they are cut."""
from __future__ import annotations

import pytest

from pipeline.gpu_worker.jobs import JOB_FRAMES, job_spans


@pytest.mark.parametrize(("frames", "compositors", "sizes"), [
    (0, 2, []), (1, 2, [1]), (2, 2, [1, 1]), (5, 2, [3, 2]), (8, 2, [4, 4]),
    (9, 2, [3, 3, 3]), (32, 2, [4] * 8), (8, 1, [4, 4]), (3, 8, [1, 1, 1]), (10, 4, [3, 3, 2, 2])])
def test_job_spans_cover_the_frames_in_order(frames: int, compositors: int, sizes: list[int]) -> None:
    """Every frame in exactly one job, in order; a job for each compositor while there are
    frames for it; none longer than JOB_FRAMES; sizes within one of each other."""
    spans = job_spans(frames, compositors)
    assert [len(s) for s in spans] == sizes
    assert [i for s in spans for i in s] == list(range(frames))
    assert all(len(s) <= JOB_FRAMES for s in spans)
