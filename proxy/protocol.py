"""The data plane's HTTP/1.1 connections: aiohttp's, plus what an edge proxy needs.

- **Header-read timeout** (slowloris). aiohttp bounds an idle connection
  (``keepalive_timeout``) but not a client that sends a request's head slowly.
  :class:`HeaderTimeoutProtocol` starts a timer at the first byte of each request head (like
  Envoy's ``request_headers_timeout``); when the head is still incomplete after
  ``server.header_read_timeout`` it answers ``408`` and closes the connection. Bodies are
  bounded separately, by the request's ``total`` (:mod:`proxy.dataplane`); the bytes of a
  body the proxy refused (a 413 being discarded) do not start the timer.
- **Malformed requests**. aiohttp's parser refuses them (400, connection closed), but its own
  error page quotes the offending bytes (which can hold a client's credential) and logs a
  traceback. Here the answer is the proxy's JSON error with a fixed message, nothing of the
  request is echoed or logged, and the server's ``on_rejected`` callback records it like
  any request (one access-log line, one ``rp_requests_total``, route ``_none``); a head that
  timed out is recorded the same way (outcome ``header_timeout``).
- **Drain** (Envoy's way for HTTP/1.1). The listener stops accepting; requests that arrive on
  connections already open are still served, each answer saying ``Connection: close``, so a
  client learns to reconnect instead of writing into a connection closed under it (the
  request it had just sent would be lost). Idle connections are closed once nothing is in
  flight and :data:`IDLE_GRACE_S` has passed. :meth:`DataServer.shutdown` waits so up to the
  drain timeout, then closes the connections still busy (their handlers are cancelled and
  log their line) within :data:`CANCEL_GRACE_S`: a drain is bounded by ``drain_timeout``
  plus a fraction of a second (aiohttp alone waits up to twice the timeout: once for the
  handler, once more after cancelling its body).

Every answer carries ``server: resilience-proxy`` (never aiohttp's version banner).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import orjson
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError, LineTooLong
from aiohttp.streams import StreamReader
from aiohttp.web_protocol import RequestHandler

SERVER_NAME = "resilience-proxy"
#: after the drain timeout, how long cancelled handlers get to finish (log their line)
CANCEL_GRACE_S = 0.5
#: how long a drain keeps idle keep-alive connections open for a request already on its way
IDLE_GRACE_S = 0.5

_TIMEOUT_BODY = b'{"error": {"type": "request_timeout", "message": "request headers too slow"}}'
_TIMEOUT_REPLY = (b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\n"
                  b"server: " + SERVER_NAME.encode() + b"\r\n"
                  b"connection: close\r\ncontent-length: %d\r\n\r\n%s"
                  % (len(_TIMEOUT_BODY), _TIMEOUT_BODY))

#: (status, outcome, reason, peer host or None): what the server records for a request the
#: data plane never saw
OnRejected = Callable[[int, str, str, str | None], None]


def _reason(exc: BaseException | None) -> str:
    """A fixed description of a parse error: aiohttp's message quotes the request's bytes."""
    if isinstance(exc, LineTooLong):
        return "a request line or header field is too long"
    message = getattr(exc, "message", "") or ""
    if message == "Too many headers received":
        return "too many header fields"
    return "malformed HTTP request"


def _json_error(status: int, type_: str, message: str) -> web.Response:
    body = orjson.dumps({"error": {"type": type_, "message": message, "request_id": None,
                                   "route": None}})
    resp = web.Response(status=status, body=body, content_type="application/json",
                        headers={"server": SERVER_NAME})
    resp.force_close()
    return resp


class HeaderTimeoutProtocol(RequestHandler):
    """One client connection: a header-read timer, JSON parse errors, drain-aware."""

    __slots__ = ("_rp_busy", "_rp_deadline", "_rp_handle", "_rp_payload", "_rp_server",
                 "_rp_timeout_s")

    def __init__(self, manager: DataServer, *, header_read_timeout: float,
                 **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self._rp_server = manager
        self._rp_timeout_s = header_read_timeout
        #: one timer per connection, re-armed lazily: a head that completes only clears
        #: ``_rp_deadline`` (no cancel, no new timer per request); when the timer fires
        #: early for a later deadline it re-arms itself for that one
        self._rp_handle: asyncio.TimerHandle | None = None
        self._rp_deadline: float | None = None
        self._rp_busy = False
        #: the body of the latest request (unread bytes of it are not a head)
        self._rp_payload: StreamReader | None = None

    @property
    def draining(self) -> bool:
        return self._rp_server.draining

    def _rp_awaiting_head(self) -> bool:
        payload = self._rp_payload
        return not self._rp_busy and (payload is None or payload.is_eof())

    def data_received(self, data: bytes) -> None:
        if self._rp_deadline is None and self._rp_timeout_s > 0 and self._rp_awaiting_head():
            loop = asyncio.get_running_loop()
            deadline = self._rp_deadline = loop.time() + self._rp_timeout_s
            if self._rp_handle is None:
                self._rp_handle = loop.call_at(deadline, self._rp_expired)
        super().data_received(data)

    def request_arrived(self, payload: StreamReader) -> None:
        """A request's head is complete (called by the server's request factory)."""
        self._rp_busy = True
        self._rp_payload = payload
        self._rp_deadline = None
        self._rp_server.busy.add(self)

    def request_started(self) -> None:
        """The data plane's handler runs (the head is complete)."""
        self._rp_busy = True
        self._rp_deadline = None

    def request_ended(self) -> None:
        """The handler is done; the next head's first byte starts its timer."""
        self._rp_busy = False
        self._rp_server.busy.discard(self)

    def connection_lost(self, exc: BaseException | None) -> None:
        self._cancel_timer()
        self._rp_server.busy.discard(self)
        super().connection_lost(exc)

    def handle_error(self, request: web.BaseRequest, status: int = 500,
                     exc: BaseException | None = None,
                     message: str | None = None) -> web.StreamResponse:
        """aiohttp's answer to a request its parser refused (or to a handler that raised):
        the proxy's JSON error, no request bytes echoed, no traceback logged."""
        if request.writer.output_size > 0:  # an answer already started: only closing is left
            raise ConnectionError("response already started")
        peer = request.remote
        if isinstance(exc, HttpProcessingError):
            reason = _reason(exc)
            self._rp_server.rejected(status, "bad_request", reason, peer)
            return _json_error(status, "bad_request", reason)
        return _json_error(500, "internal_error", "internal error")

    def _cancel_timer(self) -> None:
        self._rp_deadline = None
        if self._rp_handle is not None:
            self._rp_handle.cancel()
            self._rp_handle = None

    def _rp_expired(self) -> None:
        self._rp_handle = None
        deadline = self._rp_deadline
        if deadline is None:  # the head it was armed for completed: nothing to time now
            return
        loop = asyncio.get_running_loop()
        if loop.time() < deadline:  # armed for an earlier head: wait for this one's
            self._rp_handle = loop.call_at(deadline, self._rp_expired)
            return
        self._rp_deadline = None
        if not self._rp_awaiting_head():
            return
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        peer = transport.get_extra_info("peername")
        transport.write(_TIMEOUT_REPLY)
        self.force_close()  # closes the transport once the 408 is flushed
        self._rp_server.rejected(408, "header_timeout", "request headers too slow",
                                 str(peer[0]) if peer else None)


