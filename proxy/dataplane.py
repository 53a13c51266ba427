"""The data plane's request handler: request id, access log and error boundary.

Every request ends here with exactly one outcome: one access-log line and one increment of
``rp_requests_total``, whatever happened (a reply, a proxy error, a broken stream, a client
that went away). Proxy errors become JSON once, here.
"""

from __future__ import annotations

import asyncio
import itertools
import math
import os
import re
from typing import TYPE_CHECKING, Any

import orjson

from proxy.accesslog import AccessLog
from proxy.call import Call, Reply
from proxy.errors import BadRequest, BodyTooLarge, NoRoute, ProxyError, Timeout, UpstreamError
from proxy.metrics import status_class
from proxy.request import Request

if TYPE_CHECKING:
    from proxy.runtime import CompiledRoute, Runtime
    from proxy.server import ProxyServer

_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
#: reply headers the proxy writes itself, never relayed from a provider: framing (the
#: server's), its banner, and the ones :func:`_annotations` sets (DESIGN §4; the ``x-rp-``
#: names are the proxy's). A provider's ``date`` is kept (the server adds one when absent).
_OWN = frozenset({
    "content-length", "transfer-encoding", "connection", "keep-alive", "server",
    "x-request-id", "x-rp-route", "x-rp-provider", "x-rp-model", "x-rp-tier", "x-rp-attempts",
    "x-rp-cache", "x-rp-canary", "x-rp-fallback", "x-rp-cost-usd",
})
#: a relayed HEAD answer keeps the provider's content-length (the length a GET would get)
_OWN_HEAD = _OWN - {"content-length"}


class Overloaded(ProxyError):
    """More than ``server.max_concurrent_requests`` in flight: shed at once."""

    status, type = 503, "overloaded"


class RequestTimeout(ProxyError):
    """The client did not send its body within the request's ``total``."""

    status, type = 408, "request_timeout"


class _Done:
    """What the access log records about how a request ended."""

    __slots__ = ("error", "outcome", "reply", "status")

    def __init__(self) -> None:
        self.status = 500
        self.outcome = "internal_error"
        self.reply: Reply | None = None
        self.error: str | None = None


#: request ids: 12 random hex digits per process, then a counter (24 hex digits in all,
#: unique within the process, unlikely to repeat across processes; no syscall per request)
_ID_PREFIX = os.urandom(6).hex()
_ID_SEQ = itertools.count(int.from_bytes(os.urandom(3), "big"))


def new_request_id() -> str:
    return f"{_ID_PREFIX}{next(_ID_SEQ) & 0xFFFFFFFFFFFF:012x}"


