"""Response cache (route level, between canary and budget): answered once, served many times.

**Key** — see :mod:`policies.cache_key`: method, route, path, query, canary arm, client
identity, listed headers, the canonical body, and pass-through credentials.

**Stored** — only a provider's reply with a listed status, without ``Set-Cookie`` or
``Cache-Control: no-store``, not degraded (a ``fallback_response``, a reply that failed
``accept``, a budget downgrade), with a body up to ``max_entry_size``; an SSE stream only
once it completed (a broken or cut stream never is). Per-request headers are dropped
(``x-request-id``, ``date``, ``x-rp-*``, ``x-ratelimit-*``...). A value that would contain a
configured secret is never written.

**Served** — ``x-rp-cache: bypass`` skips the cache both ways; ``refresh`` calls upstream and
stores. A hit is ``Reply(source="cache")`` (cost 0, never reaches the budget stage), replayed
as a stream when it was one, with an ``age`` header. ``call.cache_status`` becomes
hit|miss|bypass|refresh; ``rp_cache_requests_total{route,result}`` counts those and
``coalesced``; ``t_cache`` is the time spent deciding (lookup, and waiting for a leader).

**Coalescing** — identical requests in flight in this process wait for one leader. Its
answer is everyone's: a cacheable reply (a hit for the followers), any other reply or an
upstream error (an outage is not multiplied by the number of waiting clients). When the
leader's end says nothing about the upstream — its client went away, a budget refused it,
its stream broke — one follower takes over and the others wait on it; when its budget
shaped the answer (a downgrade, a budget fallback) each follower goes on alone. With Redis, a lease
(``SET NX PX``) makes one replica the leader while the others poll the cache, for at most
half of their time left, then call upstream themselves.

**Redis down** — fail open: a miss, within ``state.redis.timeout``, counted in
``rp_state_errors_total{feature="cache"}``; readiness is unaffected.
"""

from __future__ import annotations

import asyncio
import enum
import os
from typing import NamedTuple

import orjson

from policies.cache_entry import Entry
from policies.cache_key import CacheKey
from proxy.call import Call, Handler, Reply
from proxy.config import CacheConfig
from proxy.context import RouteContext
from proxy.errors import BadRequest, BudgetExceeded, ClientAuthError, ProxyError, StateUnavailable, Timeout
from proxy.headers import CREDENTIALS
from proxy.state.backend import StateError
from proxy.state.kv import KV, MemoryKV, RedisKV

RESULTS = ("hit", "miss", "bypass", "refresh", "coalesced")
_DEGRADED = frozenset({"rejected", "downgrade", "budget", "exhausted"})
_LEADER_SPECIFIC = (BudgetExceeded, StateUnavailable, BadRequest, ClientAuthError)
_POLL_FIRST_S, _POLL_MAX_S = 0.01, 0.1


# --------------------------------------------------------------------------- coalescing


class Signal(enum.Enum):
    HANDOVER = "handover"  # the leader's end says nothing: one follower takes over
    ALONE = "alone"  # an answer that cannot be shared (a non-cacheable stream): go alone
    DEFERRED = "deferred"  # (leader only) a stream will settle the flight when it ends


class Shared(NamedTuple):
    """A leader's answer for its followers; ``cached``: served to them as a hit."""

    entry: Entry
    cached: bool


Outcome = Shared | ProxyError | Signal


class Flight:
    """One leader's call in progress. The future is made only when a follower first waits
    (most flights have none); ``outcome`` is set once, when the flight settles."""

    __slots__ = ("_future", "deadline", "lease", "outcome", "settled")

    def __init__(self, deadline: float) -> None:
        self._future: asyncio.Future[Outcome] | None = None
        self.deadline = deadline  # the leader's: a flight never outlives its request
        self.lease: bytes | None = None  # our token while this replica holds the Redis lease
        self.settled = False
        self.outcome: Outcome = Signal.HANDOVER

    def waiter(self) -> asyncio.Future[Outcome]:
        """What a follower waits on (done once the flight settles)."""
        if self._future is None:
            self._future = asyncio.get_running_loop().create_future()
            if self.settled:
                self._future.set_result(self.outcome)
        return self._future

    def settle(self, outcome: Outcome) -> None:
        """The first outcome wins (later ones are ignored)."""
        if self.settled:
            return
        self.settled = True
        self.outcome = outcome
        if self._future is not None and not self._future.done():
            self._future.set_result(outcome)


