"""One budget's live side (see :mod:`policies.budget` for the semantics): its limits as the
ledger sees them, calendar windows and keys, reserve / settle / refund against the ledger
(with settlements kept and retried while the shared state is unreachable), threshold
crossings, gauges and ``/admin/status`` rows."""

from __future__ import annotations

import asyncio
import hashlib
import math
import re
from collections import OrderedDict, deque
from datetime import UTC, datetime
from typing import Any, NamedTuple
from zoneinfo import ZoneInfo

from proxy.call import Call
from proxy.config import BudgetConfig, Threshold
from proxy.context import Deps
from proxy.errors import StateUnavailable
from proxy.state.backend import StateError
from proxy.state.ledger import (
    COUNTER_GRACE_S,
    NANO_PER_USD,
    CounterRef,
    Ledger,
    Limits,
    MemoryLedger,
    Reservation,
    ReserveResult,
    Totals,
    Window,
    calendar_window,
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


class Hold(NamedTuple):
    budget: Budget
    reservation: Reservation
    display: str


class Refused(NamedTuple):
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
        # the memory ledger is atomic and never waits: settled in place, without a task
        self._inplace = ledger if isinstance(ledger, MemoryLedger) else None
        #: reserved with :meth:`reserve_now` and settled in place (the memory ledger)
        self.inplace = self._inplace is not None
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
        self._spend_gauge = m.gauge(m.budget_spend_usd.labels(name, gauge_key))
        self._util_gauge = m.gauge(m.budget_utilization.labels(name, gauge_key))
        self._shown: tuple[float, float] | None = None  # what the two gauges show
        self._counted: tuple[str, int, int] | None = None  # (window, spend, requests) shown
        self._crossings = m.budget_crossings
        if self._header is None:
            self._keys["global"] = self._tag + "global"
        self._global = (self._tag + "global", "global")
        #: the counter of the latest call (one key, one window: the same object each time)
        self._last_ref = CounterRef("", "", 0.0)

    # ------------------------------------------------------------------ keys and windows

    def window(self, now: float) -> Window:
        w = self._win
        if not w.start <= now < w.end:
            w = self._win = calendar_window(self.cfg.window, self._tz, now)
        return w

    def key_of(self, call: Call) -> tuple[str, str]:
        """(tag, display) of the call's counter."""
        if self._header is None:
            return self._global
        value = call.headers.get(self._header)
        if value is None:
            return self._tag + "none", "(none)"
        digest = hashlib.sha256(value.encode("utf-8", "replace")).hexdigest()[:24]
        display = ("sha256:" + digest[:12]) if self._hashed else (
            value[:128] if value.isprintable() else value[:128].encode("ascii", "replace")
            .decode())
        return self._tag + digest, display

    def _counter(self, tag: str, win: Window) -> CounterRef:
        ref = self._last_ref
        if ref.tag == tag and ref.window == win.id:  # the common case: one key, one window
            return ref
        ref = self._last_ref = CounterRef(tag, win.id, win.end + COUNTER_GRACE_S)
        return ref

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
        return self._admitted(call, res, tag, display, win, now)

    def reserve_now(self, call: Call, estimate_nano: int, degraded_nano: int) -> Hold | Refused:
        """:meth:`reserve` with the memory ledger (:attr:`inplace`): no coroutine, no I/O,
        nothing that can fail for want of a shared state."""
        assert self._inplace is not None
        now = self._deps.clock.time()
        win = self.window(now)
        tag, display = self.key_of(call)
        res = self._inplace.reserve_now(
            self._counter(tag, win), self.limits, estimate_nano, degraded_nano, now,
            now + max(call.time_left(), 0.0) + HOLD_MARGIN_S)
        return self._admitted(call, res, tag, display, win, now)

    def _admitted(self, call: Call, res: ReserveResult, tag: str, display: str, win: Window,
                  now: float) -> Hold | Refused:
        self._seen(display, tag, win, res.totals)
        if res.new_flags:
            self._announce(res.new_flags, display, res.totals, call.request_id, "refusal")
        if res.degraded:
            call.downgrade = True
        if res.reservation is None:
            return Refused(self, win.end - now)
        return Hold(self, res.reservation, display)

    def finish(self, hold: Hold, cost_usd: float, counted: bool,
               request_id: str) -> asyncio.Task[None] | None:
        """Settle (or refund) in a task of its own: it completes even if the request is
        cancelled meanwhile; ``flush`` waits for it at shutdown. With the memory ledger
        (atomic, no I/O) it is settled here and now: None, nothing to wait for."""
        cost_nano = usd_to_nano(cost_usd)
        ledger = self._inplace
        if ledger is not None:
            now = self._deps.clock.time()
            reservation = hold.reservation
            new: tuple[str, ...] = ()
            if cost_nano == 0 and not counted:
                totals = ledger.refund_now(reservation, now)
            else:
                res = ledger.settle_now(reservation, cost_nano, counted, self.limits, now)
                totals, new = res.totals, res.new_flags
            self._settled(reservation, hold.display, totals, new, request_id, now)
            return None
        task = asyncio.get_running_loop().create_task(
            self._settle(hold.reservation, hold.display, cost_nano, counted, request_id))
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
        self._settled(reservation, display, totals, new, request_id, now)

    def _settled(self, reservation: Reservation, display: str, totals: Totals,
                 new: tuple[str, ...], request_id: str | None, now: float) -> None:
        if self._inplace is None:
            self._ok()
        win = self.window(now)
        if reservation.counter.window == win.id:
            self._seen(display, reservation.counter.tag, win, totals)
        if new:
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
        util = 0.0
        cfg = self.cfg
        if cfg.limit_usd is not None:
            util = max(util, totals.spend_nano / NANO_PER_USD / cfg.limit_usd)
        if cfg.limit_requests is not None:
            util = max(util, totals.requests / cfg.limit_requests)
        return util

    def _seen(self, display: str, tag: str, win: Window, totals: Totals) -> None:
        if self._header is not None:  # per-key: the recent keys, for /admin/status
            self._keys[display] = tag
            self._keys.move_to_end(display)
            if len(self._keys) > MAX_STATUS_KEYS:
                old, _ = self._keys.popitem(last=False)
                self._last.pop(old, None)
        self._last[display] = (win.id, totals)
        spend_nano, requests = totals.spend_nano, totals.requests
        if self._header is None and (win.id, spend_nano, requests) == self._counted:
            return  # a reservation changes neither the spend nor the requests: nothing to show
        self._counted = (win.id, spend_nano, requests)
        util = self.utilization(totals)
        if self._header is not None:
            peak_win, peak = self._peak
            if peak_win == win.id and util < peak:
                return
            self._peak = (win.id, util)
        spend = spend_nano / NANO_PER_USD
        if (spend, util) != self._shown:  # no lock, no set when unchanged
            self._shown = (spend, util)
            self._spend_gauge.set(spend)
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
