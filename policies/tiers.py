"""Tiers: the route's terminal stage — try each tier of the call's arm in order.

Each tier's attempt chain (retry → record → circuit → rate limit → timeout → validate →
accept → faults → send) ends in an outcome that :func:`proxy.classify.classify` turns into
a decision; this module never reads a status itself.

- ``OK`` / ``RELAY``: the answer. A client error (400, 401, 403, 404, 413, 422) is relayed
  at once, without trying another tier: another provider would refuse it too.
- ``NEXT_TIER`` / ``RETRY`` (retries exhausted or not taken): the tier is left — a 5xx, a
  429, a timeout, a connect error or reset, ``invalid_response`` (``validate``), ``rejected``
  (``accept``), ``circuit_open``, ``rate_limited`` (the local limiter refused to wait).
- ``FAIL``: the request's ``total`` deadline expired: 504 at once.
- A budget downgrade (``call.downgrade``) skips ``expensive: true`` tiers (``downgrade``).

Every move to a later tier counts ``rp_fallbacks_total{route,reason}`` with the reason the
previous tier was left, and logs ``tier_fallback`` (``request_id``, ``from_tier``,
``to_tier``, ``reason``, ``detail``). ``x-rp-fallback`` names why the first tier did not
answer, on any reply not served by it; ``/admin/status`` counts such requests in
``fallback_rate``.

When no tier answered:

1. the route's ``fallback_response``, when set (``x-rp-fallback: exhausted``, counted as
   ``rp_fallbacks_total{reason="exhausted"}``, outcome ``fallback_response``);
2. else the latest reply that only failed ``accept``: a real answer, just below the bar,
   is better than an error (``x-rp-fallback: rejected``);
3. else the last tried tier's failure: a provider reply relayed as it came, or the proxy
   error (502 ``upstream_error`` / ``invalid_response``, 504 ``timeout``);
4. no tier was tried: the local rate limit's 429 (``rate_limited``, with ``Retry-After``)
   when that was the only reason, 503 ``circuit_open`` when every tier's circuit was
   open (with ``Retry-After``: the soonest any of them lets a call through), else 503
   ``no_tier_available``.

An open circuit or a refusal by the local rate limit does not count as a try: nothing was
sent, so an earlier tier's real failure stays the answer.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import orjson

from proxy.call import Call, Reply
from proxy.classify import Verdict, classify
from proxy.config import FallbackResponse
from proxy.context import RouteContext
from proxy.errors import CircuitOpen, NoTierAvailable, ProxyError, RateLimited, Rejected

if TYPE_CHECKING:
    from proxy.runtime import CompiledTier

#: outcomes that mean the tier was skipped without sending anything
_SKIPS = (CircuitOpen, RateLimited)


class _Walk:
    """One request's way through the tiers."""

    __slots__ = ("first_reason", "last", "last_tier", "limited", "open_for_s", "pending",
                 "rejected", "skipped")

    def __init__(self) -> None:
        self.first_reason: str | None = None  # why the first tier did not answer
        self.pending: str | None = None  # why the previous tier was left (to count)
        self.last: Reply | ProxyError | None = None  # the last tried tier's failure
        self.last_tier: int | None = None
        self.rejected: Reply | None = None  # the latest reply that only failed accept
        self.limited: RateLimited | None = None
        self.open_for_s: float | None = None  # the soonest an open circuit admits a call
        self.skipped: set[str] = set()

    def left(self, reason: str) -> None:
        self.first_reason = self.first_reason or reason
        self.pending = reason


