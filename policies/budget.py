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
import hashlib
import math
import re
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from zoneinfo import ZoneInfo

import orjson

from proxy.call import Call, Handler, Reply
from proxy.config import BudgetConfig, FallbackResponse, Threshold
from proxy.context import Deps, RouteContext
from proxy.errors import BudgetExceeded, StateUnavailable
from proxy.headers import CREDENTIALS
from proxy.metering import Pricing, output_cap, pricing_for, requested_model, tokens_of
from proxy.state.backend import StateError
from proxy.state.ledger import (
    COUNTER_GRACE_S,
    NANO_PER_USD,
    CounterRef,
    Ledger,
    Limits,
    Reservation,
    Totals,
    Window,
    calendar_window,
    make_ledger,
    unheld,
    usd_to_nano,
)

HOLD_MARGIN_S = 60.0  # a hold outlives its request's deadline by this much
MAX_STATUS_KEYS = 100
MAX_PENDING = 10_000
_FEATURE = "budget"


def limits_of(cfg: BudgetConfig) -> Limits:
    """The ledger's view of a budget: caps, degrade points and threshold flags."""
    lim_nano = usd_to_nano(cfg.limit_usd) if cfg.limit_usd is not None else None
    lim_req = cfg.limit_requests

    def at_nano(at: float) -> int | None:
        return None if lim_nano is None else round(at * lim_nano)

    def at_req(at: float, ceil: bool) -> int | None:
        if lim_req is None:
            return None
        return math.ceil(at * lim_req - 1e-9) if ceil else math.floor(at * lim_req + 1e-9)

    block = next((t for t in cfg.thresholds if t.action == "block"), None)
    degrade = next((t for t in cfg.thresholds if t.action == "downgrade"), None)
    return Limits(
        cap_nano=at_nano(block.at) if block else None,
        cap_requests=at_req(block.at, ceil=False) if block else None,
        degrade_nano=at_nano(degrade.at) if degrade else None,
        degrade_requests=at_req(degrade.at, ceil=True) if degrade else None,
        refuse_flag=flag_of(block) if block else None,
        thresholds=tuple((flag_of(t), at_nano(t.at), at_req(t.at, ceil=True))
                         for t in cfg.thresholds),
    )


def flag_of(t: Threshold) -> str:
    return f"{t.at:g}:{t.action}"


@dataclass(frozen=True, slots=True)
class Hold:
    budget: Budget
    reservation: Reservation
    display: str


@dataclass(frozen=True, slots=True)
class Refused:
    budget: Budget
    retry_after_s: float


