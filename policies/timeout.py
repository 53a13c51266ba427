"""Attempt timeout: bounds one upstream try, cut to what is left of the request's total.

For a buffered reply the attempt ends with the last byte of the body; for a streamed reply,
with its first chunk (the commit point). ``first_byte`` is enforced where the response
headers are awaited (:mod:`proxy.upstream`), ``idle`` between streamed chunks by the
server's relay, ``total`` everywhere through ``call.deadline``. This policy is always on:
a route with no ``timeout`` block gets the safe defaults (30s / 120s / 30s / 60s).
"""

from __future__ import annotations

import math

from proxy.call import Call, Handler, Reply
from proxy.context import AttemptContext
from proxy.errors import Timeout
from proxy.timers import Timers


class AttemptTimeout:
    __slots__ = ("_attempt_s", "_timers", "_total_s")

    def __init__(self, attempt_s: float, total_s: float, timers: Timers) -> None:
        self._attempt_s = attempt_s
        self._total_s = total_s
        self._timers = timers

    async def __call__(self, call: Call, next_: Handler) -> Reply:
        left = call.time_left()
        if left <= 0:
            raise Timeout("total", self._total_s)
        if self._attempt_s < left:
            limit, timer, named = self._attempt_s, "attempt", self._attempt_s
        else:
            limit, timer, named = left, "total", self._total_s
        call.attempt_deadline = call.clock.monotonic() + limit
        try:
            with self._timers.after(limit):  # asyncio.timeout's semantics, no timer per use
                return await next_(call)
        except TimeoutError:
            raise Timeout(timer, named) from None
        finally:
            call.attempt_deadline = math.inf


def build_attempt(ctx: AttemptContext) -> AttemptTimeout:
    t = ctx.arm.timeout
    return AttemptTimeout(t.attempt, t.total, ctx.deps.timers)
