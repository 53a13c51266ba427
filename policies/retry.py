"""Retry: try the same tier again, with backoff and full jitter, under a retry budget.

First attempt-level stage: it wraps the rest of one tier's attempt chain (record → circuit →
rate limit → timeout → ... → send) and calls it at most ``retry.attempts`` times.

Every outcome goes through :func:`proxy.classify.classify`; only a ``RETRY`` decision is
retried, and only while all of these hold:

- the reply is not a stream (a streamed reply is committed: nothing after it is retried);
- ``non_idempotent: false`` does not forbid it: a POST/PATCH that failed after its body was
  sent (timeout, reset, 5xx) is not retried; a connect error or a 429 (refused) still is;
- the wait fits: the provider's hint (``Retry-After``, ``retry-after-ms``,
  ``x-ratelimit-reset-*``) when ``retry_after.respect``, else ``backoff_s``; a hint longer
  than ``retry_after.max``, or any wait not shorter than what is left of ``total``, is not
  slept on — the outcome is handed back so the tiers policy moves on (or, on the last tier,
  the 429 reaches the client with its own ``Retry-After``);
- the provider's retry budget allows it (Envoy's idea): retries in flight stay below
  ``budget.ratio`` × requests in flight to that provider, with ``min_per_second`` retries a
  second always allowed (a token bucket). Refused: ``rp_retries_total{reason=
  "budget_exhausted"}``, and the outcome is handed back.

A discarded streamed reply is closed before the next try. Each retry counts
``rp_retries_total{route,reason}`` and logs ``upstream_retry``; a retry not taken logs
``upstream_retry_skipped`` with ``why``.
"""

from __future__ import annotations

from typing import Any

from proxy.call import Call, Handler, Reply
from proxy.classify import Decision, Verdict, backoff_s, classify
from proxy.clock import Clock
from proxy.config import RetryConfig
from proxy.context import AttemptContext
from proxy.errors import CircuitOpen, ProxyError, RateLimited

#: outcomes after which a non-idempotent request was provably not processed
_SAFE_FOR_NON_IDEMPOTENT = frozenset({"connect_error", "429"})
_NON_IDEMPOTENT_METHODS = frozenset({"POST", "PATCH"})
#: attempt outcomes that sent nothing upstream
_NOT_SENT = (CircuitOpen, RateLimited)


class RetryBudget:
    """One provider's retry budget: requests and retries in flight, and a floor bucket.

    Shared by every route and tier that calls the provider (kept across reloads), so the
    counts are the provider's. ``ratio`` and ``min_per_second`` come from the caller's
    route: each route applies its own numbers to the shared counts.
    """

    __slots__ = ("_clock", "_stamp", "_tokens", "requests", "retries")

    def __init__(self, clock: Clock) -> None:
        self._clock = clock
        self.requests = 0  # tier attempt loops running against this provider
        self.retries = 0  # retries decided and not finished (backoff sleep included)
        self._tokens: float | None = None  # floor bucket; None = full
        self._stamp = clock.monotonic()

    def try_acquire(self, ratio: float, min_per_second: float) -> bool:
        """Take a retry slot; False when the budget is spent. Pair with :meth:`release`."""
        if self.retries < ratio * self.requests:
            self.retries += 1
            return True
        if min_per_second <= 0:
            return False
        now = self._clock.monotonic()
        capacity = max(1.0, min_per_second)
        tokens = capacity if self._tokens is None else min(
            capacity, self._tokens + (now - self._stamp) * min_per_second)
        self._stamp = now
        if tokens < 1.0:
            self._tokens = tokens
            return False
        self._tokens = tokens - 1.0
        self.retries += 1
        return True

    def release(self) -> None:
        self.retries -= 1


