"""faults: Envoy-style failure rehearsal, acting where the provider would.

Off unless the route has a ``faults`` block. Two halves of one policy:

- **Route stage** (``build_route``, before redact/cache/budget): decides the request's
  :class:`FaultPlan` once and puts it on ``call.fault``. From the request header
  (``x-rp-fault`` by default), else from the configured percentages: ``abort.percent`` and
  ``delay.percent`` are drawn independently per request from ``deps.rand`` (so a plan drawn
  for a request hits every attempt of it, like a provider that is down for that call).
- **Attempt stage** (``build_attempt``, just before send, inside the attempt timeout,
  validation, accept, circuit breaker and retry): applies the plan as the provider would.
  ``delay`` really waits (``asyncio.sleep``: a slow provider, cut by the attempt timer
  like one); ``abort=S`` answers status S with ``{"error": {"type": "injected_fault"}}``
  (a 429 carries ``Retry-After: 1``); ``bad_response`` answers 200 with a malformed JSON
  body. Retry, fallback, validation, the breaker and the canary's rollback therefore react
  exactly as in a real outage, and an abort that is the final answer is relayed like any
  provider error. Nothing reaches the provider for an aborted or bad_response attempt.

Header grammar (case-insensitive, spaces ignored)::

    x-rp-fault: <fault>[,<fault>][;tier=N]
    <fault>   := abort=<status 400..599> | delay=<duration> | bad_response

``;tier=N`` limits the faults to the tier at configured position N (1-based); without it
every tier is hit. A malformed header is the client's mistake: 400 ``bad_request``. The
header is an ``x-rp-*`` control header, so it never goes upstream.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import orjson

from proxy.call import Call, Handler, Reply
from proxy.config import FaultsConfig
from proxy.context import AttemptContext, RouteContext
from proxy.errors import BadRequest
from proxy.units import parse_duration

#: what ``bad_response`` answers: a truncated chat completion
MALFORMED_BODY = b'{"choices": [{"message": '
_JSON = ("content-type", "application/json")


@dataclass(frozen=True, slots=True)
class FaultPlan:
    """The faults one request's attempts suffer."""

    abort_status: int | None = None
    delay_s: float | None = None
    bad_response: bool = False
    tier: int | None = None  # 1-based configured position; None = every tier
    source: str = "header"  # "header" | "percent"

    def describe(self) -> str:
        parts = []
        if self.delay_s is not None:
            parts.append(f"delay={self.delay_s:g}s")
        if self.abort_status is not None:
            parts.append(f"abort={self.abort_status}")
        if self.bad_response:
            parts.append("bad_response")
        return ",".join(parts)


def parse_fault_header(value: str) -> FaultPlan:
    """Parse an ``x-rp-fault`` value. Raises ``ValueError`` with what is wrong."""
    spec, *params = [p.strip() for p in value.strip().lower().split(";")]
    tier: int | None = None
    for param in params:
        name, eq, arg = (x.strip() for x in param.partition("="))
        if name != "tier" or not eq or not arg.isdigit() or int(arg) < 1:
            raise ValueError(f"'{param}' is not a parameter (expected tier=N, N >= 1)")
        tier = int(arg)
    abort: int | None = None
    delay: float | None = None
    bad = False
    for item in (x.strip() for x in spec.split(",")):
        name, eq, arg = (x.strip() for x in item.partition("="))
        if name == "abort" and eq and arg.isdigit() and 400 <= int(arg) <= 599:
            abort = int(arg)
        elif name == "delay" and eq:
            delay = parse_duration(arg)
        elif name == "bad_response" and not eq:
            bad = True
        else:
            raise ValueError(f"'{item}' is not a fault (expected abort=<400..599>, "
                             "delay=<duration> or bad_response)")
    if abort is not None and bad:
        raise ValueError("abort and bad_response cannot both answer the same attempt")
    return FaultPlan(abort, delay, bad, tier, "header")


class FaultPlanner:
    """Route stage: decide the request's fault plan (``call.fault``)."""

    __slots__ = ("_abort_p", "_abort_status", "_delay_p", "_delay_s", "_header", "_rand")

    def __init__(self, ctx: RouteContext, cfg: FaultsConfig) -> None:
        self._header = cfg.header
        self._abort_p = cfg.abort.percent / 100.0
        self._abort_status = cfg.abort.status
        self._delay_p = cfg.delay.percent / 100.0
        self._delay_s = cfg.delay.duration
        self._rand = ctx.deps.rand

    async def __call__(self, call: Call, next_: Handler) -> Reply:
        raw = call.headers.get(self._header)
        if raw is not None:
            try:
                call.fault = parse_fault_header(raw)
            except ValueError as exc:
                raise BadRequest(f"{self._header}: {exc}") from None
        elif self._abort_p or self._delay_p:
            call.fault = self._draw()
        return await next_(call)

    def _draw(self) -> FaultPlan | None:
        rand = self._rand
        abort = self._abort_status if self._abort_p and rand.random() < self._abort_p else None
        delay = self._delay_s if self._delay_p and rand.random() < self._delay_p else None
        if abort is None and delay is None:
            return None
        return FaultPlan(abort, delay, False, None, "percent")


class FaultInjector:
    """Attempt stage: act as the provider would under the request's fault plan."""

    __slots__ = ("_log", "_model", "_provider", "_route", "_tier")

    def __init__(self, ctx: AttemptContext) -> None:
        self._tier = ctx.tier_index
        self._provider = ctx.provider.name
        self._model = ctx.tier.model
        self._route = ctx.route.name
        self._log = ctx.deps.log

    async def __call__(self, call: Call, next_: Handler) -> Reply:
        plan: FaultPlan | None = call.fault
        if plan is None or (plan.tier is not None and plan.tier != self._tier):
            return await next_(call)
        self._log.info("fault_injected", request_id=call.request_id, route=self._route,
                       tier=self._tier, provider=self._provider, fault=plan.describe(),
                       source=plan.source)
        if plan.delay_s:
            await asyncio.sleep(plan.delay_s)  # a real wait: the attempt timer cuts it
        if plan.abort_status is not None:
            return self._reply(plan.abort_status, _abort_body(plan.abort_status, call))
        if plan.bad_response:
            return self._reply(200, MALFORMED_BODY)
        return await next_(call)

    def _reply(self, status: int, body: bytes) -> Reply:
        headers = [_JSON]
        if status == 429:
            headers.append(("retry-after", "1"))
        return Reply(status, headers, body=body, provider=self._provider, model=self._model,
                     tier=self._tier, source="fault")


def _abort_body(status: int, call: Call) -> bytes:
    return orjson.dumps({"error": {
        "type": "injected_fault", "message": f"fault injected by resilience-proxy: abort={status}",
        "status": status, "request_id": call.request_id}})


def build_route(ctx: RouteContext) -> FaultPlanner | None:
    cfg = ctx.route.faults
    return None if cfg is None else FaultPlanner(ctx, cfg)


def build_attempt(ctx: AttemptContext) -> FaultInjector | None:
    return None if ctx.route.faults is None else FaultInjector(ctx)
