"""The fixed prologue every role process runs: parent-death detection, process title,
logging with a role prefix, readiness report, and "log and tell the parent" on failure.

A role spawned by `lipsync serve` reports through its pipe; a role run on its own
(`lipsync role ...`, a systemd unit) has no parent to tell or die with, and reports to
systemd instead (sd_notify: READY=1, STATUS=, STOPPING=1, WATCHDOG=1) when it runs as a
Type=notify service.
"""
from __future__ import annotations

import ctypes
import fcntl
import logging
import os
import signal
import socket
import threading
import time
from collections.abc import Callable
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Literal

import setproctitle
import zmq

from pipeline import messages as msg
from pipeline.runtime.logs import setup_logging
from pipeline.runtime.sockets import make_socket

log = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1
# A role silent this many heartbeats (runtime.heartbeat_s) is taken for frozen or dead:
# only the deaths nobody announces wait for this
LIVENESS_BEATS = 3
ANNOUNCE_LINGER_MS = 1000  # how long a death notice may take to leave

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


def sd_notify(state: str) -> bool:
    """Send one state datagram to systemd's $NOTIFY_SOCKET; False when there is none.

    The protocol of sd_notify(3), written out so that no dependency is needed: one
    datagram of newline-separated KEY=VALUE lines to an AF_UNIX socket, whose name is in
    the abstract namespace when it starts with '@'.
    """
    address = os.environ.get("NOTIFY_SOCKET", "")
    if not address.startswith(("/", "@")):
        return False
    if address[0] == "@":
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall(state.encode())
    except OSError as exc:
        log.warning("sd_notify(%r) failed: %s", state.split("\n", 1)[0], exc)
        return False
    return True


def watchdog_interval_s() -> float | None:
    """Half of systemd's WatchdogSec= for this process (None when the watchdog is off)."""
    usec, pid = os.environ.get("WATCHDOG_USEC", ""), os.environ.get("WATCHDOG_PID", "")
    if not usec.isdigit() or int(usec) == 0 or (pid and pid != str(os.getpid())):
        return None
    return int(usec) / 2e6


def role_down(role: str, pid: int, reason: str) -> msg.RoleDown:
    """The one death message of role `role` ("gpu_worker 0", "compositor 1"), whoever
    sends it: the role that raises (run_role), or the supervisor that saw it exit."""
    kind, _, index = role.partition(" ")
    kinds: dict[str, Literal["gpu_worker", "compositor"]] = {
        "gpu_worker": "gpu_worker", "compositor": "compositor"}
    if kind not in kinds:
        raise ValueError(f"no death message for role {role!r}")
    return msg.RoleDown(role=kinds[kind], index=int(index), pid=pid, reason=reason)


def failure_reason(exc: BaseException) -> str:
    """What a RoleDown says of an error: an operator's matter in its own words, a bug by
    its type too."""
    return str(exc) if isinstance(exc, RoleError) else f"{type(exc).__name__}: {exc}"


def exit_reason(exitcode: int | None) -> str:
    """What a RoleDown says of a process that exited (multiprocessing's exitcode)."""
    if exitcode is not None and exitcode < 0:
        try:
            return f"killed by {signal.Signals(-exitcode).name}"
        except ValueError:
            return f"killed by signal {-exitcode}"
    return f"exited with code {exitcode}"


class ExitWatch:
    """A child's exit status as the kernel shows it before the child is reaped, read from
    /proc/<pid>/stat through a descriptor kept open: the supervisor reads each role's many
    times a second, and a pread costs a fifth of an open, read and close (a file of /proc
    opened once names that process for good, never a later one given the same pid)."""

    def __init__(self, pid: int) -> None:
        try:
            self._fd: int | None = os.open(f"/proc/{pid}/stat", os.O_RDONLY | os.O_CLOEXEC)
        except OSError:  # no /proc: the status stays unknown (None)
            self._fd = None

    def exit_status(self) -> int | None:
        """As multiprocessing's exitcode (negative: the signal that killed it) once the
        process has exited; None while it runs, or where /proc cannot tell (reaped). A
        killed process is a zombie with its status set within milliseconds, long before
        the kernel has freed its memory."""
        if self._fd is None:
            return None
        try:
            fields = os.pread(self._fd, 4096, 0).rsplit(b")", 1)[1].split()
            if fields[0] not in (b"Z", b"X"):
                return None
            code = int(fields[-1])  # exit_code, in waitpid's format (Linux >= 3.5)
        except (OSError, IndexError, ValueError):
            return None
        return -(code & 0x7F) if code & 0x7F else (code >> 8) & 0xFF

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def announce_death(endpoint: str, down: msg.RoleDown) -> None:
    """Send `down` to `endpoint` (the frontend's inbox) on a socket of its own, waiting at
    most ANNOUNCE_LINGER_MS for it to leave."""
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    sock = make_socket(ctx, zmq.PUSH, connect=[endpoint])
    try:
        sock.send(msg.encode(down), zmq.NOBLOCK)
    except zmq.ZMQError as exc:
        log.error("could not announce this %s's death: %s", down.role, exc)
    finally:
        sock.close(ANNOUNCE_LINGER_MS)
        ctx.term()


