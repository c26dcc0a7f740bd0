"""What every way of starting the roles prepares first (`lipsync serve` once for all of
them, `lipsync role` for itself): thread settings, the socket directory, stale segments."""
from __future__ import annotations

import os

from pipeline.config import Config
from pipeline.shm.segment import sweep_stale_segments


def prepare_runtime(cfg: Config) -> None:
    """Parallelism comes from the processes and ONNX Runtime's own pool: BLAS threads would
    spin against them (set before numpy is first imported by a role, and inherited by
    spawned roles). The socket directory exists, and segments this instance's dead
    processes left are gone (only dead creators': roles running beside us keep theirs)."""
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    cfg.runtime.dir.mkdir(parents=True, exist_ok=True)
    sweep_stale_segments(cfg.runtime.instance)
