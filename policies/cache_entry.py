"""A cached reply as stored in the cache's KV (see :mod:`policies.cache`): the reply's status,
its headers less the per-request ones, its body (a stream's chunks end to end, with their
lengths so a hit replays it as the same stream) and when it was stored."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import NamedTuple

import orjson

from proxy.call import Reply, ReplyStream

_FORMAT = b"RPC1"
_PER_REQUEST = frozenset({"x-request-id", "request-id", "date", "age", "set-cookie",
                          "server-timing", "retry-after", "content-length"})
_PER_REQUEST_PREFIXES = ("x-rp-", "x-ratelimit-")


class Entry(NamedTuple):
    """A stored reply. Encoded as ``RPC1`` + 4-byte meta length + JSON meta + raw body."""

    status: int
    headers: tuple[tuple[str, str], ...]
    body: bytes  # the buffered body, or the stream's chunks end to end
    chunks: tuple[int, ...] | None  # chunk lengths when it was a stream
    provider: str | None
    model: str | None
    stored_at: float  # unix seconds

    @classmethod
    def of(cls, reply: Reply, body: bytes, chunks: tuple[int, ...] | None, now: float) -> Entry:
        headers = tuple((k, v) for k, v in reply.headers
                        if k not in _PER_REQUEST and not k.startswith(_PER_REQUEST_PREFIXES))
        return cls(reply.status, headers, body, chunks, reply.provider, reply.model, now)

    def encode(self) -> bytes:
        meta = orjson.dumps({"s": self.status, "h": self.headers, "c": self.chunks,
                             "p": self.provider, "m": self.model, "t": self.stored_at})
        return b"".join((_FORMAT, len(meta).to_bytes(4, "big"), meta, self.body))

    @classmethod
    def decode(cls, data: bytes) -> Entry | None:
        """The entry, or None for bytes this version cannot read (treated as a miss)."""
        if not data.startswith(_FORMAT) or len(data) < 8:
            return None
        end = 8 + int.from_bytes(data[4:8], "big")
        try:
            m = orjson.loads(data[8:end])
            chunks = None if m["c"] is None else tuple(int(n) for n in m["c"])
            return cls(int(m["s"]), tuple((str(k), str(v)) for k, v in m["h"]), data[end:],
                       chunks, m["p"], m["m"], float(m["t"]))
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
            return None

    def reply(self, now: float, *, cached: bool = True) -> Reply:
        """A fresh Reply: a hit (``source="cache"``) or a coalesced copy of a leader's answer."""
        headers = list(self.headers)
        if cached:
            headers.append(("age", str(max(0, int(now - self.stored_at)))))
        source = "cache" if cached else "provider"
        if self.chunks is None:
            return Reply(self.status, headers, body=self.body, provider=self.provider,
                         model=self.model, cost_usd=0.0, source=source)
        parts, at = [], 0
        for n in self.chunks:
            parts.append(self.body[at:at + n])
            at += n
        stream = ReplyStream(parts[0], _replay(parts[1:]))
        return Reply(self.status, headers, stream=stream, provider=self.provider,
                     model=self.model, cost_usd=0.0, source=source)


async def _replay(parts: list[bytes]) -> AsyncIterator[bytes]:
    for part in parts:
        yield part
