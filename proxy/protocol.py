"""The data plane's HTTP/1.1 server: a lean asyncio protocol on llhttp (``httptools``).

Why not aiohttp's server (the admin plane still uses it): on the proxy's hot path it cost
~30 µs of CPU per request (a request object with its URL and payload stream, a response
object, a task and a writer per request; measured against a bare ``httptools`` protocol
answering the same request in ~10 µs). A sidecar pays that on every call, so the data plane
parses with llhttp — the strict C parser aiohttp, Node and uvicorn use — and does only what
the proxy needs, with the hardening an edge proxy needs:

- **Strict parsing.** llhttp refuses what could desynchronise a connection or smuggle a
  request (``Content-Length`` with ``Transfer-Encoding``, duplicate or listed lengths, an
  unknown coding, bare LF, obs-fold, control bytes, bad chunks, lowercase methods). On top
  of it: the request target must be origin-form (``/...``), absolute-form
  (``http://host/...``, whose scheme and host are ignored, never followed) or ``*`` for
  ``OPTIONS``, in ASCII; an HTTP/1.1 request needs exactly one ``Host``; at most
  :data:`MAX_HEADERS` header fields, each (and the target) within ``max_header_size``
  bytes, and the whole head within :data:`HEAD_FACTOR` times that. A refused request gets
  the proxy's JSON ``400`` with a fixed message (nothing of the request is echoed or
  logged), the connection is closed, and ``on_rejected`` records it like any request (one
  access-log line, one ``rp_requests_total``, route ``_none``).
- **Header-read timeout** (slowloris): a timer from the first byte of each request head (as
  Envoy's ``request_headers_timeout``); a head still incomplete after
  ``header_read_timeout`` gets ``408``, the connection closed, recorded as
  ``header_timeout``. An idle keep-alive connection is closed after ``keepalive_timeout``.
  One timer per connection, re-armed lazily (never a timer per request).
- **Bodies** are buffered up to the body cap (the live ``server.max_request_body``); past it
  the rest is discarded and the handler answers ``413``. The handler bounds the wait for a
  body that did not come with its head (``408``). ``Expect: 100-continue`` is answered when
  the handler starts reading.
- **One request at a time per connection**, pipelined requests queued in order (reading
  pauses past :data:`PIPELINE_MAX`). A client that leaves with a head half-sent, or with
  requests still queued, gets one access-log line for each (``499``, route ``_none``).
  A client that goes away (or half-closes, as nginx
  takes it) cancels its handler, which logs it as ``499`` and closes the upstream call.
- **Responses**: one ``transport.write`` for a whole reply (head and body); streams are
  chunked (close-delimited for an HTTP/1.0 client) and wait for the socket to drain when
  the client reads slowly, so nothing is buffered without bound. Every answer carries
  ``server: resilience-proxy`` and one ``date`` (the provider's when it sent one).
- **Drain** (Envoy's way for HTTP/1.1): the listener stops accepting; requests on open
  connections are still served, each answer saying ``connection: close``; idle connections
  are closed once nothing is in flight and :data:`IDLE_GRACE_S` has passed.
  :meth:`DataServer.shutdown` waits so up to the drain timeout, then closes the
  connections still busy (their handlers are cancelled and log their line) within
  :data:`CANCEL_GRACE_S`.
"""

from __future__ import annotations

import asyncio
import math
from collections import deque
from collections.abc import Awaitable, Callable

import httptools
from multidict import CIMultiDict, CIMultiDictProxy

from proxy.request import Request, json_reply

#: after the drain timeout, how long cancelled handlers get to finish (log their line)
CANCEL_GRACE_S = 0.5
#: how long a drain keeps idle keep-alive connections open for a request already on its way
IDLE_GRACE_S = 0.5
#: header fields per request (aiohttp's default too)
MAX_HEADERS = 128
#: a whole head may be this many times ``max_header_size``
HEAD_FACTOR = 16
#: complete requests queued behind the one being handled before reading pauses
PIPELINE_MAX = 8

#: (status, outcome, reason, peer host or None): what the server records for a request the
#: data plane never saw
OnRejected = Callable[[int, str, str, str | None], None]

_TOO_LONG = "a request line or header field is too long"
_MALFORMED = "malformed HTTP request"