class DataPlane:
    """The handler given to the data plane's server (:mod:`proxy.protocol`)."""

    def __init__(self, server: ProxyServer) -> None:
        self._server = server
        self._deps = server.deps
        self._clock = server.deps.clock
        self._metrics = server.deps.metrics
        self._log = server.deps.log
        self._access = AccessLog(server.deps.log)
        self.in_flight = 0
        #: the gauge is set from this count at each flush (a scrape, or every FLUSH_S)
        server.deps.metrics.gauge_from(server.deps.metrics.in_flight, lambda: self.in_flight)
        #: Prometheus children by label values, looked up once (``labels()`` costs µs)
        self._requests_children: dict[tuple[str, int, str], Any] = {}
        self._duration_children: dict[str, Any] = {}

    async def __call__(self, request: Request) -> None:
        started = self._clock.monotonic()
        rt = self._server.runtime
        rt.active += 1
        self.in_flight += 1
        server_cfg = rt.loaded.config.server
        rid = request.headers.get("x-request-id")
        if not (server_cfg.trust_request_id and rid and _REQUEST_ID.fullmatch(rid)):
            rid = new_request_id()
        # the origin-form path and raw query, also for an absolute-form target
        # ("GET http://other-host/v1/x"): its scheme and host are ignored, never followed
        path = request.path
        route = rt.match(request.method, path, request.headers)
        done = _Done()
        call: Call | None = None
        try:
            if self.in_flight > server_cfg.max_concurrent_requests:
                raise Overloaded("too many requests in flight")
            if route is None:
                raise NoRoute(f"no route for {request.method} {path[:256]}")
            if _has_dot_segment(path):
                raise BadRequest("the path must not contain '.' or '..' segments")
            deadline = started + route.total_s
            body = await _read_body(request, server_cfg.max_request_body, deadline - started)
            call = Call(
                runtime=rt, route=route, clock=self._clock, request_id=rid,
                method=request.method, path=path, query=request.query,
                headers=request.headers, body=body, remote=request.remote, started=started,
                deadline=deadline,
            )
            call.timings["t_queue"] = (self._clock.monotonic() - started) * 1000
            reply = await route.handler(call)
            done.reply = reply
            await self._respond(request, call, reply, done)
        except ProxyError as exc:
            done.status, done.outcome, done.error = exc.status, exc.type, exc.message
            if exc.status in (408, 413):  # the body was not read: the connection cannot go on
                request.force_close()
            _error_response(request, exc, rid, route, call)
        except asyncio.CancelledError:
            done.status, done.outcome = 499, "client_disconnected"
            raise
        except ConnectionResetError:
            done.status, done.outcome = 499, "client_disconnected"
            raise
        except Exception as exc:  # the boundary: never a traceback with secrets to the client
            self._log.error("internal_error", request_id=rid, error=type(exc).__name__,
                            exc_info=True)
            done.status, done.outcome = 500, "internal_error"
            if request.head_sent:  # an answer already started: only cutting it is left
                request.abort()
            else:
                _error_response(request, ProxyError("internal error"), rid, route, call)
        finally:
            self.in_flight -= 1
            self._finish(request, rt, route, call, done, started, rid)

    async def _respond(self, request: Request, call: Call, reply: Reply, done: _Done) -> None:
        added = _annotations(call, reply)
        names = _OWN if request.method != "HEAD" else _OWN_HEAD
        # the reply's headers minus those the proxy sets, then the proxy's: one list
        headers = [(k, v) for k, v in reply.headers if k.lower() not in names]
        headers += added
        done.status = reply.status
        done.outcome = _outcome(reply)
        if reply.stream is None:
            if reply.body and not any(k.lower() == "content-type" for k, _ in headers):
                headers.append(("content-type", "application/octet-stream"))
            request.respond(reply.status, headers, reply.body or b"")
            return
        await self._relay_stream(request, call, reply, headers, done)

    async def _relay_stream(self, request: Request, call: Call, reply: Reply,
                            headers: list[tuple[str, str]], done: _Done) -> None:
        stream = reply.stream
        assert stream is not None
        completed = False
        idle_s = call.arm.timeout.idle
        timers = self._deps.timers
        relay_started = self._clock.monotonic()
        observers = stream.observers
        try:
            # each piece goes to the client first, then to the observers (metering, cache
            # recording: they never change what is sent), which see it even if the write
            # fails (the provider sent it: it was used)
            try:
                await request.start_stream(reply.status, headers, stream.first)
            finally:
                for observe in observers:
                    observe(stream.first)
            chunks = aiter(stream)
            while True:
                left = call.time_left()
                timer, limit = ("idle", idle_s) if idle_s < left else ("total", max(left, 0.0))
                try:
                    with timers.after(limit):  # one process timer, not one per chunk
                        chunk = await anext(chunks)
                except StopAsyncIteration:
                    break
                except TimeoutError:
                    named = idle_s if timer == "idle" else call.arm.timeout.total
                    raise Timeout(timer, named) from None
                try:
                    await request.write(chunk)
                finally:
                    for observe in observers:
                        observe(chunk)
            await request.write_eof()
            completed = True
        except (Timeout, UpstreamError) as exc:
            done.outcome, done.error = "stream_interrupted", exc.message
            if any(k.lower() == "content-type" and v.startswith("text/event-stream")
                   for k, v in headers):  # an SSE client is told, in its own format
                err = {"error": {"type": exc.type, "message": exc.message,
                                 "request_id": call.request_id, "route": call.route.name}}
                await request.write(b"event: error\ndata: " + orjson.dumps(err) + b"\n\n")
                await request.write_eof()
            else:
                request.abort()  # a non-SSE body is cut by closing the connection
        finally:
            call.timings["t_stream"] = (self._clock.monotonic() - relay_started) * 1000
            await stream.close(completed)

    def _finish(self, request: Request, rt: Runtime, route: CompiledRoute | None,
                call: Call | None, done: _Done, started: float, rid: str) -> None:
        elapsed = self._clock.monotonic() - started
        route_name = route.name if route is not None else "_none"
        reply = done.reply
        key = (route_name, done.status, done.outcome)
        counter = self._requests_children.get(key)
        if counter is None:
            counter = self._requests_children[key] = self._metrics.counter(
                self._metrics.requests.labels(route_name, status_class(done.status),
                                              done.outcome))
        counter.inc()
        histogram = self._duration_children.get(route_name)
        if histogram is None:
            histogram = self._duration_children[route_name] = self._metrics.histogram(
                self._metrics.request_duration.labels(route_name))
        histogram.observe(elapsed)
        if route is not None:
            fallback = reply is not None and reply.fallback_reason is not None
            route.stats.observe(reply.tier if reply is not None else None, fallback, elapsed)
        try:
            self._access.write(_log_fields(request, route_name, call, done, rid, elapsed))
        finally:  # whatever happens, the runtime's count goes down (a retired one closes)
            rt.active -= 1
            if rt.retired and rt.active == 0:
                self._server.close_retired(rt)


