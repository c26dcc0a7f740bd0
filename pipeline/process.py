"""The fixed prologue every role process runs: parent-death detection, process title,
logging with a role prefix, readiness report, and "log and tell the parent" on failure.
"""
from __future__ import annotations

import ctypes
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable
from multiprocessing.connection import Connection

import setproctitle

log = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1
LOG_FORMAT = "%(asctime)s %(levelname)s [%(role)s] %(name)s: %(message)s"


class _RoleFilter(logging.Filter):
    def __init__(self, role: str) -> None:
        super().__init__()
        self.role = role

    def filter(self, record: logging.LogRecord) -> bool:
        record.role = self.role
        return True


def setup_logging(role: str, level: int = logging.INFO) -> None:
    """One log format for every role: time, level, [role], logger, message."""
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(_RoleFilter(role))
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists (a pid we may not signal still exists)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def die_with_parent() -> None:
    """Ask the kernel for SIGTERM when the parent dies; exit now if it already has."""
    parent = os.getppid()
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):  # not Linux: the supervisor's sentinel watch remains
        return
    # the parent may have died before prctl was armed
    if os.getppid() != parent or parent == 1:
        os._exit(1)


class Readiness:
    """Tells whoever started this role that it is ready (or why it failed)."""

    def __init__(self, conn: Connection | None) -> None:
        self._conn = conn

    def ready(self) -> None:
        self._send(("ready", os.getpid()))

    def failed(self, reason: str) -> None:
        self._send(("failed", reason))

    def _send(self, message: tuple[str, object]) -> None:
        if self._conn is None:
            return
        try:
            self._conn.send(message)
            self._conn.close()
        except OSError:
            pass
        self._conn = None


def run_role(role: str, ready_conn: Connection | None,
             body: Callable[[Readiness, threading.Event], None]) -> None:
    """Run a role's body under the common prologue; never returns normally with an error.

    `body(readiness, stop)` must call readiness.ready() once it serves, and return soon
    after `stop` is set (SIGTERM). SIGINT is ignored: the supervisor orchestrates shutdown.
    """
    die_with_parent()
    setproctitle.setproctitle(f"lipsync: {role}")
    setup_logging(role)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    readiness = Readiness(ready_conn)
    try:
        body(readiness, stop)
    except Exception as exc:
        log.exception("%s failed", role)
        readiness.failed(f"{role}: {type(exc).__name__}: {exc}")
        logging.shutdown()
        os._exit(1)
    logging.shutdown()
