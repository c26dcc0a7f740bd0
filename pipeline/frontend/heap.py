"""Freed request buffers go back to the OS once the frontend is quiet.

The frontend keeps freed buffers for reuse (`runtime.process.keep_freed_memory`): reused
warm they save page faults while requests keep coming. Once nothing has been admitted for
a moment they are handed back (`release_free_heap`), after an admitted burst and after
refused calls alike: a call refused after its message was received (malformed, over a
limit, overloaded) or a flood of them must not leave the frontend at gigabytes.
"""
from __future__ import annotations

import asyncio

from pipeline.runtime.process import release_free_heap

TRIM_AFTER_IDLE_S = 2.0


class HeapTrim:
    """`hold()` while a request is admitted (its buffers are in use), `release()` after;
    `settle()` when any call ends. The heap is trimmed TRIM_AFTER_IDLE_S after a settle
    with nothing held (not postponed by further settles: a flood of refusals is trimmed
    every few seconds while it lasts), never while something is held."""

    def __init__(self, delay_s: float = TRIM_AFTER_IDLE_S) -> None:
        self.delay_s = delay_s
        self.holders = 0
        self.trims = 0
        self._timer: asyncio.TimerHandle | None = None

    def hold(self) -> None:
        self.holders += 1
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def release(self) -> None:
        self.holders -= 1
        self.settle()

    def settle(self) -> None:
        if self.holders == 0 and self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(self.delay_s, self._trim)

    def _trim(self) -> None:
        self._timer = None
        if self.holders == 0:  # takes milliseconds for a large heap: not on the loop
            self.trims += 1
            asyncio.get_running_loop().run_in_executor(None, release_free_heap)
