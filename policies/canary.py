"""Canary: send a stable share of keys to a variant arm, watch it, roll it back.

**Assignment** (route level, after redact, before cache). A key comes from ``hash_on``
(``header:<name>``, or ``client_ip`` — the peer address the proxy sees). Its bucket is::

    int.from_bytes(blake2b((salt + key).encode(), digest_size=8).digest(), "big") % 10000

with ``salt`` = ``canary.salt`` or the route's name. The key is in the variant when
``bucket < round(weight × 100)``: the same key lands on the same arm on every replica and
after restarts, and raising the weight only moves keys into the variant. No key → stable.
The variant arm has its own tiers and may override ``timeout`` (the request's deadline is
then reset to the variant's ``total``) and ``retry``. ``call.canary`` says which arm
(``x-rp-canary``, the access log and the cache key read it).

**Observations.** Around the rest of the chain, the policy measures each arm's requests,
errors and latency — the total request latency from this stage to the reply; for a stream,
until the reply is committed (its first chunk) — and cost (``reply.cost_usd``; a stream's is
added when it ends). An error is a reply with status ≥ 500, a route fallback served because
every tier of the arm failed, or a proxy error other than a client 4xx or a budget refusal.
Cache hits, budget refusals, client 4xx proxy errors and client disconnects are not
observations: the arm's providers did not serve them. A stream that breaks after its first
byte is not counted as an error (it cannot be told from a client that hung up there).

The weight, windows, rollback, ramp and report live in :class:`CanaryController`
(:mod:`policies.canary_control`): kept across reloads, shared by the fleet through
:mod:`proxy.state.canary`.
"""

from __future__ import annotations

import hashlib

import orjson

from policies.canary_control import STABLE, VARIANT, CanaryController
from proxy.call import Call, Handler, Reply
from proxy.context import RouteContext
from proxy.errors import ProxyError, RateLimited
from proxy.state.canary import make_store

BUCKETS = 10_000


def bucket(salt: str, key: str) -> int:
    """The key's bucket in [0, 10000) (stable across processes, versions and platforms)."""
    digest = hashlib.blake2b((salt + key).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") % BUCKETS


def in_variant(salt: str, key: str | None, weight: float) -> bool:
    """Whether ``key`` goes to the variant at ``weight`` percent (no key: never)."""
    return bool(key) and bucket(salt, key or "") < round(weight * 100)


class Canary:
    """The route stage: pick the arm, and observe how it served the request."""

    __slots__ = ("_clock", "_ctrl", "_header", "_salt", "_variant", "_variant_total_s")

    def __init__(self, ctx: RouteContext, ctrl: CanaryController) -> None:
        cfg = ctx.route.canary
        assert cfg is not None
        self._ctrl = ctrl
        self._clock = ctx.deps.clock
        self._salt = cfg.salt if cfg.salt is not None else ctx.route.name
        self._header = cfg.hash_on[len("header:"):] if cfg.hash_on != "client_ip" else None
        stable, variant = ctx.arms["stable"], ctx.arms["variant"]
        self._variant = variant
        total = variant.timeout.total
        self._variant_total_s = total if total != stable.timeout.total else None

    def _key(self, call: Call) -> str | None:
        return call.headers.get(self._header) if self._header is not None else call.remote

    async def __call__(self, call: Call, next_: Handler) -> Reply:
        key = self._key(call)
        arm = STABLE
        if key and bucket(self._salt, key) < self._ctrl.threshold:
            arm = VARIANT
            call.arm = self._variant
            if self._variant_total_s is not None:
                call.deadline = call.started + self._variant_total_s
        call.canary = arm
        start = self._clock.monotonic()
        try:
            reply = await next_(call)
        except ProxyError as exc:
            if exc.status >= 500 or isinstance(exc, RateLimited):
                self._ctrl.observe(arm, True, self._clock.monotonic() - start, call.spent_usd)
            raise  # a client 4xx or a budget refusal is not the arm's doing
        elapsed = self._clock.monotonic() - start
        if reply.source == "cache" or reply.fallback_reason == "budget":
            return reply
        error = reply.status >= 500 or reply.fallback_reason == "exhausted"
        stream = reply.stream
        if stream is None:
            self._ctrl.observe(arm, error, elapsed, reply.cost_usd or 0.0)
        else:
            self._ctrl.observe(arm, error, elapsed, 0.0)
            ctrl = self._ctrl

            def _metered(completed: bool) -> None:  # metering has set the cost by now
                ctrl.add_cost(arm, reply.cost_usd or 0.0)

            stream.on_close.append(_metered)
        return reply


def build_route(ctx: RouteContext) -> Canary | None:
    cfg = ctx.route.canary
    if cfg is None:
        return None
    name = ctx.route.name
    deps = ctx.deps
    store = ctx.keeper.keep("canary_store", name, None, lambda: make_store(deps.state, name))
    epoch = _epoch(ctx)
    previous = ctx.keeper.previous("canary", name)
    ctrl = ctx.keeper.keep("canary", name, (cfg, epoch), lambda: CanaryController(
        name, cfg, epoch, store, deps, previous))
    ctx.register("canary", name, ctrl)
    ctx.register("task", f"canary:{name}", ctrl.run)
    ctx.register("flush", f"canary:{name}", ctrl.flush)
    return Canary(ctx, ctrl)


def _epoch(ctx: RouteContext) -> str:
    """The experiment: what the arms are and who lands where. A change starts a new report."""
    cfg = ctx.route.canary
    assert cfg is not None
    spec = {"stable": [t.model_dump(mode="json") for t in ctx.route.tiers],
            "variant": cfg.variant.model_dump(mode="json"), "hash_on": cfg.hash_on,
            "salt": cfg.salt if cfg.salt is not None else ctx.route.name}
    blob = orjson.dumps(spec, option=orjson.OPT_SORT_KEYS)
    return hashlib.blake2b(blob, digest_size=6).hexdigest()
