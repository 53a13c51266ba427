"""Helpers for the cache tests: an upstream that answers with chosen headers, and readers
for the proxy's metrics."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import orjson
from aiohttp import web

from proxy.server import ProxyServer


@dataclass
class Echo:
    """A real upstream on loopback: ``x-echo-header: name=value`` (repeatable) is sent back as
    a response header, ``x-echo-size: N`` pads the JSON body to about N bytes."""

    url: str = ""
    calls: int = 0
    bodies: list[bytes] = field(default_factory=list)

    async def handle(self, request: web.Request) -> web.Response:
        self.calls += 1
        body = await request.read()
        self.bodies.append(body)
        headers = [tuple(h.split("=", 1)) for h in request.headers.getall("x-echo-header", [])]
        pad = "x" * int(request.headers.get("x-echo-size", "0"))
        data = orjson.dumps({"n": self.calls, "pad": pad})
        resp = web.Response(body=data, content_type="application/json")
        for name, value in headers:
            resp.headers.add(name, value)
        return resp


@asynccontextmanager
async def running_echo() -> AsyncIterator[Echo]:
    """Serve an :class:`Echo` on 127.0.0.1:<free> for the duration of the block."""
    echo = Echo()
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", echo.handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    echo.url = f"http://127.0.0.1:{runner.addresses[0][1]}"
    try:
        yield echo
    finally:
        await runner.cleanup()


def metric(proxy: ProxyServer, name: str, **labels: str) -> float:
    value = proxy.deps.metrics.registry.get_sample_value(name, labels)
    return value or 0.0


def cache_results(proxy: ProxyServer, route: str = "chat") -> dict[str, float]:
    """rp_cache_requests_total by result, zeros left out."""
    out = {}
    for result in ("hit", "miss", "bypass", "refresh", "coalesced"):
        n = metric(proxy, "rp_cache_requests_total", route=route, result=result)
        if n:
            out[result] = n
    return out