class CacheStore:
    """The process's cache state, kept across reloads: the KV and the flights in progress."""

    def __init__(self, kv: KV, leases: bool) -> None:
        self.kv = kv
        self.leases = leases
        self.flights: dict[str, Flight] = {}


# --------------------------------------------------------------------------- policy


class Cache:
    def __init__(self, ctx: RouteContext, cfg: CacheConfig, store: CacheStore,
                 key: CacheKey) -> None:
        self._key = key
        self._store = store
        self._kv = store.kv
        #: the memory KV, used without coroutines (None with Redis)
        self._memory = store.kv if isinstance(store.kv, MemoryKV) else None
        self._flights = store.flights
        self._clock = ctx.deps.clock
        self._log = ctx.deps.log
        self._ttl_s = cfg.ttl
        self._statuses = frozenset(cfg.statuses)
        self._max_entry = cfg.max_entry_size
        self._coalesce = cfg.coalesce
        self._secrets = tuple(s.encode() for s in ctx.loaded.secrets if s)
        counter = ctx.deps.metrics.cache_requests
        self._results = {r: ctx.deps.metrics.counter(counter.labels(ctx.route.name, r))
                         for r in RESULTS}

    async def __call__(self, call: Call, next_: Handler) -> Reply:
        mode = call.headers.get("x-rp-cache", "").strip().lower()
        started = self._clock.monotonic()
        if mode == "bypass":
            self._decided(call, "bypass", "bypass", started)
            return await next_(call)
        key = self._key(call)
        if mode == "refresh":
            self._decided(call, "refresh", "refresh", started)
            return (await self._keep(call, key, await next_(call), None))[0]
        while True:
            flight = self._flights.get(key) if self._coalesce else None
            if flight is None:
                entry, reachable = self._lookup_now(key) if self._memory is not None \
                    else await self._lookup(key)
                if entry is not None:
                    self._decided(call, "hit", "hit", started)
                    return entry.reply(self._clock.time())
                flight = self._flights.get(key) if self._coalesce else None
                if flight is None:
                    return await self._lead(call, next_, key, started, reachable)
            outcome = await self._follow(call, key, flight)
            if outcome is Signal.HANDOVER:
                continue
            if isinstance(outcome, Signal):  # ALONE (DEFERRED never reaches a follower)
                self._decided(call, "miss", "miss", started)
                return (await self._keep(call, key, await next_(call), None))[0]
            return self._shared(call, outcome, started)

    def _decided(self, call: Call, status: str, result: str, started: float) -> None:
        call.cache_status = status
        call.timings["t_cache"] = (self._clock.monotonic() - started) * 1000
        self._results[result].inc()

    def _lookup_now(self, key: str) -> tuple[Entry | None, bool]:
        """:meth:`_lookup` in the memory KV (it always answers)."""
        assert self._memory is not None
        data = self._memory.get_now(key)
        return (None if data is None else Entry.decode(data)), True

    async def _lookup(self, key: str) -> tuple[Entry | None, bool]:
        """(the entry or None, whether the store answered)."""
        try:
            data = await self._kv.get(key)
        except StateError:
            return None, False  # fail open: counted and logged by the backend
        return (None if data is None else Entry.decode(data)), True

    async def _lead(self, call: Call, next_: Handler, key: str, started: float,
                    reachable: bool) -> Reply:
        """Call upstream for everyone waiting on ``key``. When the store did not answer the
        lookup, this request asks it nothing more (no lease, no store): an unreachable Redis
        costs a request one timeout, not three."""
        flight = self._flights[key] = Flight(call.deadline)
        outcome: Outcome = Signal.HANDOVER
        try:
            if self._store.leases and reachable:
                entry = await self._lease(call, key, flight)
                if entry is not None:
                    outcome = Shared(entry, True)
                    self._decided(call, "hit", "hit", started)
                    return entry.reply(self._clock.time())
            self._decided(call, "miss", "miss", started)
            reply, outcome = await self._keep(call, key, await next_(call), flight, reachable)
            return reply
        except ProxyError as exc:
            if not isinstance(exc, _LEADER_SPECIFIC):
                outcome = exc
            raise
        finally:
            if outcome is not Signal.DEFERRED:
                self._land(key, flight, outcome)
                if flight.lease is not None:
                    await self._unlease(key, flight.lease)

    async def _lease(self, call: Call, key: str, flight: Flight) -> Entry | None:
        """Across replicas: take the lease (None: we lead) or find the leader's entry."""
        token = os.urandom(8).hex().encode()
        give_up_at = self._clock.monotonic() + call.time_left() / 2
        wait_s = _POLL_FIRST_S
        waited = False
        while True:
            try:
                if await self._kv.set_if_absent(key + ":lease", token, call.time_left()):
                    flight.lease = token
                    if not waited:
                        return None
                    # another replica led: it may have stored its entry and let go of the
                    # lease between our last lookup and this lease; look once more, or we
                    # would call upstream for a reply already cached (on a first try the
                    # window is one round trip, and the extra GET is not paid)
                    entry, _ = await self._lookup(key)
                    return entry
            except StateError:
                return None
            if self._clock.monotonic() + wait_s > give_up_at:
                return None
            await self._clock.sleep(wait_s)
            waited = True
            wait_s = min(wait_s * 2, _POLL_MAX_S)
            entry, reachable = await self._lookup(key)
            if entry is not None or not reachable:
                return entry

    async def _settle(self, key: str, flight: Flight, outcome: Outcome) -> None:
        self._land(key, flight, outcome)
        if flight.lease is not None:
            await self._unlease(key, flight.lease)

    def _land(self, key: str, flight: Flight, outcome: Outcome) -> None:
        if self._flights.get(key) is flight:
            del self._flights[key]
        flight.settle(outcome)

    async def _unlease(self, key: str, lease: bytes) -> None:
        try:
            await self._kv.delete_if_equals(key + ":lease", lease)
        except StateError:
            pass  # it expires with the leader's deadline

    async def _keep(self, call: Call, key: str, reply: Reply, flight: Flight | None,
                    store: bool = True) -> tuple[Reply, Outcome]:
        """Store ``reply`` when it may be (a stream: once it completes); what followers get."""
        if not self._storable(call, reply):
            if reply.stream is not None:
                return reply, Signal.ALONE
            if call.downgrade or (reply.fallback_reason or call.fallback_reason) == "budget":
                # the leader's budget shaped this answer; each follower's own budget decides
                return reply, Signal.ALONE
            return reply, Shared(Entry.of(reply, reply.body or b"", None, self._clock.time()),
                                 False)
        if reply.stream is not None:
            recorder = _Recorder(self, key, reply, flight, store)
            reply.stream.observers.append(recorder.observe)
            reply.stream.on_close.append(recorder.close)
            return reply, Signal.DEFERRED
        entry = Entry.of(reply, reply.body or b"", None, self._clock.time())
        if store:
            if self._memory is not None:
                self._put_now(key, entry)
            else:
                await self._put(key, entry)
        return reply, Shared(entry, True)

    def _storable(self, call: Call, reply: Reply) -> bool:
        if reply.status not in self._statuses or reply.source != "provider":
            return False
        if call.downgrade or reply.fallback_reason in _DEGRADED:
            return False
        for name, value in reply.headers:
            if name == "set-cookie" or (name == "cache-control" and "no-store" in value.lower()):
                return False
        if reply.stream is not None:
            return (reply.header("content-type") or "").startswith("text/event-stream")
        return reply.body is not None and len(reply.body) <= self._max_entry

    async def _put(self, key: str, entry: Entry) -> None:
        data = self._encoded(entry)
        if data is None:
            return
        try:
            await self._kv.set(key, data, self._ttl_s)
        except StateError:
            pass  # fail open: counted and logged by the backend

    def _put_now(self, key: str, entry: Entry) -> None:
        """:meth:`_put` into the memory KV."""
        assert self._memory is not None
        data = self._encoded(entry)
        if data is not None:
            self._memory.set_now(key, data, self._ttl_s)

    def _encoded(self, entry: Entry) -> bytes | None:
        """The entry's bytes, or None when it must not be stored."""
        try:
            data = entry.encode()
        except orjson.JSONEncodeError:  # a header value that is not valid UTF-8
            self._log.warning("cache_store_refused", reason="header is not valid UTF-8")
            return None
        if self._secrets and any(secret in data for secret in self._secrets):
            self._log.warning("cache_store_refused", reason="reply contains a configured secret")
            return None
        return data

    async def _follow(self, call: Call, key: str, flight: Flight) -> Outcome:
        """Wait for the leader within the follower's deadline (never cancelling the flight).

        A flight still unsettled past its leader's deadline (its reply was never relayed)
        is dropped and handed over, so a key can never stay stuck behind a dead leader."""
        now = self._clock.monotonic()
        wait_s = min(call.deadline, flight.deadline + _POLL_MAX_S) - now
        if wait_s > 0 and not flight.settled:
            await asyncio.wait([flight.waiter()], timeout=wait_s)
        if flight.settled:
            return flight.outcome
        if call.time_left() <= 0:
            raise Timeout("total", call.arm.timeout.total)
        if self._flights.get(key) is flight:
            del self._flights[key]
        return Signal.HANDOVER

    def _shared(self, call: Call, outcome: Shared | ProxyError, started: float) -> Reply:
        if isinstance(outcome, ProxyError):
            self._decided(call, "miss", "coalesced", started)
            raise _clone(outcome)
        self._decided(call, "hit" if outcome.cached else "miss", "coalesced", started)
        return outcome.entry.reply(self._clock.time(), cached=outcome.cached)


