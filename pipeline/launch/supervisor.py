"""`lipsync serve`: start every role with the spawn context, serve once all are ready,
restart a dead role with backoff, and on SIGINT/SIGTERM stop everything and leave no
process and no shared-memory segment behind.
"""
from __future__ import annotations

import logging
import multiprocessing as mp
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing import resource_tracker
from multiprocessing.connection import Connection, wait
from typing import Any

from pipeline.compositor.proc import run_compositor_process
from pipeline.config import Config
from pipeline.frontend.server import run_frontend_process
from pipeline.gpu_worker.device import resolve_provider
from pipeline.gpu_worker.proc import run_gpu_worker_process
from pipeline.gpu_worker.unet import Backend
from pipeline.launch.common import prepare_runtime
from pipeline.shm.segment import sweep_stale_segments

log = logging.getLogger(__name__)

STOP_TIMEOUT_S = 4.0         # after the frontend's drain: SIGTERM, then SIGKILL
STABLE_AFTER_S = 60.0        # a role up this long has its backoff reset


@dataclass
class Role:
    name: str
    target: Callable[..., None]
    args: tuple[Any, ...]
    process: Any = None
    ready_conn: Connection | None = None
    started_at: float = 0.0
    restarts: int = 0
    pids: list[int] = field(default_factory=list)


class Supervisor:
    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.ctx = mp.get_context("spawn")
        provider = resolve_provider(cfg.gpus.provider, cfg.gpus.count)
        # a precision the provider or this CPU cannot run stops the start here, by name
        backend = Backend.of(provider, cfg.gpus.unet_precision)
        log.info("%d %s gpu_worker(s) (%s), %d compositor(s)", cfg.gpus.count, provider,
                 backend.precision, cfg.compositor.pool_size)
        self.roles = (
            [Role(f"compositor {i}", run_compositor_process, (cfg, i))
             for i in range(cfg.compositor.pool_size)]
            + [Role(f"gpu_worker {i}", run_gpu_worker_process, (cfg, i, provider))
               for i in range(cfg.gpus.count)]
            + [Role("frontend", run_frontend_process, (cfg,))])
        self._stopping = False

    def _start(self, role: Role) -> None:
        parent_conn, child_conn = self.ctx.Pipe(duplex=False)
        role.process = self.ctx.Process(target=role.target, args=(*role.args, child_conn),
                                        name=role.name, daemon=False)
        role.process.start()
        child_conn.close()
        role.ready_conn = parent_conn
        role.started_at = time.monotonic()
        role.pids.append(role.process.pid)

    def serve(self) -> int:
        """Serve until SIGINT/SIGTERM; returns the process exit code."""
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: self._request_stop())
        signal.signal(signal.SIGHUP, lambda *_: self._forward_reload())
        prepare_runtime(self.cfg)  # before any role is spawned: they inherit its settings
        try:
            for role in self.roles:
                self._start(role)
            if not self._wait_ready():
                return 1
            log.info("all roles ready; gRPC on %s:%d", self.cfg.server.host, self.cfg.server.port)
            self._watch()
            return 0
        finally:
            self._stop_all()

    def _request_stop(self) -> None:
        self._stopping = True

    def _forward_reload(self) -> None:
        """SIGHUP (systemctl reload): the frontend re-reads its tokens."""
        frontend = self.roles[-1].process
        if frontend is not None and frontend.is_alive():
            os.kill(frontend.pid, signal.SIGHUP)

    def _wait_ready(self) -> bool:
        deadline = time.monotonic() + self.cfg.runtime.start_timeout_s
        waiting: dict[object, Role] = {r.ready_conn: r for r in self.roles if r.ready_conn}
        while waiting and not self._stopping:
            if time.monotonic() > deadline:
                log.error("not ready after %.0f s: %s", self.cfg.runtime.start_timeout_s,
                          ", ".join(r.name for r in waiting.values()))
                return False
            for conn in wait([r.ready_conn for r in waiting.values() if r.ready_conn], timeout=0.2):
                role = waiting.pop(conn)
                assert role.ready_conn is not None
                try:
                    status, detail = role.ready_conn.recv()
                except EOFError:
                    status, detail = "failed", f"exited with code {role.process.exitcode}"
                if status != "ready":
                    log.error("%s failed to start: %s", role.name, detail)
                    return False
        return not self._stopping

    def _watch(self) -> None:
        while not self._stopping:
            sentinels = {r.process.sentinel: r for r in self.roles}
            for sentinel in wait(list(sentinels), timeout=0.2):
                role = sentinels[sentinel]
                if self._stopping:
                    break
                role.process.join()
                log.error("%s (pid %d) died with exit code %s", role.name, role.process.pid,
                          role.process.exitcode)
                sweep_stale_segments(self.cfg.runtime.instance, pids={role.process.pid})
                if time.monotonic() - role.started_at > STABLE_AFTER_S:
                    role.restarts = 0
                delay = min(0.5 * 2 ** min(role.restarts, 16), self.cfg.runtime.restart_backoff_max_s)
                role.restarts += 1
                log.info("restarting %s in %.1f s", role.name, delay)
                end = time.monotonic() + delay
                while time.monotonic() < end and not self._stopping:
                    time.sleep(0.05)
                if not self._stopping:
                    self._start(role)

    def _stop_all(self) -> None:
        """The frontend first (it drains: no new work, in-flight work finishes on the other
        roles), then the rest; SIGKILL what outlives the timeout."""
        live = [r.process for r in reversed(self.roles) if r.process is not None]
        frontend, rest = live[0], live[1:]
        server = self.cfg.server
        deadline = time.monotonic() + server.drain_delay_s + server.shutdown_grace_s + STOP_TIMEOUT_S
        if frontend.is_alive():
            os.kill(frontend.pid, signal.SIGTERM)
            frontend.join(max(0.0, deadline - STOP_TIMEOUT_S + 1 - time.monotonic()))
        for p in rest:
            if p.is_alive():
                os.kill(p.pid, signal.SIGTERM)
        for p in live:
            p.join(max(0.0, deadline - time.monotonic()))
        for p in live:
            if p.is_alive():
                log.warning("%s did not stop in time; killing it", p.name)
                p.kill()
                p.join()
        pids = {pid for r in self.roles for pid in r.pids}
        sweep_stale_segments(self.cfg.runtime.instance, pids=pids)
        # the spawn context started multiprocessing's resource tracker for us; reap it too,
        # so nothing of ours outlives this process
        stop_tracker = getattr(resource_tracker._resource_tracker, "_stop", None)
        if stop_tracker is not None:
            stop_tracker()
        log.info("stopped")
