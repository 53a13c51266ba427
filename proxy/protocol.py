"""The data plane's HTTP/1.1 connection: aiohttp's, plus a header-read timeout.

aiohttp's server bounds an idle connection (``keepalive_timeout``) but not a client that
sends a request's head slowly (slowloris). :class:`HeaderTimeoutProtocol` starts a timer at
the first byte of each request head (like Envoy's ``request_headers_timeout``); when the
head is still incomplete after ``server.header_read_timeout`` it answers ``408`` and closes
the connection. The data plane tells the connection when a request's head is complete
(:meth:`request_started`) and when its answer is done (:meth:`request_ended`). Bodies are
bounded separately, by the request's ``total`` (:mod:`proxy.dataplane`).
"""

from __future__ import annotations

import asyncio
from typing import Any

from aiohttp import web
from aiohttp.web_protocol import RequestHandler

_TIMEOUT_BODY = b'{"error": {"type": "request_timeout", "message": "request headers too slow"}}'
_TIMEOUT_REPLY = (b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\n"
                  b"connection: close\r\ncontent-length: %d\r\n\r\n%s"
                  % (len(_TIMEOUT_BODY), _TIMEOUT_BODY))


class HeaderTimeoutProtocol(RequestHandler):
    """One client connection; closes it when a request head takes too long to arrive."""

    __slots__ = ("_rp_busy", "_rp_handle", "_rp_on_timeout", "_rp_timeout_s")

    def __init__(self, manager: web.Server, *, header_read_timeout: float,
                 on_timeout: Any = None, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self._rp_timeout_s = header_read_timeout
        self._rp_handle: asyncio.TimerHandle | None = None
        self._rp_busy = False
        self._rp_on_timeout = on_timeout

    def data_received(self, data: bytes) -> None:
        if not self._rp_busy and self._rp_handle is None and self._rp_timeout_s > 0:
            loop = asyncio.get_running_loop()
            self._rp_handle = loop.call_later(self._rp_timeout_s, self._rp_expired)
        super().data_received(data)

    def request_started(self) -> None:
        """The head of a request is complete (the handler runs)."""
        self._rp_busy = True
        self._cancel_timer()

    def request_ended(self) -> None:
        """The handler is done; the next byte starts the next head's timer."""
        self._rp_busy = False

    def connection_lost(self, exc: BaseException | None) -> None:
        self._cancel_timer()
        super().connection_lost(exc)

    def _cancel_timer(self) -> None:
        if self._rp_handle is not None:
            self._rp_handle.cancel()
            self._rp_handle = None

    def _rp_expired(self) -> None:
        self._rp_handle = None
        if self._rp_busy:
            return
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        peer = transport.get_extra_info("peername")
        transport.write(_TIMEOUT_REPLY)
        self.force_close()  # closes the transport once the 408 is flushed
        if self._rp_on_timeout is not None:
            self._rp_on_timeout(peer)


class DataServer(web.Server):
    """aiohttp's low-level server whose connections are :class:`HeaderTimeoutProtocol`."""

    def __init__(self, handler: Any, *, header_read_timeout: float, on_header_timeout: Any = None,
                 handler_cancellation: bool = False, **kwargs: Any) -> None:
        super().__init__(handler, handler_cancellation=handler_cancellation, **kwargs)
        self._rp_protocol_kwargs = kwargs
        self._rp_header_read_timeout = header_read_timeout
        self._rp_on_header_timeout = on_header_timeout

    def __call__(self) -> RequestHandler:
        return HeaderTimeoutProtocol(
            self, loop=asyncio.get_running_loop(),
            header_read_timeout=self._rp_header_read_timeout,
            on_timeout=self._rp_on_header_timeout, **self._rp_protocol_kwargs,
        )
