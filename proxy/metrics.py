"""Prometheus metrics, one registry per :class:`Metrics` (no module globals).

Names and labels follow the contract (DESIGN §5); labels stay low-cardinality: route,
provider, model, tier, outcome, status class (``code``), reason, result.

With ``--workers N`` the supervisor sets ``PROMETHEUS_MULTIPROC_DIR`` before the workers
import prometheus-client; values then live in shared files and :meth:`Metrics.render`
aggregates every worker's (gauges declare how: ``livesum`` for in-flight, ``max`` for
states and ratios that every worker reads from the same shared state).

**The hot path defers.** A prometheus-client ``inc``/``observe`` is a few Python calls and
a lock (~1 µs; a histogram ~2 µs), paid several times per request. The per-request
series (requests, durations, attempts, tokens, cost, cache results, in flight) go through
:meth:`Metrics.counter` / :meth:`Metrics.histogram` instead: plain-float accumulators
that are added to the real children when anything reads the registry (a collector
registered first flushes them: ``/metrics``, ``get_sample_value``, ``render``). With
``--workers`` (multiprocess mode) any worker may answer a scrape for all of them, so each
worker also flushes every :data:`FLUSH_S` (and when it stops): a scrape sees another
worker's last quarter-second late at most.
"""

from __future__ import annotations

import os
from bisect import bisect_left
from collections.abc import Iterable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector

#: with --workers, how often each worker adds its deferred values to the shared files
FLUSH_S = 0.25

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


def status_class(status: int) -> str:
    return f"{status // 100}xx"


class FastCounter:
    """A counter child (or a gauge to set) whose increments wait in a float until a flush."""

    __slots__ = ("child", "pending")

    def __init__(self, child: Any) -> None:
        self.child = child
        self.pending = 0.0

    def inc(self, amount: float = 1.0) -> None:
        self.pending += amount

    def flush(self) -> None:
        pending = self.pending
        if pending:
            self.pending = 0.0
            self.child.inc(pending)

    def value(self) -> float:
        """The child's value with what is pending (tests, status)."""
        return float(self.child._value.get()) + self.pending


class FastGauge:
    """A gauge child whose latest value is set on it at the next flush."""

    __slots__ = ("child", "pending")

    def __init__(self, child: Any) -> None:
        self.child = child
        self.pending: float | None = None

    def set(self, value: float) -> None:
        self.pending = value

    def flush(self) -> None:
        pending = self.pending
        if pending is not None:
            self.pending = None
            self.child.set(pending)


class FastHistogram:
    """A histogram child whose observations are counted per bucket until a flush."""

    __slots__ = ("bounds", "child", "counts", "total")

    def __init__(self, child: Any) -> None:
        self.child = child
        self.bounds: list[float] = list(child._upper_bounds)
        self.counts = [0] * len(self.bounds)
        self.total = 0.0

    def observe(self, amount: float) -> None:
        # prometheus-client's rule: the first bucket whose bound is >= the value
        self.counts[bisect_left(self.bounds, amount)] += 1
        self.total += amount

    def flush(self) -> None:
        counts = self.counts
        if not any(counts):
            return
        child = self.child
        for i, n in enumerate(counts):
            if n:
                child._buckets[i].inc(n)
                counts[i] = 0
        child._sum.inc(self.total)
        self.total = 0.0


