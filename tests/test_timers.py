"""The hot path's shared deadline timer (proxy/timers.py): asyncio.timeout's semantics with
one loop timer for every open scope."""

from __future__ import annotations

import asyncio
import time

import pytest

from proxy.timers import Timers


async def test_a_scope_past_its_deadline_raises_timeout_error():
    timers = Timers()
    t0 = time.monotonic()
    with pytest.raises(TimeoutError):
        with timers.after(0.05):
            await asyncio.sleep(5)
    took = time.monotonic() - t0
    assert 0.045 <= took < 1.0
    assert len(timers) == 0
    assert asyncio.current_task().cancelling() == 0  # the cancellation was taken back


async def test_a_scope_that_finishes_in_time_leaves_nothing():
    timers = Timers()
    with timers.after(0.05):
        await asyncio.sleep(0.001)
    assert len(timers) == 0
    await asyncio.sleep(0.1)  # the timer fires on nothing: no stray cancellation
    assert asyncio.current_task().cancelling() == 0


async def test_many_scopes_each_cut_at_its_own_deadline():
    """Deadlines out of order, some finishing early: each scope is cut at its own time,
    by one timer re-armed for the earliest open deadline (also when an earlier one opens
    after a later one)."""
    timers = Timers()
    results: dict[str, float | str] = {}

    async def run(name: str, limit: float, work: float) -> None:
        t0 = time.monotonic()
        try:
            with timers.after(limit):
                await asyncio.sleep(work)
            results[name] = "done"
        except TimeoutError:
            results[name] = time.monotonic() - t0

    await asyncio.gather(run("late", 0.30, 5), run("early", 0.05, 5), run("quick", 0.10, 0.01),
                         run("mid", 0.15, 5))
    assert results["quick"] == "done"
    for name, limit in (("early", 0.05), ("mid", 0.15), ("late", 0.30)):
        took = results[name]
        assert isinstance(took, float) and limit - 0.005 <= took < limit + 0.2, (name, took)
    assert len(timers) == 0


async def test_an_outside_cancellation_is_not_turned_into_a_timeout():
    timers = Timers()

    async def victim() -> None:
        with timers.after(5):
            await asyncio.sleep(5)

    task = asyncio.ensure_future(victim())
    await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert len(timers) == 0


async def test_nested_scopes_the_inner_one_fires():
    timers = Timers()
    with timers.after(5) as outer:
        with pytest.raises(TimeoutError):
            with timers.after(0.02):
                await asyncio.sleep(5)
        assert not outer.expired
        await asyncio.sleep(0.001)  # still usable: the outer scope was not touched
    assert len(timers) == 0


async def test_an_exception_inside_passes_through():
    timers = Timers()
    with pytest.raises(KeyError):
        with timers.after(1):
            raise KeyError("x")
    assert len(timers) == 0
