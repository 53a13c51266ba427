"""The budget ledger: windowed spend counters with atomic check-and-reserve, settle, refund.

One *counter* is (budget, key, calendar window). It holds, in integer nano-USD (1e-9 USD,
so sums are exact and Lua's doubles stay exact up to $9M) and requests:

- ``spend`` / ``requests``: what settled calls used;
- ``reserved`` / ``reserved_requests``: estimates of the calls in flight;
- flags: thresholds already announced this window (fleet-wide "once per window").

Operations (each one atomic: one Lua script on Redis, one synchronous step in memory):

- :meth:`Ledger.reserve`: admit a call iff ``spend < cap`` and
  ``spend + reserved + estimate <= cap`` (and ``requests + reserved_requests + 1 <=
  cap_requests``), then hold its estimate. Concurrent reservations see each other, so N
  replicas together overshoot a cap only by what in-flight calls cost beyond their estimates.
  A refusal sets the refusal flag (the ``block`` threshold) once per window.
- :meth:`Ledger.settle`: release the hold and add the actual cost (and the request when it
  counts); thresholds reached by the new totals set their flag, and the ones this call set
  first are returned (exactly one caller in the fleet sees each crossing).
- :meth:`Ledger.refund`: release the hold, add nothing.
- :meth:`Ledger.read`: the totals, with the flags set this window (the other operations
  answer totals without flags).

A hold expires at ``hold_until`` (the request's deadline plus a margin): a replica that dies
with calls in flight cannot shrink the room for the rest of the window. A settle that arrives
after its hold expired still adds its cost, without releasing the hold twice.

Settling is idempotent for ``SETTLE_DEDUPE_S``: a settle whose reply timed out may have run,
and the caller retries it later (once the state answers again); the counter remembers the
holds it settled, so the retry cannot count the call twice. (A Redis that lost its data has
forgotten them too: the retry then records the call, which is what is wanted.)
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any, Literal, NamedTuple, Protocol
from zoneinfo import ZoneInfo

from proxy.state import ledger_lua as lua

if TYPE_CHECKING:
    from proxy.state.backend import StateBackend

NANO_PER_USD = 1_000_000_000
#: how long a counter in Redis remembers a settled hold (retried settlements are deduplicated)
SETTLE_DEDUPE_S = 3600.0
#: the memory ledger remembers at most this many settled holds per counter (the most recent
#: ones, at least half as many, whatever their age): in one process a settlement is never
#: retried (no network to time out), so the dedupe only guards against a double call, and
#: an hour of settlements would grow by ~200 bytes per request
MEMORY_SETTLED_MAX = 10_000
#: counters outlive their window by this much (late settlements, the status of yesterday)
COUNTER_GRACE_S = 2 * 86400.0


def usd_to_nano(usd: float) -> int:
    return round(usd * NANO_PER_USD)


# --------------------------------------------------------------------------- windows


@dataclass(frozen=True, slots=True)
class Window:
    """A calendar window ``[start, end)`` in unix seconds; ``id`` names it in keys."""

    id: str
    start: float
    end: float


def calendar_window(kind: Literal["day", "month"], tz: ZoneInfo, now: float) -> Window:
    """The calendar day or month containing ``now`` in ``tz`` (DST-aware: a day may be 23 h)."""
    local = datetime.fromtimestamp(now, tz)
    if kind == "day":
        start = datetime(local.year, local.month, local.day, tzinfo=tz)
        nxt = start.date() + timedelta(days=1)
        end = datetime(nxt.year, nxt.month, nxt.day, tzinfo=tz)
        wid = f"d{start:%Y%m%d}"
    else:
        start = datetime(local.year, local.month, 1, tzinfo=tz)
        year, month = (local.year + 1, 1) if local.month == 12 else (local.year, local.month + 1)
        end = datetime(year, month, 1, tzinfo=tz)
        wid = f"m{start:%Y%m}"
    return Window(wid, start.timestamp(), end.timestamp())


# --------------------------------------------------------------------------- values


class CounterRef(NamedTuple):
    """Which counter: ``tag`` (budget and key, a Redis hash tag) and ``window`` id."""

    tag: str
    window: str
    #: unix time after which the counter may be dropped (window end + grace)
    expires_at: float


@dataclass(frozen=True, slots=True)
class Limits:
    """A budget's admission rules in ledger units, computed once per config load.

    ``None`` disables a rule. ``thresholds`` are ``(flag, spend_nano_at, requests_at)``.
    """

    cap_nano: int | None = None
    cap_requests: int | None = None
    degrade_nano: int | None = None
    degrade_requests: int | None = None
    refuse_flag: str | None = None
    thresholds: tuple[tuple[str, int | None, int | None], ...] = ()


class Totals(NamedTuple):
    spend_nano: int = 0
    reserved_nano: int = 0
    requests: int = 0
    reserved_requests: int = 0
    flags: frozenset[str] = frozenset()


class Reservation(NamedTuple):
    counter: CounterRef
    member: str  # "<id>:<estimate_nano>"
    estimate_nano: int


class ReserveResult(NamedTuple):
    admitted: bool
    #: the counter was at or past a degrade point: the degraded estimate was used
    degraded: bool
    reservation: Reservation | None
    totals: Totals
    #: flags this call set first (the refusal flag, when it refused)
    new_flags: tuple[str, ...] = ()


class SettleResult(NamedTuple):
    totals: Totals
    new_flags: tuple[str, ...] = ()
    #: False when the hold had been settled already (a retried settle): nothing changed
    applied: bool = True


class Ledger(Protocol):
    async def reserve(self, counter: CounterRef, limits: Limits, estimate_nano: int,
                      degraded_estimate_nano: int, now: float,
                      hold_until: float) -> ReserveResult: ...

    async def settle(self, reservation: Reservation, cost_nano: int, counted: bool,
                     limits: Limits, now: float) -> SettleResult: ...

    async def refund(self, reservation: Reservation, now: float) -> Totals: ...

    async def read(self, counter: CounterRef) -> Totals: ...


def _member(estimate_nano: int) -> str:
    return f"{os.urandom(8).hex()}:{estimate_nano}"


def unheld(counter: CounterRef) -> Reservation:
    """A reservation that holds nothing: for a call admitted while the ledger could not be
    reached, so that its cost can still be settled (idempotently) once it can."""
    return Reservation(counter, _member(0), 0)


def _admits(limits: Limits, spend: int, reserved: int, requests: int, reserved_requests: int,
            estimate: int) -> bool:
    if limits.cap_nano is not None and (
            spend >= limits.cap_nano or spend + reserved + estimate > limits.cap_nano):
        return False
    return limits.cap_requests is None or requests + reserved_requests + 1 <= limits.cap_requests


def _degraded(limits: Limits, spend: int, requests: int) -> bool:
    return ((limits.degrade_nano is not None and spend >= limits.degrade_nano)
            or (limits.degrade_requests is not None and requests >= limits.degrade_requests))


# --------------------------------------------------------------------------- memory


@dataclass(slots=True)
class _Counter:
    expires_at: float
    spend: int = 0
    reserved: int = 0
    requests: int = 0
    reserved_requests: int = 0
    flags: set[str] = field(default_factory=set)
    #: member -> (estimate, hold_until)
    holds: dict[str, tuple[int, float]] = field(default_factory=dict)
    #: no hold expires before this (the earliest ``hold_until`` when last looked at)
    next_expiry: float = math.inf
    #: recently settled members, in two generations: the newer fills up to half of
    #: MEMORY_SETTLED_MAX, then replaces the older (O(1) per call; no FIFO of the members)
    settled: set[str] = field(default_factory=set)
    settled_before: set[str] = field(default_factory=set)

    def totals(self, flags: bool = False) -> Totals:
        return Totals(self.spend, self.reserved, self.requests, self.reserved_requests,
                      frozenset(self.flags) if flags else frozenset())

    def hold(self, member: str, estimate: int, until: float) -> None:
        self.holds[member] = (estimate, until)
        self.reserved += estimate
        self.reserved_requests += 1
        if until < self.next_expiry:
            self.next_expiry = until

    def release(self, member: str) -> bool:
        found = self.holds.pop(member, None)
        if found is None:
            return False
        self.reserved -= found[0]
        self.reserved_requests -= 1
        return True

    def purge(self, now: float) -> None:
        """Release the holds past their ``hold_until``: a scan of the holds (the calls in
        flight) only when the earliest one is due, not a heap operation per call."""
        if now < self.next_expiry:
            return
        nxt = math.inf
        for member, (_, until) in list(self.holds.items()):
            if until <= now:
                self.release(member)
            elif until < nxt:
                nxt = until
        self.next_expiry = nxt

    def first_settle(self, member: str) -> bool:
        """Remember ``member`` as settled; False when it already was."""
        settled = self.settled
        if member in settled or member in self.settled_before:
            return False
        settled.add(member)
        if len(settled) >= MEMORY_SETTLED_MAX // 2:
            self.settled_before, self.settled = settled, set()
        return True


class MemoryLedger:
    """One process's ledger (``state.backend: memory``). Each operation runs without an
    ``await`` in its body, so it is atomic on the event loop."""

    _SWEEP_EVERY_S = 600.0

    def __init__(self) -> None:
        self._counters: dict[tuple[str, str], _Counter] = {}
        self._next_sweep = 0.0
        self._seq = 0

    def _counter(self, ref: CounterRef, now: float) -> _Counter:
        if now >= self._next_sweep:
            self._next_sweep = now + self._SWEEP_EVERY_S
            for k in [k for k, c in self._counters.items() if c.expires_at <= now]:
                del self._counters[k]
        c = self._counters.get((ref.tag, ref.window))
        if c is None:
            c = self._counters[(ref.tag, ref.window)] = _Counter(ref.expires_at)
        return c

    async def reserve(self, counter: CounterRef, limits: Limits, estimate_nano: int,
                      degraded_estimate_nano: int, now: float,
                      hold_until: float) -> ReserveResult:
        return self.reserve_now(counter, limits, estimate_nano, degraded_estimate_nano, now,
                                hold_until)

    def reserve_now(self, counter: CounterRef, limits: Limits, estimate_nano: int,
                    degraded_estimate_nano: int, now: float,
                    hold_until: float) -> ReserveResult:
        """:meth:`reserve` without the coroutine (see :meth:`settle_now`)."""
        c = self._counter(counter, now)
        c.purge(now)
        degraded = _degraded(limits, c.spend, c.requests)
        estimate = degraded_estimate_nano if degraded else estimate_nano
        if not _admits(limits, c.spend, c.reserved, c.requests, c.reserved_requests, estimate):
            new: tuple[str, ...] = ()
            if limits.refuse_flag is not None and limits.refuse_flag not in c.flags:
                c.flags.add(limits.refuse_flag)
                new = (limits.refuse_flag,)
            return ReserveResult(False, degraded, None, c.totals(), new)
        # unique within this process is enough here (no syscall per request, as urandom is)
        self._seq += 1
        member = f"m{self._seq:x}:{estimate}"
        c.hold(member, estimate, hold_until)
        return ReserveResult(True, degraded, Reservation(counter, member, estimate), c.totals())

    async def settle(self, reservation: Reservation, cost_nano: int, counted: bool,
                     limits: Limits, now: float) -> SettleResult:
        return self.settle_now(reservation, cost_nano, counted, limits, now)

    def settle_now(self, reservation: Reservation, cost_nano: int, counted: bool,
                   limits: Limits, now: float) -> SettleResult:
        """:meth:`settle` without the coroutine: a caller that knows it holds a memory
        ledger settles in place, with no task or future per request."""
        c = self._counter(reservation.counter, now)
        if not c.first_settle(reservation.member):
            return SettleResult(c.totals(), (), applied=False)
        c.release(reservation.member)
        c.spend += cost_nano
        c.requests += 1 if counted else 0
        new = []
        for flag, spend_at, requests_at in limits.thresholds:
            reached = ((spend_at is not None and c.spend >= spend_at)
                       or (requests_at is not None and c.requests >= requests_at))
            if reached and flag not in c.flags:
                c.flags.add(flag)
                new.append(flag)
        return SettleResult(c.totals(), tuple(new))

    async def refund(self, reservation: Reservation, now: float) -> Totals:
        return self.refund_now(reservation, now)

    def refund_now(self, reservation: Reservation, now: float) -> Totals:
        c = self._counter(reservation.counter, now)
        c.release(reservation.member)
        return c.totals()

    async def read(self, counter: CounterRef) -> Totals:
        c = self._counters.get((counter.tag, counter.window))
        return Totals() if c is None else c.totals(flags=True)


# --------------------------------------------------------------------------- redis
# (the scripts: proxy.state.ledger_lua)


def _opt(value: int | None) -> int:
    return -1 if value is None else value


def _ttl(counter: CounterRef, now: float) -> int:
    """Seconds the keys live: relative to the caller's clock (Redis's own may differ)."""
    return max(1, math.ceil(counter.expires_at - now))


class RedisLedger:
    """The fleet's ledger (``state.backend: redis``): one Lua script per operation, both
    keys of a counter under one hash tag, keys expiring ``COUNTER_GRACE_S`` after the
    window. Every call goes through :meth:`StateBackend.call` (bounded by
    ``state.redis.timeout``; raises :class:`~proxy.state.backend.StateError`)."""

    FEATURE = "budget"

    def __init__(self, state: StateBackend) -> None:
        assert state.redis is not None
        self._state = state
        r = state.redis
        self._reserve = r.register_script(lua.RESERVE)
        self._settle = r.register_script(lua.SETTLE)
        self._refund = r.register_script(lua.REFUND)
        self._read = r.register_script(lua.READ)

    def _keys(self, ref: CounterRef) -> list[str]:
        h = self._state.key(ref.tag, "w", ref.window)
        return [h, h + ":holds", h + ":settled"]

    async def _run(self, script: Any, keys: list[str], args: list[Any]) -> Any:
        return await self._state.call(self.FEATURE, lambda: script(keys=keys, args=args))

    async def reserve(self, counter: CounterRef, limits: Limits, estimate_nano: int,
                      degraded_estimate_nano: int, now: float,
                      hold_until: float) -> ReserveResult:
        member_id = os.urandom(8).hex()
        out = await self._run(self._reserve, self._keys(counter)[:2], [
            repr(now), estimate_nano, degraded_estimate_nano, _opt(limits.degrade_nano),
            _opt(limits.degrade_requests), _opt(limits.cap_nano), _opt(limits.cap_requests),
            limits.refuse_flag or "", member_id, repr(hold_until), _ttl(counter, now)])
        admitted, degraded, estimate, spend, reserved, req, rreq, fired = (int(x) for x in out)
        totals = Totals(spend, reserved, req, rreq)
        if not admitted:
            new = (limits.refuse_flag,) if fired and limits.refuse_flag else ()
            return ReserveResult(False, bool(degraded), None, totals, new)
        reservation = Reservation(counter, f"{member_id}:{estimate}", estimate)
        return ReserveResult(True, bool(degraded), reservation, totals)

    async def settle(self, reservation: Reservation, cost_nano: int, counted: bool,
                     limits: Limits, now: float) -> SettleResult:
        args: list[Any] = [reservation.member, reservation.estimate_nano, cost_nano,
                           1 if counted else 0, _ttl(reservation.counter, now), repr(now),
                           repr(now - SETTLE_DEDUPE_S)]
        for flag, spend_at, requests_at in limits.thresholds:
            args += [flag, _opt(spend_at), _opt(requests_at)]
        out = await self._run(self._settle, self._keys(reservation.counter), args)
        spend, reserved, req, rreq, applied = (int(x) for x in out[:5])
        new = tuple(x.decode() if isinstance(x, bytes) else str(x) for x in out[5:])
        return SettleResult(Totals(spend, reserved, req, rreq), new, bool(applied))

    async def refund(self, reservation: Reservation, now: float) -> Totals:
        out = await self._run(self._refund, self._keys(reservation.counter)[:2],
                              [reservation.member, reservation.estimate_nano])
        spend, reserved, req, rreq = (int(x) for x in out)
        return Totals(spend, reserved, req, rreq)

    async def read(self, counter: CounterRef) -> Totals:
        out = await self._run(self._read, self._keys(counter)[:1], [])
        fields = {out[i].decode(): out[i + 1].decode() for i in range(0, len(out), 2)}
        return Totals(int(fields.get("spend", 0)), int(fields.get("reserved", 0)),
                      int(fields.get("req", 0)), int(fields.get("rreq", 0)),
                      frozenset(k[2:] for k in fields if k.startswith("f:")))


def make_ledger(state: StateBackend) -> Ledger:
    """The ledger for the configured backend."""
    return RedisLedger(state) if state.kind == "redis" else MemoryLedger()
