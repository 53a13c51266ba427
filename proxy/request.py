"""One data-plane request: its head, its body as it arrives, and the way to answer it.

The connection (:mod:`proxy.protocol`) parses and feeds it; the data plane's handler reads
its body and answers through it: a whole reply in one write (:meth:`Request.respond`), or
a stream (:meth:`Request.start_stream`, :meth:`Request.write`, :meth:`Request.write_eof`),
chunked for HTTP/1.1 and close-delimited for HTTP/1.0, waiting while the client reads
slowly. Every answer carries ``server: resilience-proxy`` and one ``date`` (the
provider's when it sent one).
"""

from __future__ import annotations

import asyncio
import time
from email.utils import formatdate
from http import HTTPStatus
from typing import TYPE_CHECKING

import orjson
from multidict import CIMultiDictProxy

if TYPE_CHECKING:
    from proxy.protocol import HttpConnection

SERVER_NAME = "resilience-proxy"

_STATUS_LINES = {
    s.value: b"HTTP/1.1 %d %s\r\n" % (s.value, s.phrase.encode()) for s in HTTPStatus
}
_NO_BODY = frozenset({204, 304})
_SERVER_LINE = b"server: " + SERVER_NAME.encode() + b"\r\n"


def _status_line(status: int) -> bytes:
    line = _STATUS_LINES.get(status)
    if line is None:
        line = b"HTTP/1.1 %d Unknown\r\n" % status
    return line


class _Date:
    """The ``date`` header line, rendered once a second."""

    __slots__ = ("line", "second")

    def __init__(self) -> None:
        self.second = -1
        self.line = b""

    def get(self) -> bytes:
        now = time.time()
        second = int(now)
        if second != self.second:
            self.second = second
            self.line = b"date: " + formatdate(now, usegmt=True).encode() + b"\r\n"
        return self.line


_DATE = _Date()


def json_reply(status: int, type_: str, message: str) -> bytes:
    """A whole answer for a request the data plane never saw; the connection then closes."""
    body = orjson.dumps({"error": {"type": type_, "message": message, "request_id": None,
                                   "route": None}})
    return (_status_line(status) + b"content-type: application/json\r\n" + _SERVER_LINE
            + _DATE.get() + b"connection: close\r\ncontent-length: %d\r\n\r\n" % len(body)
            + body)


