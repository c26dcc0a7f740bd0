"""When the frontend hands freed request buffers back to the OS: after a quiet moment with
nothing admitted, after admitted and refused calls alike, never while a request holds."""
from __future__ import annotations

import asyncio

from pipeline.frontend.heap import HeapTrim

DELAY_S = 0.05


async def _settled(trim: HeapTrim) -> int:
    await asyncio.sleep(DELAY_S * 3)
    return trim.trims


def test_a_refused_call_is_trimmed_after_a_quiet_moment() -> None:
    """A call that ends with nothing admitted (a refusal) leads to one trim, not one per call."""
    async def run() -> int:
        trim = HeapTrim(DELAY_S)
        for _ in range(5):
            trim.settle()
        return await _settled(trim)

    assert asyncio.run(run()) == 1


def test_no_trim_while_a_request_is_admitted() -> None:
    """Calls ending while a request is held do not trim; its release does, once."""
    async def run() -> tuple[int, int]:
        trim = HeapTrim(DELAY_S)
        trim.settle()
        trim.hold()  # cancels the pending trim: its buffers are in use
        trim.settle()
        during = await _settled(trim)
        trim.release()
        return during, await _settled(trim)

    assert asyncio.run(run()) == (0, 1)


def test_a_flood_of_refusals_is_trimmed_while_it_lasts() -> None:
    """Settles that keep coming do not postpone the trim: a steady flood is trimmed every
    delay, not only once it stops."""
    async def run() -> int:
        trim = HeapTrim(DELAY_S)
        for _ in range(40):
            trim.settle()
            await asyncio.sleep(DELAY_S / 5)
        return trim.trims

    assert asyncio.run(run()) >= 5
