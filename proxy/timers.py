"""Deadlines for the hot path: one loop timer for every open scope of a process.

``asyncio.timeout`` arms a loop timer per use and cancels it on exit: ~4 µs a request
under uvloop (``call_later`` and ``cancel``), 6% of a bare route's CPU, for a timer that
almost never fires (replies come in milliseconds, attempt timers are seconds). Here a
scope is an entry in a dict, and one timer, armed for the earliest open deadline, serves
them all. Closing a scope only removes its entry: when the timer fires and finds its
scope gone, it scans the open ones (requests in flight) and re-arms for the earliest. The
timer moves earlier only when a scope opens with a deadline before it. Deadlines are exact
(the loop's clock), not rounded to a tick.

The semantics are ``asyncio.timeout``'s: at the deadline the task is cancelled; the scope
turns that cancellation into :class:`TimeoutError` unless the task was also cancelled from
outside (then the ``CancelledError`` goes on).
"""

from __future__ import annotations

import asyncio
import math
from types import TracebackType


class Timers:
    """Every open :class:`Cut` of one event loop, and the one timer that serves them."""

    __slots__ = ("_armed_at", "_handle", "_loop", "_open")

    def __init__(self) -> None:
        self._open: dict[Cut, None] = {}
        self._handle: asyncio.TimerHandle | None = None
        self._armed_at = math.inf
        self._loop: asyncio.AbstractEventLoop | None = None

    def after(self, delay: float) -> Cut:
        """A scope that cancels the current task ``delay`` seconds from now (a ``with``)."""
        loop = asyncio.get_running_loop()
        if loop is not self._loop:  # a new loop (tests): nothing of the old one is valid
            self._loop, self._open, self._handle, self._armed_at = loop, {}, None, math.inf
        task = asyncio.current_task(loop)
        assert task is not None, "a deadline needs a task"
        cut = Cut(self, task, loop.time() + max(delay, 0.0))
        self._open[cut] = None
        if cut.deadline < self._armed_at:
            self._arm(cut.deadline)
        return cut

    def _arm(self, when: float) -> None:
        if self._handle is not None:
            self._handle.cancel()
        assert self._loop is not None
        self._armed_at = when
        self._handle = self._loop.call_at(when, self._fire)

    def _fire(self) -> None:
        self._handle = None
        self._armed_at = math.inf
        loop = self._loop
        assert loop is not None
        now = loop.time()
        earliest = math.inf
        for cut in list(self._open):
            if cut.deadline <= now:
                del self._open[cut]
                cut.expire()
            elif cut.deadline < earliest:
                earliest = cut.deadline
        if earliest < math.inf:
            self._arm(earliest)

    def close(self, cut: Cut) -> None:
        self._open.pop(cut, None)

    def __len__(self) -> int:
        return len(self._open)


class Cut:
    """One open deadline: ``with timers.after(s):`` around the awaited work."""

    __slots__ = ("_cancelling", "_task", "_timers", "deadline", "expired")

    def __init__(self, timers: Timers, task: asyncio.Task[object], deadline: float) -> None:
        self._timers = timers
        self._task = task
        self._cancelling = task.cancelling()
        self.deadline = deadline
        self.expired = False

    def expire(self) -> None:
        self.expired = True
        self._task.cancel()

    def __enter__(self) -> Cut:
        return self

    def __exit__(self, typ: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._timers.close(self)
        if self.expired and self._task.uncancel() <= self._cancelling \
                and typ is asyncio.CancelledError:
            raise TimeoutError from exc
