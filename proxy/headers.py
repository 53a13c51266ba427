"""Header rules, precomputed once per provider per config load.

Toward the provider we drop: hop-by-hop headers (RFC 9110 §7.6.1, and any named in the
request's ``Connection``), ``host``/``content-length`` (set by the client library),
``accept-encoding`` (the client library negotiates compression upstream and decompresses),
``x-rp-*`` control headers, the ``server.clients`` header, and — when the provider configures
any header — the client's own credentials and any header named like a configured one.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from multidict import CIMultiDictProxy

HOP_BY_HOP = frozenset({
    "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "proxy-connection",
    "te", "trailer", "transfer-encoding", "upgrade",
})
CREDENTIALS = frozenset({"authorization", "x-api-key", "api-key", "x-goog-api-key"})
_REQUEST_ALWAYS = HOP_BY_HOP | {"host", "content-length", "accept-encoding", "expect"}
#: response headers the proxy recomputes (the body was decompressed / re-framed)
_RESPONSE_DROP = HOP_BY_HOP | {"content-length", "content-encoding"}


class HeaderRules:
    """What one provider's requests carry, and what its responses give back."""

    __slots__ = ("drop", "inject")

    def __init__(self, configured: Mapping[str, str], clients_header: str | None) -> None:
        drop = set(_REQUEST_ALWAYS)
        if clients_header:
            drop.add(clients_header.lower())
        if configured:
            drop |= CREDENTIALS
            drop |= set(configured)
        self.drop = frozenset(drop)
        self.inject = tuple(configured.items())

    def client_items(self, client: CIMultiDictProxy[str]) -> list[tuple[str, str]]:
        """The client's headers that go upstream, as a list (no multidict per request); the
        caller adds ``inject`` (the provider's configured headers) and ``x-request-id``."""
        drop = self.drop
        conn = client.get("connection")
        if conn:
            drop = drop | {t.strip().lower() for t in conn.split(",")}
        return [(name, value) for name, value in client.items()
                if (low := name.lower()) not in drop and low != "x-request-id"
                and not low.startswith("x-rp-")]


def response_headers(upstream: Iterable[tuple[str, str]], connection: str | None) -> list[tuple[str, str]]:
    """The provider's response headers, minus hop-by-hop and re-framed ones (lower-cased)."""
    drop = _RESPONSE_DROP
    if connection:
        drop = drop | {t.strip().lower() for t in connection.split(",")}
    return [(k.lower(), v) for k, v in upstream if k.lower() not in drop]
