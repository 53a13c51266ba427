"""Metering: what each provider reply used and cost, read per the provider's ``format``.

An attempt-level stage, innermost (right around ``send``): it sees every reply a provider
actually sent — a tier-1 answer that ``accept`` or ``validate`` rejects afterwards was still
billed — and never an injected fault, which short-circuits above it.

- **Usage and model** per ``format`` (read by :mod:`proxy.usage`): ``openai`` (chat
  completions: ``usage.prompt_tokens``/``completion_tokens``; responses API:
  ``usage.input_tokens``/``output_tokens``; streams: the final usage chunk, or
  ``response.completed``), ``anthropic`` (``usage``, cache reads and writes counted as input;
  streams: ``message_start`` input + ``message_delta`` output), ``gemini`` (``usageMetadata``,
  thoughts counted as output; ``modelVersion``), ``generic`` (the provider's ``usage:`` JSON
  paths). The model that answered prices the call: the reply's own model, else the tier's,
  else the request's.
- **No usage** in a 2xx reply or stream: input ≈ request bytes / 4, output ≈ answer text
  characters / 4, flagged ``usage.estimated`` (the log says ``tokens_estimated: true``). A
  call that was answered is never metered at $0 for want of a usage block.
- **Price**: ``pricing`` looked up exactly, then by the longest key that prefixes the model
  at a separator (``gpt-4o-mini`` prices ``gpt-4o-mini-2024-07-18``; ``gpt-4`` does not
  price ``gpt-4o``), then ``"*"``; a model that still has no price (possible only for a
  model the provider chose itself — configured tier models are checked at load) is priced
  at the provider's highest prices and logged once (``price_unknown_model``), never free.
  ``cost_per_request`` (a 2xx answer) wins over token prices when both are set.
- **Results**: ``reply.usage``, ``reply.model``, ``call.spent_usd`` (the call's total over
  all its attempts) and ``reply.cost_usd`` (that total, for ``x-rp-cost-usd`` and the log);
  ``rp_tokens_total{provider,model,kind}`` and ``rp_cost_usd_total{route,provider,model}``
  per attempt. Non-2xx replies cost nothing. Streams are metered when they close
  (completed, broken or abandoned: what was streamed was used).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import orjson

from proxy.call import Call, Handler, Reply, Usage
from proxy.config import Price, ProviderConfig
from proxy.usage import Found, StreamMeter, UsageReader, as_count

if TYPE_CHECKING:
    from proxy.context import AttemptContext, Keeper

_SEPARATORS = frozenset("-.:@/_")
_MAX_LABELS = 32  # distinct model label values per provider; the rest are "other"
_OUTPUT_CAPS = ("max_tokens", "max_completion_tokens", "max_output_tokens")


# --------------------------------------------------------------------------- prices


def match_price(pricing: Mapping[str, Price], model: str | None) -> Price | None:
    """Exact model, then the longest key prefixing it at a separator, then ``"*"``."""
    if model is not None:
        found = pricing.get(model)
        if found is not None:
            return found
        best = ""
        for key in pricing:
            if (len(key) > len(best) and key != "*" and model.startswith(key)
                    and (key[-1] in _SEPARATORS or model[len(key)] in _SEPARATORS)):
                best = key
        if best:
            return pricing[best]
    return pricing.get("*")


class Pricing:
    """One provider's prices and metric labels; shared by its tiers (kept per load)."""

    def __init__(self, name: str, cfg: ProviderConfig, log: Any) -> None:
        self.name = name
        self.table: dict[str, Price] = dict(cfg.pricing or {})
        self.cost_per_request = cfg.cost_per_request
        self.priced = bool(self.table) or self.cost_per_request is not None
        self._log = log
        self._resolved: dict[str | None, Price] = {}
        self._labels: set[str] = set()
        self._ceiling = Price(input=max((p.input for p in self.table.values()), default=0.0),
                              output=max((p.output for p in self.table.values()), default=0.0))

    def price(self, model: str | None) -> Price | None:
        """The price per 1M tokens of ``model`` (None: the provider has no token prices)."""
        if not self.table:
            return None
        found = self._resolved.get(model)
        if found is None:
            found = match_price(self.table, model)
            if found is None:
                found = self._ceiling
                self._log.warning("price_unknown_model", provider=self.name, model=model,
                                  priced_as="highest configured prices")
            if len(self._resolved) < 1024:
                self._resolved[model] = found
        return found

    def cost_usd(self, model: str | None, usage: Usage | None) -> float | None:
        """A 2xx answer's cost: ``cost_per_request``, else tokens × price, else None."""
        if self.cost_per_request is not None:
            return self.cost_per_request
        price = self.price(model)
        if price is None or usage is None:
            return None
        return (usage.input_tokens * price.input + usage.output_tokens * price.output) / 1e6

    def label(self, model: str | None) -> str:
        """A bounded metric label for ``model``."""
        if model is None:
            return "unknown"
        if model in self._labels:
            return model
        if len(self._labels) < _MAX_LABELS and len(model) <= 64:
            self._labels.add(model)
            return model
        return "other"


# --------------------------------------------------------------------------- estimates


def tokens_of(nbytes: int) -> int:
    """The ≈4 bytes (or characters) per token rule."""
    return math.ceil(nbytes / 4)


