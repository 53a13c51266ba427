"""A fault-injecting fake AI provider: the project's test double, demo upstream and
rehearsal tool (``resilience-proxy mock``, and ``url: mock://`` in a config).

Endpoints:

- ``POST /v1/chat/completions``: OpenAI-shaped, with ``usage``; SSE when ``"stream": true``
  (a final usage chunk when ``stream_options.include_usage`` is true).
- ``POST /v1/messages``: Anthropic-shaped; ``POST /v1beta/models/{model}:generateContent``:
  Gemini-shaped (``usageMetadata``).
- ``POST /v1/generic`` and any other path: generic JSON with a ``confidence`` field.
- ``GET /mock/stats``, ``GET /mock/requests`` (the last 256 requests as received: method,
  path, raw path and query, lower-cased headers, body, the caller's source port),
  ``POST /mock/reset``.

``/mock/stats`` counts ``calls``, ``by_path``, ``by_status``, ``by_key``, ``tokens``,
``streams`` (SSE replies started) and ``cancelled`` (requests whose client went away before
the mock answered: what a proxy's client-disconnect or timeout cancellation looks like).
A malformed ``x-mock-*`` value answers 400 ``mock_bad_header``.

Per-request headers:

===========================  ==========================================================
``x-mock-status: 503``       answer with that status (an OpenAI-style error body; a 3xx
                             is a redirect to ``x-mock-location``, default ``/``)
``x-mock-retry-after: 1``    with it, a ``Retry-After`` header
``x-mock-error-code: C``     the error body's ``code`` (e.g. ``insufficient_quota``)
``x-mock-echo-auth: true``   the error message quotes the request's ``authorization``
                             (as some providers do with a wrong key: a leak rehearsal)
``x-mock-delay: 2s``         wait before the response headers
``x-mock-chunk-delay: 50ms`` wait between SSE chunks
``x-mock-chunks: 5``         how many content chunks a stream has
``x-mock-confidence: 0.6``   the generic endpoint's ``confidence``
``x-mock-handwritten: true`` the generic endpoint says the text is handwritten
``x-mock-body: malformed``   a 200 whose body is not valid JSON
``x-mock-drop: mid-stream``  a stream that breaks after its first chunks;
                             ``x-mock-drop: headers`` closes before any response
``x-mock-fail-first: N``     fail the first N calls of ``x-mock-key`` (status from
                             ``x-mock-status``, default 503), then answer normally
``x-mock-fail-percent: 5``   fail that share of the calls of ``x-mock-key``, evenly spread
                             (at 5: its 20th, 40th, ... call; status as fail-first): a
                             provider's ``headers:`` can set it to rehearse a bad canary;
                             ``MockProvider.fail_percent`` sets it for every call
``x-mock-model: M``          report model M as the one that answered
``x-mock-usage: none``       leave usage out (streams: no usage chunk)
``x-mock-output-tokens: N``  the completion's output token count
``x-mock-headers: {JSON}``   extra response headers on every answer, e.g.
                             ``{"retry-after-ms": "1500"}`` or the provider rate-limit
                             headers ``x-ratelimit-remaining-requests`` / ``-reset-*``
===========================  ==========================================================
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter, deque
from typing import Any

import orjson
from aiohttp import web

from proxy.units import parse_duration

_JSON = "application/json"


class MockProvider:
    """The mock's state (counters, recent requests) and its aiohttp app."""

    def __init__(self) -> None:
        #: the x-mock-fail-percent of calls that do not send one (a test or demo sets it)
        self.fail_percent = 0.0
        self.reset()

    def reset(self) -> None:
        self.calls = 0
        self.by_path: Counter[str] = Counter()
        self.by_status: Counter[int] = Counter()
        self.by_key: Counter[str] = Counter()
        self.tokens = {"input": 0, "output": 0}
        self.streams = 0
        self.cancelled = 0
        self.recent: deque[dict[str, Any]] = deque(maxlen=256)

    def app(self) -> web.Application:
        app = web.Application(client_max_size=64 * 1024**2)
        app.router.add_get("/mock/stats", self._stats)
        app.router.add_get("/mock/requests", self._requests)
        app.router.add_post("/mock/reset", self._reset)
        app.router.add_route("*", "/{tail:.*}", self._serve)
        app.on_response_prepare.append(_extra_headers)
        return app

    async def _stats(self, request: web.Request) -> web.Response:
        return _json({
            "calls": self.calls,
            "by_path": dict(self.by_path),
            "by_status": {str(k): v for k, v in self.by_status.items()},
            "by_key": dict(self.by_key),
            "tokens": self.tokens,
            "streams": self.streams,
            "cancelled": self.cancelled,
        })

    async def _requests(self, request: web.Request) -> web.Response:
        return _json(list(self.recent))

    async def _reset(self, request: web.Request) -> web.Response:
        self.reset()
        return _json({"reset": True})

    async def _serve(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        h = request.headers
        key = h.get("x-mock-key", "")
        self.calls += 1
        self.by_path[request.path] += 1
        nth = self.by_key[key] = self.by_key[key] + 1
        peer = request.transport.get_extra_info("peername") if request.transport else None
        self.recent.append({
            "method": request.method, "path": request.path, "raw_path": request.raw_path,
            "query": request.query_string, "raw_query": request.rel_url.raw_query_string,
            "headers": {k.lower(): v for k, v in h.items()},
            "body": body.decode("utf-8", "replace"),
            "peer_port": peer[1] if peer else None,
        })
        try:
            plan = _Plan(h, nth, self.fail_percent)
        except ValueError as exc:
            return _json({"error": {"type": "mock_bad_header", "message": str(exc)}}, 400)
        try:
            return await self._answer(request, body, plan)
        except asyncio.CancelledError:
            if not plan.dropped:
                self.cancelled += 1  # the client (the proxy) went away first
            raise

    async def _answer(self, request: web.Request, body: bytes, plan: _Plan) -> web.StreamResponse:
        h = request.headers
        if plan.delay_s:
            await asyncio.sleep(plan.delay_s)
        if plan.drop == "headers":
            plan.dropped = True
            assert request.transport is not None
            request.transport.abort()
            raise asyncio.CancelledError
        status = plan.status
        if 300 <= status < 400:
            self.by_status[status] += 1
            return web.Response(status=status, headers={"location": h.get("x-mock-location", "/")})
        if status >= 400:
            return self._error(status, h)
        self.by_status[200] += 1
        if h.get("x-mock-body") == "malformed":
            return web.Response(body=b'{"choices": [{"message": ', content_type=_JSON)
        data = _loads(body)
        path = request.path
        if path.endswith("/chat/completions"):
            if isinstance(data, dict) and data.get("stream"):
                return await self._chat_stream(request, data, len(body), plan)
            return _json(self._chat(data, h, len(body)))
        if path.endswith("/messages"):
            return _json(self._anthropic(data, h, len(body)))
        if path.endswith(":generateContent"):
            return _json(self._gemini(path, h, len(body)))
        return _json(self._generic(data, h))

    def _error(self, status: int, h: Any) -> web.Response:
        self.by_status[status] += 1
        headers = {}
        if "x-mock-retry-after" in h:
            headers["retry-after"] = h["x-mock-retry-after"]
        code = h.get("x-mock-error-code", f"mock_{status}")
        message = f"mock provider answered {status}"
        if h.get("x-mock-echo-auth") == "true":
            message += f" (credentials received: {h.get('authorization', '<none>')})"
        body = {"error": {"message": message, "type": "mock_error", "code": code}}
        return web.Response(status=status, body=_dumps(body), content_type=_JSON, headers=headers)

    def _usage(self, h: Any, body_len: int, text: str) -> tuple[int, int]:
        tin = max(1, body_len // 4)
        tout = int(h["x-mock-output-tokens"]) if "x-mock-output-tokens" in h else max(1, len(text) // 4)
        self.tokens["input"] += tin
        self.tokens["output"] += tout
        return tin, tout

    def _chat(self, data: Any, h: Any, body_len: int) -> dict[str, Any]:
        model = h.get("x-mock-model") or _model(data)
        text = f"This is a mock completion from {model}."
        out: dict[str, Any] = {
            "id": "chatcmpl-mock", "object": "chat.completion", "created": int(time.time()),
            "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                         "finish_reason": "stop"}],
        }
        if h.get("x-mock-usage") != "none":
            tin, tout = self._usage(h, body_len, text)
            out["usage"] = {"prompt_tokens": tin, "completion_tokens": tout,
                            "total_tokens": tin + tout}
        return out

    async def _chat_stream(self, request: web.Request, data: dict[str, Any],
                           body_len: int, plan: _Plan) -> web.StreamResponse:
        h = request.headers
        model = h.get("x-mock-model") or _model(data)
        n, gap = plan.chunks, plan.chunk_delay_s
        self.streams += 1
        resp = web.StreamResponse()
        resp.headers["content-type"] = "text/event-stream"
        resp.headers["cache-control"] = "no-cache"
        await resp.prepare(request)
        words = [f"word{i} " for i in range(n)]
        for i, word in enumerate(words):
            if i and gap:
                await asyncio.sleep(gap)
            chunk = {"id": "chatcmpl-mock", "object": "chat.completion.chunk", "model": model,
                     "choices": [{"index": 0, "delta": {"content": word}, "finish_reason": None}]}
            await resp.write(b"data: " + _dumps(chunk) + b"\n\n")
            if plan.drop == "mid-stream" and i == min(1, n - 1):
                plan.dropped = True
                assert request.transport is not None
                request.transport.abort()
                return resp
        opts = data.get("stream_options") or {}
        if opts.get("include_usage") and h.get("x-mock-usage") != "none":
            tin, tout = self._usage(h, body_len, "".join(words))
            final: dict[str, Any] = {
                     "id": "chatcmpl-mock", "object": "chat.completion.chunk", "model": model,
                     "choices": [], "usage": {"prompt_tokens": tin, "completion_tokens": tout,
                                              "total_tokens": tin + tout}}
            await resp.write(b"data: " + _dumps(final) + b"\n\n")
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp

    def _anthropic(self, data: Any, h: Any, body_len: int) -> dict[str, Any]:
        model = h.get("x-mock-model") or _model(data)
        text = f"This is a mock message from {model}."
        tin, tout = self._usage(h, body_len, text)
        return {"id": "msg_mock", "type": "message", "role": "assistant", "model": model,
                "content": [{"type": "text", "text": text}], "stop_reason": "end_turn",
                "usage": {"input_tokens": tin, "output_tokens": tout}}

    def _gemini(self, path: str, h: Any, body_len: int) -> dict[str, Any]:
        model = h.get("x-mock-model") or path.rsplit("/", 1)[-1].split(":", 1)[0]
        text = f"This is a mock answer from {model}."
        tin, tout = self._usage(h, body_len, text)
        return {"candidates": [{"content": {"parts": [{"text": text}], "role": "model"},
                                "finishReason": "STOP"}],
                "modelVersion": model,
                "usageMetadata": {"promptTokenCount": tin, "candidatesTokenCount": tout,
                                  "totalTokenCount": tin + tout}}

    def _generic(self, data: Any, h: Any) -> dict[str, Any]:
        confidence = float(h.get("x-mock-confidence", "0.92"))
        out: dict[str, Any] = {"text": "MOCK RESULT", "confidence": confidence,
                               "handwritten": h.get("x-mock-handwritten") == "true",
                               "items": [{"name": "mock item", "price": 1000}]}
        if isinstance(data, dict) and "barcode" in data:
            out["barcode"] = data["barcode"]
        return out


class _Plan:
    """What the ``x-mock-*`` headers ask of one request (parsed up front: a bad value is a
    400, not a crash half-way)."""

    __slots__ = ("chunk_delay_s", "chunks", "delay_s", "drop", "dropped", "status")

    def __init__(self, h: Any, nth: int, fail_percent: float = 0.0) -> None:
        self.delay_s = _duration(h, "x-mock-delay")
        self.chunk_delay_s = _duration(h, "x-mock-chunk-delay")
        self.chunks = _int(h, "x-mock-chunks", 5, 1)
        self.drop = h.get("x-mock-drop")
        if self.drop not in (None, "headers", "mid-stream"):
            raise ValueError("x-mock-drop must be 'headers' or 'mid-stream'")
        self.dropped = False
        status = _int(h, "x-mock-status", 200, 200)
        if status > 599:
            raise ValueError("x-mock-status must be in [200, 599]")
        fail_first = _int(h, "x-mock-fail-first", 0, 0)
        if fail_first:
            status = (status if status >= 400 else 503) if nth <= fail_first else 200
        elif "x-mock-fail-percent" in h or fail_percent:
            try:
                pct = float(h.get("x-mock-fail-percent", fail_percent))
            except ValueError:
                raise ValueError("x-mock-fail-percent must be a number") from None
            if not 0 <= pct <= 100:
                raise ValueError("x-mock-fail-percent must be in [0, 100]")
            fails = (nth * pct) // 100 > ((nth - 1) * pct) // 100
            status = (status if status >= 400 else 503) if fails else 200
        self.status = status
        for name in ("x-mock-confidence",):
            if name in h:
                try:
                    float(h[name])
                except ValueError:
                    raise ValueError(f"{name} must be a number") from None
        if "x-mock-output-tokens" in h:
            _int(h, "x-mock-output-tokens", 0, 0)


def _duration(h: Any, name: str) -> float:
    if name not in h:
        return 0.0
    try:
        return parse_duration(h[name])
    except ValueError:
        raise ValueError(f"{name} must be a duration like 250ms or 2s") from None


def _int(h: Any, name: str, default: int, minimum: int) -> int:
    if name not in h:
        return default
    try:
        value = int(h[name])
    except ValueError:
        raise ValueError(f"{name} must be an integer") from None
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}")
    return value


async def _extra_headers(request: web.Request, response: web.StreamResponse) -> None:
    """``x-mock-headers``: a JSON object of headers added to the answer (bad JSON: none)."""
    raw = request.headers.get("x-mock-headers")
    if not raw:
        return
    try:
        extra = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return
    if isinstance(extra, dict):
        for name, value in extra.items():
            response.headers[str(name)] = str(value)


def _dumps(obj: Any) -> bytes:
    return orjson.dumps(obj)


def _json(obj: Any, status: int = 200) -> web.Response:
    return web.Response(status=status, body=_dumps(obj), content_type=_JSON)


def _loads(body: bytes) -> Any:
    try:
        return orjson.loads(body) if body else None
    except orjson.JSONDecodeError:
        return None


def _model(data: Any) -> str:
    if isinstance(data, dict) and isinstance(data.get("model"), str):
        return data["model"]
    return "mock-model"


async def start_mock(host: str = "127.0.0.1", port: int = 0) -> tuple[MockProvider, web.AppRunner, str]:
    """Start a mock on ``host:port`` (0 = any free port); returns (mock, runner, base URL)."""
    mock = MockProvider()
    # handler_cancellation: a client that goes away cancels the handler, as a real
    # provider stops working for a caller that hung up (and ``cancelled`` counts it)
    runner = web.AppRunner(mock.app(), access_log=None, handle_signals=False,
                           handler_cancellation=True)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    bound = runner.addresses[0][1]
    return mock, runner, f"http://{host}:{bound}"