class Retry:
    __slots__ = ("_attempts", "_backoff", "_budget", "_cfg", "_clock", "_floor", "_hint_max_s",
                 "_idempotent_only", "_log", "_provider", "_rand", "_ratio", "_respect",
                 "_retries", "_route", "_tier")

    def __init__(self, ctx: AttemptContext, cfg: RetryConfig) -> None:
        deps = ctx.deps
        self._cfg = cfg
        self._attempts = cfg.attempts
        self._backoff = cfg.backoff
        self._respect = cfg.retry_after.respect
        self._hint_max_s = cfg.retry_after.max
        self._ratio = cfg.budget.ratio
        self._floor = cfg.budget.min_per_second
        self._idempotent_only = not cfg.non_idempotent
        self._clock = deps.clock
        self._rand = deps.rand
        self._log = deps.log
        self._retries = deps.metrics.retries
        self._route = ctx.route.name
        self._tier = ctx.tier_index
        self._provider = ctx.provider.name
        clock = deps.clock
        self._budget = ctx.route_ctx.keeper.keep(
            "retry_budget", ctx.provider.name, None, lambda: RetryBudget(clock))

    async def __call__(self, call: Call, next_: Handler) -> Reply:
        budget = self._budget
        budget.requests += 1
        try:
            try:  # the first try inline: no extra coroutine frame on every request
                outcome: Reply | ProxyError = await next_(call)
            except ProxyError as exc:
                if not exc.attempt:
                    raise
                outcome = exc
            for retry_index in range(self._attempts - 1):
                decision = classify(outcome, self._cfg, self._clock.time())
                if decision.verdict is not Verdict.RETRY or _committed(outcome):
                    break
                wait_s = self._wait_s(call, decision, retry_index)
                if wait_s is None:
                    break
                if not budget.try_acquire(self._ratio, self._floor):
                    self._retries.labels(self._route, "budget_exhausted").inc()
                    self._skipped(call, decision, "budget_exhausted")
                    break
                try:
                    self._retries.labels(self._route, decision.reason).inc()
                    self._log.info("upstream_retry", request_id=call.request_id,
                                   route=self._route, tier=self._tier, provider=self._provider,
                                   retry=retry_index + 1, reason=decision.reason,
                                   wait_s=round(wait_s, 3))
                    await self._clock.sleep(wait_s)
                    retried = await _attempt(call, next_)
                finally:
                    budget.release()
                if isinstance(retried, _NOT_SENT):
                    # the breaker opened or the local limit refused: nothing was sent, so the
                    # provider's last real answer stands (tiers treats these as skips)
                    self._skipped(call, decision, retried.type)
                    break
                await _release(outcome)
                outcome = retried
        finally:
            budget.requests -= 1
        if isinstance(outcome, ProxyError):
            raise outcome
        return outcome

    def _wait_s(self, call: Call, decision: Decision, retry_index: int) -> float | None:
        """Seconds to wait before the retry, or None when it must not be taken."""
        if (self._idempotent_only and call.method in _NON_IDEMPOTENT_METHODS
                and decision.reason not in _SAFE_FOR_NON_IDEMPOTENT):
            self._skipped(call, decision, "non_idempotent")
            return None
        hint = decision.wait_s if self._respect else None
        if hint is not None and hint > self._hint_max_s:
            self._skipped(call, decision, "retry_after_over_max", wait_s=hint)
            return None
        wait_s = hint if hint is not None else backoff_s(retry_index, self._backoff, self._rand)
        if wait_s >= call.time_left():
            self._skipped(call, decision, "deadline", wait_s=wait_s)
            return None
        return wait_s

    def _skipped(self, call: Call, decision: Decision, why: str, **extra: Any) -> None:
        self._log.info("upstream_retry_skipped", request_id=call.request_id, route=self._route,
                       tier=self._tier, provider=self._provider, reason=decision.reason,
                       why=why, **{k: round(v, 3) for k, v in extra.items()})


async def _attempt(call: Call, next_: Handler) -> Reply | ProxyError:
    """One try of the rest of the chain; an attempt-level error is returned, not raised."""
    try:
        return await next_(call)
    except ProxyError as exc:
        if not exc.attempt:
            raise
        return exc


def _committed(outcome: Reply | ProxyError) -> bool:
    """A streamed reply's first chunk has arrived: it is the answer, whatever its status."""
    return isinstance(outcome, Reply) and outcome.stream is not None


async def _release(outcome: Reply | ProxyError) -> None:
    """Free what a discarded outcome holds (a streamed body's upstream connection)."""
    if isinstance(outcome, Reply) and outcome.stream is not None:
        await outcome.stream.close(False)


def build_attempt(ctx: AttemptContext) -> Retry | None:
    cfg = ctx.arm.retry
    if cfg is None or cfg.attempts <= 1:
        return None
    return Retry(ctx, cfg)
