"""Time, injected: the real clock in production, a fake one in tests.

Windows, backoff, breakers and budgets read time only through a :class:`Clock`, so a
test of a 30 s window or a 15 s breaker runs in milliseconds with :class:`FakeClock`.
"""

from __future__ import annotations

import asyncio
import time
from typing import Protocol


class Clock(Protocol):
    def monotonic(self) -> float:
        """Seconds on a clock that never goes back (deadlines, windows, breakers)."""
        ...

    def time(self) -> float:
        """Unix time in seconds (calendar windows, HTTP dates, log stamps)."""
        ...

    async def sleep(self, seconds: float) -> None:
        """Wait ``seconds`` (backoff, Retry-After, rate-limit waits)."""
        ...


class SystemClock:
    """The real clock."""

    monotonic = staticmethod(time.monotonic)
    time = staticmethod(time.time)

    async def sleep(self, seconds: float) -> None:
        if seconds > 0:
            await asyncio.sleep(seconds)


class FakeClock:
    """A clock that moves only when told to, or when something sleeps on it.

    ``sleep`` advances time at once (and yields to the loop), so code that backs off for
    5 s finishes instantly while still seeing 5 s pass. ``slept`` records every wait.
    """

    def __init__(self, start: float = 1_000.0, wall: float = 1_767_225_600.0) -> None:
        self._mono = start
        self._wall_offset = wall - start
        self.slept: list[float] = []

    def monotonic(self) -> float:
        return self._mono

    def time(self) -> float:
        return self._mono + self._wall_offset

    def advance(self, seconds: float) -> None:
        self._mono += seconds

    def set_wall(self, unix_time: float) -> None:
        self._wall_offset = unix_time - self._mono

    async def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        if seconds > 0:
            self._mono += seconds
        await asyncio.sleep(0)
