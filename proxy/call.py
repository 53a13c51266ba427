"""What flows through the pipeline: one :class:`Call` per request, one :class:`Reply` back.

A policy reads and annotates the ``Call`` (arm, cache status, fault plan, attempts...) and
returns a ``Reply``: buffered (``body``) or streamed (``stream``, whose first chunk has
already arrived: that is the commit point after which nothing is retried).
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import orjson
from multidict import CIMultiDictProxy

from proxy.errors import BadRequest

if TYPE_CHECKING:
    from proxy.clock import Clock
    from proxy.runtime import Arm, CompiledRoute, Runtime


@dataclass(slots=True)
class Usage:
    input_tokens: int = 0
    output_tokens: int = 0
    estimated: bool = False


class UpstreamBody(Protocol):
    """The upstream response a stream reads from (:class:`proxy.h1.Response`)."""

    def release(self) -> None: ...

    def close(self) -> None: ...


class ReplyStream:
    """A streamed upstream body whose first chunk has arrived.

    ``observers`` see every chunk (metering, cache recording) once it went to the client
    (or failed to: they never change what is sent); ``on_close`` callbacks run
    once when the stream ends, with ``True`` when it completed and ``False`` when it broke
    or the client went away.
    """

    __slots__ = ("_closed", "_iter", "_response", "first", "observers", "on_close")

    def __init__(
        self,
        first: bytes,
        chunks: AsyncIterator[bytes],
        response: UpstreamBody | None = None,
    ) -> None:
        self.first = first
        self._iter = chunks
        self._response = response
        self._closed = False
        self.observers: list[Callable[[bytes], None]] = []
        self.on_close: list[Callable[[bool], Awaitable[None] | None]] = []

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self._iter

    async def close(self, completed: bool) -> None:
        """Release the upstream connection and run the ``on_close`` callbacks (once)."""
        if self._closed:
            return
        self._closed = True
        if self._response is not None:
            if completed:
                self._response.release()
            else:
                self._response.close()
        callbacks, self.on_close = self.on_close, []
        # the callbacks and observers hold the reply that holds this stream: dropping them
        # breaks the cycle, so the stream is freed now, not by a later cyclic collection
        self.observers = []
        self._response = None
        for callback in callbacks:
            result = callback(completed)
            if result is not None:
                await result


@dataclass(slots=True)
class Reply:
    """An answer for the client: from a provider, the cache, a fault or a fallback."""

    status: int
    headers: list[tuple[str, str]]
    body: bytes | None = None
    stream: ReplyStream | None = None
    provider: str | None = None
    model: str | None = None
    tier: int | None = None  # 1-based configured position
    usage: Usage | None = None
    cost_usd: float | None = None
    #: set when the reply is not the upstream's verbatim answer for tier 1
    fallback_reason: str | None = None
    #: "provider" (relayed), "cache", "fault", "fallback_response"
    source: str = "provider"
    _json: Any = field(default=None, repr=False)

    def header(self, name: str) -> str | None:
        """First value of header ``name`` (lower-case), or None."""
        for k, v in self.headers:
            if k == name:
                return v
        return None

    def json(self) -> Any:
        """The body parsed as JSON (cached); raises ``orjson.JSONDecodeError``."""
        if self._json is None:
            self._json = orjson.loads(self.body or b"")
        return self._json


@dataclass(slots=True)
class AttemptRecord:
    tier: int
    provider: str
    status: int | None
    error: str | None
    duration_ms: float


_UNSET: Any = object()


class Call:
    """One request's working state, made by the server and passed to every policy."""

    __slots__ = (
        "_json", "arm", "attempt_deadline", "attempts", "body", "cache_status", "canary",
        "client_id", "clock",
        "deadline", "downgrade", "fallback_reason", "fault", "headers", "log", "method",
        "path", "query", "remote", "request_id", "route", "runtime", "spent_usd", "started",
        "tier_bodies", "timings",
    )

    def __init__(
        self,
        *,
        runtime: Runtime,
        route: CompiledRoute,
        clock: Clock,
        request_id: str,
        method: str,
        path: str,
        query: str,
        headers: CIMultiDictProxy[str],
        body: bytes,
        remote: str | None,
        started: float,
        deadline: float,
    ) -> None:
        self.runtime = runtime
        self.route = route
        self.clock = clock
        self.request_id = request_id
        self.method = method
        self.path = path  # raw (still percent-encoded) path
        self.query = query  # raw query string, without '?'
        self.headers = headers  # the client's request headers
        self.body = body
        self.remote = remote
        self.started = started
        self.deadline = deadline  # monotonic; every timer is cut to it
        #: when the current attempt's timer fires (set by the attempt timeout policy): a
        #: first-byte timer that could only fire later is not armed
        self.attempt_deadline = math.inf
        self.arm: Arm = route.stable
        self.canary: str | None = None
        self.cache_status: str | None = None
        self.client_id: str | None = None
        self.fault: Any = None  # policies.faults.FaultPlan when the route has faults
        self.downgrade = False
        self.fallback_reason: str | None = None
        self.attempts: list[AttemptRecord] = []
        self.timings: dict[str, float] = {}
        self.log: dict[str, Any] = {}
        self.tier_bodies: dict[int, bytes] | None = None
        #: what the provider replies of this call cost so far, over every attempt (metering)
        self.spent_usd = 0.0
        self._json: Any = _UNSET

    def time_left(self) -> float:
        """Seconds until the request's deadline (may be <= 0)."""
        return self.deadline - self.clock.monotonic()

    def json(self) -> Any:
        """The request body parsed as JSON once, or None when it is not JSON.

        Raises :class:`~proxy.errors.BadRequest` (400) for a document nested deeper than
        :data:`MAX_JSON_DEPTH`: it could not be written back (redaction, a tier's model, a
        cache key), and no API takes one. (Past 1024 levels orjson does not parse it: not
        JSON, the body passes as bytes.)"""
        if self._json is _UNSET:
            try:
                self._json = orjson.loads(self.body) if self.body else None
            except orjson.JSONDecodeError:
                self._json = None
            body = self.body
            # the walk only for a body with enough brackets to be that deep (a C-speed count)
            if (self._json is not None
                    and body.count(b"[") + body.count(b"{") > MAX_JSON_DEPTH
                    and _deeper_than(self._json, MAX_JSON_DEPTH)):
                self._json = None
                raise BadRequest(f"the JSON body is nested deeper than {MAX_JSON_DEPTH} levels")
        return self._json

    def set_json(self, value: Any) -> None:
        """Replace the body with ``value`` re-encoded (redaction, rewrites)."""
        self._json = value
        self.body = orjson.dumps(value)
        self.tier_bodies = None


Handler = Callable[[Call], Awaitable[Reply]]

#: the deepest JSON document the proxy reads: what orjson can encode again
MAX_JSON_DEPTH = 254


def _deeper_than(doc: Any, limit: int) -> bool:
    """True when ``doc`` nests more than ``limit`` containers (iterative: no recursion)."""
    stack: list[tuple[Any, int]] = [(doc, 1)]
    while stack:
        node, depth = stack.pop()
        children: Iterable[Any]
        if isinstance(node, dict):
            children = node.values()
        elif isinstance(node, list):
            children = node
        else:
            continue
        if depth > limit:
            return True
        stack.extend((c, depth + 1) for c in children if isinstance(c, dict | list))
    return False
