"""Which compositor gets which CompositeJob: work is pulled, not pushed blindly.

Each compositor grants this worker a few credits (jobs it may hold at once) and returns one
with every finished job (msg.Credit). A job goes only to a compositor with a free credit, so
a slow one is never handed more than it asked for; the rest wait here: a live session's
frames first (a frame late is a frame lost), then the others, each in order. The
dispatcher remembers which jobs each compositor holds (their encoded bytes: the prediction
and background they point to stay valid in shared memory while the frontend waits for the
frames), so when a compositor is lost its jobs go to the others and nothing fails:

- it announced its death (msg.RoleDown), its process is gone, or a send to it found no
  peer: forgotten at once, its jobs handed again, and with them the jobs it finished in
  its last RECENT_S: a compositor sends a job's frames before the credit, but ZMQ writes
  each socket from an IO thread, so frames may still sit in a process that dies after its
  credit left. Those few are duplicates the frontend drops when the frames did arrive,
  against a request waiting for its deadline when it did not;
- it went silent (frozen, e.g. SIGSTOP): its jobs are handed again, but its record stays
  with those jobs still counted against its credits. If it comes back it finishes them
  (late duplicates, which the frontend drops) and gets new work only as they complete, so
  even then it never holds more than it asked for.

Pure bookkeeping: no sockets, no threads; the shell's link thread drives it.
"""
from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from pipeline import messages as msg
from pipeline.shm.segment import pid_alive

log = logging.getLogger(__name__)

JobKey = tuple[int, int]  # (request_id, first_frame)
RECENT_S = 0.25  # a finished job's frames have surely left its compositor after this long


def process_running(pid: int) -> bool:
    """Whether `pid` is a live process: a zombie (killed, not yet reaped by its parent)
    holds no job any more, though signal 0 still finds it."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    except OSError:  # no /proc to read: ask the kernel
        return pid_alive(pid)
    return stat.rsplit(")", 1)[-1].split()[0] not in ("Z", "X")


@dataclass
class Member:
    """One compositor, as seen through one connection of its DEALER."""

    identity: bytes                     # the ROUTER's routing id of that connection
    index: int
    pid: int
    credits: int
    last_seen: float
    # the jobs it holds; None: handed to another compositor while this one was silent (a
    # stale job it may still finish, counted against its credits until it does)
    held: dict[JobKey, bytes | None] = field(default_factory=dict)
    # (when its credit came, key, job) of the jobs it finished lately, oldest first
    recent: deque[tuple[float, JobKey, bytes]] = field(default_factory=deque)
    handed: int = 0
    alive: bool = True

    @property
    def free(self) -> int:
        return max(0, self.credits - len(self.held)) if self.alive else 0


class CreditDispatcher:
    def __init__(self, silence_s: float,
                 running: Callable[[int], bool] = process_running) -> None:
        """`silence_s`: a compositor not heard from this long is frozen or gone."""
        self.silence_s = silence_s
        self.running = running
        self.members: dict[bytes, Member] = {}
        # jobs waiting for a credit: a live session's, then the others (in order within each)
        self._live: deque[tuple[JobKey, bytes]] = deque()
        self._batch: deque[tuple[JobKey, bytes]] = deque()
        self.redispatched = 0

    def submit(self, key: JobKey, job: bytes, live: bool = False) -> None:
        """A new job (its encoded CompositeJob), handed out in order (live ones first)."""
        (self._live if live else self._batch).append((key, job))

    @property
    def waiting(self) -> list[tuple[JobKey, bytes]]:
        """The jobs waiting, in the order they will be handed out."""
        return [*self._live, *self._batch]

    def on_credit(self, identity: bytes, credit: msg.Credit, now: float) -> None:
        member = self.members.get(identity)
        if member is None:
            # the same process on a new connection: the old one's jobs went with it
            for old in [m for m in self.members.values() if m.pid == credit.pid]:
                self._lose(old, "reconnected", forget=True)
            member = self.members[identity] = Member(identity, credit.index, credit.pid,
                                                     credit.credits, now)
            log.info("compositor %d (pid %d) takes jobs (%d credits)", credit.index,
                     credit.pid, credit.credits)
        elif not member.alive:
            member.alive = True
            log.warning("compositor %d (pid %d) is back; %d stale job(s) still count against "
                        "its credits", member.index, member.pid, len(member.held))
        member.last_seen = now
        member.credits = credit.credits
        if credit.request_id >= 0:
            key = (credit.request_id, credit.first_frame)
            job = member.held.pop(key, None)
            if job is not None:
                member.recent.append((now, key, job))
        while member.recent and member.recent[0][0] < now - RECENT_S:
            member.recent.popleft()

    def on_down(self, identity: bytes, down: msg.RoleDown) -> None:
        """The compositor announced its death."""
        member = self.members.get(identity)
        if member is not None:
            self._lose(member, f"is down ({down.reason})", forget=True)

    def unreachable(self, identity: bytes) -> None:
        """A send to it found no connection: it is gone (its jobs, the last one included)."""
        member = self.members.get(identity)
        if member is not None:
            self._lose(member, "is unreachable", forget=True)

    def check(self, now: float) -> None:
        """Find the compositors that exited or went silent (call it often: cheap)."""
        for member in list(self.members.values()):
            if not self.running(member.pid):
                self._lose(member, "exited", forget=True)
            elif member.alive and now - member.last_seen > self.silence_s:
                self._lose(member, f"is silent ({now - member.last_seen:.1f} s)", forget=False)

    def _lose(self, member: Member, why: str, forget: bool) -> None:
        held = [(key, job) for key, job in member.held.items() if job is not None]
        # gone: what it finished last may not have left it (a frozen one keeps it)
        recent = [(key, job) for t, key, job in member.recent
                  if t >= member.last_seen - RECENT_S] if forget else []
        jobs = recent + held
        self._live.extendleft(reversed(jobs))  # they are the oldest and late: first again
        self.redispatched += len(jobs)
        if forget:
            del self.members[member.identity]
        else:
            member.alive = False
            member.held = dict.fromkeys(member.held)
        # a loss only when jobs it held moved: one that held nothing (it stopped with the
        # server, or its death is logged by whoever saw it) is a note, its last finished
        # jobs sent again only in case their frames were lost with it
        log.log(logging.WARNING if held else logging.INFO,
                "compositor %d (pid %d) %s: %d job(s) handed to the others%s", member.index,
                member.pid, why, len(held),
                f", {len(recent)} finished just before sent again" if recent else "")

    def assignments(self) -> Iterator[tuple[bytes, bytes]]:
        """(identity, job) for every waiting job that a compositor has room for now, each
        to the one with the most free credits (so a batch spreads over the pool)."""
        while self._live or self._batch:
            member = max(self.members.values(), key=lambda m: m.free, default=None)
            if member is None or member.free == 0:
                return
            key, job = (self._live or self._batch).popleft()
            member.held[key] = job
            member.handed += 1
            yield member.identity, job

    def snapshot(self) -> list[msg.CompositorLink]:
        return [msg.CompositorLink(m.index, m.pid, m.credits, len(m.held), m.handed, m.alive)
                for m in sorted(self.members.values(), key=lambda m: (m.index, m.pid))]
