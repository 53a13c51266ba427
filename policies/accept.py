"""accept: a tier's content condition on a 2xx reply (``tiers[i].accept``).

A tier may answer 200 and still not be good enough — an OCR model unsure of what it read
(``confidence < 0.75``), a menu that turned out to be handwritten. ``accept`` names what a
usable answer looks like; a 2xx that fails it raises :class:`~proxy.errors.Rejected`
carrying the reply, and the tiers policy moves on (reason ``rejected``, never retried: the
same provider would answer the same). If no later tier does better and the route has no
``fallback_response``, the rejected reply is still the best answer there is and is relayed
with ``x-rp-fallback: rejected`` (see :mod:`policies.tiers`).

A condition is a JSONPath (:mod:`proxy.jsonpath`) and checks that must all hold:

- ``exists: true`` (the default when no other check is set) / ``exists: false``
- ``min`` / ``max``: inclusive bounds; the value must be a number (``true`` is not 1)
- ``equals``: JSON equality (``false`` is not ``0``; ``null`` is a value)
- ``in``: equal to one of a list

``accept`` is one condition or a list of conditions that must all hold.

Only buffered 2xx replies with a body are judged (as by ``validate``, through the same
:func:`policies.validate.json_to_judge`): an error status is the classifier's business, and a
stream cannot be read without consuming it. A 2xx whose body is not JSON cannot satisfy
anything; it is an :class:`~proxy.errors.InvalidResponse` (as ``validate`` would say), not a
rejection: there is nothing worth relaying in it.
"""

from __future__ import annotations

import math
from typing import Any

import orjson

from policies.validate import NOT_JUDGED, json_to_judge
from proxy.call import Call, Handler, Reply
from proxy.config import AcceptConfig
from proxy.context import AttemptContext
from proxy.errors import Rejected
from proxy.jsonpath import MISSING, JsonPath, compile_path


class Condition:
    """One compiled ``accept`` condition."""

    __slots__ = ("_equals", "_exists", "_has_equals", "_in", "_max", "_min", "path")

    def __init__(self, cfg: AcceptConfig) -> None:
        self.path: JsonPath = compile_path(cfg.json_path)
        self._min = cfg.min
        self._max = cfg.max
        self._has_equals = "equals" in cfg.model_fields_set
        self._equals = cfg.equals
        self._in = None if cfg.in_ is None else tuple(cfg.in_)
        self._exists = cfg.exists

    def failure(self, doc: Any) -> str | None:
        """None when ``doc`` satisfies the condition, else why not (no string values)."""
        expr = self.path.expr
        value = self.path.find(doc)
        if value is MISSING:
            return None if self._exists is False else f"{expr} is missing"
        if self._exists is False:
            return f"{expr} exists"
        if self._min is not None or self._max is not None:
            if not _is_number(value):
                return f"{expr} is not a number"
            if self._min is not None and value < self._min:
                return f"{expr} = {value:g} < min {self._min:g}"
            if self._max is not None and value > self._max:
                return f"{expr} = {value:g} > max {self._max:g}"
        if self._has_equals and not json_equal(value, self._equals):
            return f"{expr} {_shown(value)}!= {_shown(self._equals, True)}"
        if self._in is not None and not any(json_equal(value, x) for x in self._in):
            return f"{expr} {_shown(value)}is not one of the accepted values"
        return None


class Accept:
    """The attempt stage: judge a buffered 2xx reply against the tier's conditions."""

    __slots__ = ("_conditions", "_tier")

    def __init__(self, conditions: tuple[Condition, ...], tier: int) -> None:
        self._conditions = conditions
        self._tier = tier

    async def __call__(self, call: Call, next_: Handler) -> Reply:
        reply = await next_(call)
        doc = json_to_judge(reply, self._tier)
        if doc is NOT_JUDGED:
            return reply
        for cond in self._conditions:
            why = cond.failure(doc)
            if why is not None:
                raise Rejected(f"tier {self._tier} ({reply.provider}) reply failed accept: {why}",
                               reply)
        return reply


def json_equal(a: Any, b: Any) -> bool:
    """Equality as JSON means it: booleans are not numbers, 1 == 1.0, containers deep."""
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    if _is_number(a) and _is_number(b):
        return bool(a == b)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(json_equal(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(json_equal(a[k], b[k]) for k in a)
    return type(a) is type(b) and bool(a == b)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and not (
        isinstance(v, float) and math.isnan(v))


def _shown(v: Any, configured: bool = False) -> str:
    """A value for a log message: scalars from the config or non-string scalars only
    (a reply's strings may be the user's content, which never reaches a log)."""
    if configured:
        return orjson.dumps(v).decode()[:64]
    if v is None or isinstance(v, (bool, int, float)):
        return orjson.dumps(v).decode() + " "
    return ""


def build_attempt(ctx: AttemptContext) -> Accept | None:
    if not ctx.tier.accept:
        return None
    return Accept(tuple(Condition(c) for c in ctx.tier.accept), ctx.tier_index)