async def _read_body(request: Request, limit: int, within_s: float) -> bytes:
    """The whole request body, refused (413) past ``limit`` bytes before anything is sent
    upstream, and read within ``within_s`` (the request's total), else 408."""
    length = request.content_length
    if length is not None and length > limit:
        raise BodyTooLarge(f"request body of {length} bytes is over the {limit}-byte limit")
    if not request.body_exists:
        return b""
    if not request.body_complete:  # the body did not come with the head: wait, bounded
        if request.expect_continue:
            # the client waits for this before sending its body (curl does for large
            # bodies); an oversized body was refused above, before the client sent it
            request.send_continue()
        try:
            async with asyncio.timeout(within_s):
                await request.wait_body()
        except TimeoutError:
            raise RequestTimeout(
                f"the request body did not arrive within {within_s:g}s") from None
    if request.error is not None:
        raise BadRequest(request.error)
    body = request.body()
    if request.too_large or len(body) > limit:
        raise BodyTooLarge(f"request body is over the {limit}-byte limit")
    return body


_DOT_SEGMENTS = frozenset({".", "..", "%2e", "%2e%2e", ".%2e", "%2e."})
#: what some upstream servers take for a segment separator: "/", "\\" and their encodings
_SEPARATORS = re.compile(r"/|\\|%2f|%5c", re.IGNORECASE)


def _has_dot_segment(path: str) -> bool:
    """True when a segment is ``.`` or ``..`` (also percent-encoded, also between
    backslashes or encoded slashes, which some servers decode before resolving): an
    upstream would resolve it and could leave the route's prefix or the provider's base
    path."""
    if "." not in path and "%" not in path:
        return False
    return any(seg.lower() in _DOT_SEGMENTS for seg in _SEPARATORS.split(path))


def _annotations(call: Call, reply: Reply) -> list[tuple[str, str]]:
    """The headers the proxy adds to (or replaces in) a reply (DESIGN §4)."""
    out = [("x-request-id", call.request_id), ("x-rp-route", call.route.name)]
    if reply.provider is not None:
        out.append(("x-rp-provider", reply.provider))
    if reply.model is not None:
        out.append(("x-rp-model", reply.model))
    if reply.tier is not None:
        out.append(("x-rp-tier", str(reply.tier)))
    out.append(("x-rp-attempts", str(len(call.attempts))))
    if call.cache_status is not None:
        out.append(("x-rp-cache", call.cache_status))
    if call.canary is not None:
        out.append(("x-rp-canary", call.canary))
    fallback = reply.fallback_reason or call.fallback_reason
    if fallback is not None:
        out.append(("x-rp-fallback", fallback))
    if reply.source == "cache":
        out.append(("x-rp-cost-usd", "0"))
    elif reply.cost_usd is not None and reply.stream is None:
        out.append(("x-rp-cost-usd", f"{reply.cost_usd:.6f}"))
    return out