class BadHead(Exception):
    """A request head the proxy refuses (beyond what llhttp refuses itself)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


Handler = Callable[[Request], Awaitable[None]]


class HttpConnection(asyncio.Protocol):
    """One client connection."""

    __slots__ = (
        "_current",
        "_drain_waiter",
        "_fail",
        "_head_bytes",
        "_head_deadline",
        "_head_started",
        "_headers",
        "_idle_deadline",
        "_in_head",
        "_loop",
        "_parser",
        "_parsing",
        "_queue",
        "_read_paused",
        "_task",
        "_timer",
        "_timer_at",
        "_url",
        "paused",
        "remote",
        "server",
        "transport",
    )

    def __init__(self, server: DataServer) -> None:
        self.server = server
        self._loop = server.loop
        self._parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.remote: str | None = None
        self._url = b""
        self._headers: list[tuple[bytes, bytes]] = []
        self._in_head = True
        #: a head's first bytes were parsed (its end not yet)
        self._head_started = False
        self._head_bytes = 0
        #: the request whose body is being parsed
        self._parsing: Request | None = None
        #: complete heads waiting for their turn
        self._queue: deque[Request] = deque()
        #: the request being handled, and its task
        self._current: Request | None = None
        self._task: asyncio.Task[None] | None = None
        #: a parse error to answer once the requests before it are answered
        self._fail: str | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = math.inf
        self._head_deadline: float | None = None
        self._idle_deadline: float | None = None
        self.paused = False
        self._read_paused = False
        self._drain_waiter: asyncio.Future[None] | None = None

    # ------------------------------------------------------------------ transport

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is no subclass
        peer = transport.get_extra_info("peername")
        self.remote = str(peer[0]) if peer else None
        self.server.connections.add(self)
        if self.server.draining:
            transport.close()
            return
        self._idle(self._loop.time())

    def connection_lost(self, exc: Exception | None) -> None:
        if self._fail is None:  # what the client left behind is logged once each
            who = "the drain cut the connection" if self.server.draining else "the client left"
            for _ in self._queue:  # complete requests that never reached the data plane
                self.server.rejected(499, "client_disconnected",
                                     f"{who} before its request was handled", self.remote)
            if self._head_started or (self._in_head and self._head_bytes):
                self.server.rejected(499, "client_disconnected",
                                     f"{who} in the middle of a request head", self.remote)
        self._queue.clear()
        self.transport = None
        self.server.connections.discard(self)
        self.server.busy.discard(self)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        task = self._task
        if task is not None and not task.done():
            task.cancel()
        for req in (self._current, self._parsing):
            if req is not None:
                req._wake()
        waiter = self._drain_waiter
        if waiter is not None and not waiter.done():
            waiter.set_exception(ConnectionResetError("the client closed the connection"))

    def eof_received(self) -> bool:
        # the client closed its side: it is gone (as nginx and aiohttp take it), so the
        # transport closes and a request in flight is cancelled (its upstream call too)
        return False

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False
        waiter = self._drain_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def drain(self) -> None:
        if self.transport is None:
            raise ConnectionResetError("the client closed the connection")
        waiter = self._drain_waiter = self._loop.create_future()
        try:
            await waiter
        finally:
            self._drain_waiter = None

    # ------------------------------------------------------------------ parsing

    def data_received(self, data: bytes) -> None:
        if self._fail is not None:
            return  # refused already: the rest is not read
        in_head = self._in_head
        if in_head:
            self._head_bytes += len(data)
            if self._head_deadline is None and self._current is None and not self._queue:
                self._idle_deadline = None
                self._head_deadline = deadline = self._loop.time() + self.server.head_timeout_s
                self._arm(deadline)
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._upgrade()
        except httptools.HttpParserCallbackError as exc:
            cause = exc.__context__
            self._parse_failed(cause.reason if isinstance(cause, BadHead) else _MALFORMED)
        except httptools.HttpParserError:
            self._parse_failed(_MALFORMED)
        else:
            if self._in_head and self._head_bytes > self.server.max_head:
                self._parse_failed(_TOO_LONG)
        # requests complete before an error in the same read are still answered, in order
        if self._current is None and self._queue:
            self._start_next()

    def on_message_begin(self) -> None:
        self._in_head = True
        self._head_started = True
        self._url = b""
        self._headers = []

    def on_url(self, url: bytes) -> None:
        url = self._url + url if self._url else url
        if len(url) > self.server.max_field:
            raise BadHead(_TOO_LONG)
        self._url = url

    def on_header(self, name: bytes, value: bytes) -> None:
        headers = self._headers
        if len(headers) >= MAX_HEADERS:
            raise BadHead("too many header fields")
        if len(name) + len(value) > self.server.max_field:
            raise BadHead(_TOO_LONG)
        headers.append((name, value))

    def on_headers_complete(self) -> None:
        parser = self._parser
        url = self._url
        method = parser.get_method().decode("ascii")
        version = parser.get_http_version()
        if url[:1] != b"/":
            url = _origin_form(url, method)
        if not url.isascii():
            raise BadHead(_MALFORMED)
        target = url.decode("ascii")
        path, _, query = target.partition("?")
        if "#" in query or "#" in path:
            path = path.partition("#")[0]
            query = query.partition("#")[0]
        headers = CIMultiDictProxy(CIMultiDict(
            [(n.decode("latin-1"), v.decode("utf-8", "surrogateescape"))
             for n, v in self._headers]))
        hosts = len(headers.getall("host", ()))
        if hosts > 1 or (hosts == 0 and version != "1.0"):
            raise BadHead(_MALFORMED)
        req = Request(self, method, path, query, version, headers,
                      parser.should_keep_alive(), self.server.body_cap())
        length = headers.get("content-length")
        if length is not None:
            req.content_length = int(length)  # llhttp checked: digits, one value
        req.chunked = "transfer-encoding" in headers  # llhttp checked: chunked, last
        expect = headers.get("expect")
        if expect is not None and expect.lower() == "100-continue" and version == "1.1":
            req.expect_continue = True
        self._in_head = False
        self._head_started = False
        self._head_bytes = 0
        self._head_deadline = None
        self._parsing = req
        self._queue.append(req)
        if len(self._queue) > PIPELINE_MAX and self.transport is not None:
            self._read_paused = True
            self.transport.pause_reading()

    def on_body(self, body: bytes) -> None:
        req = self._parsing
        if req is not None:
            req._feed(body)

    def on_message_complete(self) -> None:
        req = self._parsing
        self._parsing = None
        self._in_head = True
        if req is not None:
            req.body_complete = True
            req._wake()

    def _upgrade(self) -> None:
        """CONNECT or ``Upgrade:`` — not proxied: the request is answered as any other, and
        the connection closes after it (what follows its head is not HTTP)."""
        for req in self._queue:
            req.keep_alive = False
        if self._current is not None:
            self._current.keep_alive = False
        if self.transport is not None:
            self.transport.pause_reading()
        self._fail = ""  # read nothing more; nothing to answer for it

    def _parse_failed(self, reason: str) -> None:
        req = self._parsing
        self._parsing = None
        if self.transport is not None:
            self.transport.pause_reading()
        if req is not None and req is self._current:
            # its handler runs, waiting for the body: it answers (400) and closes
            req.error = reason
            req.keep_alive = False
            req._wake()
            self._fail = ""
            return
        if req is not None and self._queue and self._queue[-1] is req:
            self._queue.pop()  # never started: the data plane never saw it
        self._fail = reason
        if self._current is None and not self._queue:
            self._refuse()

    def _refuse(self) -> None:
        reason = self._fail
        transport = self.transport
        if not reason or transport is None or transport.is_closing():
            if transport is not None:
                transport.close()
            return
        transport.write(json_reply(400, "bad_request", reason))
        transport.close()
        self.server.rejected(400, "bad_request", reason, self.remote)

    # ------------------------------------------------------------------ requests

    def _start_next(self) -> None:
        req = self._queue.popleft()
        self._current = req
        self.server.busy.add(self)
        if self._read_paused and len(self._queue) <= PIPELINE_MAX // 2 and self._fail is None:
            self._read_paused = False
            if self.transport is not None:
                self.transport.resume_reading()
        self._task = self._loop.create_task(self._run(req))

    async def _run(self, req: Request) -> None:
        try:
            await self.server.handler(req)
        except asyncio.CancelledError:
            pass  # the client left (the handler logged it)
        except Exception:  # the handler is the boundary; this is a last resort
            self.server.log_error()
            if not req.head_sent:
                req.abort()
        finally:
            self._done(req)

    def _done(self, req: Request) -> None:
        self._current = None
        self._task = None
        self.server.busy.discard(self)
        transport = self.transport
        if transport is None:
            return
        if req.closing or not req.head_sent or transport.is_closing() \
                or self.server.keepalive_s <= 0:
            transport.close()
            return
        if self._queue:
            self._start_next()
        elif self._fail is not None:
            self._refuse()
        elif self._head_started:  # the next head came in part, behind this request
            now = self._loop.time()
            self._head_deadline = deadline = now + self.server.head_timeout_s
            self._arm(deadline)
        else:
            self._idle(self._loop.time())

    # ------------------------------------------------------------------ timers

    def _idle(self, now: float) -> None:
        keepalive = self.server.keepalive_s
        if keepalive <= 0:  # no keep-alive: a new connection's first head is bounded below
            keepalive = self.server.first_head_s
        deadline = self._idle_deadline = now + keepalive
        self._arm(deadline)

    def _arm(self, when: float) -> None:
        """Have the connection's one timer fire no later than ``when`` (a later timer is
        moved; an earlier one fires first and re-arms for what is left)."""
        if when >= self._timer_at:
            return
        if self._timer is not None:
            self._timer.cancel()
        self._timer_at = when
        self._timer = self._loop.call_at(when, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self._timer_at = math.inf
        if self.transport is None:
            return
        now = self._loop.time()
        head = self._head_deadline
        if head is not None and self._in_head and self._current is None and not self._queue:
            if now >= head:
                self._head_timed_out()
                return
        else:
            head = None
        idle = self._idle_deadline
        if idle is not None and self._current is None and not self._queue \
                and not self._head_bytes and self._parsing is None:
            if now >= idle:
                self.transport.close()
                return
        else:
            idle = None
        nxt = min(head if head is not None else math.inf, idle if idle is not None else math.inf)
        if nxt < math.inf:
            self._arm(nxt)

    def _head_timed_out(self) -> None:
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        self._fail = ""
        transport.write(json_reply(408, "request_timeout", "request headers too slow"))
        transport.close()
        self.server.rejected(408, "header_timeout", "request headers too slow", self.remote)

    def close_if_idle(self) -> bool:
        if self._current is None and not self._queue and self.transport is not None:
            self.transport.close()
            return True
        return False


def _origin_form(url: bytes, method: str) -> bytes:
    """The path (and query) of an absolute-form target; ``*`` for ``OPTIONS *``."""
    if url == b"*" and method == "OPTIONS":
        return b"*"
    lower = url[:8].lower()
    if lower.startswith(b"http://"):
        rest = url[7:]
    elif lower.startswith(b"https://"):
        rest = url[8:]
    else:
        raise BadHead(_MALFORMED)
    slash = rest.find(b"/")
    if slash < 0:
        query = rest.find(b"?")
        return b"/" if query < 0 else b"/" + rest[query:]
    authority = rest[:slash]
    if b"?" in authority:
        return b"/" + rest[authority.index(b"?"):]
    return rest[slash:]


class DataServer:
    """The data plane's listener: its connections, drain and shutdown."""

    def __init__(self, handler: Handler, *, header_read_timeout: float, keepalive_timeout: float,
                 max_header_size: int, body_cap: Callable[[], int],
                 on_rejected: OnRejected | None = None,
                 in_flight: Callable[[], int] | None = None,
                 log_error: Callable[[], None] | None = None) -> None:
        self.handler = handler
        self.loop = asyncio.get_running_loop()
        self.head_timeout_s = header_read_timeout if header_read_timeout > 0 else math.inf
        self.keepalive_s = keepalive_timeout
        #: with no keep-alive, how long a new connection may wait before its first byte
        self.first_head_s = header_read_timeout if header_read_timeout > 0 else 10.0
        self.max_field = max_header_size
        self.max_head = max_header_size * HEAD_FACTOR
        self.body_cap = body_cap
        self._on_rejected = on_rejected
        self._log_error = log_error
        #: handlers running (the data plane's count): cancelled ones are waited for
        self._in_flight = in_flight or (lambda: len(self.busy))
        self.connections: set[HttpConnection] = set()
        #: connections with a request in flight
        self.busy: set[HttpConnection] = set()
        self.draining = False
        self._server: asyncio.Server | None = None

    def __call__(self) -> HttpConnection:
        return HttpConnection(self)

    async def listen(self, host: str, port: int, *, reuse_port: bool = False) -> None:
        self._server = await self.loop.create_server(
            self, host or None, port, reuse_port=reuse_port or None, backlog=1024)

    @property
    def address(self) -> tuple[str, int]:
        assert self._server is not None
        sock = self._server.sockets[0]
        host, port = sock.getsockname()[:2]
        return str(host), int(port)

    def rejected(self, status: int, outcome: str, reason: str, peer: str | None) -> None:
        if self._on_rejected is not None:
            self._on_rejected(status, outcome, reason, peer)

    def log_error(self) -> None:
        if self._log_error is not None:
            self._log_error()

    async def shutdown(self, timeout: float) -> None:  # noqa: ASYNC109
        """Stop accepting; wait up to ``timeout`` seconds for the requests in flight (idle
        connections get :data:`IDLE_GRACE_S` for a request already on its way), then close
        what is left, giving cancelled handlers :data:`CANCEL_GRACE_S` to log their line."""
        self.draining = True
        if self._server is not None:
            self._server.close()
        loop = self.loop
        now = loop.time()
        end = now + timeout
        idle_from = min(now + IDLE_GRACE_S, end)
        while loop.time() < end and (  # noqa: ASYNC110 (a poll: no event to wait on)
                self.busy or (self.connections and loop.time() < idle_from)):
            await asyncio.sleep(0.02)
        for conn in list(self.connections):
            if not conn.close_if_idle() and conn.transport is not None:
                conn.transport.close()  # past the drain: its handler is cancelled
        end = loop.time() + CANCEL_GRACE_S
        while self._in_flight() and loop.time() < end:  # noqa: ASYNC110
            await asyncio.sleep(0.01)
        if self._server is not None:
            try:
                async with asyncio.timeout(CANCEL_GRACE_S):
                    await self._server.wait_closed()
            except TimeoutError:
                pass
