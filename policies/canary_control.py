"""A canary's control loop: the fleet's weight, window judging, rollback, ramp, report.

One :class:`CanaryController` per route with a canary, kept across reloads (a reload keeps
the weight unless the file's ``weight`` changed). It is what the admin plane acts on
(``registry["canary"][route]``) and runs a background loop (``registry["task"]``) that,
every :data:`REFRESH_S`:

1. adds this replica's pending observations to the shared store (one batch: requests never
   wait on the state backend for the canary);
2. reads the published weight (a state error keeps the last known one; counted as
   ``rp_state_errors_total{feature="canary"}``), so an operator's change or a rollback
   reaches every replica within a second;
3. judges the windows that have closed (``window id = floor(unix time / window)``, judged
   :data:`SETTLE_S` after it closes so every replica's last batch has landed). A window
   breaches when the variant had at least ``min_requests`` requests and its error rate or
   p95 is over a limit (``max_error_rate``, ``max_p95``, and against stable's in the same
   window ``max_error_rate_over_stable``, ``max_p95_over_stable``). After ``consecutive``
   breaching windows — all begun after the last operator change — the weight goes to 0,
   state ``rolled_back``, everywhere; it stays there until an operator sets a weight.
   With Redis the windows are counted fleet-wide, so the replicas judge the same numbers;
   a compare-and-set on the weight's version lets exactly one of them perform the rollback
   (log ``canary_rolled_back``, ``rp_canary_rollbacks_total{route}``);
4. advances a staged ramp (``steps`` with ``step_every``): to the next step once the
   weight has held ``step_every`` and the last window since the change had enough variant
   requests and no breach (no evidence is not health: a quiet route holds its step).
"""

from __future__ import annotations

import asyncio
import math
from typing import Any

from proxy import abstats
from proxy.config import AutoRollbackConfig, CanaryConfig
from proxy.context import Deps
from proxy.errors import StateUnavailable
from proxy.state.backend import StateError
from proxy.state.canary import (
    ACTIVE,
    ARMS,
    ROLLED_BACK,
    WINDOW_SAMPLES,
    ArmStats,
    Batch,
    CanaryStore,
    Published,
)

STABLE, VARIANT = ARMS
REFRESH_S = 0.5
SETTLE_S = 1.0
#: windows bucketed when no auto_rollback is configured (the report still needs batches)
DEFAULT_WINDOW_S = 60.0
#: the report's significance level, and its minimum requests per arm without auto_rollback
ALPHA = 0.05
REPORT_MIN_REQUESTS = 20


class _Buffer:
    """This replica's observations not yet in the store (shared with the controller that
    replaces this one on a reload, so requests still running on the old config count)."""

    __slots__ = ("batch",)

    def __init__(self) -> None:
        self.batch: Batch = {}


class Judgement:
    """One window's verdict on the variant."""

    __slots__ = ("enough", "p95_ms", "rate", "reasons", "requests", "wid")

    def __init__(self, wid: int, arms: dict[str, ArmStats], cfg: AutoRollbackConfig) -> None:
        v, s = arms[VARIANT], arms[STABLE]
        self.wid = wid
        self.requests = v.requests
        self.enough = v.requests >= cfg.min_requests
        self.rate = v.errors / v.requests if v.requests else 0.0
        self.p95_ms = abstats.percentile(v.latencies_ms, 95) if v.latencies_ms else 0.0
        reasons: list[str] = []
        if self.enough:
            if cfg.max_error_rate is not None and self.rate > cfg.max_error_rate:
                reasons.append("error_rate")
            if cfg.max_p95 is not None and self.p95_ms > cfg.max_p95 * 1000:
                reasons.append("p95")
            if s.requests >= cfg.min_requests:
                s_rate = s.errors / s.requests
                s_p95 = abstats.percentile(s.latencies_ms, 95) if s.latencies_ms else 0.0
                over = cfg.max_error_rate_over_stable
                if over is not None and self.rate - s_rate > over:
                    reasons.append("error_rate_over_stable")
                over = cfg.max_p95_over_stable
                if over is not None and self.p95_ms - s_p95 > over * 1000:
                    reasons.append("p95_over_stable")
        self.reasons = reasons

    @property
    def breach(self) -> bool:
        return bool(self.reasons)

    def summary(self) -> dict[str, Any]:
        return {"window": self.wid, "requests": self.requests, "error_rate": round(self.rate, 6),
                "p95_ms": round(self.p95_ms, 3), "breached": self.reasons}


