"""Client-side rate limit per provider: throttle before the provider says 429.

A token bucket of ``requests_per_second`` with ``burst`` (default: one second's worth),
kept as GCRA (a "theoretical arrival time"), so a request learns its exact wait before
waiting and reserves its slot in one step. A request waits only while the wait is at most
``max_wait`` and shorter than what is left of ``total``; otherwise it fails at once with
:class:`~proxy.errors.RateLimited` (``retry_after_s`` = the wait), which the tiers policy
reads as "next tier" and, on the last tier, becomes 429 ``rate_limited`` with
``Retry-After``. A request cancelled while waiting gives its slot back when it can.

``adaptive: true`` reads the provider's ``x-ratelimit-remaining-*`` / ``x-ratelimit-reset-*``
headers (:func:`proxy.classify.rate_limit_headers`) from every reply:

- a remaining count of 0 holds new requests until that dimension resets;
- fewer remaining requests than ``burst`` paces requests until the reset at the rate they
  come back (see :meth:`TokenBucket.pace`), instead of spending them at once and meeting a
  429;
- a 429 with a wait hint (not a quota 429) holds new requests for the hint.

Why not ``aiolimiter.AsyncLimiter``: it reads ``loop.time()`` (not the injected clock, so
waits could not be tested without patching it) and only answers "is there capacity now?"
— the fail-fast decision needs "how long would I wait?" before waiting, and the adaptive
mode needs to move the bucket's horizon. The bucket below is the same leaky-bucket
arithmetic in ~40 lines, on :class:`~proxy.clock.Clock`.

``scope: fleet`` (one bucket shared through Redis) is not implemented yet: the limit acts
per replica, and a warning says so when the limiter is built.

``rp_rate_limited_total{provider,result}``: ``delayed`` (waited), ``rejected`` (failed fast).
"""

from __future__ import annotations

import asyncio
import math
from typing import Any, NamedTuple

from proxy.call import Call, Handler, Reply
from proxy.classify import classify, rate_limit_headers
from proxy.clock import Clock
from proxy.config import RateLimitConfig
from proxy.context import AttemptContext
from proxy.errors import RateLimited


class Reservation(NamedTuple):
    wait_s: float
    tat_before: float
    tat_after: float


class TokenBucket:
    """GCRA token bucket on an injected clock, with adaptive holds and pacing."""

    __slots__ = ("_clock", "_hold_until", "_interval_s", "_pace_s", "_pace_until", "_tat",
                 "_tolerance_s", "burst")

    def __init__(self, requests_per_second: float, burst: int, clock: Clock) -> None:
        self._clock = clock
        self._interval_s = 1.0 / requests_per_second
        self.burst = burst
        self._tolerance_s = (burst - 1) * self._interval_s
        self._tat = -math.inf  # theoretical arrival time of the next request
        self._hold_until = -math.inf  # adaptive: nothing goes before this
        self._pace_s = 0.0  # adaptive: a slower interval the provider's headers ask for
        self._pace_until = -math.inf

    def wait_s(self) -> float:
        """Seconds the next request would wait now (0 = go)."""
        now = self._clock.monotonic()
        return self._slot(now)[0] - now

    def reserve(self, max_wait_s: float) -> Reservation | None:
        """Take the next slot if its wait is at most ``max_wait_s``, else None."""
        now = self._clock.monotonic()
        at, interval = self._slot(now)
        if at - now > max_wait_s:
            return None
        before = self._tat
        self._tat = max(before, at) + interval
        return Reservation(at - now, before, self._tat)

    def give_back(self, reservation: Reservation) -> None:
        """Undo a reservation whose request gave up waiting, if no one reserved after it."""
        if self._tat == reservation.tat_after:
            self._tat = reservation.tat_before

    def _slot(self, now: float) -> tuple[float, float]:
        interval = self._interval_s
        tolerance = self._tolerance_s
        if now < self._pace_until and self._pace_s > interval:
            interval, tolerance = self._pace_s, 0.0
        return max(now, self._tat - tolerance, self._hold_until), interval

    def hold(self, seconds: float) -> None:
        """Adaptive: let nothing through for ``seconds``."""
        self._hold_until = max(self._hold_until, self._clock.monotonic() + seconds)

    def pace(self, remaining: float, reset_s: float, limit: float | None) -> None:
        """Adaptive: with fewer than ``burst`` requests left, go no faster than they come back.

        With the provider's ``limit`` known, ``reset_s`` is read as OpenAI documents it (the
        time until the limit is full again: ``limit - remaining`` requests come back in
        ``reset_s``); without it, as a fixed window (``remaining`` requests until the reset).
        """
        if remaining >= self.burst or reset_s <= 0:
            return
        now = self._clock.monotonic()
        spent = limit - remaining if limit is not None and limit > remaining else None
        self._pace_s = reset_s / (spent if spent is not None else remaining)
        self._pace_until = now + reset_s
        self._tat = max(self._tat, now + self._pace_s)


