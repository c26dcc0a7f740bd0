"""Which gpu_workers and compositors are alive, from their heartbeats and announcements.

Pure state: each observation (a heartbeat, a RoleDown, a periodic check) returns the events
it implies — a worker restarted or went silent, a compositor was lost, what a worker holds —
and the frontend applies them to the in-flight table and the model registry.

Silence is judged on the frontend's awake clock: the time it was itself running to hear a
heartbeat. A frontend frozen by SIGSTOP, a long GC or a stalled event loop hears nobody
meanwhile; on waking, that time is not its peers' silence (their heartbeats of the frozen
time wait in its inbox).
"""
from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import Any

import msgspec

from pipeline import messages as msg
from pipeline.config import Config
from pipeline.runtime.process import LIVENESS_BEATS

log = logging.getLogger(__name__)



@dataclass
class RoleView:
    """One gpu_worker or compositor as its heartbeats describe it."""

    pid: int = 0
    last_seen: float = 0.0    # on the awake clock
    silent: bool = False      # missed its heartbeats (or announced its death)
    restarts: int = 0         # pid changes seen
    device_memory_used_bytes: int = 0
    queue_depth: int = 0
    models: dict[str, int] = field(default_factory=dict)  # what a worker reports holding
    exited_pid: int = 0       # announced its exit: its last heartbeats are not believed
    jobs: dict[str, Any] = field(default_factory=dict)  # a gpu_worker's compositor jobs
    cuda: bool = False
    backend: dict[str, Any] = field(default_factory=dict)  # a gpu_worker's: what runs it

    def alive(self, awake: float, heartbeat_s: float) -> bool:
        return (self.pid != 0 and not self.silent
                and awake - self.last_seen < LIVENESS_BEATS * heartbeat_s)


@dataclass(frozen=True)
class WorkerLost:
    """A gpu_worker's requests fail. `restarted`: it can no longer write into their blocks
    (a new process, or it announced its exit); else it is only silent and may still."""

    index: int
    reason: str
    restarted: bool


@dataclass(frozen=True)
class CompositorLost:
    index: int
    reason: str


@dataclass(frozen=True)
class WorkerHolds:
    index: int
    models: dict[str, int]


Event = WorkerLost | CompositorLost | WorkerHolds


