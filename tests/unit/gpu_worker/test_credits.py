"""The credit dispatcher of the gpu_worker: compositors pull jobs with credits, a slow one
never holds more than it asked for, and a lost one's jobs go to the others; no sockets."""
from __future__ import annotations

import os

from pipeline import messages as msg
from pipeline.gpu_worker.credits import CreditDispatcher, process_running

A, B, C = b"\0a", b"\0b", b"\0c"
SILENCE_S = 1.5


class Pids:
    """Which compositor processes are running (the fake of /proc)."""

    def __init__(self) -> None:
        self.dead: set[int] = set()

    def __call__(self, pid: int) -> bool:
        return pid not in self.dead


def _dispatcher() -> tuple[CreditDispatcher, Pids]:
    pids = Pids()
    return CreditDispatcher(SILENCE_S, running=pids), pids


def _credit(index: int, credits: int = 2, done: tuple[int, int] | None = None) -> msg.Credit:
    rid, frame = done if done is not None else (-1, -1)
    return msg.Credit(index=index, pid=1000 + index, credits=credits, request_id=rid,
                      first_frame=frame)


def _submit(d: CreditDispatcher, request: int, frames: int) -> None:
    for i in range(frames):
        d.submit((request, i), f"job {request}/{i}".encode())


def _hand_out(d: CreditDispatcher) -> list[tuple[bytes, bytes]]:
    return list(d.assignments())


def _held(d: CreditDispatcher, identity: bytes) -> int:
    return len(d.members[identity].held)


def test_a_live_sessions_frames_are_handed_out_before_waiting_batch_frames() -> None:
    """Batch frames wait for credits; a live session's frames submitted after them go first,
    each kind in its order."""
    d, _ = _dispatcher()
    d.on_credit(A, _credit(0, credits=1), 0.0)
    _submit(d, 1, 3)
    d.submit((2, 0), b"live 2/0", live=True)
    d.submit((2, 1), b"live 2/1", live=True)
    assert [key for key, _ in d.waiting] == [(2, 0), (2, 1), (1, 0), (1, 1), (1, 2)]
    assert _hand_out(d) == [(A, b"live 2/0")]
    d.on_credit(A, _credit(0, credits=1, done=(2, 0)), 0.1)
    assert _hand_out(d) == [(A, b"live 2/1")]
    d.on_credit(A, _credit(0, credits=1, done=(2, 1)), 0.2)
    assert _hand_out(d) == [(A, b"job 1/0")]


def test_no_compositor_holds_more_than_its_credits() -> None:
    """Jobs beyond every compositor's credits wait, in order, until a credit comes back."""
    d, _ = _dispatcher()
    d.on_credit(A, _credit(0), 0.0)
    d.on_credit(B, _credit(1, credits=1), 0.0)
    _submit(d, 7, 5)
    handed = _hand_out(d)
    assert len(handed) == 3 and _held(d, A) == 2 and _held(d, B) == 1
    assert [key for key, _ in d.waiting] == [(7, 3), (7, 4)]
    assert _hand_out(d) == []  # nothing more until a job finishes
    (held_by_b,) = d.members[B].held
    d.on_credit(B, _credit(1, credits=1, done=held_by_b), 0.1)
    assert _hand_out(d) == [(B, b"job 7/3")]  # the oldest waiting job, to the one with room


def test_a_batch_spreads_over_the_pool() -> None:
    """Each job goes to the compositor with the most free credits."""
    d, _ = _dispatcher()
    for identity, index in ((A, 0), (B, 1), (C, 2)):
        d.on_credit(identity, _credit(index), 0.0)
    _submit(d, 1, 3)
    assert sorted(identity for identity, _ in _hand_out(d)) == [A, B, C]


def test_a_finished_job_frees_exactly_one_credit() -> None:
    """The Credit naming a finished job frees its slot; a heartbeat Credit frees none."""
    d, _ = _dispatcher()
    d.on_credit(A, _credit(0), 0.0)
    _submit(d, 1, 4)
    _hand_out(d)
    d.on_credit(A, _credit(0), 0.2)  # a heartbeat: still full
    assert _hand_out(d) == []
    d.on_credit(A, _credit(0, done=(1, 0)), 0.3)
    assert _hand_out(d) == [(A, b"job 1/2")]
    d.on_credit(A, _credit(0, done=(99, 0)), 0.3)  # a job it never held: no effect
    assert _held(d, A) == 2