class RateLimit:
    __slots__ = ("_adaptive", "_bucket", "_clock", "_delayed", "_log", "_max_wait_s",
                 "_provider", "_rejected")

    def __init__(self, ctx: AttemptContext, cfg: RateLimitConfig, bucket: TokenBucket) -> None:
        deps = ctx.deps
        self._bucket = bucket
        self._max_wait_s = cfg.max_wait
        self._adaptive = cfg.adaptive
        self._clock = deps.clock
        self._log = deps.log
        self._provider = ctx.provider.name
        self._delayed = deps.metrics.rate_limited.labels(self._provider, "delayed")
        self._rejected = deps.metrics.rate_limited.labels(self._provider, "rejected")

    async def __call__(self, call: Call, next_: Handler) -> Reply:
        bucket = self._bucket
        # a wait that ends at (or past) the deadline would only turn into a 504
        allowed_s = max(0.0, min(self._max_wait_s, math.nextafter(call.time_left(), -math.inf)))
        reservation = bucket.reserve(allowed_s)
        if reservation is None:
            self._rejected.inc()
            retry_s = bucket.wait_s()
            self._log.info("rate_limited", request_id=call.request_id, provider=self._provider,
                           wait_s=round(retry_s, 3))
            raise RateLimited(f"client-side rate limit of provider '{self._provider}': a "
                              f"{retry_s:.3f}s wait does not fit", retry_after_s=retry_s)
        if reservation.wait_s > 0:
            self._delayed.inc()
            try:
                await self._clock.sleep(reservation.wait_s)
            except asyncio.CancelledError:
                bucket.give_back(reservation)
                raise
        reply = await next_(call)
        if self._adaptive:
            self._observe(reply)
        return reply

    def _observe(self, reply: Reply) -> None:
        bucket = self._bucket
        now_wall = self._clock.time()
        info = rate_limit_headers(reply.headers, now_wall)
        for remaining, reset_s in ((info.remaining_requests, info.reset_requests_s),
                                   (info.remaining_tokens, info.reset_tokens_s)):
            if remaining is not None and remaining <= 0 and reset_s is not None:
                bucket.hold(reset_s)
        if info.remaining_requests is not None and info.reset_requests_s is not None \
                and info.remaining_requests > 0:
            bucket.pace(info.remaining_requests, info.reset_requests_s, info.limit_requests)
        if reply.status == 429:
            decision = classify(reply, None, now_wall)
            if decision.reason == "429" and decision.wait_s is not None:  # not a quota 429
                bucket.hold(decision.wait_s)


def _make_bucket(cfg: RateLimitConfig, provider: str, clock: Clock, log: Any) -> TokenBucket:
    if cfg.scope == "fleet":
        log.warning("rate_limit_scope_local", provider=provider,
                    detail="scope: fleet is not implemented yet; the limit acts per replica")
    burst = cfg.burst if cfg.burst is not None else max(1, math.ceil(cfg.requests_per_second))
    return TokenBucket(cfg.requests_per_second, burst, clock)


def build_attempt(ctx: AttemptContext) -> RateLimit | None:
    provider = ctx.provider.name
    cfg = ctx.route_ctx.config.providers[provider].rate_limit
    if cfg is None:
        return None
    deps = ctx.deps
    bucket = ctx.route_ctx.keeper.keep(
        "rate_limit", provider, cfg, lambda: _make_bucket(cfg, provider, deps.clock, deps.log))
    return RateLimit(ctx, cfg, bucket)