class _Flusher(Collector):
    """Registered first: every read of the registry flushes the deferred children."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def describe(self) -> Iterable[Any]:
        return []

    def collect(self) -> Iterable[Any]:
        self._metrics.flush()
        return []


class Metrics:
    """Every metric the proxy exports, registered in its own registry."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        r = self.registry = registry or CollectorRegistry(auto_describe=True)
        self._fast: dict[int, FastCounter | FastGauge | FastHistogram] = {}
        #: multiprocess mode (--workers): flushed every FLUSH_S too (another worker may
        #: answer the scrape)
        self.multiprocess = bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))
        self._gauges: list[tuple[Any, Any]] = []
        r.register(_Flusher(self))
        self.requests = Counter("rp_requests_total", "Requests answered, one per request.",
                                ["route", "code", "outcome"], registry=r)
        self.request_duration = Histogram(
            "rp_request_duration_seconds", "Time from request arrival to the last byte sent.",
            ["route"], buckets=_LATENCY_BUCKETS, registry=r)
        self.in_flight = Gauge("rp_requests_in_flight", "Requests being served.", registry=r,
                               multiprocess_mode="livesum")
        self.upstream_attempts = Counter(
            "rp_upstream_attempts_total", "Upstream attempts by result (status class or error).",
            ["route", "provider", "tier", "result"], registry=r)
        self.upstream_duration = Histogram(
            "rp_upstream_duration_seconds",
            "Duration of one upstream attempt: the whole reply when buffered, up to the first "
            "chunk when streamed.",
            ["provider"], buckets=_LATENCY_BUCKETS, registry=r)
        self.retries = Counter("rp_retries_total", "Retries, by reason.", ["route", "reason"],
                               registry=r)
        self.fallbacks = Counter("rp_fallbacks_total", "Tiers left for the next, by reason.",
                                 ["route", "reason"], registry=r)
        self.cache_requests = Counter("rp_cache_requests_total", "Cache lookups by result.",
                                      ["route", "result"], registry=r)
        self.tokens = Counter("rp_tokens_total", "Tokens used, by kind (input|output).",
                              ["provider", "model", "kind"], registry=r)
        self.cost_usd = Counter("rp_cost_usd_total", "Cost of answered calls in USD.",
                                ["route", "provider", "model"], registry=r)
        self.budget_spend_usd = Gauge("rp_budget_spend_usd", "Spend in the current window.",
                                      ["budget", "key"], registry=r, multiprocess_mode="max")
        self.budget_utilization = Gauge("rp_budget_utilization_ratio",
                                        "Spend (or requests) over limit in the current window.",
                                        ["budget", "key"], registry=r, multiprocess_mode="max")
        self.budget_crossings = Counter("rp_budget_threshold_crossings_total",
                                        "Budget thresholds crossed.", ["budget", "action"],
                                        registry=r)
        self.circuit_state = Gauge("rp_circuit_state", "0 closed, 1 half-open, 2 open.",
                                   ["provider"], registry=r, multiprocess_mode="max")
        self.canary_weight = Gauge("rp_canary_weight", "Percent of keys sent to the variant.",
                                   ["route"], registry=r, multiprocess_mode="max")
        self.canary_rollbacks = Counter("rp_canary_rollbacks_total", "Automatic rollbacks.",
                                        ["route"], registry=r)
        self.rate_limited = Counter("rp_rate_limited_total",
                                    "Requests refused or delayed by a client-side rate limit.",
                                    ["provider", "result"], registry=r)
        self.config_reloads = Counter("rp_config_reloads_total", "Config loads by result.",
                                      ["result"], registry=r)
        self.state_errors = Counter("rp_state_errors_total",
                                    "Shared-state calls that failed or timed out.", ["feature"],
                                    registry=r)
        self.redactions = Counter("rp_redactions_total", "Values masked in request bodies.",
                                  ["route", "kind"], registry=r)

    def counter(self, child: Any) -> FastCounter:
        """The deferred form of a counter child (one per child: the same object each time)."""
        fast = self._fast.get(id(child))
        if fast is None:
            fast = self._fast[id(child)] = FastCounter(child)
        assert isinstance(fast, FastCounter)
        return fast

    def gauge(self, child: Any) -> FastGauge:
        """The deferred form of a gauge child that is only ever ``set`` (one per child)."""
        fast = self._fast.get(id(child))
        if fast is None:
            fast = self._fast[id(child)] = FastGauge(child)
        assert isinstance(fast, FastGauge)
        return fast

    def histogram(self, child: Any) -> FastHistogram:
        """The deferred form of a histogram child (one per child)."""
        fast = self._fast.get(id(child))
        if fast is None:
            fast = self._fast[id(child)] = FastHistogram(child)
        assert isinstance(fast, FastHistogram)
        return fast

    def gauge_from(self, gauge: Any, read: Any) -> None:
        """Set ``gauge`` from ``read()`` at every flush (e.g. requests in flight)."""
        self._gauges.append((gauge, read))

    def flush(self) -> None:
        for fast in list(self._fast.values()):
            fast.flush()
        for gauge, read in self._gauges:
            gauge.set(read())

    def render(self) -> bytes:
        """The exposition text: this process's registry, or every worker's in multiprocess mode."""
        path = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
        if path:
            registry = CollectorRegistry()
            MultiProcessCollector(registry, path=path)
            return generate_latest(registry)
        return generate_latest(self.registry)
