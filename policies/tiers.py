"""Tiers: the route's terminal stage — try each tier of the call's arm in order.

A tier is left when its attempt chain (retries included) ends in a ``NEXT_TIER`` or
``RETRY`` decision (see :mod:`proxy.classify`): exhausted retries, an open circuit, a
failed ``accept`` or ``validate``, a 5xx or 429; or when a budget downgrade skips
``expensive`` tiers. A client error (400, 401, 403, 404, 413, 422) is relayed at once.

When every tier failed: the route's ``fallback_response`` (``x-rp-fallback: exhausted``),
else the last tried tier's error — a provider reply is relayed as it came, a proxy error
is raised for the boundary. No tier tried because every one had an open circuit: 503
``circuit_open``; none tried for mixed reasons: 503 ``no_tier_available``. When the last
tier's 2xx reply only failed ``accept``, that reply is the best answer there is: it is
relayed with ``x-rp-fallback: rejected`` rather than turned into an error.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import orjson

from proxy.call import Call, Reply
from proxy.classify import Verdict, classify
from proxy.config import FallbackResponse
from proxy.context import RouteContext
from proxy.errors import CircuitOpen, NoTierAvailable, ProxyError, Rejected

if TYPE_CHECKING:
    from proxy.runtime import CompiledTier


class Tiers:
    __slots__ = ("_clock", "_fallback", "_fallbacks", "_log", "_route")

    def __init__(self, ctx: RouteContext) -> None:
        self._route = ctx.route.name
        self._clock = ctx.deps.clock
        self._fallbacks = ctx.deps.metrics.fallbacks
        self._log = ctx.deps.log
        fb = ctx.route.fallback_response
        self._fallback = None if fb is None else _static_reply(fb)

    async def __call__(self, call: Call) -> Reply:
        last: Reply | ProxyError | None = None
        skipped: set[str] = set()
        reason: str | None = None
        for tier in call.arm.tiers:
            if call.downgrade and tier.expensive:
                skipped.add("downgrade")
                reason = reason or "downgrade"
                continue
            if reason is not None:
                self._fallbacks.labels(self._route, reason).inc()
                self._log.info("tier_fallback", request_id=call.request_id, route=self._route,
                               to_tier=tier.index, reason=reason)
            outcome = await _run(tier, call)
            decision = classify(outcome, None, self._clock.time())
            if decision.verdict in (Verdict.OK, Verdict.RELAY):
                assert isinstance(outcome, Reply)
                if reason is not None:
                    outcome.fallback_reason = reason
                return outcome
            if decision.verdict is Verdict.FAIL:
                assert isinstance(outcome, ProxyError)
                raise outcome
            if isinstance(outcome, CircuitOpen) and last is None:
                skipped.add("circuit_open")
            else:
                _discard(last)
                last = outcome
            reason = decision.reason
        return self._exhausted(call, last, skipped, reason)

    def _exhausted(self, call: Call, last: Reply | ProxyError | None, skipped: set[str],
                   reason: str | None) -> Reply:
        if self._fallback is not None:
            self._fallbacks.labels(self._route, "exhausted").inc()
            _discard(last)
            reply = Reply(self._fallback.status, list(self._fallback.headers),
                          body=self._fallback.body, source="fallback_response",
                          fallback_reason="exhausted")
            return reply
        if isinstance(last, Rejected) and isinstance(last.reply, Reply):
            last.reply.fallback_reason = "rejected"
            return last.reply
        if isinstance(last, Reply):
            if reason is not None and last.tier not in (None, 1):
                last.fallback_reason = last.fallback_reason or reason
            return last
        if isinstance(last, ProxyError):
            raise last
        if skipped == {"circuit_open"}:
            raise CircuitOpen("every tier's circuit is open")
        raise NoTierAvailable("no tier could take the request ("
                              + ", ".join(sorted(skipped)) + ")")


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
