"""Helpers for the core's tests: raw HTTP on loopback and scripted upstreams.

- :func:`raw_http`: send exact bytes to a listener, read the answer (for absolute-form
  targets, forged Host headers, slow heads, hop-by-hop headers aiohttp's client would fix).
- :class:`RawUpstream`: a loopback HTTP/1.1 server that answers every request with one canned
  response and counts connections; as an "attacker" it must see none.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field


async def raw_http(url: str, data: bytes, *, read_timeout: float = 10.0) -> bytes:
    """Send ``data`` to ``url``'s host:port and return everything read until EOF."""
    host, port = url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(data)
        await writer.drain()
        async with asyncio.timeout(read_timeout):
            return await reader.read()
    finally:
        writer.close()


def parse_response(raw: bytes) -> tuple[int, dict[str, str], bytes]:
    """(status, lower-cased headers, body) of one HTTP/1.1 response (not chunked)."""
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ")[1])
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return status, headers, body


@dataclass
class RawUpstream:
    """A loopback server answering each request with ``response`` (bytes, sent verbatim)."""

    response: bytes = (b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
                       b"content-length: 2\r\n\r\n{}")
    #: close the connection right after the response (e.g. a stream cut before its body)
    close_after: bool = False
    connections: int = 0
    requests: list[bytes] = field(default_factory=list)
    url: str = ""
    _server: asyncio.Server | None = None
    _writers: list[asyncio.StreamWriter] = field(default_factory=list)

    async def start(self) -> RawUpstream:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        port = self._server.sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        return self

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self._writers.append(writer)
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":", 1)[1])
                body = await reader.readexactly(length) if length else b""
                self.requests.append(head + body)
                writer.write(self.response)
                await writer.drain()
                if self.close_after:
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            for writer in self._writers:
                writer.close()
            await self._server.wait_closed()
