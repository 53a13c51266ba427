"""The state backend: which store is in use, and the rules every shared-state call obeys.

- Memory (``state.backend: memory``): this process only; no connection, never blind.
- Redis: one ``redis.asyncio`` client over a blocking pool of ``state.redis.max_connections``;
  every call through :meth:`StateBackend.call` is bounded by ``state.redis.timeout``
  (waiting for a pooled connection included), so Redis never holds a request longer than
  that. A failure is counted in ``rp_state_errors_total{feature}``, logged once per burst
  (``state_unavailable``; ``state_recovered`` when the feature's next call succeeds), and
  raised as :class:`StateError` for the feature to apply its own failure rule (the cache
  fails open, a budget follows ``on_state_error``, canary keeps the last known weight).

Keys are ``<prefix>{<tag>}:<parts>``: everything one budget, cache entry or canary touches
shares a hash tag, so multi-key Lua scripts work on Redis Cluster. Secrets never go into
keys or values.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from proxy.clock import Clock
from proxy.config import StateConfig
from proxy.metrics import Metrics

T = TypeVar("T")
_LOG_EVERY_S = 5.0


class StateError(Exception):
    """The shared state could not be reached in time."""

    def __init__(self, feature: str) -> None:
        super().__init__(f"shared state unavailable for {feature}")
        self.feature = feature


class StateBackend:
    def __init__(self, cfg: StateConfig, metrics: Metrics, log: Any, clock: Clock) -> None:
        self.cfg = cfg
        self.kind = cfg.backend
        self.prefix = cfg.redis.prefix
        self.timeout_s = cfg.redis.timeout
        self._metrics = metrics
        self._log = log
        self._clock = clock
        self._last_logged: dict[str, float] = {}
        self._failing: set[str] = set()
        self._blind: set[str] = set()
        self.redis: aioredis.Redis | None = None
        if cfg.backend == "redis":
            # A blocking pool: past max_connections a call waits for a free connection
            # (within the timeout) instead of failing at once with "Too many connections".
            # No client-side retry: a command is sent once, so a script that reserves or
            # settles can never run twice; a pooled connection that a Redis restart closed
            # is detected and re-dialled when it is checked out, so a restart costs no error.
            pool = aioredis.BlockingConnectionPool.from_url(
                cfg.redis.url,
                max_connections=cfg.redis.max_connections,
                timeout=cfg.redis.timeout,
                socket_timeout=cfg.redis.timeout,
                socket_connect_timeout=cfg.redis.timeout,
                retry=Retry(NoBackoff(), 0),
                decode_responses=False,
            )
            self.redis = aioredis.Redis(connection_pool=pool)

    def key(self, tag: str, *parts: str) -> str:
        """``<prefix>{<tag>}:<part>:<part>`` — one hash slot per tag."""
        return f"{self.prefix}{{{tag}}}" + "".join(":" + p for p in parts)

    async def call(self, feature: str, fn: Callable[[], Awaitable[T]]) -> T:
        """Run one Redis operation within ``state.redis.timeout``; raise StateError on failure."""
        try:
            async with asyncio.timeout(self.timeout_s):
                result = await fn()
        except (RedisError, OSError, TimeoutError) as exc:
            self.failed(feature, exc)
            raise StateError(feature) from None
        if self._failing and feature in self._failing:
            self._failing.discard(feature)
            self._log.info("state_recovered", feature=feature)
        return result

    def failed(self, feature: str, exc: BaseException) -> None:
        """Count a failure and log it once per burst (not once per request)."""
        self._metrics.state_errors.labels(feature).inc()
        self._failing.add(feature)
        now = self._clock.monotonic()
        if now - self._last_logged.get(feature, -1e9) >= _LOG_EVERY_S:
            self._last_logged[feature] = now
            self._log.warning("state_unavailable", feature=feature, error=type(exc).__name__)

    def set_blind(self, feature: str, blind: bool) -> None:
        """A fail-closed feature reports whether it can see its state (for /readyz)."""
        if blind:
            self._blind.add(feature)
        else:
            self._blind.discard(feature)

    @property
    def blind(self) -> frozenset[str]:
        return frozenset(self._blind)

    async def close(self) -> None:
        if self.redis is not None:
            await self.redis.aclose()
            await self.redis.connection_pool.disconnect()