class Budget:
    """One ``budgets.<name>``: windows, keys, ledger calls, crossings, gauges, status rows.
    Shared by every route that lists it; kept across reloads while its config is unchanged."""

    def __init__(self, name: str, cfg: BudgetConfig, ledger: Ledger, deps: Deps,
                 secret_headers: frozenset[str]) -> None:
        self.name = name
        self.cfg = cfg
        self.limits = limits_of(cfg)
        self.priced = cfg.limit_usd is not None
        self._ledger = ledger
        self._deps = deps
        self._tz = ZoneInfo(cfg.timezone)
        self._header = None if cfg.per == "global" else cfg.per.removeprefix("header:")
        self._hashed = self._header in secret_headers
        self._tag = "b:" + re.sub(r"[^A-Za-z0-9_.-]", "_", name) + ":"
        self._steps = {flag_of(t): t for t in cfg.thresholds}
        self._win = calendar_window(cfg.window, self._tz, deps.clock.time())
        self._keys: OrderedDict[str, str] = OrderedDict()  # display -> tag, most recent last
        self._last: dict[str, tuple[str, Totals]] = {}  # display -> (window id, totals)
        self._peak = ("", -1.0)  # (window id, utilization) behind the per_key_max gauges
        self._tasks: set[asyncio.Task[None]] = set()
        self._pending: deque[tuple[Reservation, str, int, bool]] = deque(maxlen=MAX_PENDING)
        self._draining = False
        m = deps.metrics
        gauge_key = "global" if self._header is None else "per_key_max"
        self._spend_gauge = m.budget_spend_usd.labels(name, gauge_key)
        self._util_gauge = m.budget_utilization.labels(name, gauge_key)
        self._crossings = m.budget_crossings
        if self._header is None:
            self._keys["global"] = self._tag + "global"

    # ------------------------------------------------------------------ keys and windows

    def window(self, now: float) -> Window:
        w = self._win
        if not w.start <= now < w.end:
            w = self._win = calendar_window(self.cfg.window, self._tz, now)
        return w

    def key_of(self, call: Call) -> tuple[str, str]:
        """(tag, display) of the call's counter."""
        if self._header is None:
            return self._tag + "global", "global"
        value = call.headers.get(self._header)
        if value is None:
            return self._tag + "none", "(none)"
        digest = hashlib.sha256(value.encode("utf-8", "replace")).hexdigest()[:24]
        display = ("sha256:" + digest[:12]) if self._hashed else (
            value[:128] if value.isprintable() else value[:128].encode("ascii", "replace")
            .decode())
        return self._tag + digest, display

    def _counter(self, tag: str, win: Window) -> CounterRef:
        return CounterRef(tag, win.id, win.end + COUNTER_GRACE_S)

    # ------------------------------------------------------------------ admission

    async def reserve(self, call: Call, estimate_nano: int, degraded_nano: int) -> Hold | Refused:
        """Hold an estimate, or refuse. State down: 503 (``block``), or admit with an empty
        hold (``allow``) whose settlement waits for the state to answer again."""
        now = self._deps.clock.time()
        win = self.window(now)
        tag, display = self.key_of(call)
        try:
            res = await self._ledger.reserve(
                self._counter(tag, win), self.limits, estimate_nano, degraded_nano, now,
                now + max(call.time_left(), 0.0) + HOLD_MARGIN_S)
        except StateError:
            if self.cfg.on_state_error == "allow":  # settled later, when Redis answers again
                return Hold(self, unheld(self._counter(tag, win)), display)
            self._deps.state.set_blind(_FEATURE, True)
            raise StateUnavailable(f"budget '{self.name}' cannot reach its shared state") \
                from None
        self._ok()
        self._seen(display, tag, win, res.totals)
        self._announce(res.new_flags, display, res.totals, call.request_id, "refusal")
        if res.degraded:
            call.downgrade = True
        if res.reservation is None:
            return Refused(self, win.end - now)
        return Hold(self, res.reservation, display)

    def finish(self, hold: Hold, cost_usd: float, counted: bool,
               request_id: str) -> asyncio.Task[None]:
        """Settle (or refund) in a task of its own: it completes even if the request is
        cancelled meanwhile; ``flush`` waits for it at shutdown."""
        task = asyncio.get_running_loop().create_task(
            self._settle(hold.reservation, hold.display, usd_to_nano(cost_usd), counted,
                         request_id))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _settle(self, reservation: Reservation, display: str, cost_nano: int,
                      counted: bool, request_id: str | None) -> None:
        now = self._deps.clock.time()
        try:
            if cost_nano == 0 and not counted:
                totals = await self._ledger.refund(reservation, now)
                new: tuple[str, ...] = ()
            else:
                res = await self._ledger.settle(reservation, cost_nano, counted, self.limits,
                                                now)
                totals, new = res.totals, res.new_flags
        except StateError:
            if cost_nano or counted:
                self._pending.append((reservation, display, cost_nano, counted))
            return
        self._ok()
        win = self.window(now)
        if reservation.counter.window == win.id:
            self._seen(display, reservation.counter.tag, win, totals)
        self._announce(new, display, totals, request_id, "spend")

    def _ok(self) -> None:
        """A ledger call worked: the state is visible again; retry what was left pending."""
        self._deps.state.set_blind(_FEATURE, False)
        if self._pending and not self._draining:
            self._draining = True
            task = asyncio.get_running_loop().create_task(self._drain())
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _drain(self) -> None:
        try:
            while self._pending:
                reservation, display, cost_nano, counted = self._pending.popleft()
                before = len(self._pending)
                await self._settle(reservation, display, cost_nano, counted, None)
                if len(self._pending) > before:  # failed again: it went back; stop for now
                    return
        finally:
            self._draining = False

    async def flush(self) -> None:
        """Shutdown: wait for settlements in flight, then retry the pending ones once."""
        if self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)
        if self._pending and not self._draining:
            self._draining = True
            await self._drain()

    # ------------------------------------------------------------------ visibility

    def utilization(self, totals: Totals) -> float:
        ratios = [0.0]
        if self.cfg.limit_usd is not None:
            ratios.append(totals.spend_nano / NANO_PER_USD / self.cfg.limit_usd)
        if self.cfg.limit_requests is not None:
            ratios.append(totals.requests / self.cfg.limit_requests)
        return max(ratios)

    def _seen(self, display: str, tag: str, win: Window, totals: Totals) -> None:
        self._keys[display] = tag
        self._keys.move_to_end(display)
        if len(self._keys) > MAX_STATUS_KEYS:
            old, _ = self._keys.popitem(last=False)
            self._last.pop(old, None)
        self._last[display] = (win.id, totals)
        util = self.utilization(totals)
        if self._header is not None:
            peak_win, peak = self._peak
            if peak_win == win.id and util < peak:
                return
            self._peak = (win.id, util)
        self._spend_gauge.set(totals.spend_nano / NANO_PER_USD)
        self._util_gauge.set(util)

    def _announce(self, flags: tuple[str, ...], display: str, totals: Totals,
                  request_id: str | None, trigger: str) -> None:
        """Log and count the steps this replica crossed first. ``trigger``: ``spend`` (the
        settled spend reached the step) or ``refusal`` (the first call refused: what is
        spent plus what is held for calls in flight leaves no room)."""
        for flag in flags:
            step = self._steps.get(flag)
            if step is None:
                continue
            self._crossings.labels(self.name, step.action).inc()
            self._deps.log.info("budget_threshold_crossed", request_id=request_id,
                                budget=self.name, key=display, at=step.at, action=step.action,
                                spend_usd=round(totals.spend_nano / NANO_PER_USD, 9),
                                reserved_usd=round(totals.reserved_nano / NANO_PER_USD, 9),
                                requests=totals.requests, trigger=trigger)

    async def status(self) -> list[dict[str, Any]]:
        """``/admin/status`` rows: the global key, or the recent keys of a per-key budget."""
        win = self.window(self._deps.clock.time())
        rows = []
        reachable = True
        for display, tag in list(self._keys.items())[::-1]:
            totals = None
            if reachable:
                try:
                    totals = await self._ledger.read(self._counter(tag, win))
                except StateError:
                    reachable = False  # the last known values, without waiting per key
            if totals is None:
                last = self._last.get(display)
                totals = last[1] if last is not None and last[0] == win.id else Totals()
            rows.append(self._row(display, totals, win))
        return rows

    def _row(self, display: str, totals: Totals, win: Window) -> dict[str, Any]:
        util = self.utilization(totals)
        level = "ok"
        for t in self.cfg.thresholds:
            if util >= t.at or flag_of(t) in totals.flags:
                level = t.action
        return {
            "name": self.name, "key": display,
            "spend_usd": round(totals.spend_nano / NANO_PER_USD, 9),
            "requests": totals.requests, "limit_usd": self.cfg.limit_usd,
            "limit_requests": self.cfg.limit_requests, "utilization": round(util, 6),
            "level": level,
            "resets_at": datetime.fromtimestamp(win.end, UTC).isoformat(),
        }


