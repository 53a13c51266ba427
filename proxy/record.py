"""Attempt recording: every upstream attempt, whatever its end, in the call and metrics.

The attempt's duration runs to its end (the whole body when buffered, the first chunk when
streamed); ``t_upstream_first_byte`` is stamped by the upstream client itself when the
response headers arrive (:mod:`proxy.upstream`), so it is the real first byte.
"""

from __future__ import annotations

from typing import Any

from proxy.call import AttemptRecord, Call, Handler, Reply
from proxy.context import AttemptContext
from proxy.errors import ProxyError
from proxy.metrics import status_class


class RecordAttempt:
    __slots__ = ("_attempts", "_by_result", "_clock", "_duration", "_metrics", "_provider", "_route", "_tier",
                 "_tier_s")

    def __init__(self, ctx: AttemptContext) -> None:
        m = ctx.deps.metrics
        self._clock = ctx.deps.clock
        self._provider = ctx.provider.name
        self._route = ctx.route.name
        self._tier = ctx.tier_index
        self._tier_s = str(ctx.tier_index)
        self._attempts = m.upstream_attempts
        self._metrics = m
        self._duration = m.histogram(m.upstream_duration.labels(ctx.provider.name))
        #: rp_upstream_attempts_total children by result, looked up once each
        self._by_result: dict[str, Any] = {}

    async def __call__(self, call: Call, next_: Handler) -> Reply:
        start = self._clock.monotonic()
        status: int | None = None
        error: str | None = None
        try:
            reply = await next_(call)
            status = reply.status
            return reply
        except ProxyError as exc:
            error = getattr(exc, "kind", None) or exc.type
            raise
        except BaseException:
            error = "cancelled"
            raise
        finally:
            elapsed = self._clock.monotonic() - start
            call.attempts.append(AttemptRecord(self._tier, self._provider, status, error,
                                               round(elapsed * 1000, 3)))
            self._duration.observe(elapsed)
            result = status_class(status) if status is not None else (error or "error")
            counter = self._by_result.get(result)
            if counter is None:
                counter = self._by_result[result] = self._metrics.counter(self._attempts.labels(
                    self._route, self._provider, self._tier_s, result))
            counter.inc()


def build_attempt(ctx: AttemptContext) -> RecordAttempt:
    return RecordAttempt(ctx)