class Request:
    """One request: its head, its body as it arrives, and the way to answer it."""

    __slots__ = (
        "_cap",
        "_conn",
        "_no_body",
        "_parts",
        "_size",
        "_stream_chunked",
        "_waiter",
        "body_complete",
        "chunked",
        "closing",
        "content_length",
        "error",
        "expect_continue",
        "head_sent",
        "headers",
        "keep_alive",
        "method",
        "path",
        "query",
        "remote",
        "too_large",
        "version",
    )

    def __init__(self, conn: HttpConnection, method: str, path: str, query: str,
                 version: str, headers: CIMultiDictProxy[str], keep_alive: bool,
                 cap: int) -> None:
        self._conn = conn
        self.method = method
        #: raw (still percent-encoded) path and query, origin-form
        self.path = path
        self.query = query
        self.version = version
        self.headers = headers
        self.remote = conn.remote
        self.keep_alive = keep_alive
        self.content_length: int | None = None
        self.chunked = False
        self.expect_continue = False
        self.body_complete = False
        self.too_large = False
        #: a malformed body (bad chunk framing): the parser's fixed reason
        self.error: str | None = None
        self.head_sent = False
        #: the answer says ``connection: close`` and the connection closes after it
        self.closing = False
        self._parts: list[bytes] = []
        self._size = 0
        self._cap = cap
        self._waiter: asyncio.Future[None] | None = None
        self._stream_chunked = False
        self._no_body = False

    # ------------------------------------------------------------------ body

    @property
    def body_exists(self) -> bool:
        return self.chunked or bool(self.content_length)

    def _feed(self, data: bytes) -> None:
        if self.too_large:
            return
        self._size += len(data)
        if self._size > self._cap:
            self.too_large = True
            self._parts.clear()
            self._wake()
            return
        self._parts.append(data)

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def body(self) -> bytes:
        """What was received of the body (all of it once :attr:`body_complete`)."""
        parts = self._parts
        if len(parts) == 1:
            return parts[0]
        return b"".join(parts)

    async def wait_body(self) -> None:
        """Until the body is complete, over the cap, malformed, or the client left."""
        while not (self.body_complete or self.too_large or self.error is not None):
            if self._conn.transport is None:
                raise ConnectionResetError("the client closed the connection")
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None

    def send_continue(self) -> None:
        transport = self._conn.transport
        if transport is not None and not transport.is_closing():
            transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")

    # ------------------------------------------------------------------ answer

    def force_close(self) -> None:
        """The answer says ``connection: close``; the connection closes after it."""
        self.closing = True

    def _head(self, status: int, headers: list[tuple[str, str]], framing: bytes) -> bytes:
        conn = self._conn
        if not (self.keep_alive and self.body_complete) or conn.server.draining \
                or conn.server.keepalive_s <= 0:
            self.closing = True
        text = "".join([f"{k}: {v}\r\n" for k, v in headers])
        if text.count("\n") != len(headers) or text.count("\r") != len(headers):
            raise ValueError("a reply header holds CR or LF")  # never split a head
        # the provider's Date is kept (RFC 9110 §6.6.1: an intermediary adds one only when
        # the message has none); names here are lower-case
        dated = text.startswith("date: ") or "\r\ndate: " in text
        return b"".join((
            _status_line(status), text.encode("utf-8", "surrogateescape"), _SERVER_LINE,
            b"" if dated else _DATE.get(), framing,
            b"connection: close\r\n\r\n" if self.closing else
            (b"connection: keep-alive\r\n\r\n" if self.version == "1.0" else b"\r\n"),
        ))

    def respond(self, status: int, headers: list[tuple[str, str]], body: bytes) -> None:
        """A whole answer, in one write. ``headers`` hold no framing fields (length, coding,
        connection) and no ``server``: this writes those, and a ``date`` when none is there."""
        transport = self._conn.transport
        if status in _NO_BODY or status < 200:
            head = self._head(status, headers, b"")
            body = b""
        elif self.method == "HEAD" and not body:
            head = self._head(status, headers, b"")  # a relayed HEAD: the length is not ours
        else:
            head = self._head(status, headers, b"content-length: %d\r\n" % len(body))
        self.head_sent = True
        if transport is None or transport.is_closing():
            return
        if self.method == "HEAD" or not body:
            transport.write(head)
        else:
            transport.write(head + body)

    async def start_stream(self, status: int, headers: list[tuple[str, str]],
                           first: bytes = b"") -> None:
        """The head of a streamed answer, chunked (close-delimited for HTTP/1.0), with its
        first piece in the same write (one packet: the client's first byte comes sooner)."""
        transport = self._conn.transport
        if transport is None or transport.is_closing():
            raise ConnectionResetError("the client closed the connection")
        if status in _NO_BODY or status < 200 or self.method == "HEAD":
            framing, first = b"", b""  # no body: what the stream holds is not sent
        elif self.version == "1.0":
            self.closing = True
            framing = b""
        else:
            framing = b"transfer-encoding: chunked\r\n"
        head = self._head(status, headers, framing)
        self._stream_chunked = bool(framing)
        self._no_body = (not framing and self.version != "1.0") or self.method == "HEAD"
        self.head_sent = True
        if not first:
            transport.write(head)
        elif framing:
            transport.write(b"%s%x\r\n%s\r\n" % (head, len(first), first))
        else:
            transport.write(head + first)
        if self._conn.paused:
            await self._conn.drain()

    async def write(self, data: bytes) -> None:
        """One piece of a streamed answer, written as it is given (no buffering); waits
        while the client is slower than the stream."""
        if not data:
            return
        conn = self._conn
        transport = conn.transport
        if transport is None or transport.is_closing():
            raise ConnectionResetError("the client closed the connection")
        if self._no_body:
            return
        if self._stream_chunked:
            transport.writelines((b"%x\r\n" % len(data), data, b"\r\n"))
        else:
            transport.write(data)
        if conn.paused:
            await conn.drain()

    async def write_eof(self) -> None:
        transport = self._conn.transport
        if transport is None or transport.is_closing():
            raise ConnectionResetError("the client closed the connection")
        if self._stream_chunked and self.method != "HEAD":
            transport.write(b"0\r\n\r\n")
        self._stream_chunked = False

    def abort(self) -> None:
        """Cut the connection (a non-SSE stream that broke: the client must see it)."""
        self.closing = True
        transport = self._conn.transport
        if transport is not None:
            transport.close()