def usage_from(found: Found, request_bytes: int, text_chars: int) -> Usage:
    """Usage as the reply said it, each missing half estimated (and flagged)."""
    tin, tout = found.input_tokens, found.output_tokens
    return Usage(tokens_of(request_bytes) if tin is None else tin,
                 tokens_of(text_chars) if tout is None else tout,
                 estimated=tin is None or tout is None)


def requested_model(call: Call, fmt: str) -> str | None:
    """The model the request names: its JSON ``model``, or Gemini's ``/models/<m>:`` path."""
    body = call.json()
    if isinstance(body, dict) and isinstance(body.get("model"), str):
        return str(body["model"])
    if fmt == "gemini" and "/models/" in call.path:
        return call.path.rsplit("/models/", 1)[1].split(":", 1)[0] or None
    return None


def output_cap(call: Call) -> int | None:
    """The request's own bound on output tokens, when it sets one."""
    body = call.json()
    if not isinstance(body, dict):
        return None
    for name in _OUTPUT_CAPS:
        value = body.get(name)
        if value is not None and (n := as_count(value)) is not None:
            return n
    gen = body.get("generationConfig")
    return as_count(gen.get("maxOutputTokens")) if isinstance(gen, dict) else None


# --------------------------------------------------------------------------- the stage


class Meter:
    """The attempt stage: meter the reply ``send`` returned (see the module docstring)."""

    __slots__ = ("_children", "_cost", "_fmt", "_metrics", "_pricing", "_provider", "_reader", "_route",
                 "_tokens")

    def __init__(self, ctx: AttemptContext, pricing: Pricing) -> None:
        pcfg = ctx.route_ctx.config.providers[ctx.tier.provider]
        self._fmt = pcfg.format
        self._reader = UsageReader(pcfg.format, pcfg.usage)
        self._pricing = pricing
        self._provider = ctx.provider.name
        self._route = ctx.route.name
        self._metrics = ctx.deps.metrics
        self._tokens = ctx.deps.metrics.tokens
        self._cost = ctx.deps.metrics.cost_usd
        #: per model label: the (input tokens, output tokens, cost) children, looked up once
        self._children: dict[str, tuple[Any, Any, Any]] = {}

    async def __call__(self, call: Call, next_: Handler) -> Reply:
        reply = await next_(call)
        if reply.source != "provider" or not 200 <= reply.status < 300:
            if call.spent_usd:
                reply.cost_usd = call.spent_usd
            return reply
        if reply.stream is None:
            self._buffered(call, reply)
        else:
            sse = (reply.header("content-type") or "").startswith("text/event-stream")
            meter = StreamMeter(self._reader, sse)
            if self._reader.reads_usage:
                reply.stream.observers.append(meter.feed)
            reply.stream.on_close.append(self._closer(call, reply, meter))
        return reply

    def _buffered(self, call: Call, reply: Reply) -> None:
        usage: Usage | None = None
        found = Found()
        if self._reader.reads_usage:
            try:
                found = self._reader.read(reply.json())
                text_chars = found.text_chars
            except orjson.JSONDecodeError:
                text_chars = len(reply.body or b"")
            usage = usage_from(found, len(call.body), text_chars)
        self._account(call, reply, found.model, usage)

    def _closer(self, call: Call, reply: Reply, meter: StreamMeter) -> Callable[[bool], None]:
        def close(completed: bool) -> None:
            usage = None
            if self._reader.reads_usage:
                usage = usage_from(meter.found, len(call.body), meter.text_chars())
            self._account(call, reply, meter.found.model, usage)
        return close

    def _account(self, call: Call, reply: Reply, answered: str | None,
                 usage: Usage | None) -> None:
        model = answered or reply.model or requested_model(call, self._fmt)
        reply.model = model
        reply.usage = usage
        label = self._pricing.label(model)
        children = self._children.get(label)
        if children is None:  # labels are bounded per provider (Pricing.label)
            fast = self._metrics
            children = self._children[label] = (
                fast.counter(self._tokens.labels(self._provider, label, "input")),
                fast.counter(self._tokens.labels(self._provider, label, "output")),
                fast.counter(self._cost.labels(self._route, self._provider, label)))
        if usage is not None:
            children[0].inc(usage.input_tokens)
            children[1].inc(usage.output_tokens)
        cost = self._pricing.cost_usd(model, usage)
        if cost is not None:
            call.spent_usd += cost
            children[2].inc(cost)
        if cost is not None or call.spent_usd:
            reply.cost_usd = call.spent_usd


def pricing_for(keeper: Keeper, name: str, pcfg: ProviderConfig, log: Any) -> Pricing:
    """Provider ``name``'s :class:`Pricing`, one per provider and config (metering and
    budget estimates share it)."""
    return keeper.keep("pricing", name, (pcfg.pricing, pcfg.cost_per_request),
                       lambda: Pricing(name, pcfg, log))


def build_attempt(ctx: AttemptContext) -> Meter | None:
    """None for a provider whose replies say nothing and cost nothing (the bare path)."""
    name = ctx.tier.provider
    pcfg = ctx.route_ctx.config.providers[name]
    if pcfg.format == "generic" and pcfg.usage is None and not pcfg.pricing \
            and pcfg.cost_per_request is None:
        return None
    return Meter(ctx, pricing_for(ctx.route_ctx.keeper, name, pcfg, ctx.deps.log))