class Liveness:
    def __init__(self, cfg: Config) -> None:
        self.heartbeat_s = cfg.runtime.heartbeat_s
        self.pool_size = cfg.compositor.pool_size
        self.workers = [RoleView() for _ in range(cfg.gpus.count)]
        self.compositors: dict[int, RoleView] = {}
        self.all_reported = asyncio.Event()  # every role has been heard from
        self._tick = time.monotonic()        # the last periodic check
        self._asleep = 0.0                   # seconds the frontend was stalled, so far

    def awake(self) -> float:
        """The awake clock: monotonic time less every stall of the frontend. A check runs
        twice a heartbeat; a gap beyond a heartbeat was a stall — also the one that has not
        ended in a check yet, so nothing is judged dead in the moment after waking."""
        now = time.monotonic()
        return now - self._asleep - max(0.0, now - self._tick - self.heartbeat_s)

    def role_pids(self) -> list[int]:
        """Every role's process as last heard (the capacity samples their CPU)."""
        return [v.pid for v in (*self.workers, *self.compositors.values()) if v.pid]

    def cuda(self) -> bool:
        return any(w.cuda for w in self.workers)

    def heard(self, m: msg.Heartbeat) -> list[Event]:
        events: list[Event] = []
        if m.role == "compositor":
            view = self.compositors.setdefault(m.index, RoleView())
            if m.pid == view.exited_pid:
                return events
            if view.pid and view.pid != m.pid:
                view.restarts += 1
                log.warning("compositor %d restarted (pid %d -> %d)", m.index, view.pid, m.pid)
                if not view.silent:
                    events.append(CompositorLost(m.index, f"compositor {m.index} restarted"))
        elif 0 <= m.index < len(self.workers):
            view = self.workers[m.index]
            if m.pid == view.exited_pid:
                return events
            if view.pid and view.pid != m.pid:
                view.restarts += 1
                log.warning("gpu_worker %d restarted (pid %d -> %d)", m.index, view.pid, m.pid)
                events.append(WorkerLost(m.index, f"gpu_worker {m.index} restarted", True))
            view.models, view.cuda = m.loaded_models, m.cuda
            view.backend = {"backend": m.backend, "precision": m.precision,
                            "threads": m.threads, "thread_plan": m.thread_plan}
            view.jobs = {"waiting": m.jobs_waiting, "redispatched": m.jobs_redispatched,
                         "compositors": [msgspec.structs.asdict(c) for c in m.compositors]}
            events.append(WorkerHolds(m.index, m.loaded_models))
        else:
            return events
        view.pid, view.last_seen, view.silent = m.pid, self.awake(), False
        view.device_memory_used_bytes = m.device_memory_used_bytes
        view.queue_depth = m.queue_depth
        if not self.all_reported.is_set() and self.all_alive():
            self.all_reported.set()
        return events

    def announced(self, m: msg.RoleDown) -> list[Event]:
        """A role said it is exiting, or the supervisor saw it exit: it is dead now, not
        after its heartbeats stop (told once: a role that raised is announced by both)."""
        views = self.compositors if m.role == "compositor" else dict(enumerate(self.workers))
        view = views.get(m.index)
        if view is not None and view.exited_pid == m.pid:
            return []
        log.error("%s %d (pid %d) is exiting: %s", m.role, m.index, m.pid, m.reason)
        if m.role == "compositor":
            view = self.compositors.get(m.index)
            if view is not None and view.pid == m.pid:
                view.silent, view.exited_pid = True, m.pid
                return [CompositorLost(m.index, f"compositor {m.index} failed: {m.reason}")]
            return []
        if 0 <= m.index < len(self.workers) and self.workers[m.index].pid == m.pid:
            view = self.workers[m.index]
            view.silent, view.exited_pid = True, m.pid
            return [WorkerLost(m.index, f"gpu_worker {m.index} failed: {m.reason}", True)]
        return []

    def check(self) -> list[Event]:
        """Roles that went silent since the last check (called twice a heartbeat)."""
        mono = time.monotonic()
        self._asleep += max(0.0, mono - self._tick - self.heartbeat_s)
        self._tick = mono
        now, events = self.awake(), list[Event]()
        for i, w in enumerate(self.workers):
            if w.pid and not w.silent and not w.alive(now, self.heartbeat_s):
                log.error("gpu_worker %d (pid %d) stopped answering", i, w.pid)
                w.silent = True
                events.append(WorkerLost(i, f"gpu_worker {i} is unavailable (no heartbeat)",
                                         False))
        for i, c in self.compositors.items():
            if c.pid and not c.silent and not c.alive(now, self.heartbeat_s):
                log.error("compositor %d (pid %d) stopped answering", i, c.pid)
                c.silent = True
                events.append(CompositorLost(i, f"compositor {i} is unavailable (no heartbeat)"))
        return events

    def worker(self, index: int) -> RoleView | None:
        """The worker's view when it is alive to take work, else None."""
        view = self.workers[index]
        return view if view.alive(self.awake(), self.heartbeat_s) else None

    def all_alive(self) -> bool:
        now = self.awake()
        compositors = sum(c.alive(now, self.heartbeat_s) for c in self.compositors.values())
        return all(w.alive(now, self.heartbeat_s) for w in self.workers) \
            and compositors >= self.pool_size

    def healthy(self) -> bool:
        """Every worker and at least one compositor alive (what SERVING means)."""
        now = self.awake()
        return (all(w.alive(now, self.heartbeat_s) for w in self.workers)
                and any(c.alive(now, self.heartbeat_s) for c in self.compositors.values()))

    def snapshot(self) -> dict[str, list[dict[str, Any]]]:
        now = self.awake()

        def view(index: int, v: RoleView) -> dict[str, Any]:
            return {"index": index, "pid": v.pid, "restarts": v.restarts,
                    "alive": v.alive(now, self.heartbeat_s), "queue_depth": v.queue_depth,
                    "device_memory_used_bytes": v.device_memory_used_bytes}

        return {"gpu_workers": [{**view(i, w), "compositor_jobs": w.jobs, "cuda": w.cuda,
                                 **w.backend}
                                for i, w in enumerate(self.workers)],
                "compositors": [view(i, c) for i, c in sorted(self.compositors.items())]}
