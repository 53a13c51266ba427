"""The response cache's key (see :mod:`policies.cache`): one hex sha256 per request.

**Key** — sha256 over length-prefixed parts: method, route, path, raw query, the canary arm,
the client identity (``call.client_id``, set when ``server.clients`` is), the listed
request headers (absent and empty differ), and the body: JSON re-encoded with sorted keys
and ``ignore_json_fields`` removed (a top-level name, or a dotted path into nested objects:
``metadata.trace_id``; arrays are not descended), else the raw bytes. When a tier's provider
is pass-through (configures no headers) the app's own credentials reach the provider, so a
digest of them is part of the key: a request can never be answered with a reply that was
paid for, or authorised, by another key.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from typing import Any

import orjson

from proxy.call import Call
from proxy.config import CacheKeyConfig

#: sha256 over this, then each part as its 8-byte big-endian length and its bytes
_KEY_PREFIX = b"rp-cache-key-1"
_PREFIXES_MAX = 1024


class CacheKey:
    """Builds a request's cache key (hex sha256); compiled once per route."""

    __slots__ = ("_body", "_credentials", "_headers", "_ignore", "_names", "_prefixes",
                 "_route", "_route_part")

    def __init__(self, route: str, cfg: CacheKeyConfig, credentials: Iterable[str] = ()) -> None:
        self._route = route.encode()
        self._route_part = len(self._route).to_bytes(8, "big") + self._route
        self._body = cfg.body
        self._headers = tuple(cfg.headers)
        self._ignore = tuple(tuple(p.split(".")) for p in cfg.ignore_json_fields)
        self._credentials = tuple(sorted(credentials))
        self._names = self._headers + self._credentials
        #: the encoded head parts by (method, path, query, arm, client): most requests
        #: repeat a handful of them (bounded: cleared when full)
        self._prefixes: dict[tuple[str, str, str, str, str], bytes] = {}

    def __call__(self, call: Call) -> str:
        # every part length-prefixed, hashed in one call
        head = (call.method, call.path, call.query, call.arm.name, call.client_id or "")
        prefix = self._prefixes.get(head)
        if prefix is None:
            pieces = [_KEY_PREFIX]
            for text in head:
                data = text.encode(errors="surrogatepass")
                pieces += (len(data).to_bytes(8, "big"), data)
            pieces.append(self._route_part)
            prefix = b"".join(pieces)
            if len(self._prefixes) >= _PREFIXES_MAX:
                self._prefixes.clear()
            self._prefixes[head] = prefix
        parts = [prefix]
        headers = call.headers
        for name in self._names:
            values = headers.getall(name, None)
            data = b"-" if values is None else \
                b"+" + "\x00".join(values).encode(errors="surrogatepass")
            parts += (len(data).to_bytes(8, "big"), data)
        if self._body:
            json_data = call.json()
            data = b"raw:" + call.body if json_data is None else \
                b"json:" + normalised_json(json_data, self._ignore)
            parts += (len(data).to_bytes(8, "big"), data)
        return hashlib.sha256(b"".join(parts)).hexdigest()


def normalised_json(data: Any, ignore: tuple[tuple[str, ...], ...] = ()) -> bytes:
    """``data`` encoded with sorted keys (at any depth) and the ``ignore`` paths removed."""
    for path in ignore:
        data = _without(data, path)
    return orjson.dumps(data, option=orjson.OPT_SORT_KEYS)


def _without(data: Any, path: tuple[str, ...]) -> Any:
    """``data`` without the field at ``path``; copies only along the path (never mutates)."""
    if not isinstance(data, dict) or path[0] not in data:
        return data
    out = dict(data)
    if len(path) == 1:
        del out[path[0]]
    else:
        out[path[0]] = _without(out[path[0]], path[1:])
    return out