class _DataRequest(web.BaseRequest):
    """A data-plane request: not kept alive once the server drains."""

    @property
    def keep_alive(self) -> bool:
        proto = self.protocol
        if isinstance(proto, HeaderTimeoutProtocol) and proto.draining:
            return False
        return bool(super().keep_alive)


class DataServer(web.Server):
    """aiohttp's low-level server whose connections are :class:`HeaderTimeoutProtocol`."""

    def __init__(self, handler: Any, *, header_read_timeout: float,
                 on_rejected: OnRejected | None = None, in_flight: Callable[[], int] | None = None,
                 handler_cancellation: bool = False, **kwargs: Any) -> None:
        super().__init__(handler, handler_cancellation=handler_cancellation,
                         request_factory=self._rp_make_request, **kwargs)
        self._rp_protocol_kwargs = kwargs
        self._rp_header_read_timeout = header_read_timeout
        self._rp_on_rejected = on_rejected
        #: handlers running (the data plane's count): cancelled ones are waited for
        self._rp_in_flight = in_flight or (lambda: len(self.busy))
        #: connections with a request in flight
        self.busy: set[HeaderTimeoutProtocol] = set()
        self.draining = False

    def __call__(self) -> RequestHandler:
        return HeaderTimeoutProtocol(
            self, loop=asyncio.get_running_loop(),
            header_read_timeout=self._rp_header_read_timeout, **self._rp_protocol_kwargs,
        )

    def _rp_make_request(self, message: Any, payload: StreamReader, protocol: RequestHandler,
                         writer: Any, task: asyncio.Task[None]) -> web.BaseRequest:
        if isinstance(protocol, HeaderTimeoutProtocol):
            protocol.request_arrived(payload)
        return _DataRequest(message, payload, protocol, writer, task,
                            asyncio.get_running_loop())

    def rejected(self, status: int, outcome: str, reason: str, peer: str | None) -> None:
        if self._rp_on_rejected is not None:
            self._rp_on_rejected(status, outcome, reason, peer)

    def pre_shutdown(self) -> None:
        """Stop keeping connections alive (idle ones are closed by :meth:`shutdown`)."""
        self.draining = True

    async def shutdown(self, timeout: float | None = None) -> None:  # noqa: ASYNC109 (aiohttp)
        """Wait up to ``timeout`` seconds for the requests in flight, then close the
        connections still busy and give their cancelled handlers :data:`CANCEL_GRACE_S` to
        finish (bounded: ``timeout`` + about :data:`CANCEL_GRACE_S`)."""
        self.draining = True
        loop = asyncio.get_running_loop()
        now = loop.time()
        end = now + (timeout or 0.0)
        idle_from = min(now + IDLE_GRACE_S, end)
        while loop.time() < end and (  # noqa: ASYNC110 (a poll: no event to wait on)
                self.busy or (self.connections and loop.time() < idle_from)):
            await asyncio.sleep(0.02)
        super().pre_shutdown()  # idle connections: closed now
        for proto in list(self.busy):  # past the drain: their handlers are cancelled
            proto.force_close()
        end = loop.time() + CANCEL_GRACE_S
        while self._rp_in_flight() and loop.time() < end:  # noqa: ASYNC110
            await asyncio.sleep(0.01)
        await super().shutdown(CANCEL_GRACE_S)  # what is left: idle or lingering connections