class BudgetStage:
    """The route stage: reserve in every listed budget, call on, settle."""

    __slots__ = ("_budgets", "_fallback", "_fallbacks", "_pricings", "_route")

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

    async def __call__(self, call: Call, next_: Handler) -> Reply:
        holds: list[Hold] = []
        try:
            for budget in self._budgets:
                outcome = await budget.reserve(call, *self._estimates(call, budget))
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
        await self._settle(holds, call, reply)
        return reply

    def _estimates(self, call: Call, budget: Budget) -> tuple[int, int]:
        """Nano-USD estimates at the arm's first tier, and at its first non-expensive tier."""
        if not budget.priced:
            return 0, 0
        tiers = call.arm.tiers
        tin = tokens_of(len(call.body))
        tout = output_cap(call)
        tout = budget.cfg.default_output_tokens if tout is None else tout
        first = self._tier_cost(call, tiers[0].provider, tiers[0].cfg.model, tin, tout)
        cheap = next((t for t in tiers if not t.expensive), tiers[0])
        degraded = first if cheap is tiers[0] else self._tier_cost(
            call, cheap.provider, cheap.cfg.model, tin, tout)
        return usd_to_nano(first), usd_to_nano(degraded)

    def _tier_cost(self, call: Call, provider: str, model: str | None, tin: int,
                   tout: int) -> float:
        pricing, fmt = self._pricings[provider]
        if pricing.cost_per_request is not None:
            return pricing.cost_per_request
        price = pricing.price(model or requested_model(call, fmt))
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
        tasks = [h.budget.finish(h, call.spent_usd, counted, call.request_id) for h in holds]
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