class Tiers:
    __slots__ = ("_clock", "_exhausted_counter", "_fallback", "_fallbacks", "_log", "_route")

    def __init__(self, ctx: RouteContext) -> None:
        self._route = ctx.route.name
        self._clock = ctx.deps.clock
        self._fallbacks = ctx.deps.metrics.fallbacks
        self._exhausted_counter = self._fallbacks.labels(self._route, "exhausted")
        self._log = ctx.deps.log
        fb = ctx.route.fallback_response
        self._fallback = None if fb is None else _static_reply(fb)

    async def __call__(self, call: Call) -> Reply:
        walk = _Walk()
        prev_index: int | None = None
        for tier in call.arm.tiers:
            if call.downgrade and tier.expensive:
                walk.skipped.add("downgrade")
                walk.left("downgrade")
                continue
            if walk.pending is not None:
                self._moved(call, prev_index, tier.index, walk.pending, walk.last)
            prev_index = tier.index
            try:
                outcome = await _run(tier, call)
            except BaseException:  # the client went away, or a request-ending error
                _discard(walk.last)
                raise
            decision = classify(outcome, None, self._clock.time())
            if decision.verdict in (Verdict.OK, Verdict.RELAY):
                assert isinstance(outcome, Reply)
                _discard(walk.last)
                if walk.first_reason is not None:
                    outcome.fallback_reason = walk.first_reason
                return outcome
            if decision.verdict is Verdict.FAIL:
                assert isinstance(outcome, ProxyError)
                _discard(walk.last)
                raise outcome
            self._failed(walk, outcome, tier.index)
            walk.left(decision.reason)
        return self._exhausted(call, walk)

    @staticmethod
    def _failed(walk: _Walk, outcome: Reply | ProxyError, index: int) -> None:
        if isinstance(outcome, _SKIPS):
            walk.skipped.add(outcome.type)
            if isinstance(outcome, RateLimited) and (
                    walk.limited is None or (outcome.retry_after_s or 0.0)
                    < (walk.limited.retry_after_s or 0.0)):
                walk.limited = outcome
            elif isinstance(outcome, CircuitOpen) and outcome.retry_after_s is not None and (
                    walk.open_for_s is None or outcome.retry_after_s < walk.open_for_s):
                walk.open_for_s = outcome.retry_after_s
            return
        if isinstance(outcome, Rejected) and isinstance(outcome.reply, Reply):
            walk.rejected = outcome.reply
        _discard(walk.last)
        walk.last, walk.last_tier = outcome, index

    def _moved(self, call: Call, from_tier: int | None, to_tier: int, reason: str,
               last: Reply | ProxyError | None) -> None:
        self._fallbacks.labels(self._route, reason).inc()
        detail = last.message if isinstance(last, ProxyError) else None
        self._log.info("tier_fallback", request_id=call.request_id, route=self._route,
                       from_tier=from_tier, to_tier=to_tier, reason=reason, detail=detail)

    def _exhausted(self, call: Call, walk: _Walk) -> Reply:
        last = walk.last
        if self._fallback is not None:
            self._exhausted_counter.inc()
            _discard(last)
            fb = self._fallback
            self._log.info("tier_exhausted", request_id=call.request_id, route=self._route,
                           answer="fallback_response", first_reason=walk.first_reason,
                           last_reason=walk.pending)
            return Reply(fb.status, list(fb.headers), body=fb.body, source="fallback_response",
                         fallback_reason="exhausted")
        if walk.rejected is not None:
            if walk.rejected is not last:
                _discard(last)
            walk.rejected.fallback_reason = "rejected"
            return walk.rejected
        first_index = call.arm.tiers[0].index if call.arm.tiers else None
        if isinstance(last, Reply):
            if last.tier != first_index:
                last.fallback_reason = walk.first_reason
            return last
        if isinstance(last, ProxyError):
            if walk.last_tier != first_index and call.fallback_reason is None:
                call.fallback_reason = walk.first_reason  # shown on the error response
            raise last
        if walk.skipped == {"rate_limited"} and walk.limited is not None:
            raise walk.limited
        if walk.skipped == {"circuit_open"}:
            raise CircuitOpen("every tier's circuit is open", retry_after_s=walk.open_for_s)
        raise NoTierAvailable("no tier could take the request ("
                              + ", ".join(sorted(walk.skipped)) + ")")


async def _run(tier: CompiledTier, call: Call) -> Reply | ProxyError:
    try:
        return await tier.handler(call)
    except ProxyError as exc:
        if not exc.attempt:
            raise
        return exc


def _discard(outcome: Reply | ProxyError | None) -> None:
    """A reply we will not relay: free its connection if it is still streaming."""
    if isinstance(outcome, Reply) and outcome.stream is not None:
        resp = outcome.stream._response
        if resp is not None:
            resp.close()


def _static_reply(fb: FallbackResponse) -> Reply:
    body = fb.body
    data = body.encode() if isinstance(body, str) else orjson.dumps(body)
    headers = [(k.lower(), v) for k, v in fb.headers.items()]
    return Reply(fb.status, headers, body=data, source="fallback_response")


def build_terminal(ctx: RouteContext) -> Tiers:
    return Tiers(ctx)