def _outcome(reply: Reply) -> str:
    if reply.source == "cache":
        return "cache_hit"
    if reply.source == "fallback_response":
        return "fallback_response"
    if reply.status >= 400:
        return "provider_error"
    return "fallback" if reply.fallback_reason is not None else "ok"


def _error_response(request: Request, exc: ProxyError, rid: str, route: CompiledRoute | None,
                    call: Call | None) -> None:
    route_name = route.name if route is not None else None
    body = {"error": {"type": exc.type, "message": exc.message, "request_id": rid,
                      "route": route_name}}
    headers = [("content-type", "application/json"), ("x-request-id", rid)]
    if route_name is not None:
        headers.append(("x-rp-route", route_name))
    if call is not None:
        headers.append(("x-rp-attempts", str(len(call.attempts))))
        if call.cache_status is not None:
            headers.append(("x-rp-cache", call.cache_status))
        if call.canary is not None:
            headers.append(("x-rp-canary", call.canary))
        if call.fallback_reason is not None:
            headers.append(("x-rp-fallback", call.fallback_reason))
    if exc.retry_after_s is not None:
        headers.append(("retry-after", str(max(1, math.ceil(exc.retry_after_s)))))
    request.respond(exc.status, headers, orjson.dumps(body))


def _log_fields(request: Request, route: str, call: Call | None, done: _Done,
                rid: str, elapsed: float) -> dict[str, Any]:
    """The access-log line (DESIGN §5, types per §8): durations in ms are always floats
    (0.0 for a stage that did not run); ``t_upstream_first_byte`` is null when no upstream
    response arrived."""
    reply = done.reply
    prompt_version = request.headers.get("x-prompt-version")
    fields: dict[str, Any] = {
        "request_id": rid, "route": route, "method": request.method,
        "path": request.path[:512], "status": done.status,
        "outcome": done.outcome, "provider": None, "used_model": None,
        "prompt_version": prompt_version[:128] if prompt_version is not None else None,
        "tier": None, "attempts": 0, "cache": None, "canary": None, "cost_usd": None,
        "tokens": None, "t_queue": 0.0, "t_cache": 0.0, "t_upstream_first_byte": None,
        "t_upstream_total": 0.0, "t_total": round(elapsed * 1000, 3),
    }
    if reply is not None:
        fields["provider"] = reply.provider
        fields["used_model"] = reply.model
        fields["tier"] = reply.tier
        cost = 0.0 if reply.source == "cache" else reply.cost_usd
        fields["cost_usd"] = None if cost is None else float(cost)
        if reply.usage is not None:
            fields["tokens"] = {"input": reply.usage.input_tokens,
                                "output": reply.usage.output_tokens}
            if reply.usage.estimated:
                fields["tokens_estimated"] = True
        fallback = reply.fallback_reason
        if fallback is not None:
            fields["fallback"] = fallback
    if done.error is not None:
        fields["error"] = done.error
    if call is not None:
        fields["attempts"] = len(call.attempts)
        fields["cache"] = call.cache_status
        fields["canary"] = call.canary
        for k, v in call.timings.items():
            fields[k] = round(float(v), 3)
        if call.attempts:
            # attempts (a streamed one to its first chunk) + the rest of the stream, if any
            fields["t_upstream_total"] = round(
                sum(a.duration_ms for a in call.attempts) + call.timings.get("t_stream", 0.0), 3)
            fields["attempt_log"] = [
                {"tier": a.tier, "provider": a.provider, "status": a.status, "error": a.error,
                 "ms": a.duration_ms} for a in call.attempts
            ]
        if call.log:
            fields.update(call.log)
    return fields