class Readiness:
    """Tells whoever started this role that it is ready (or why it failed).

    With a pipe (`lipsync serve`) the supervisor is told. Without one, and when systemd
    started us as a Type=notify service ($NOTIFY_SOCKET), systemd is told, and when
    WatchdogSec= is set a daemon thread pings WATCHDOG=1 every WATCHDOG_USEC/2 from the
    start (start-up, which may load models for minutes, included) until the process ends.

    Its death too: `down(exc)` sends the role's RoleDown to `announce_to` (the frontend's
    inbox), once, as early as the role knows it is going to exit, if it was ever ready (one
    that failed to start is the supervisor's or systemd's to report, and may not even hold
    its role: another process of the instance does, which the frontend knows).
    """

    def __init__(self, conn: Connection | None, role: str = "",
                 announce_to: str | None = None) -> None:
        self._conn = conn
        self._role = role or "role"
        self._announce_to = announce_to
        self._served = False
        self._systemd = conn is None and bool(os.environ.get("NOTIFY_SOCKET"))
        interval = watchdog_interval_s() if self._systemd else None
        if interval is not None:
            threading.Thread(target=self._watchdog, args=(interval,), name="sd-watchdog",
                             daemon=True).start()

    def ready(self) -> None:
        self._served = True
        self._send(("ready", os.getpid()))
        self._notify(f"READY=1\nMAINPID={os.getpid()}\nSTATUS={self._role} serving")

    def failed(self, reason: str) -> None:
        self._send(("failed", reason))
        self._notify(f"STATUS=failed: {reason}")

    def down(self, exc: BaseException) -> None:
        """Announce that this role exits because of `exc` (the first call only)."""
        if self._announce_to is not None and self._served:
            announce_death(self._announce_to, role_down(self._role, os.getpid(),
                                                        failure_reason(exc)))
            self._announce_to = None

    def stopping(self) -> None:
        """Tell systemd that the stop it asked for is under way (no-op under a supervisor)."""
        self._notify(f"STOPPING=1\nSTATUS={self._role} stopping")

    def _notify(self, state: str) -> None:
        if self._systemd:
            sd_notify(state)

    @staticmethod
    def _watchdog(interval: float) -> None:
        while True:  # a lost ping is systemd's to judge: keep pinging
            sd_notify("WATCHDOG=1")
            time.sleep(interval)

    def _send(self, message: tuple[str, object]) -> None:
        if self._conn is None:
            return
        try:
            self._conn.send(message)
            self._conn.close()
        except OSError:
            pass
        self._conn = None


class RoleError(RuntimeError):
    """A role cannot run, for a reason its message gives in full (logged without a
    traceback: it is an operator's matter, not a bug)."""


class RoleTaken(RoleError):
    """Another process already runs this role of this instance."""


def hold_role_lock(path: Path) -> int:
    """An exclusive lock on `path`, held until this process exits (the kernel drops it
    even on SIGKILL). A second `lipsync serve` or unit of the same instance would otherwise
    bind the same ipc endpoints and steal half the traffic."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        owner = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
        os.close(fd)
        raise RoleTaken(f"{path.stem} is already running (pid {owner}); stop it first or "
                        "give this one another runtime.instance") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, str(os.getpid()).encode(), 0)
    return fd


def check_role_free(path: Path) -> None:
    """RoleTaken when a process holds the role's lock now (the lock is not kept)."""
    os.close(hold_role_lock(path))


M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_ARENA_MAX = -1, -3, -8  # glibc mallopt parameters


