"""The upstream client: one pooled ``ClientSession`` per provider, one attempt per call.

:meth:`ProviderClient.send` makes one attempt and returns a :class:`~proxy.call.Reply`
for any HTTP status, or raises an attempt-level error (connect error, reset, first-byte
timeout). The URL comes only from the provider's config: the request contributes its path
and query, never a scheme, host or port. Redirects are never followed.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import aiohttp
from yarl import URL

from proxy.call import Call, Reply, ReplyStream
from proxy.config import ProviderConfig, TierConfig
from proxy.errors import Timeout, UpstreamError
from proxy.headers import HeaderRules, response_headers

#: the provider closed or broke the connection (anything the client library raises once the
#: connection exists; connect failures are ``ClientConnectorError``, caught first)
_RESET_ERRORS = (aiohttp.ClientError,)


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
        self._max_buffered = max_buffered
        self.session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        connector = aiohttp.TCPConnector(
            limit=self.cfg.max_connections, limit_per_host=0, ttl_dns_cache=300,
            keepalive_timeout=30,
        )
        self.session = aiohttp.ClientSession(
            connector=connector,
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=10),
            cookie_jar=aiohttp.DummyCookieJar(),
            auto_decompress=True,
            raise_for_status=False,
            # the client's own User-Agent goes through; none is invented for it
            skip_auto_headers=("User-Agent",),
        )

    async def close(self) -> None:
        if self.session is not None:
            await self.session.close()

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

    async def send(self, call: Call, tier: TierConfig, body: bytes) -> Reply:
        """One upstream attempt; the caller bounds it with the attempt timer."""
        assert self.session is not None
        headers = self.rules.upstream(call.headers, call.request_id)
        fb_s = call.arm.timeout.first_byte
        left = call.time_left()
        timer = "first_byte" if fb_s < left else "total"
        limit = min(fb_s, left)
        try:
            async with asyncio.timeout(max(limit, 0.0)):
                resp = await self.session.request(
                    call.method, self.url(call, tier), data=body or None, headers=headers,
                    allow_redirects=False, compress=None,
                )
            # the response headers are in: the real first byte of this attempt
            call.timings["t_upstream_first_byte"] = (call.clock.monotonic() - call.started) * 1000
        except TimeoutError:
            raise Timeout(timer, fb_s if timer == "first_byte" else call.arm.timeout.total) \
                from None
        except aiohttp.ClientConnectorError:
            raise UpstreamError(f"cannot connect to provider '{self.name}'") from None
        except _RESET_ERRORS:
            raise UpstreamError(f"provider '{self.name}' closed the connection",
                                kind="reset") from None
        try:
            return await self._read(resp)
        except BaseException:
            resp.close()
            raise

    async def _read(self, resp: aiohttp.ClientResponse) -> Reply:
        headers = response_headers(resp.headers.items(), resp.headers.get("connection"))
        ctype = resp.headers.get("content-type", "")
        length = resp.content_length
        try:
            if not ctype.startswith("text/event-stream"):
                if length is not None and length <= self._max_buffered:
                    return self._buffered(resp, headers, await resp.read())
                if length is None:
                    body, complete = await self._read_capped(resp)
                    if complete:
                        return self._buffered(resp, headers, body)
                    return Reply(resp.status, headers, provider=self.name,
                                 stream=ReplyStream(body, _chunks(resp), resp))
            first = await resp.content.readany()
        except _RESET_ERRORS:
            raise UpstreamError(f"provider '{self.name}' closed the connection",
                                kind="reset") from None
        if not first:
            resp.release()
            return Reply(resp.status, headers, body=b"", provider=self.name)
        stream = ReplyStream(first, _chunks(resp), resp)
        return Reply(resp.status, headers, stream=stream, provider=self.name)

    async def _read_capped(self, resp: aiohttp.ClientResponse) -> tuple[bytes, bool]:
        """Read a body of unknown length up to the buffer cap: (bytes read, complete?).

        Past the cap the bytes read so far become the stream's first chunk."""
        content = resp.content
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

    def _buffered(self, resp: aiohttp.ClientResponse, headers: list[tuple[str, str]],
                  body: bytes) -> Reply:
        if resp.status >= 400 and self._secrets:
            for secret in self._secrets:
                if secret in body:
                    body = body.replace(secret, b"[REDACTED]")
        return Reply(resp.status, headers, body=body, provider=self.name)


async def _chunks(resp: aiohttp.ClientResponse) -> AsyncIterator[bytes]:
    """The rest of a streamed body, chunk by chunk as it arrives (no re-buffering)."""
    content = resp.content
    while True:
        try:
            chunk = await content.readany()
        except _RESET_ERRORS:
            raise UpstreamError("provider closed the stream", kind="reset") from None
        if not chunk:
            return
        yield chunk
