"""Client auth: when ``server.clients`` is set, a request must carry one of its keys.

Missing header: 401 ``unauthorized``; unknown key: 403 ``forbidden``. The key is compared in
constant time and never logged; ``call.client_id`` gets a short digest of it, which the
cache uses as the tenant identity (no cross-tenant hits).
"""

from __future__ import annotations

import hashlib
import hmac

from proxy.call import Call, Handler, Reply
from proxy.context import RouteContext
from proxy.errors import ClientAuthError


class ClientAuth:
    __slots__ = ("_header", "_keys")

    def __init__(self, header: str, keys: list[str]) -> None:
        self._header = header
        self._keys = tuple((k.encode(), hashlib.sha256(k.encode()).hexdigest()[:16]) for k in keys)

    async def __call__(self, call: Call, next_: Handler) -> Reply:
        presented = call.headers.get(self._header)
        if not presented:
            raise ClientAuthError(f"missing client key header '{self._header}'")
        given = presented.encode()
        client_id = None
        for key, digest in self._keys:
            if hmac.compare_digest(key, given):
                client_id = digest
        if client_id is None:
            raise ClientAuthError("unknown client key", forbidden=True)
        call.client_id = client_id
        return await next_(call)


def build_route(ctx: RouteContext) -> ClientAuth | None:
    clients = ctx.config.server.clients
    if clients is None:
        return None
    return ClientAuth(clients.header.lower(), clients.keys)
