"""validate: a 2xx reply must be well-formed before it counts as an answer.

``validate: {json: true, require: ["$.choices[0].message.content"]}`` (route level, applied
to every attempt of every tier): a buffered 2xx whose body is not JSON, or lacks a required
path, raises :class:`~proxy.errors.InvalidResponse`. The classifier sends it to the next
tier (reason ``invalid_response``; it is not retried on the same tier) and the circuit
breaker counts it as a provider failure. When it is the final answer the client gets 502
``invalid_response`` — or the route's ``fallback_response``.

Not validated: non-2xx replies (the classifier's business), ``204``/``205`` (no body by
definition) and streams (``reply.stream`` set: their bytes are relayed as they arrive and
cannot be judged before the commit point).
"""

from __future__ import annotations

from typing import Any

import orjson

from proxy.call import Call, Handler, Reply
from proxy.config import ValidateConfig
from proxy.context import AttemptContext
from proxy.errors import InvalidResponse
from proxy.jsonpath import MISSING, JsonPath, compile_path

_NO_BODY = frozenset({204, 205})
#: what :func:`json_to_judge` returns for a reply that is not judged
NOT_JUDGED: Any = object()


def json_to_judge(reply: Reply, tier: int) -> Any:
    """A buffered 2xx reply's body as JSON, for ``validate`` and ``accept`` alike.

    :data:`NOT_JUDGED` for replies that are not theirs to judge (other statuses, 204/205,
    streams); :class:`~proxy.errors.InvalidResponse` when the body is not valid JSON.
    """
    if (not 200 <= reply.status < 300 or reply.status in _NO_BODY
            or reply.stream is not None or reply.body is None):
        return NOT_JUDGED
    try:
        return reply.json()
    except orjson.JSONDecodeError:
        raise InvalidResponse(f"tier {tier} ({reply.provider}) answered {reply.status} "
                              "with a body that is not valid JSON") from None


class Validate:
    __slots__ = ("_require", "_tier")

    def __init__(self, cfg: ValidateConfig, tier: int) -> None:
        self._require: tuple[JsonPath, ...] = tuple(compile_path(p) for p in cfg.require)
        self._tier = tier

    async def __call__(self, call: Call, next_: Handler) -> Reply:
        reply = await next_(call)
        doc = json_to_judge(reply, self._tier)
        if doc is NOT_JUDGED:
            return reply
        for path in self._require:
            if path.find(doc) is MISSING:
                raise InvalidResponse(f"tier {self._tier} ({reply.provider}) answered "
                                      f"{reply.status} without {path.expr}")
        return reply


def build_attempt(ctx: AttemptContext) -> Validate | None:
    cfg = ctx.route.validate_
    if cfg is None or (not cfg.json_ and not cfg.require):
        return None
    return Validate(cfg, ctx.tier_index)
