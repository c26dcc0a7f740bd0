"""`lipsync serve`: start every role with the spawn context, serve once all are ready,
restart a dead role with backoff, and on SIGINT/SIGTERM stop everything and leave no
process and no shared-memory segment behind.

A role that dies is seen at once (its exit status, then its sentinel), however it died. A
gpu_worker or compositor killed by a signal cannot announce its own death: the supervisor
does (the RoleDown of the role's prologue, saying which signal), so a SIGKILLed worker's
requests fail at once, not after its heartbeats go silent; one that raised has announced
itself, with the cause.
"""
from __future__ import annotations

import logging
import math
import multiprocessing as mp
import os
import select
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing import resource_tracker
from multiprocessing.connection import Connection, wait
from typing import Any

import zmq

from pipeline import messages as msg
from pipeline.compositor.proc import run_compositor_process
from pipeline.config import Config
from pipeline.frontend.server import run_frontend_process
from pipeline.gpu_worker.device import resolve_provider
from pipeline.gpu_worker.device_compositor import unavailable as device_compositor_unavailable
from pipeline.gpu_worker.proc import run_gpu_worker_process
from pipeline.gpu_worker.unet import Backend
from pipeline.launch.common import prepare_runtime
from pipeline.runtime.addresses import Addresses
from pipeline.runtime.process import ExitWatch, exit_reason, role_down
from pipeline.runtime.sockets import make_socket
from pipeline.shm.segment import sweep_stale_segments

log = logging.getLogger(__name__)

STOP_TIMEOUT_S = 4.0         # after the frontend's drain: SIGTERM, then SIGKILL
STABLE_AFTER_S = 60.0        # a role up this long has its backoff reset
# A killed process's sentinel fires only once the kernel has torn it down (its last thread
# gone, its memory freed: measured 0.1-0.9 s for a 0.5 GB worker on a busy 2-core box),
# though it is a zombie, its exit status set, within milliseconds: the watch also reads
# that status this often
WATCH_S = 0.05


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
    exits: ExitWatch | None = None  # its exit status before its sentinel fires
    announced: bool = True       # its death goes to the frontend (not the frontend's own)