def test_a_dead_compositors_jobs_go_to_the_others_first() -> None:
    """When a compositor's process is gone, the jobs it held are handed again, ahead of the
    jobs that waited, and it is forgotten."""
    d, pids = _dispatcher()
    d.on_credit(A, _credit(0), 0.0)
    d.on_credit(B, _credit(1, credits=1), 0.0)
    _submit(d, 1, 3)
    _hand_out(d)
    _submit(d, 2, 1)
    pids.dead.add(1000)  # compositor 0 (A) was killed
    d.check(0.1)
    assert A not in d.members and d.redispatched == 2
    assert [key for key, _ in d.waiting] == [(1, 0), (1, 1), (2, 0)]
    (held_by_b,) = d.members[B].held
    d.on_credit(B, _credit(1, credits=1, done=held_by_b), 0.2)
    assert _hand_out(d) == [(B, b"job 1/0")]


def test_an_announced_death_hands_its_jobs_to_the_others() -> None:
    """RoleDown from a compositor: its jobs are handed to the others at once."""
    d, _ = _dispatcher()
    d.on_credit(A, _credit(0), 0.0)
    _submit(d, 1, 2)
    _hand_out(d)
    d.on_credit(B, _credit(1), 0.0)
    d.on_down(A, msg.RoleDown(role="compositor", index=0, pid=1000, reason="boom"))
    assert A not in d.members
    assert sorted(_hand_out(d)) == [(B, b"job 1/0"), (B, b"job 1/1")]


def test_a_silent_compositor_loses_its_jobs_and_comes_back_within_its_credits() -> None:
    """A frozen compositor's jobs go to the others; when it speaks again its stale jobs
    still count against its credits, so it never holds more than it asked for."""
    d, _ = _dispatcher()
    d.on_credit(A, _credit(0), 0.0)
    _submit(d, 1, 2)
    _hand_out(d)  # A holds both
    d.on_credit(B, _credit(1), 1.0)
    d.check(1.0)
    assert d.members[A].alive  # 1 s of silence: still within 1.5 s
    d.on_credit(B, _credit(1), 2.0)
    d.check(2.0)
    assert not d.members[A].alive and d.redispatched == 2
    assert sorted(_hand_out(d)) == [(B, b"job 1/0"), (B, b"job 1/1")]
    _submit(d, 2, 2)
    d.on_credit(A, _credit(0), 3.0)  # thawed: alive again, but both its slots are stale
    assert d.members[A].alive and _hand_out(d) == []
    d.on_credit(A, _credit(0, done=(1, 0)), 3.1)  # a late duplicate finishes
    assert _hand_out(d) == [(A, b"job 2/0")]
    assert _held(d, A) == 2


def test_an_unreachable_compositor_gives_the_job_to_another() -> None:
    """A send that finds no peer: the compositor is forgotten and the job handed again."""
    d, _ = _dispatcher()
    d.on_credit(A, _credit(0), 0.0)
    d.on_credit(B, _credit(1), 0.0)
    _submit(d, 1, 1)
    got = []
    for identity, job in d.assignments():
        got.append((identity, job))
        if identity == A:
            d.unreachable(A)
    assert got == [(A, b"job 1/0"), (B, b"job 1/0")]
    assert A not in d.members and _held(d, B) == 1


def test_a_reconnected_process_replaces_its_old_connection() -> None:
    """The same compositor on a new connection: the old record's jobs are handed again."""
    d, _ = _dispatcher()
    d.on_credit(A, _credit(0), 0.0)
    _submit(d, 1, 1)
    _hand_out(d)
    d.on_credit(C, _credit(0), 0.5)
    assert set(d.members) == {C}
    assert _hand_out(d) == [(C, b"job 1/0")]


