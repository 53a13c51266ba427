"""The upstream client: one pool of keep-alive connections per provider, one attempt per call.

:meth:`ProviderClient.send` makes one attempt and returns a :class:`~proxy.call.Reply`
for any HTTP status, or raises an attempt-level error (connect error, reset, first-byte
timeout). The URL comes only from the provider's config: the request contributes its path
and query, never a scheme, host or port. Redirects are never followed. The HTTP/1.1 client
is :mod:`proxy.h1` (lean: the hop's largest CPU cost was ``aiohttp.ClientSession``).

A provider that quotes a configured secret back (an echoed key) has it replaced by
``[REDACTED]`` in its response header values and, for an error reply (status >= 400), in its
body: an error body is read whole (up to ``max_buffered_response``) whatever its content
type, so an error "stream" is masked like any other error body.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

from yarl import URL

from proxy.call import Call, Reply, ReplyStream
from proxy.config import ProviderConfig, TierConfig
from proxy.errors import Timeout, UpstreamError
from proxy.h1 import ConnectError, ResetError, Response
from proxy.h1_pool import Pool
from proxy.headers import HeaderRules, response_headers

#: the provider closed or broke the connection, or sent a malformed response
_RESET_ERRORS = (ResetError,)
#: what aiohttp's client added when the request had none (kept, so providers see the same)
_AUTO_HEADERS = (("accept", "Accept: */*\r\n"), ("accept-encoding", "Accept-Encoding: gzip, deflate\r\n"))


class ProviderClient:
    """A provider's connection pool and request shaping."""

    def __init__(
        self,
        name: str,
        cfg: ProviderConfig,
        base_url: str,
        clients_header: str | None,
        secrets: frozenset[str],
        max_buffered: int,
    ) -> None:
        self.name = name
        self.cfg = cfg
        self.base = URL(base_url)
        #: scheme://host[:port][/base] as configured; the request adds path and query only
        self._prefix = base_url.rstrip("/")
        self.rules = HeaderRules(cfg.headers, clients_header)
        # longest first, so a whole "Bearer <key>" goes before the bare key inside it
        self._secrets = tuple(sorted((s.encode() for s in secrets), key=len, reverse=True))
        self._secret_texts = tuple(s.decode() for s in self._secrets)
        self._max_buffered = max_buffered
        #: Host and the configured headers: the same lines on every request
        inject = self.rules.inject
        self._fixed_names = frozenset(name.lower() for name, _ in inject)
        self._fixed: str | None = f"Host: {_host_port(self.base)}\r\n" + "".join(
            f"{name}: {value}\r\n" for name, value in inject)
        if any("\r" in part or "\n" in part for pair in inject for part in pair):
            self._fixed = None
        #: the base path, prepended to every request target
        self._base_path = self.base.raw_path.rstrip("/")
        #: the provider's connection pool (named ``session``: one per provider)
        self.session: Pool | None = None

    async def start(self) -> None:
        assert self.base.host is not None and self.base.port is not None
        self.session = Pool(self.base.scheme, self.base.host, self.base.port,
                            limit=self.cfg.max_connections, keepalive_s=30.0,
                            connect_timeout_s=10.0)

    async def close(self) -> None:
        if self.session is not None:
            self.session.close()

    def url(self, call: Call, tier: TierConfig) -> URL:
        """Provider base + (tier path or request path) + request query; host from config only.

        The path and query are the request's raw (still percent-encoded) bytes, passed on
        unchanged: ``a=b%26c`` stays one parameter. The path always starts with a single
        ``/`` and has no dot segments (the data plane refuses those), so it can neither
        name another host nor climb out of the provider's base path.
        """
        path = tier.path or call.path
        if call.query:
            return URL(f"{self._prefix}{path}?{call.query}", encoded=True)
        return URL(self._prefix + path, encoded=True)

    def _request_head(self, call: Call, tier: TierConfig, body: bytes) -> bytes:
        """Request line and headers: the client's (filtered by the provider's rules), the
        configured ones, ``x-request-id``, then what aiohttp's client used to add."""
        path = tier.path or call.path
        target = self._base_path + path + ("?" + call.query if call.query else "")
        if self._fixed is None:
            raise ValueError("a configured header has CR or LF")  # aiohttp refused these too
        lines = [f"{call.method} {target} HTTP/1.1\r\n", self._fixed,
                 f"x-request-id: {call.request_id}\r\n"]
        seen = set(self._fixed_names)
        for name, value in self.rules.client_items(call.headers):
            if "\r" in value or "\n" in value or "\r" in name or "\n" in name:
                raise ValueError("a header with CR or LF")
            seen.add(name.lower())
            lines.append(f"{name}: {value}\r\n")
        for name, line in _AUTO_HEADERS:
            if name not in seen:
                lines.append(line)
        if body:
            if "content-type" not in seen:
                lines.append("Content-Type: application/octet-stream\r\n")
            lines.append(f"Content-Length: {len(body)}\r\n\r\n")
        elif call.method in _BODY_METHODS:
            lines.append("Content-Length: 0\r\n\r\n")
        else:
            lines.append("\r\n")
        return "".join(lines).encode("utf-8", "surrogateescape")

    async def send(self, call: Call, tier: TierConfig, body: bytes) -> Reply:
        """One upstream attempt; the caller bounds it with the attempt timer."""
        pool = self.session
        assert pool is not None
        head = self._request_head(call, tier, body)
        fb_s = call.arm.timeout.first_byte
        left = call.time_left()
        timer = "first_byte" if fb_s < left else "total"
        limit = min(fb_s, left)
        try:
            if call.clock.monotonic() + limit < call.attempt_deadline:
                async with asyncio.timeout(max(limit, 0.0)):
                    resp = await pool.request(call.method, head, body)
            else:  # the attempt's own timer fires first: one timer is enough
                resp = await pool.request(call.method, head, body)
            # the response headers are in: the real first byte of this attempt
            call.timings["t_upstream_first_byte"] = (call.clock.monotonic() - call.started) * 1000
        except TimeoutError:
            raise Timeout(timer, fb_s if timer == "first_byte" else call.arm.timeout.total) \
                from None
        except ConnectError:
            raise UpstreamError(f"cannot connect to provider '{self.name}'") from None
        except _RESET_ERRORS:
            raise UpstreamError(f"provider '{self.name}' closed the connection",
                                kind="reset") from None
        try:
            reply = await self._read(resp)
        except BaseException:
            resp.close()
            raise
        if call.method == "HEAD":
            # the length a GET would get: a HEAD answer states it without a body
            length = resp.header("content-length")
            if length is not None and length.isdigit() and length.isascii():
                reply.headers.append(("content-length", length))
        return reply

    async def _read(self, resp: Response) -> Reply:
        headers = response_headers(resp.headers, resp.header("connection"))
        if self._secret_texts:
            headers = self._masked_headers(headers)
        ctype = resp.header("content-type") or ""
        length = resp.content_length
        try:
            if resp.status >= 400 or not ctype.startswith("text/event-stream"):
                if length is not None and length <= self._max_buffered:
                    body = await resp.read()
                    resp.release()
                    return self._buffered(resp, headers, body)
                if length is None:
                    body, complete = await self._read_capped(resp)
                    if complete:
                        resp.release()
                        return self._buffered(resp, headers, body)
                    chunks = _chunks(resp)
                    if resp.status >= 400 and self._secrets:  # an error body past the cap
                        body, chunks = self._mask(body), _masked(chunks, self._mask)
                    return Reply(resp.status, headers, provider=self.name,
                                 stream=ReplyStream(body, chunks, resp))
            first = await resp.readany()
        except _RESET_ERRORS:
            raise UpstreamError(f"provider '{self.name}' closed the connection",
                                kind="reset") from None
        if not first:
            resp.release()
            return Reply(resp.status, headers, body=b"", provider=self.name)
        stream = ReplyStream(first, _chunks(resp), resp)
        return Reply(resp.status, headers, stream=stream, provider=self.name)

    async def _read_capped(self, resp: Response) -> tuple[bytes, bool]:
        """Read a body of unknown length up to the buffer cap: (bytes read, complete?).

        Past the cap the bytes read so far become the stream's first chunk."""
        content = resp
        parts: list[bytes] = []
        size = 0
        while True:
            if size > self._max_buffered:
                return b"".join(parts), False
            chunk = await content.readany()
            if not chunk:
                return b"".join(parts), True
            parts.append(chunk)
            size += len(chunk)

    def _buffered(self, resp: Response, headers: list[tuple[str, str]],
                  body: bytes) -> Reply:
        if resp.status >= 400 and self._secrets:
            body = self._mask(body)
        return Reply(resp.status, headers, body=body, provider=self.name)

    def _mask(self, body: bytes) -> bytes:
        for secret in self._secrets:
            if secret in body:
                body = body.replace(secret, b"[REDACTED]")
        return body

    def _masked_headers(self, headers: list[tuple[str, str]]) -> list[tuple[str, str]]:
        """``headers`` with any configured secret in a value masked (a copy only if so)."""
        out = headers
        for i, (name, value) in enumerate(headers):
            for secret in self._secret_texts:
                if secret in value:
                    if out is headers:
                        out = list(headers)
                    value = value.replace(secret, "[REDACTED]")
                    out[i] = (name, value)
        return out


async def _chunks(resp: Response) -> AsyncIterator[bytes]:
    """The rest of a streamed body, chunk by chunk as it arrives (no re-buffering)."""
    content = resp
    while True:
        try:
            chunk = await content.readany()
        except _RESET_ERRORS:
            raise UpstreamError("provider closed the stream", kind="reset") from None
        if not chunk:
            return
        yield chunk


async def _masked(chunks: AsyncIterator[bytes],
                  mask: Callable[[bytes], bytes]) -> AsyncIterator[bytes]:
    async for chunk in chunks:
        yield mask(chunk)


_BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})


def _host_port(url: URL) -> str:
    """The ``Host`` header for ``url``: host (bracketed when IPv6), and the port unless default."""
    host = url.raw_host or ""
    if ":" in host:
        host = f"[{host}]"
    if url.explicit_port is not None and url.port != {"http": 80, "https": 443}.get(url.scheme):
        return f"{host}:{url.port}"
    return host
