"""A compiled config: provider clients, route table, and each route's policy chain.

Built once per (re)load by :func:`build_runtime`; the server swaps the whole object
atomically, and a request keeps the runtime it started with until it ends.
"""

from __future__ import annotations

import gc
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from multidict import CIMultiDictProxy

from proxy.call import Handler
from proxy.config import MatchConfig, RouteConfig, TierConfig, TimeoutConfig
from proxy.context import (
    ArmSpec,
    AttemptContext,
    Deps,
    Keeper,
    ProviderRuntime,
    RouteContext,
)
from proxy.loader import LoadedConfig
from proxy.upstream import ProviderClient

DEFAULT_TIMEOUT = TimeoutConfig()
#: young-generation GC threshold while serving (CPython's default is 700): measured under
#: ``bench/perf.py``'s full policy set, gen-0 collections cost ~9-13 µs a request at 700 and
#: ~1 µs at 5000 (most request objects die by refcount; a collection rescans the survivors)
GC_THRESHOLDS = (5000, 20, 10)


def tune_gc() -> None:
    """Once the proxy is serving: leave the startup heap (modules, config, compiled routes) out
    of future collections, and collect the young generation less often."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


@dataclass(slots=True)
class CompiledTier:
    index: int  # 1-based configured position
    cfg: TierConfig
    provider: str
    expensive: bool
    handler: Handler  # the attempt chain, retries included


@dataclass(slots=True)
class Arm:
    name: str  # "stable" | "variant"
    tiers: list[CompiledTier]
    timeout: TimeoutConfig
    spec: ArmSpec


class RouteStats:
    """Per-route counters for ``/admin/status`` (kept across reloads by route name)."""

    def __init__(self, samples: int = 2048) -> None:
        self.requests = 0
        self.fallbacks = 0
        self.by_tier: dict[int, int] = {}
        self.latency_sum_s = 0.0
        self._latency: deque[float] = deque(maxlen=samples)

    def observe(self, tier: int | None, fallback: bool, seconds: float) -> None:
        self.requests += 1
        if tier is not None:
            self.by_tier[tier] = self.by_tier.get(tier, 0) + 1
        if fallback:
            self.fallbacks += 1
        self.latency_sum_s += seconds
        self._latency.append(seconds)

    def snapshot(self) -> dict[str, Any]:
        ordered = sorted(self._latency)
        p95 = ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))] if ordered else 0.0
        mean = self.latency_sum_s / self.requests if self.requests else 0.0
        return {
            "requests": self.requests,
            "by_tier": {str(k): v for k, v in sorted(self.by_tier.items())},
            "fallback_rate": self.fallbacks / self.requests if self.requests else 0.0,
            "latency_ms": {"mean": round(mean * 1000, 3), "p95": round(p95 * 1000, 3)},
        }


@dataclass(slots=True)
class CompiledRoute:
    name: str
    cfg: RouteConfig
    match: MatchConfig
    methods: frozenset[str] | None
    header_match: tuple[tuple[str, str], ...]
    stable: Arm
    variant: Arm | None
    handler: Handler
    stats: RouteStats
    #: seconds for the request deadline (the stable arm's total; a variant may reset it)
    total_s: float

    def matches(self, method: str, path: str, headers: CIMultiDictProxy[str]) -> bool:
        m = self.match
        if m.path is not None:
            if path != m.path:
                return False
        elif not path.startswith(m.path_prefix or "/"):
            return False
        if self.methods is not None and method not in self.methods:
            return False
        for name, want in self.header_match:
            got = headers.get(name)
            if got is None or (want != "*" and got != want):
                return False
        return True


@dataclass
class Runtime:
    loaded: LoadedConfig
    providers: dict[str, ProviderRuntime]
    routes: list[CompiledRoute]
    #: objects the admin plane acts on, by kind then name (circuit, canary, budget, ...)
    registry: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: requests still running on this runtime, and whether a reload replaced it
    active: int = 0
    retired: bool = False

    def match(self, method: str, path: str, headers: CIMultiDictProxy[str]) -> CompiledRoute | None:
        for route in self.routes:
            if route.matches(method, path, headers):
                return route
        return None

    async def close(self) -> None:
        for p in self.providers.values():
            await p.client.close()


async def build_runtime(loaded: LoadedConfig, deps: Deps, keeper: Keeper,
                        mock_url: str | None) -> Runtime:
    """Compile ``loaded``. On error nothing is kept; the caller keeps its old runtime."""
    from proxy.pipeline import build_attempt_chain, build_route_chain

    cfg = loaded.config
    clients_header = cfg.server.clients.header if cfg.server.clients else None
    providers: dict[str, ProviderRuntime] = {}
    try:
        for name, pcfg in cfg.providers.items():
            base = pcfg.url
            if base.startswith("mock://"):
                if mock_url is None:
                    raise RuntimeError("mock:// provider but no bundled mock is running")
                base = mock_url + base[len("mock://"):].rstrip("/")
            client = ProviderClient(name, pcfg, base, clients_header, loaded.secrets,
                                    cfg.server.max_buffered_response)
            await client.start()
            providers[name] = ProviderRuntime(name, client)
        registry: dict[str, dict[str, Any]] = {}
        routes = []
        for rcfg in cfg.routes:
            ctx = RouteContext(loaded, rcfg, deps, keeper, providers, registry)
            arms = _arm_specs(rcfg)
            compiled_arms = {
                spec.name: Arm(spec.name, [
                    CompiledTier(i, tier, tier.provider, tier.expensive, build_attempt_chain(
                        AttemptContext(ctx, spec, tier, i, providers[tier.provider])))
                    for i, tier in enumerate(spec.tiers, start=1)
                ], spec.timeout, spec)
                for spec in arms
            }
            ctx.arms = compiled_arms
            stats = keeper.keep("route_stats", rcfg.name, None, RouteStats)
            routes.append(CompiledRoute(
                name=rcfg.name, cfg=rcfg, match=rcfg.match,
                methods=frozenset(m.upper() for m in rcfg.match.methods)
                if rcfg.match.methods else None,
                header_match=tuple((k.lower(), v) for k, v in (rcfg.match.headers or {}).items()),
                stable=compiled_arms["stable"], variant=compiled_arms.get("variant"),
                handler=build_route_chain(ctx), stats=stats,
                total_s=compiled_arms["stable"].timeout.total,
            ))
    except BaseException:
        keeper.abort()
        for p in providers.values():
            await p.client.close()
        raise
    keeper.commit()
    return Runtime(loaded, providers, routes, registry)


def _arm_specs(rcfg: RouteConfig) -> list[ArmSpec]:
    timeout = rcfg.timeout or DEFAULT_TIMEOUT
    arms = [ArmSpec("stable", rcfg.tiers, timeout, rcfg.retry)]
    if rcfg.canary is not None:
        v = rcfg.canary.variant
        arms.append(ArmSpec("variant", v.tiers, v.timeout or timeout, v.retry or rcfg.retry))
    return arms
