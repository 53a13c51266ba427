"""budget: spend and request caps per calendar window, with alert / downgrade / block steps.

Route level, after the cache (a hit never reaches it), before the tiers. For each budget the
route lists, in order:

1. **Reserve** an estimate in the ledger (:mod:`proxy.state.ledger`), atomically: input
   tokens ≈ body bytes / 4, output = the body's ``max_tokens`` / ``max_completion_tokens`` /
   ``max_output_tokens`` or the budget's ``default_output_tokens``, priced at the arm's first
   tier (or, when the counter is past a ``downgrade`` step, its first tier not marked
   ``expensive``), or ``cost_per_request``. The call is admitted iff
   ``spend < cap`` and ``spend + reserved + estimate <= cap`` (cap = the lowest ``block``
   step × ``limit_usd``), and ``requests + in-flight + 1 <= cap`` for ``limit_requests``;
   so replicas together overshoot only by what in-flight calls cost beyond their estimates.
   Refused: the route's ``fallback_response`` (``x-rp-fallback: budget``) or 429
   ``budget_exceeded`` with ``Retry-After`` = seconds to the window's end. Past a
   ``downgrade`` step the call skips ``expensive`` tiers (``call.downgrade``).
2. **Settle** when the reply is done (a stream: when it closes) with the call's actual cost
   over every attempt (``call.spent_usd``, from :mod:`proxy.metering`); a request counts
   toward ``limit_requests`` when a provider answered it with a non-error status or it cost
   money. A call that fails or whose client goes away settles what it spent (a refund when
   nothing). Settlements that cannot reach Redis are kept and retried (and flushed at
   shutdown); a hold that is never settled expires with the request's deadline.
3. **Crossings**: each step is announced once per window and key, fleet-wide (the ledger's
   flags): log ``budget_threshold_crossed`` (budget, key, at, action, spend_usd) and
   ``rp_budget_threshold_crossings_total{budget,action}``. The ``block`` step is also
   crossed by the first refusal (the room left is smaller than a call's estimate).

Keys: ``per: global`` is key ``global``; ``per: header:<name>`` keeps one counter per header
value (a missing header is key ``(none)``), stored under a digest of the value; credential
headers are shown as ``sha256:<digest>`` too. Gauges ``rp_budget_spend_usd`` and
``rp_budget_utilization_ratio`` are labelled ``key="global"``, or ``key="per_key_max"``
(the most-utilized key this replica saw in the window) for per-key budgets, so label
cardinality stays bounded. ``/admin/status`` lists the global key from the start and, for
per-key budgets, the last 100 keys this replica served.

Shared state unreachable: ``on_state_error: block`` answers 503 ``state_unavailable`` and
marks the feature ``budget`` blind for ``/readyz`` until a ledger call succeeds again;
``allow`` lets the call through (counted in ``rp_state_errors_total``) and settles its cost
once Redis answers again.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, NamedTuple

import orjson

from policies.budget_state import Budget, Hold, Refused
from proxy.call import Call, Handler, Reply
from proxy.config import BudgetConfig, FallbackResponse, Price
from proxy.context import RouteContext
from proxy.errors import BudgetExceeded
from proxy.headers import CREDENTIALS
from proxy.metering import Pricing, output_cap, pricing_for, requested_model
from proxy.state.ledger import NANO_PER_USD, make_ledger

if TYPE_CHECKING:
    from proxy.runtime import Arm, CompiledTier


class _TierPrice(NamedTuple):
    """What a budget estimate needs of one tier, looked up once per arm."""

    pricing: Pricing
    fmt: str
    model: str | None  # the tier's own model (None: the request's)
    fixed: Price | None  # the tier model's price (when it has one)


class BudgetStage:
    """The route stage: reserve in every listed budget, call on, settle."""

    __slots__ = ("_budgets", "_fallback", "_fallbacks", "_plans", "_pricings", "_route")

    def __init__(self, ctx: RouteContext, budgets: list[Budget]) -> None:
        self._budgets = budgets
        self._route = ctx.route.name
        self._fallbacks = ctx.deps.metrics.fallbacks
        self._pricings: dict[str, tuple[Pricing, str]] = {
            name: (pricing_for(ctx.keeper, name, p, ctx.deps.log), p.format)
            for name, p in ctx.config.providers.items()
        }
        fb = ctx.route.fallback_response
        self._fallback = None if fb is None else _fallback_reply(fb)
        #: id(arm) -> (arm, its estimate plan): the arm kept so that a reused id cannot match
        self._plans: dict[int, tuple[Arm, tuple[_TierPrice, _TierPrice | None]]] = {}

    async def __call__(self, call: Call, next_: Handler) -> Reply:
        holds: list[Hold] = []
        try:
            for budget in self._budgets:
                estimates = self._estimates(call, budget)
                outcome = budget.reserve_now(call, *estimates) if budget.inplace \
                    else await budget.reserve(call, *estimates)
                if isinstance(outcome, Refused):
                    self._release(holds, call)
                    return self._refuse(call, outcome)
                holds.append(outcome)
        except BaseException:
            self._release(holds, call)
            raise
        try:
            reply = await next_(call)
        except BaseException:
            self._release(holds, call)
            raise
        if reply.stream is not None:
            reply.stream.on_close.append(lambda completed: self._settle(holds, call, reply))
            return reply
        settling = self._settle(holds, call, reply)
        if settling is not None:
            await settling
        return reply

    def _estimates(self, call: Call, budget: Budget) -> tuple[int, int]:
        """Nano-USD estimates at the arm's first tier, and at its first non-expensive tier."""
        if not budget.priced:
            return 0, 0
        arm = call.arm
        found = self._plans.get(id(arm))
        if found is None or found[0] is not arm:
            found = self._plans[id(arm)] = (arm, self._plan(arm.tiers))
        first, cheap = found[1]
        tin = (len(call.body) + 3) // 4  # tokens_of: ≈4 bytes a token
        tout = output_cap(call)
        tout = budget.cfg.default_output_tokens if tout is None else tout
        est = self._tier_cost(call, first, tin, tout)
        degraded = est if cheap is None else self._tier_cost(call, cheap, tin, tout)
        return round(est * NANO_PER_USD), round(degraded * NANO_PER_USD)

    def _plan(self, tiers: list[CompiledTier]) -> tuple[_TierPrice, _TierPrice | None]:
        """An arm's first tier and, when that one is ``expensive``, its first cheap tier."""
        cheap = next((t for t in tiers if not t.expensive), tiers[0])
        return self._tier_price(tiers[0]), None if cheap is tiers[0] else self._tier_price(cheap)

    def _tier_price(self, tier: CompiledTier) -> _TierPrice:
        pricing, fmt = self._pricings[tier.provider]
        model = tier.cfg.model
        # a tier with its own model has one price, looked up here; else the request's model's
        fixed = pricing.price(model) if model is not None else None
        return _TierPrice(pricing, fmt, model, fixed)

    @staticmethod
    def _tier_cost(call: Call, tp: _TierPrice, tin: int, tout: int) -> float:
        pricing = tp.pricing
        if pricing.cost_per_request is not None:
            return pricing.cost_per_request
        price = tp.fixed if tp.model is not None else pricing.price(requested_model(call, tp.fmt))
        return 0.0 if price is None else (tin * price.input + tout * price.output) / 1e6

    def _refuse(self, call: Call, refused: Refused) -> Reply:
        if self._fallback is not None:
            self._fallbacks.labels(self._route, "budget").inc()
            fb = self._fallback
            return Reply(fb.status, list(fb.headers), body=fb.body, source="fallback_response",
                         fallback_reason="budget")
        budget = refused.budget
        raise BudgetExceeded(f"budget '{budget.name}' is exhausted for this {budget.cfg.window}",
                             retry_after_s=refused.retry_after_s)

    def _settle(self, holds: list[Hold], call: Call, reply: Reply) -> Any:
        counted = (reply.source == "provider" and reply.status < 400) or call.spent_usd > 0
        tasks = [task for h in holds
                 if (task := h.budget.finish(h, call.spent_usd, counted, call.request_id))
                 is not None]  # None: settled in place (the memory ledger)
        if not tasks:
            return None
        if len(tasks) == 1:  # no gather future on top of the task
            return asyncio.shield(tasks[0])
        return asyncio.shield(asyncio.gather(*tasks))

    def _release(self, holds: list[Hold], call: Call) -> None:
        """The call failed or was cancelled: settle what it spent, in the background."""
        for h in holds:
            h.budget.finish(h, call.spent_usd, call.spent_usd > 0, call.request_id)


