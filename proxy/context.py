"""What policy builders receive: the config they apply, and the process's dependencies.

Builders run once per config load. Long-lived objects (a provider's circuit breaker, a
rate limiter, a route's canary state) are obtained through :meth:`Keeper.keep`, which hands
back the previous load's object when its config did not change, so a reload neither resets
a breaker nor forgets a canary weight. Objects the admin plane acts on are registered with
:meth:`RouteContext.register` under a kind (``circuit``, ``canary``, ``budget``, ...).
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

from proxy.clock import Clock
from proxy.config import Config, RetryConfig, RouteConfig, TierConfig, TimeoutConfig
from proxy.loader import LoadedConfig
from proxy.metrics import Metrics
from proxy.timers import Timers

if TYPE_CHECKING:
    from proxy.state.backend import StateBackend
    from proxy.upstream import ProviderClient

T = TypeVar("T")


@dataclass
class Deps:
    """The process's collaborators, passed explicitly (never imported as globals)."""

    clock: Clock
    metrics: Metrics
    log: Any  # a structlog bound logger
    state: StateBackend
    rand: random.Random = field(default_factory=random.Random)
    #: the hot path's deadlines (one loop timer for all of them)
    timers: Timers = field(default_factory=Timers)


class Keeper:
    """Keeps stateful policy objects across reloads while their config is unchanged."""

    def __init__(self) -> None:
        self._live: dict[tuple[str, str], tuple[Any, Any]] = {}
        self._next: dict[tuple[str, str], tuple[Any, Any]] = {}

    def keep(self, kind: str, name: str, cfg: Any, factory: Callable[[], T]) -> T:
        key = (kind, name)
        found = self._next.get(key) or self._live.get(key)
        if found is not None and found[0] == cfg:
            obj: T = found[1]
        else:
            obj = factory()
        self._next[key] = (cfg, obj)
        return obj

    def previous(self, kind: str, name: str) -> Any:
        """The object the live config holds under (kind, name), whatever its config."""
        found = self._live.get((kind, name))
        return None if found is None else found[1]

    def commit(self) -> None:
        """The new config is live: drop what it no longer uses. An object that has no
        successor under its kind and name (its route or block was removed) is told so by
        its ``retire()``, when it has one (e.g. its labelled gauge leaves /metrics)."""
        dropped = [obj for key, (_, obj) in self._live.items() if key not in self._next]
        self._live, self._next = self._next, {}
        for obj in dropped:
            retire = getattr(obj, "retire", None)
            if retire is not None:
                retire()

    def abort(self) -> None:
        self._next = {}


@dataclass
class ProviderRuntime:
    name: str
    client: ProviderClient


@dataclass
class ArmSpec:
    """One arm of a route: ``stable`` (the route's tiers) or ``variant`` (a canary's)."""

    name: str
    tiers: list[TierConfig]
    timeout: TimeoutConfig
    retry: RetryConfig | None


@dataclass
class RouteContext:
    loaded: LoadedConfig
    route: RouteConfig
    deps: Deps
    keeper: Keeper
    providers: dict[str, ProviderRuntime]
    registry: dict[str, dict[str, Any]]
    #: filled by the runtime before the route chain is built
    arms: dict[str, Any] = field(default_factory=dict)

    @property
    def config(self) -> Config:
        return self.loaded.config

    def register(self, kind: str, name: str, obj: Any) -> None:
        """Expose ``obj`` to the admin plane as ``registry[kind][name]``."""
        self.registry.setdefault(kind, {})[name] = obj


@dataclass
class AttemptContext:
    route_ctx: RouteContext
    arm: ArmSpec
    tier: TierConfig
    tier_index: int  # 1-based configured position
    provider: ProviderRuntime

    @property
    def deps(self) -> Deps:
        return self.route_ctx.deps

    @property
    def route(self) -> RouteConfig:
        return self.route_ctx.route