class CanaryController:
    """The fleet's canary for one route (see the module docstring)."""

    def __init__(self, route: str, cfg: CanaryConfig, epoch: str, store: CanaryStore,
                 deps: Deps, previous: CanaryController | None = None) -> None:
        self.route = route
        self.cfg = cfg
        self.epoch = epoch
        self._store = store
        self._clock = deps.clock
        self._log = deps.log
        self._weights = deps.metrics.canary_weight
        self._gauge = self._weights.labels(route)
        self._rollbacks = deps.metrics.canary_rollbacks.labels(route)
        self._ar = cfg.auto_rollback
        self._window_s = self._ar.window if self._ar is not None else DEFAULT_WINDOW_S
        self._keep_windows = (self._ar.consecutive if self._ar is not None else 1) + 3
        self._buffer = _Buffer()
        self._published: Published | None = None
        self._seeded = False
        self._judged: tuple[int, int] | None = None  # (latest window id, record version)
        self._latest: Judgement | None = None
        self._breaching = 0
        self.threshold = round(cfg.weight * 100)  # variant when bucket < threshold
        if previous is not None:
            if previous._published is not None:
                self._set(previous._published)
            if previous.epoch == epoch and previous._window_s == self._window_s:
                self._buffer = previous._buffer  # in-flight requests of the old config too
        self._gauge.set(self.weight)

    def retire(self) -> None:
        """The route's canary block is gone (or the route): its weight gauge goes too, not
        left showing the last weight. (With ``--workers``, prometheus-client's multiprocess
        files keep the last value until the workers restart.)"""
        try:
            self._weights.remove(self.route)
        except KeyError:
            pass

    # ------------------------------------------------------------------ hot path

    def observe(self, arm: str, error: bool, latency_s: float, cost_usd: float) -> None:
        """Record one request the arm served (no I/O: added to the store in batches)."""
        wid = int(self._clock.time() // self._window_s)
        pending = self._buffer.batch
        stats = pending.get((wid, arm))
        if stats is None:
            stats = pending[(wid, arm)] = ArmStats()
        stats.add(error, latency_s * 1000, cost_usd, WINDOW_SAMPLES)

    def add_cost(self, arm: str, cost_usd: float) -> None:
        """A streamed reply's cost, known once it ended."""
        if cost_usd:
            wid = int(self._clock.time() // self._window_s)
            self._buffer.batch.setdefault((wid, arm), ArmStats()).cost_usd += cost_usd

    # ------------------------------------------------------------------ admin protocol

    @property
    def weight(self) -> float:
        return self._published.weight if self._published is not None else self.cfg.weight

    @property
    def state(self) -> str:
        return self._published.state if self._published is not None else ACTIVE

    def status(self) -> dict[str, Any]:
        return {"weight": self.weight, "state": self.state, "breaching_windows": self._breaching}

    async def set_weight(self, weight: float) -> None:
        """An operator's weight: published to every replica, windows judged afresh."""
        await self._operator(weight, ACTIVE)
        self._log.info("canary_weight_set", route=self.route, weight=weight)

    async def rollback(self) -> None:
        """An operator's rollback: weight 0 everywhere until a weight is set again."""
        before = self.weight
        await self._operator(0.0, ROLLED_BACK)
        self._log.warning("canary_rolled_back", route=self.route, reason="operator",
                          weight_before=before)

    async def _operator(self, weight: float, state: str) -> None:
        try:
            rec = await self._store.publish(weight, state, self._clock.time(),
                                            file_weight=self.cfg.weight, reset_windows=True)
        except StateError:
            raise StateUnavailable("the canary weight could not be published: shared state "
                                   "unavailable") from None
        assert rec is not None
        self._set(rec)

    async def report(self) -> dict[str, Any]:
        """The A/B report over this experiment (see :func:`build_report`)."""
        now = self._clock.time()
        await self.flush()
        await self._refresh(now)
        try:
            totals = await self._store.totals(self.epoch)
        except StateError:
            raise StateUnavailable("the canary report needs the shared state") from None
        min_n = self._ar.min_requests if self._ar is not None else REPORT_MIN_REQUESTS
        return build_report(self.route, self.weight, self.state, totals, min_n)

    # ------------------------------------------------------------------ the loop

    async def run(self) -> None:
        """The background loop (started with the runtime, cancelled when it is replaced)."""
        while True:
            try:
                await self.tick()
            except Exception as exc:  # the loop must outlive any one bad tick
                self._log.error("canary_tick_failed", route=self.route, error=type(exc).__name__)
            await asyncio.sleep(REFRESH_S)  # real time: the refresh cadence, not policy time

    async def tick(self) -> None:
        """One round: flush, refresh the weight, judge closed windows, rollback or ramp."""
        now = self._clock.time()
        await self.flush()
        rec = await self._refresh(now)
        if rec is None or self._ar is None:
            return
        try:
            await self._judge(rec, now, self._ar)
        except StateError:
            return  # judged on the next tick; the weight stays as last known

    async def flush(self) -> None:
        """Add the pending observations to the store (kept for the next try on failure)."""
        buffer = self._buffer
        if not buffer.batch:
            return
        batch, buffer.batch = buffer.batch, {}
        now = self._clock.time()
        try:
            await self._store.add(self.epoch, batch, now, self._window_s * self._keep_windows)
        except StateError:
            oldest = int(now // self._window_s) - self._keep_windows
            for key, stats in batch.items():
                if key[0] >= oldest:
                    buffer.batch.setdefault(key, ArmStats()).merge(stats, WINDOW_SAMPLES)

    async def _refresh(self, now: float) -> Published | None:
        try:
            if not self._seeded:
                rec: Published | None = await self._store.seed(self.cfg.weight, now)
                self._seeded = True
            else:
                rec = await self._store.read()
                if rec is None:  # the store lost it (e.g. a Redis restart): republish
                    rec = await self._republish(now)
        except StateError:
            return self._published
        if rec is not None:
            self._set(rec)
        return rec

    async def _republish(self, now: float) -> Published | None:
        last = self._published
        if last is None:
            return await self._store.seed(self.cfg.weight, now)
        rec = await self._store.publish(last.weight, last.state, now, file_weight=last.file_weight,
                                        reset_windows=False, expect_version=0)
        return rec if rec is not None else await self._store.read()

    def _set(self, rec: Published) -> None:
        self._published = rec
        self.threshold = round(rec.weight * 100)
        self._gauge.set(rec.weight)

    async def _judge(self, rec: Published, now: float, ar: AutoRollbackConfig) -> None:
        latest = math.floor((now - SETTLE_S) / ar.window) - 1
        if self._judged != (latest, rec.version):
            ids = [w for w in range(latest, latest - ar.consecutive, -1)
                   if w * ar.window >= rec.since]
            windows = await self._store.windows(self.epoch, ids) if ids else {}
            judged = [Judgement(w, windows[w], ar) for w in ids]
            self._judged = (latest, rec.version)
            self._latest = judged[0] if judged else None
            self._breaching = next((i for i, j in enumerate(judged) if not j.breach), len(judged))
            if rec.state == ACTIVE and rec.weight > 0 and self._breaching >= ar.consecutive:
                await self._auto_rollback(rec, now, judged)
                return
        await self._maybe_step(rec, now, ar)

    async def _auto_rollback(self, rec: Published, now: float, judged: list[Judgement]) -> None:
        new = await self._store.publish(0.0, ROLLED_BACK, now, file_weight=rec.file_weight,
                                        reset_windows=True, expect_version=rec.version)
        if new is None:  # another replica changed the weight first (and logged it)
            await self._refresh(now)
            return
        self._set(new)
        self._rollbacks.inc()
        self._log.warning("canary_rolled_back", route=self.route, reason="auto",
                          weight_before=rec.weight, windows=[j.summary() for j in judged])

    async def _maybe_step(self, rec: Published, now: float, ar: AutoRollbackConfig) -> None:
        steps, every = self.cfg.steps, self.cfg.step_every
        if not steps or every is None or rec.state != ACTIVE or rec.weight <= 0:
            return
        nxt = next((s for s in steps if s > rec.weight), None)
        health = self._latest
        if nxt is None or now - rec.changed_at < every or health is None:
            return
        if not health.enough or health.breach or health.wid * ar.window < rec.changed_at:
            return
        new = await self._store.publish(nxt, ACTIVE, now, file_weight=rec.file_weight,
                                        reset_windows=False, expect_version=rec.version)
        if new is None:
            await self._refresh(now)
            return
        self._set(new)
        self._log.info("canary_step", route=self.route, weight_before=rec.weight, weight=nxt,
                       window=health.summary())


# --------------------------------------------------------------------------- report


def _ms(value: float) -> float:
    return round(value, 3)


def _arm_summary(s: ArmStats) -> dict[str, Any]:
    lat = sorted(s.latencies_ms)
    return {
        "requests": s.requests, "errors": s.errors,
        "error_rate": s.errors / s.requests if s.requests else None,
        "latency_ms": {
            "p50": _ms(abstats.percentile(lat, 50, presorted=True)) if lat else None,
            "p95": _ms(abstats.percentile(lat, 95, presorted=True)) if lat else None,
            "mean": _ms(math.fsum(lat) / len(lat)) if lat else None,
            "samples": len(lat),
        },
        "mean_cost_usd": s.cost_usd / s.requests if s.requests else None,
    }


def build_report(route: str, weight: float, state: str, totals: dict[str, ArmStats],
                 min_requests: int) -> dict[str, Any]:
    """Stable vs variant (differences are variant − stable; tests two-sided at 95%).

    Error rate: two-proportion z-test, Newcombe interval. Latency: Mann–Whitney U (the
    p-value and verdict; latency is skewed), with Welch's t on the means and Cohen's d
    alongside. Verdict: ``not_enough_data`` below ``min_requests`` in either arm; else
    ``variant_worse`` when either metric is significantly worse, ``variant_better`` when
    one is significantly better and none worse, else ``no_significant_difference``.
    """
    s, v = totals[STABLE], totals[VARIANT]
    report: dict[str, Any] = {
        "route": route, "weight": weight, "state": state,
        "arms": {STABLE: _arm_summary(s), VARIANT: _arm_summary(v)},
        "error_rate": {"diff": None, "ci95": None, "p_value": None},
        "latency": {"p50_diff_ms": None, "p95_diff_ms": None, "p_value": None,
                    "test": "mann_whitney_u", "mean_diff_ms": None, "mean_diff_ci95": None,
                    "welch_p_value": None, "cohens_d": None},
    }
    worse = better = False
    if s.requests and v.requests:
        z = abstats.two_proportion(s.errors, s.requests, v.errors, v.requests)
        report["error_rate"] = {"diff": z.diff, "ci95": list(z.ci95), "p_value": z.p_value}
        if z.p_value < ALPHA:
            worse, better = z.diff > 0, z.diff < 0
    if s.latencies_ms and v.latencies_ms:
        lat = report["latency"]
        arms = report["arms"]
        lat["p50_diff_ms"] = _ms(arms[VARIANT]["latency_ms"]["p50"]
                                 - arms[STABLE]["latency_ms"]["p50"])
        lat["p95_diff_ms"] = _ms(arms[VARIANT]["latency_ms"]["p95"]
                                 - arms[STABLE]["latency_ms"]["p95"])
        u = abstats.mann_whitney_u(s.latencies_ms, v.latencies_ms)
        assert u is not None
        lat["p_value"] = u.p_value
        if u.p_value < ALPHA:
            worse, better = worse or u.prob_b_greater > 0.5, better or u.prob_b_greater < 0.5
        w = abstats.welch_t(s.latencies_ms, v.latencies_ms)
        if w is not None:
            lat.update(mean_diff_ms=_ms(w.mean_diff), mean_diff_ci95=[_ms(x) for x in w.ci95],
                       welch_p_value=w.p_value, cohens_d=w.cohens_d)
    if s.requests < min_requests or v.requests < min_requests:
        report["verdict"] = "not_enough_data"
    else:
        report["verdict"] = ("variant_worse" if worse else "variant_better" if better
                             else "no_significant_difference")
    return report