def _fallback_reply(fb: FallbackResponse) -> Reply:
    data = fb.body.encode() if isinstance(fb.body, str) else orjson.dumps(fb.body)
    return Reply(fb.status, [(k.lower(), v) for k, v in fb.headers.items()], body=data,
                 source="fallback_response")


def _secret_headers(ctx: RouteContext) -> frozenset[str]:
    names = set(CREDENTIALS) | {"cookie", "proxy-authorization"}
    if ctx.config.server.clients is not None:
        names.add(ctx.config.server.clients.header.lower())
    for p in ctx.config.providers.values():
        names.update(p.headers)
    return frozenset(names)


def build_route(ctx: RouteContext) -> BudgetStage | None:
    """Every configured budget is built and registered (listed in ``/admin/status`` from
    the start); a route without ``budgets`` gets no stage."""
    if not ctx.config.budgets:
        return None
    deps = ctx.deps
    ledger = ctx.keeper.keep("ledger", "budget", None, lambda: make_ledger(deps.state))
    secret = _secret_headers(ctx)
    built: dict[str, Budget] = {}

    def factory(name: str, cfg: BudgetConfig) -> Callable[[], Budget]:
        return lambda: Budget(name, cfg, ledger, deps, secret)

    for name, cfg in ctx.config.budgets.items():
        budget = built[name] = ctx.keeper.keep("budget", name, (cfg, secret),
                                               factory(name, cfg))
        ctx.register("budget", name, budget)
        ctx.register("flush", f"budget:{name}", budget.flush)
    if not ctx.route.budgets:
        return None
    return BudgetStage(ctx, [built[name] for name in ctx.route.budgets])
