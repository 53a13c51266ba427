"""A naive aiohttp + uvloop pass-through: the floor any Python proxy hop pays.

No policies, no logs, no metrics: read the request, send it to the upstream on one pooled
session, buffer the answer (an SSE stream is relayed chunk by chunk), send it back.
``python bench/naive_proxy.py LISTEN UPSTREAM``.
"""

from __future__ import annotations

import sys

import aiohttp
import uvloop
from aiohttp import web

DROP = {"host", "content-length", "transfer-encoding", "connection", "content-encoding"}


def main(listen: str, upstream: str) -> None:
    async def handler(request: web.Request) -> web.Response:
        session: aiohttp.ClientSession = request.app["session"]
        headers = {k: v for k, v in request.headers.items() if k.lower() not in DROP}
        async with session.request(request.method, upstream + request.path_qs, headers=headers,
                                   data=await request.read(), allow_redirects=False) as resp:
            out = {k: v for k, v in resp.headers.items() if k.lower() not in DROP}
            if not resp.headers.get("content-type", "").startswith("text/event-stream"):
                return web.Response(status=resp.status, body=await resp.read(), headers=out)
            stream = web.StreamResponse(status=resp.status, headers=out)  # SSE: chunk by chunk
            await stream.prepare(request)
            async for chunk in resp.content.iter_any():
                await stream.write(chunk)
            await stream.write_eof()
            return stream

    async def session_ctx(app: web.Application):  # type: ignore[no-untyped-def]
        app["session"] = aiohttp.ClientSession()
        yield
        await app["session"].close()

    app = web.Application()
    app.cleanup_ctx.append(session_ctx)
    app.router.add_route("*", "/{tail:.*}", handler)
    host, port = listen.rsplit(":", 1)
    web.run_app(app, host=host, port=int(port), access_log=None, print=None, loop=uvloop.new_event_loop())


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