def test_the_snapshot_reports_each_compositor() -> None:
    """What heartbeats carry: credits, jobs held now, handed so far, liveness."""
    d, _ = _dispatcher()
    d.on_credit(B, _credit(1), 0.0)
    d.on_credit(A, _credit(0, credits=3), 0.0)
    _submit(d, 1, 4)
    _hand_out(d)
    d.on_credit(A, _credit(0, credits=3, done=(1, 0)), 0.1)
    snap = {link.index: link for link in d.snapshot()}
    assert [link.index for link in d.snapshot()] == [0, 1]
    assert (snap[0].credits, snap[0].pid, snap[0].alive) == (3, 1000, True)
    assert snap[0].held + snap[1].held == 3 and snap[0].handed + snap[1].handed == 4


def test_process_running_sees_live_and_missing_processes() -> None:
    """This process runs; a pid beyond the kernel's range does not."""
    assert process_running(os.getpid())
    assert not process_running(2**22 + 12345)


def test_the_last_jobs_of_a_dead_compositor_are_handed_again() -> None:
    """A compositor that dies may not have sent the frames of the jobs it just finished:
    those of its last RECENT_S go to the others too (duplicates at worst); older ones, and
    a frozen one's, do not."""
    d, pids = _dispatcher()
    d.on_credit(A, _credit(0), 0.0)
    _submit(d, 1, 2)
    _hand_out(d)
    d.on_credit(A, _credit(0, done=(1, 0)), 0.5)   # long before its end
    d.on_credit(A, _credit(0, done=(1, 1)), 1.9)   # just before
    d.on_credit(A, _credit(0), 2.0)
    d.check(2.0)
    assert [key for key, _ in d.waiting] == []  # alive: nothing handed again
    pids.dead.add(1000)
    d.check(2.1)
    assert [key for key, _ in d.waiting] == [(1, 1)] and d.redispatched == 1


def test_a_frozen_compositor_keeps_its_last_jobs_until_it_dies() -> None:
    """Silent, its finished jobs stay with it (it sends their frames when thawed); killed
    while frozen, those it finished just before freezing are handed again."""
    d, pids = _dispatcher()
    d.on_credit(A, _credit(0), 0.0)
    _submit(d, 1, 2)
    _hand_out(d)
    d.on_credit(A, _credit(0, done=(1, 0)), 1.0)   # then frozen, holding (1, 1)
    d.check(3.0)
    assert [key for key, _ in d.waiting] == [(1, 1)]
    pids.dead.add(1000)
    d.check(4.0)
    assert [key for key, _ in d.waiting] == [(1, 0), (1, 1)] and d.redispatched == 2


def test_a_compositor_that_leaves_holding_nothing_is_no_warning(caplog) -> None:
    """A compositor that exits holding no job (it stopped with the rest of the server) is
    noted at INFO; one whose jobs go to the others is a WARNING."""
    import logging

    d, pids = _dispatcher()
    d.on_credit(A, _credit(0), 0.0)
    d.on_credit(B, _credit(1), 0.0)
    _submit(d, 7, 1)
    assert _hand_out(d) == [(A, b"job 7/0")]
    pids.dead |= {1000, 1001}
    with caplog.at_level(logging.INFO, logger="pipeline.gpu_worker.credits"):
        d.check(0.1)
    levels = {r.getMessage().split(" (")[0]: r.levelname for r in caplog.records}
    assert levels == {"compositor 0": "WARNING", "compositor 1": "INFO"}, caplog.text


def test_a_compositor_that_leaves_just_after_its_last_job_is_no_warning(caplog) -> None:
    """One that finished its last job just before it exited (a server's clean stop right
    after some work) loses nothing: that job is sent again only in case its frames were
    still in the dead process's socket, noted at INFO with the count."""
    import logging

    d, pids = _dispatcher()
    d.on_credit(A, _credit(0), 0.0)
    _submit(d, 7, 1)
    assert _hand_out(d) == [(A, b"job 7/0")]
    d.on_credit(A, _credit(0, done=(7, 0)), 0.1)   # done; then it exits with the server
    pids.dead.add(1000)
    with caplog.at_level(logging.INFO, logger="pipeline.gpu_worker.credits"):
        d.check(0.2)
    assert [key for key, _ in d.waiting] == [(7, 0)]  # the precaution stays
    assert [r.levelname for r in caplog.records] == ["INFO"], caplog.text
    assert "0 job(s) handed to the others, 1 finished just before sent again" in caplog.text
