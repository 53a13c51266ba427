"""Circuit breaker: per provider, local to this replica (as in Envoy).

States (``rp_circuit_state{provider}``: 0 closed, 1 half-open, 2 open):

- **closed**: every call goes through; outcomes are counted in a sliding ``window`` (ten
  buckets). Once the window holds ``min_requests`` outcomes and the share of failures
  reaches ``failure_rate``, the breaker opens.
- **open**: calls fail at once with :class:`~proxy.errors.CircuitOpen` (no I/O, no await:
  microseconds), which the tiers policy reads as "skip this tier". After ``open_for`` the
  next call finds it half-open.
- **half-open**: ``half_open_requests`` probe calls go through, the rest fail fast. Any
  probe failure opens it again for ``open_for``; when every probe succeeded it closes with
  an empty window.

What counts as a failure is :func:`proxy.classify.provider_failure` (connect errors,
resets, attempt/first-byte timeouts, 5xx, invalid responses); 4xx (429 included) and
``accept`` rejections are successes (the provider answered); a ``total`` timeout, the
proxy's own rate limit and cancellations say nothing. An outcome of a call admitted before
the last state change is ignored, so a slow call from before the trip cannot close it.

One breaker per provider, shared by every route and tier using it, kept across reloads
while its config is unchanged, and registered for the admin plane (``/admin/status``,
``POST /admin/circuit/{provider}/reset``). Time comes from the injected clock.
"""

from __future__ import annotations

from collections import deque
from typing import Any

from proxy.call import Call, Handler, Reply
from proxy.classify import provider_failure
from proxy.clock import Clock
from proxy.config import CircuitBreakerConfig
from proxy.context import AttemptContext
from proxy.errors import CircuitOpen

CLOSED, HALF_OPEN, OPEN = "closed", "half_open", "open"
_GAUGE = {CLOSED: 0, HALF_OPEN: 1, OPEN: 2}
_BUCKETS = 10

Ticket = tuple[int, bool]  # (state generation at admission, is a half-open probe)


class _Window:
    """Outcomes over the last ``window_s`` seconds, in ``_BUCKETS`` time buckets."""

    __slots__ = ("_buckets", "_width_s", "failures", "total")

    def __init__(self, window_s: float) -> None:
        self._width_s = max(window_s / _BUCKETS, 1e-6)
        self._buckets: deque[list[int]] = deque()  # [bucket index, total, failures]
        self.total = 0
        self.failures = 0

    def add(self, now: float, failed: bool) -> None:
        index = int(now / self._width_s)
        buckets = self._buckets
        while buckets and buckets[0][0] <= index - _BUCKETS:
            _, total, failures = buckets.popleft()
            self.total -= total
            self.failures -= failures
        if not buckets or buckets[-1][0] != index:
            buckets.append([index, 0, 0])
        last = buckets[-1]
        last[1] += 1
        self.total += 1
        if failed:
            last[2] += 1
            self.failures += 1

    def clear(self) -> None:
        self._buckets.clear()
        self.total = self.failures = 0


class CircuitBreaker:
    """One provider's breaker. ``admit`` before a call, ``record`` its outcome after."""

    __slots__ = ("_clock", "_gauge", "_generation", "_log", "_opened_at", "_probe_ok", "_probes",
                 "_state", "_window", "cfg", "provider")

    def __init__(self, provider: str, cfg: CircuitBreakerConfig, clock: Clock, gauge: Any,
                 log: Any) -> None:
        self.provider = provider
        self.cfg = cfg
        self._clock = clock
        self._gauge = gauge
        self._log = log
        self._state = CLOSED
        self._generation = 0
        self._opened_at = 0.0
        self._probes = 0  # probes in flight
        self._probe_ok = 0  # probes that succeeded in this half-open period
        self._window = _Window(cfg.window)
        gauge.set(0)

    def state_name(self) -> str:
        """``closed`` | ``open`` | ``half_open`` (an elapsed open period reads half-open)."""
        if self._state is OPEN and self._open_left() <= 0:
            self._to(HALF_OPEN, None, "open_for_elapsed")
        return self._state

    def reset(self) -> None:
        """Close the breaker and forget the window (admin action)."""
        self._to(CLOSED, None, "admin_reset")

    def admit(self, request_id: str | None) -> Ticket:
        """Let a call through, or raise :class:`CircuitOpen` at once."""
        if self._state is CLOSED:
            return (self._generation, False)
        if self._state is OPEN:
            left = self._open_left()
            if left > 0:
                raise CircuitOpen(f"the circuit of provider '{self.provider}' is open",
                                  retry_after_s=left)
            self._to(HALF_OPEN, request_id, "open_for_elapsed")
        if self._probes >= self.cfg.half_open_requests:
            raise CircuitOpen(f"the circuit of provider '{self.provider}' is half-open and its "
                              "probes are in flight", retry_after_s=1.0)
        self._probes += 1
        return (self._generation, True)

    def record(self, ticket: Ticket, failed: bool | None, request_id: str | None) -> None:
        """The outcome of an admitted call: True failure, False success, None neutral."""
        generation, probe = ticket
        if generation != self._generation:
            return
        if probe:
            self._probes -= 1
            if failed is None:
                return
            if failed:
                self._to(OPEN, request_id, "probe_failed")
                return
            self._probe_ok += 1
            if self._probe_ok >= self.cfg.half_open_requests:
                self._to(CLOSED, request_id, "probes_succeeded")
            return
        if failed is None:
            return
        window = self._window
        window.add(self._clock.monotonic(), failed)
        cfg = self.cfg
        if (failed and window.total >= cfg.min_requests
                and window.failures >= cfg.failure_rate * window.total):
            self._to(OPEN, request_id, "failure_rate")

    def _open_left(self) -> float:
        return self._opened_at + self.cfg.open_for - self._clock.monotonic()

    def _to(self, state: str, request_id: str | None, why: str) -> None:
        previous, window = self._state, self._window
        fields: dict[str, Any] = {"requests": window.total, "failures": window.failures}
        self._state = state
        self._generation += 1
        self._probes = self._probe_ok = 0
        if state is OPEN:
            self._opened_at = self._clock.monotonic()
        if state is not HALF_OPEN:
            window.clear()
        self._gauge.set(_GAUGE[state])
        if previous is not state:
            self._log.info("circuit_state_changed", request_id=request_id,
                           provider=self.provider, previous=previous, state=state, why=why,
                           **fields)


class Circuit:
    """The attempt-level stage around one tier's calls to the provider."""

    __slots__ = ("_breaker",)

    def __init__(self, breaker: CircuitBreaker) -> None:
        self._breaker = breaker

    async def __call__(self, call: Call, next_: Handler) -> Reply:
        breaker = self._breaker
        ticket = breaker.admit(call.request_id)
        try:
            reply = await next_(call)
        except BaseException as exc:
            breaker.record(ticket, provider_failure(exc), call.request_id)
            raise
        breaker.record(ticket, provider_failure(reply), call.request_id)
        return reply


def build_attempt(ctx: AttemptContext) -> Circuit | None:
    provider = ctx.provider.name
    cfg = ctx.route_ctx.config.providers[provider].circuit_breaker
    if cfg is None:
        return None
    deps = ctx.deps
    gauge = deps.metrics.circuit_state.labels(provider)
    breaker = ctx.route_ctx.keeper.keep(
        "circuit", provider, cfg,
        lambda: CircuitBreaker(provider, cfg, deps.clock, gauge, deps.log))
    ctx.route_ctx.register("circuit", provider, breaker)
    return Circuit(breaker)
