"""A request's frames as the CompositeJobs that carry them to the compositor pool.

Each job is one message to a compositor, one credit back and one wake-up of each side, so
a request's frames travel as a few jobs rather than one per frame: at least one per
compositor of the pool (all of them work on the request at once), at most JOB_FRAMES
frames each. A job that long keeps a live session's frames from waiting behind more than a
few frames of batch work that a compositor already holds (2.4-3 ms of paste + JPEG per
720p frame on the benchmark VM's cores; the live session's jobs are handed out first,
credits.py).
"""
from __future__ import annotations

import itertools
from collections.abc import Sequence

from pipeline import messages as msg
from pipeline.config.schema import CompositeMode
from pipeline.gpu_worker.avatar import Avatar
from pipeline.synctalk import PREDICTION_BYTES, PREDICTION_SHAPE

JOB_FRAMES = 4


def job_spans(frames: int, compositors: int) -> list[range]:
    """A request's frames [0, frames) as its jobs' spans, in order: one job per compositor
    while there are frames for it, none longer than JOB_FRAMES, sizes within one of each
    other."""
    if frames <= 0:
        return []
    jobs = min(frames, max(compositors, -(-frames // JOB_FRAMES)))
    size, longer = divmod(frames, jobs)
    bounds = [j * size + min(j, longer) for j in range(jobs + 1)]
    return [range(a, b) for a, b in itertools.pairwise(bounds)]


def composite_jobs(request_id: int, indices: Sequence[int], output: msg.TensorRef | None,
                   avatar: Avatar, mode: CompositeMode, jpeg_quality: int, live: bool,
                   compositors: int) -> list[msg.CompositeJob]:
    """The jobs of a request whose frame k shows background `indices[k]`: the compositors
    read each frame's prediction (row k of `output`; None: the background as it is) and
    background in place."""
    jobs = []
    for span in job_spans(len(indices), compositors):
        predictions = None if output is None else msg.TensorRef(
            output.segment, output.offset + span.start * PREDICTION_BYTES,
            (len(span), *PREDICTION_SHAPE), "float32")
        jobs.append(msg.CompositeJob(
            request_id=request_id, first_frame=span.start, predictions=predictions,
            backgrounds=tuple(avatar.background_ref(indices[k]) for k in span),
            rects=tuple(avatar.rect(indices[k]) for k in span),
            mode=mode, jpeg_quality=jpeg_quality, live=live))
    return jobs