def private_bytes(pid: int | str = "self") -> int:
    """Resident memory of process `pid` that is its own (RssAnon; 0 if it cannot be read):
    RSS also counts the pages of shared-memory segments it touched, which are the arena's
    and the models', not its own."""
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def keep_freed_memory() -> None:
    """Let glibc reuse freed buffers instead of returning them to the OS.

    Every request allocates buffers of megabytes (a received message, a frame copy, a
    JPEG). By default glibc serves those with fresh mmaps and unmaps them on free, so each
    request pays page faults and the kernel zeroing every page again: a fifth of the
    frontend's CPU. Served from the heap and kept (up to the trim threshold) they are
    reused warm. Memory goes back to the OS on explicit trims (model unloads, an idle
    frontend): one arena for all threads, since malloc_trim never shrinks the top of the
    arena glibc would give each thread (grpc's, the executors'), so a buffer freed there
    stayed resident for good (a frontend idled 70-160 MB above its baseline after bursts of
    20 MB requests, depending on which threads had served them).
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(M_MMAP_THRESHOLD, 32 << 20)   # glibc's maximum
        libc.mallopt(M_TRIM_THRESHOLD, 512 << 20)
        libc.mallopt(M_ARENA_MAX, 1)
    except (OSError, AttributeError):  # not glibc
        pass


def release_free_heap() -> None:
    """Hand freed heap memory back to the OS (glibc keeps it otherwise: a worker that
    loads and unloads avatars, or a frontend after a burst of large requests, would only
    ever grow). Takes milliseconds for a large heap: not on an event loop."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


class StopFlag(threading.Event):
    """A role's stop (run_role's): an Event that also wakes whatever sleeps until it. `set()`
    makes `fileno()` readable, so a loop asleep in a poll of its sockets (ZeroMQ's Poller
    takes descriptors too) wakes at once instead of looking at the flag every so often, and
    calls what `on_set` registered (waking a queue's reader). Set from a signal handler too:
    the write never blocks."""

    def __init__(self) -> None:
        super().__init__()
        self._read, self._write = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._callbacks: list[Callable[[], None]] = []

    def fileno(self) -> int:
        return self._read

    def on_set(self, callback: Callable[[], None]) -> None:
        """Call `callback` when the flag is set (now, if it is)."""
        self._callbacks.append(callback)
        if self.is_set():
            callback()

    def set(self) -> None:
        super().set()
        try:
            os.write(self._write, b"\0")
        except BlockingIOError:  # readable already
            pass
        for callback in list(self._callbacks):
            callback()


def run_role(role: str, ready_conn: Connection | None,
             body: Callable[[Readiness, StopFlag], None],
             lock: Path | None = None, announce_to: str | None = None) -> None:
    """Run a role's body under the common prologue; never returns normally with an error.

    `body(readiness, stop)` must call readiness.ready() once it serves, and return soon
    after `stop` is set (SIGTERM). Under a supervisor (`ready_conn` given) SIGINT is
    ignored: the supervisor orchestrates shutdown. A role run on its own (`ready_conn`
    None: `lipsync role`, a systemd unit) has no parent to die with — under systemd its
    parent is pid 1, which die_with_parent would take for "orphaned" — and stops on
    SIGINT as on SIGTERM. A body that raises is announced (`role_down`) to `announce_to`,
    the frontend's inbox, before the process exits (a body may do it sooner, before its
    own clean-up: `readiness.down(exc)`).
    """
    standalone = ready_conn is None
    if not standalone:
        die_with_parent()
    setproctitle.setproctitle(f"lipsync: {role}")
    setup_logging(role)
    keep_freed_memory()
    stop = StopFlag()
    readiness = Readiness(ready_conn, role, announce_to)

    def on_stop_signal(*_: object) -> None:
        if not stop.is_set():
            readiness.stopping()
        stop.set()

    signal.signal(signal.SIGTERM, on_stop_signal)
    # SIGHUP means "reload" (the frontend re-reads its tokens), never "die"
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    signal.signal(signal.SIGINT, on_stop_signal if standalone else signal.SIG_IGN)
    try:
        if lock is not None:
            hold_role_lock(lock)
        body(readiness, stop)
    except Exception as exc:
        if isinstance(exc, RoleError):
            log.error("%s", exc)
        else:
            log.exception("%s failed", role)
        readiness.failed(f"{role}: {failure_reason(exc)}")
        readiness.down(exc)
        logging.shutdown()
        os._exit(1)
    logging.shutdown()
