"""The upstream client's connection pool: one per provider (see :mod:`proxy.h1`).

At most ``limit`` connections open; idle ones reused most recent first and dropped after
``keepalive_s``; callers past the limit wait in line and are handed the next free
connection. A connection is put back only when its response was read to the end and
neither side said ``Connection: close``; anything else closes it.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections import deque

from proxy.h1 import ConnectError, Connection, Response


class Pool:
    """A provider's keep-alive connections: at most ``limit`` open, reused most recent first."""

    def __init__(self, scheme: str, host: str, port: int, *, limit: int,
                 keepalive_s: float = 30.0, connect_timeout_s: float = 10.0) -> None:
        self.loop = asyncio.get_running_loop()
        self.host = host
        self.port = port
        self.limit = limit
        self.keepalive_s = keepalive_s
        self.connect_timeout_s = connect_timeout_s
        self.ssl: ssl.SSLContext | None = ssl.create_default_context() \
            if scheme == "https" else None
        self._idle: list[Connection] = []
        self._all: set[Connection] = set()
        self._opening = 0
        self._waiters: deque[asyncio.Future[Connection | None]] = deque()
        self._closed = False

    @property
    def closed(self) -> bool:
        """The pool was closed (its provider's runtime was replaced or the proxy stopped)."""
        return self._closed

    @property
    def size(self) -> int:
        """Connections open or being opened."""
        return len(self._all) + self._opening

    async def request(self, method: str, head: bytes, body: bytes) -> Response:
        """Send one request (``head`` is the request line and headers, CRLF-terminated)
        and wait for the response head. Cancelling closes the connection."""
        conn = await self._acquire()
        try:
            return await conn.send(head, body, method)
        except BaseException:
            conn.abort()
            raise

    async def _acquire(self) -> Connection:
        if self._closed:
            raise ConnectError("the provider's pool is closed")
        idle = self._idle
        now = time.monotonic()
        while idle:
            conn = idle.pop()
            if conn.closed or conn.transport is None or conn.transport.is_closing():
                conn.abort()
                continue
            if now - conn.idle_since > self.keepalive_s:
                conn.abort()
                continue
            return conn
        if self.size >= self.limit:
            waiter: asyncio.Future[Connection | None] = self.loop.create_future()
            self._waiters.append(waiter)
            try:
                handed = await waiter
            except BaseException:
                if waiter.done() and not waiter.cancelled():
                    self._hand_off(waiter.result())  # what it was given goes to the next
                raise
            if handed is not None and not handed.closed:
                return handed
        return await self._connect()

    async def _connect(self) -> Connection:
        self._opening += 1
        try:
            async with asyncio.timeout(self.connect_timeout_s):
                _, conn = await self.loop.create_connection(
                    lambda: Connection(self), self.host, self.port, ssl=self.ssl,
                    server_hostname=self.host if self.ssl is not None else None)
        except TimeoutError:
            raise
        except OSError as exc:
            raise ConnectError(str(exc) or type(exc).__name__) from None
        finally:
            self._opening -= 1
        if self._closed:
            conn.abort()
            raise ConnectError("the provider's pool is closed")
        self._all.add(conn)
        return conn

    def release(self, conn: Connection) -> None:
        """A response is done with ``conn``: keep it when it can carry another request."""
        if conn.reusable() and not self._closed:
            self._put(conn)
        else:
            conn.abort()

    def _put(self, conn: Connection) -> None:
        if self._hand_off(conn):
            return
        idle = self._idle
        now = conn.idle_since = time.monotonic()
        while idle and (idle[0].closed or now - idle[0].idle_since > self.keepalive_s):
            idle.pop(0).abort()  # the least recently used: closed, or idle too long
        idle.append(conn)

    def _hand_off(self, conn: Connection | None) -> bool:
        """Give ``conn`` (None: a free slot to open one) to the first live waiter."""
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(conn)
                return True
        return False

    def forget(self, conn: Connection) -> None:
        """``conn`` closed: it no longer counts, and a waiter may open a new one."""
        if conn in self._all:
            self._all.discard(conn)
            if conn in self._idle:
                self._idle.remove(conn)
            self._hand_off(None)

    def close(self) -> None:
        self._closed = True
        for conn in list(self._all):
            conn.abort()
        self._idle.clear()
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_exception(ConnectError("the provider's pool is closed"))