class Supervisor:
    def __init__(self, cfg: Config, stop_with_parent: bool = False) -> None:
        """`stop_with_parent`: stop as on SIGTERM once the process that started this one
        has exited (a bench's own server; seen by the watch, which runs anyway)."""
        self.cfg = cfg
        self._parent = os.getppid() if stop_with_parent else None
        self.ctx = mp.get_context("spawn")
        provider = resolve_provider(cfg.gpus.provider, cfg.gpus.count)
        # a precision the provider or this CPU cannot run stops the start here, by name
        backend = Backend.of(provider, cfg.gpus.unet_precision)
        if cfg.compositor.device == "gpu" and (reason := device_compositor_unavailable(provider)):
            raise ValueError(reason)
        log.info("%d %s gpu_worker(s) (%s), %d compositor(s)", cfg.gpus.count, provider,
                 backend.precision, cfg.compositor.pool_size)
        self.roles = (
            [Role(f"compositor {i}", run_compositor_process, (cfg, i))
             for i in range(cfg.compositor.pool_size)]
            + [Role(f"gpu_worker {i}", run_gpu_worker_process, (cfg, i, provider))
               for i in range(cfg.gpus.count)]
            + [Role("frontend", run_frontend_process, (cfg,), announced=False)])
        self._stopping = False
        self._frontend: zmq.Socket[bytes] | None = None  # where deaths are announced

    def _start(self, role: Role) -> None:
        parent_conn, child_conn = self.ctx.Pipe(duplex=False)
        role.process = self.ctx.Process(target=role.target, args=(*role.args, child_conn),
                                        name=role.name, daemon=False)
        role.process.start()
        child_conn.close()
        if role.exits is not None:
            role.exits.close()
        role.exits = ExitWatch(role.process.pid)
        role.ready_conn = parent_conn
        role.started_at = time.monotonic()
        role.pids.append(role.process.pid)

    def serve(self) -> int:
        """Serve until SIGINT/SIGTERM; returns the process exit code."""
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: self._request_stop())
        signal.signal(signal.SIGHUP, lambda *_: self._forward_reload())
        prepare_runtime(self.cfg)  # before any role is spawned: they inherit its settings
        ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
        self._frontend = make_socket(ctx, zmq.PUSH, connect=[Addresses.of(self.cfg).frontend_inbox])
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
            self._frontend.close(0)
            ctx.term()

    def _request_stop(self) -> None:
        self._stopping = True

    def _orphaned(self) -> bool:
        """The process that started this one has exited (this one was handed to init or a
        subreaper): with `stop_with_parent`, a stop as on SIGTERM."""
        if self._parent is None or os.getppid() == self._parent:
            return False
        if not self._stopping:
            log.warning("the process that started this server (pid %d) exited; stopping",
                        self._parent)
        self._stopping = True
        return True

    def _forward_reload(self) -> None:
        """SIGHUP (systemctl reload): the frontend re-reads its tokens."""
        frontend = self.roles[-1].process
        if frontend is not None and frontend.is_alive():
            os.kill(frontend.pid, signal.SIGHUP)

    def _wait_ready(self) -> bool:
        deadline = time.monotonic() + self.cfg.runtime.start_timeout_s
        waiting: dict[object, Role] = {r.ready_conn: r for r in self.roles if r.ready_conn}
        while waiting and not self._stopping and not self._orphaned():
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
        """Each death as it happens: announced, its segments swept, its restart due after
        its backoff; the other roles stay watched meanwhile."""
        restarts: dict[str, tuple[float, Role]] = {}  # name -> (when, role)
        # the roles watched and their sentinels' poll, made again only when a role died or
        # restarted (20 wake-ups a second: the idle server's main cost, kept small)
        watched: dict[int, Role] = {}
        poller: select.poll | None = None
        while not self._stopping and not self._orphaned():
            now = time.monotonic()
            for name, (when, role) in list(restarts.items()):
                if when <= now:
                    del restarts[name]
                    role.process.join()  # reaped (torn down by now, or shortly)
                    self._start(role)
                    poller = None
            if poller is None:
                watched = {r.process.sentinel: r for r in self.roles if r.name not in restarts}
                poller = select.poll()
                for sentinel in watched:
                    poller.register(sentinel, select.POLLIN)
            timeout = min([WATCH_S, *(max(0.0, when - now) for when, _ in restarts.values())])
            ready = {fd for fd, _ in poller.poll(math.ceil(timeout * 1000))}
            for sentinel, role in watched.items():
                if self._stopping:
                    break
                assert role.exits is not None
                code = role.exits.exit_status()
                if code is None and sentinel in ready:  # its descriptors closed: exiting
                    role.process.join()
                    code = role.process.exitcode
                if code is not None:
                    restarts[role.name] = (time.monotonic() + self._died(role, code), role)
                    poller = None

    def _died(self, role: Role, exitcode: int | None) -> float:
        """Handle `role`'s death (its exit status as multiprocessing gives it); returns
        the backoff before its restart."""
        pid, reason = role.process.pid, exit_reason(exitcode)
        # killed by a signal, it could not say a word; one that exited with a status ran
        # its own code, which announced any error first (run_role) with its cause: a second
        # notice here could overtake that one (another connection) and blur the cause
        killed = exitcode is not None and exitcode < 0
        if role.announced and killed and self._frontend is not None:
            try:
                self._frontend.send(msg.encode(role_down(role.name, pid, reason)), zmq.NOBLOCK)
            except zmq.ZMQError:  # no frontend to tell (restarting): it learns from silence
                pass
        log.error("%s (pid %d) died: %s", role.name, pid, reason)
        sweep_stale_segments(self.cfg.runtime.instance, pids={pid})
        if time.monotonic() - role.started_at > STABLE_AFTER_S:
            role.restarts = 0
        delay = min(0.5 * 2 ** min(role.restarts, 16), self.cfg.runtime.restart_backoff_max_s)
        role.restarts += 1
        log.info("restarting %s in %.1f s", role.name, delay)
        return delay

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
        for role in self.roles:
            if role.exits is not None:
                role.exits.close()
        pids = {pid for r in self.roles for pid in r.pids}
        sweep_stale_segments(self.cfg.runtime.instance, pids=pids)
        # the spawn context started multiprocessing's resource tracker for us; reap it too,
        # so nothing of ours outlives this process
        stop_tracker = getattr(resource_tracker._resource_tracker, "_stop", None)
        if stop_tracker is not None:
            stop_tracker()
        log.info("stopped")