def _clone(exc: ProxyError) -> ProxyError:
    """A follower's own copy of the leader's error (one exception object per request)."""
    clone = type(exc).__new__(type(exc), *exc.args)
    clone.__dict__.update(exc.__dict__)
    return clone


class _Recorder:
    """Records a streamed reply's chunks; stores it and settles the flight when it ends."""

    __slots__ = ("_cache", "_flight", "_key", "_parts", "_reply", "_size", "_store")

    def __init__(self, cache: Cache, key: str, reply: Reply, flight: Flight | None,
                 store: bool) -> None:
        self._cache = cache
        self._store = store
        self._key = key
        self._reply = reply
        self._flight = flight
        self._parts: list[bytes] | None = []  # None once over max_entry_size
        self._size = 0

    def observe(self, chunk: bytes) -> None:
        if self._parts is None:
            return
        self._size += len(chunk)
        if self._size > self._cache._max_entry:
            self._parts = None
        else:
            self._parts.append(chunk)

    async def close(self, completed: bool) -> None:
        cache, parts = self._cache, self._parts
        outcome: Outcome = Signal.HANDOVER if not completed else Signal.ALONE
        try:
            if completed and parts:
                entry = Entry.of(self._reply, b"".join(parts), tuple(len(p) for p in parts),
                                 cache._clock.time())
                if self._store:
                    await cache._put(self._key, entry)
                outcome = Shared(entry, True)
        finally:
            if self._flight is not None:
                await cache._settle(self._key, self._flight, outcome)


def build_route(ctx: RouteContext) -> Cache | None:
    cfg = ctx.route.cache
    if cfg is None:
        return None
    state = ctx.deps.state
    config = ctx.config
    if state.kind == "redis":
        store = ctx.keeper.keep("cache_store", "redis", None,
                                lambda: CacheStore(RedisKV(state, "cache", "cache"), True))
    else:
        max_bytes = config.state.memory.max_size
        store = ctx.keeper.keep("cache_store", "memory", max_bytes, lambda: CacheStore(
            MemoryKV(ctx.deps.clock, max_bytes), False))
    passthrough = any(not config.providers[t.provider].headers
                      for arm in ctx.arms.values() for t in arm.spec.tiers)
    key = CacheKey(ctx.route.name, cfg.key, CREDENTIALS if passthrough else ())
    return Cache(ctx, cfg, store, key)
