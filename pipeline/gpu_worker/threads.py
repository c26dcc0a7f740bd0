"""How many threads a CPU worker's UNet runs get: the cores split between the inference and
the rest of a frame's work, from what each measurably costs.

On a CPU box every frame costs the worker's UNet run (multi-threaded), its audio features
and visual input (the engine's thread), and a compositor's paste and JPEG (another
process), all on the same cores. Too few inference threads leave cores idle while the UNet
is the bottleneck; too many preempt the compositors, and a UNet thread preempted mid-layer
stalls the others at the layer's end. The split that keeps both stages fed gives each
stage the share of the cores that it takes of a frame's CPU:

    threads = round(cores × unet / (unet + prepare + composite))     (1 <= threads <= cores)

with `unet`, `prepare` and `composite` the CPU seconds per frame measured while serving:
the worker's process CPU over its UNet runs, its engine thread's CPU over preparing the
requests, and the compositors' CPU per frame (reported with each credit). `cores` is this
worker's share of the cores the process may run on (its affinity divided among the box's
CPU workers). A worker starts with every core of its share, re-plans once PLAN_FRAMES frames
have been measured, and again whenever the plan has moved; a new plan rebuilds the loaded
UNets on the loader thread (engine.py). `gpus.intra_op_threads` > 0 fixes the count instead.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

PLAN_FRAMES = 200      # frames measured before a (re)plan: a few seconds of one live session
EWMA = 0.2


def worker_cores(cpu_workers: int) -> int:
    """The cores this worker may use: its process's affinity, shared among `cpu_workers`."""
    try:
        available = len(os.sched_getaffinity(0))
    except AttributeError:  # no affinity on this platform
        available = os.cpu_count() or 1
    return max(1, available // max(1, cpu_workers))


def split(cores: int, unet_s: float, other_s: float) -> int:
    """Inference threads of `cores` for a UNet costing `unet_s` CPU seconds per frame beside
    `other_s` of other work per frame on the same cores."""
    if unet_s <= 0:
        return cores
    return max(1, min(cores, round(cores * unet_s / (unet_s + max(0.0, other_s)))))


@dataclass
class StageCpu:
    """CPU seconds per frame of each stage (EWMA over runs), None until measured."""

    unet: float | None = None
    prepare: float | None = None
    composite: float | None = None

    def as_ms(self) -> dict[str, float | None]:
        return {k: None if v is None else round(v * 1e3, 3) for k, v in
                (("unet", self.unet), ("prepare", self.prepare), ("composite", self.composite))}


def _ewma(old: float | None, new: float) -> float:
    return new if old is None else (1 - EWMA) * old + EWMA * new


class ThreadPlanner:
    """The measured per-frame CPU of the stages and the inference threads they call for.
    Fed by the engine's thread (UNet, prepare) and the link thread (composite): each feed
    replaces one float, which another thread reads whole."""

    def __init__(self, cores: int, threads: int, fixed: bool) -> None:
        self.cores = cores
        self.threads = threads        # what the loaded UNets run with now
        self.fixed = fixed            # gpus.intra_op_threads set: never re-planned
        self.cpu = StageCpu()
        self.frames = 0               # measured since the last plan

    def unet(self, frames: int, cpu_s: float) -> None:
        if frames > 0:
            self.cpu.unet = _ewma(self.cpu.unet, cpu_s / frames)
            self.frames += frames

    def prepare(self, frames: int, cpu_s: float) -> None:
        if frames > 0:
            self.cpu.prepare = _ewma(self.cpu.prepare, cpu_s / frames)

    def composite(self, cpu_s: float) -> None:
        """A compositing job's frames took `cpu_s` each."""
        self.cpu.composite = _ewma(self.cpu.composite, cpu_s)

    def planned(self) -> int | None:
        """The threads the measurements call for; None before any UNet run was measured."""
        if self.cpu.unet is None:
            return None
        return split(self.cores, self.cpu.unet,
                     (self.cpu.prepare or 0.0) + (self.cpu.composite or 0.0))

    def due(self) -> int | None:
        """A new thread count to rebuild with, when enough frames were measured since the
        last plan and it differs from the current one; None otherwise. Resets the count."""
        if self.fixed or self.frames < PLAN_FRAMES:
            return None
        self.frames = 0
        planned = self.planned()
        return planned if planned is not None and planned != self.threads else None

    def snapshot(self) -> dict[str, object]:
        return {"cores": self.cores, "threads": self.threads, "fixed": self.fixed,
                "planned": self.planned(), "cpu_ms_per_frame": self.cpu.as_ms()}
