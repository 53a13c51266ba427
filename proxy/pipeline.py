"""The fixed order of the request flow — a correctness property, so it lives here only.

Route level (per request)::

    client_auth → faults → redact → canary → cache → budget → tiers

(request id, access log and the error boundary wrap this chain in :mod:`proxy.server`.)

Attempt level (per tier, built once per tier of each arm)::

    retry → circuit → rate_limit → record → timeout → validate → accept → faults → meter → send

(``record`` sits after the local gates: a tier skipped for an open circuit or a local rate
limit made no upstream attempt, so it is not counted in ``x-rp-attempts``.)

Each policy module exposes ``build_route(ctx)`` and/or ``build_attempt(ctx)`` returning a
policy — an object with ``async def __call__(self, call, next_) -> Reply`` — or ``None``
when its block is not configured, so an unused policy costs nothing. The YAML only switches
stages on and sets their numbers; it never changes this order.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import Protocol

import orjson

from policies import (
    accept,
    budget,
    cache,
    canary,
    circuit,
    client_auth,
    faults,
    ratelimit,
    redact,
    retry,
    tiers,
    timeout,
    validate,
)
from proxy.call import Call, Handler, Reply
from proxy.context import AttemptContext, RouteContext
from proxy.metering import build_attempt as meter_attempt
from proxy.record import build_attempt as record_attempt
from proxy.upstream import ProviderClient


class Policy(Protocol):
    async def __call__(self, call: Call, next_: Handler) -> Reply: ...


RouteBuilder = Callable[[RouteContext], Policy | None]
AttemptBuilder = Callable[[AttemptContext], Policy | None]

ROUTE_STAGES: tuple[RouteBuilder, ...] = (
    client_auth.build_route,
    faults.build_route,
    redact.build_route,
    canary.build_route,
    cache.build_route,
    budget.build_route,
)
ATTEMPT_STAGES: tuple[AttemptBuilder, ...] = (
    retry.build_attempt,
    circuit.build_attempt,
    ratelimit.build_attempt,
    record_attempt,
    timeout.build_attempt,
    validate.build_attempt,
    accept.build_attempt,
    faults.build_attempt,
    meter_attempt,  # innermost: every reply a provider sent (and billed), never a fault's
)


def compose(stages: Sequence[Policy], terminal: Handler) -> Handler:
    """Nest policies so that ``stages[0]`` runs first and ``terminal`` last."""
    handler = terminal
    for policy in reversed(stages):
        handler = _bind(policy, handler)
    return handler


def _bind(policy: Policy, next_: Handler) -> Handler:
    def bound(call: Call) -> Awaitable[Reply]:
        return policy(call, next_)
    return bound


def build_route_chain(ctx: RouteContext) -> Handler:
    stages = [p for build in ROUTE_STAGES if (p := build(ctx)) is not None]
    return compose(stages, tiers.build_terminal(ctx))


def build_attempt_chain(ctx: AttemptContext) -> Handler:
    stages = [p for build in ATTEMPT_STAGES if (p := build(ctx)) is not None]
    return compose(stages, Send(ctx))


class Send:
    """The terminal attempt stage: one request to the tier's provider."""

    __slots__ = ("_client", "_index", "_model", "_tier")

    def __init__(self, ctx: AttemptContext) -> None:
        self._client: ProviderClient = ctx.provider.client
        self._tier = ctx.tier
        self._index = ctx.tier_index
        self._model = ctx.tier.model

    async def __call__(self, call: Call) -> Reply:
        body = call.body if self._model is None else self._rewritten(call)
        reply = await self._client.send(call, self._tier, body)
        reply.tier = self._index
        reply.model = self._model
        return reply

    def _rewritten(self, call: Call) -> bytes:
        """The body with this tier's ``model``; built once per call and tier."""
        bodies = call.tier_bodies
        if bodies is None:
            bodies = call.tier_bodies = {}
        body = bodies.get(self._index)
        if body is None:
            data = call.json()
            if isinstance(data, dict):
                body = orjson.dumps({**data, "model": self._model})
            else:
                body = call.body
            bodies[self._index] = body
        return body
