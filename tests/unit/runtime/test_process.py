"""The one death message of a role, whoever sends it: its fields and its reasons."""
from __future__ import annotations

import signal
import threading

import pytest

from pipeline import messages as msg
from pipeline.runtime.process import RoleError, exit_reason, failure_reason, role_down


def test_the_death_message_names_the_role_its_index_and_pid() -> None:
    """'gpu_worker 1' and 'compositor 0' become RoleDowns that survive the wire."""
    for name, kind, index in (("gpu_worker 1", "gpu_worker", 1), ("compositor 0", "compositor", 0)):
        down = msg.frontend_decoder.decode(msg.encode(role_down(name, 4242, "why")))
        assert down == msg.RoleDown(role=kind, index=index, pid=4242, reason="why")


def test_the_frontend_has_no_death_message() -> None:
    """The frontend is who is told: there is nobody to tell of its own death."""
    with pytest.raises(ValueError, match="frontend"):
        role_down("frontend", 1, "why")


def test_reasons_say_how_the_role_ended() -> None:
    """An exit by a signal names the signal; a raised error its type, an operator's error
    its own words."""
    assert exit_reason(-signal.SIGKILL) == "killed by SIGKILL"
    assert exit_reason(1) == "exited with code 1"
    assert failure_reason(ValueError("bad")) == "ValueError: bad"
    assert failure_reason(RoleError("port taken")) == "port taken"


def test_a_stop_flag_wakes_a_poll_and_its_callbacks() -> None:
    """StopFlag: its descriptor turns readable when set (a loop asleep in a poll wakes at
    once), what on_set registered is called then, or at once when registered after."""
    import select

    from pipeline.runtime.process import StopFlag

    stop, called = StopFlag(), []
    stop.on_set(lambda: called.append("before"))
    assert select.select([stop], [], [], 0)[0] == [] and called == []
    setter = threading.Timer(0.05, stop.set)
    setter.start()
    assert select.select([stop], [], [], 5)[0] == [stop]
    setter.join()  # the descriptor turns readable before the callbacks have run
    assert stop.is_set() and called == ["before"]
    stop.on_set(lambda: called.append("after"))
    stop.set()  # again: nothing blocks, every callback runs
    assert called == ["before", "after", "before", "after"]
