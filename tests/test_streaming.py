"""Streaming relay (DESIGN §3, §8): SSE chunk by chunk, the commit point, broken streams,
idle/total timeouts after the commit, large non-SSE bodies streamed."""

from __future__ import annotations

import asyncio
import time

import orjson
from aiohttp import web

from tests.conftest import access_lines, wait_for
from tests.core_support import RawUpstream

CONFIG = """
version: 1
server: {{max_buffered_response: 64KiB}}
providers:
  p1: {{url: "{mock}", format: openai}}
routes:
  - name: chat
    match: {{path_prefix: /v1/chat/completions}}
    provider: p1
    timeout: {{attempt: 5s, total: {total}, first_byte: 5s, idle: {idle}}}
  - name: any
    match: {{path_prefix: /}}
    provider: p1
    timeout: {{idle: {idle}}}
"""

STREAM = {"model": "m1", "stream": True, "messages": []}


def sse_events(raw: bytes) -> list[tuple[str | None, bytes]]:
    """(event name, data) pairs of an SSE body."""
    out = []
    for block in raw.split(b"\n\n"):
        if not block.strip():
            continue
        event, data = None, b""
        for line in block.split(b"\n"):
            if line.startswith(b"event: "):
                event = line[7:].decode()
            elif line.startswith(b"data: "):
                data = line[6:]
        out.append((event, data))
    return out


async def start(make_proxy, mock_provider, *, total="30s", idle="10s"):
    return await make_proxy(CONFIG.format(mock=mock_provider.url, total=total, idle=idle))


async def test_sse_chunks_reach_the_client_before_the_stream_ends(mock_provider, make_proxy, http):
    """Each SSE chunk is relayed as it arrives: the first one is at the client long before
    the provider sends the last (no buffering in the proxy)."""
    proxy = await start(make_proxy, mock_provider)
    headers = {"x-mock-chunk-delay": "250ms", "x-mock-chunks": "5"}
    t0 = time.monotonic()
    async with http.post(proxy.data_url + "/v1/chat/completions", json=STREAM,
                         headers=headers) as resp:
        assert resp.status == 200
        assert resp.headers["content-type"].startswith("text/event-stream")
        assert "x-rp-cost-usd" not in resp.headers  # absent on streams
        arrivals: list[float] = []
        body = b""
        async for chunk in resp.content.iter_any():
            arrivals.append(time.monotonic() - t0)
            body += chunk
    # 4 gaps of 250 ms: the last chunk is sent ~1 s in; the first arrived well before
    assert arrivals[0] < 0.6 and arrivals[-1] > 0.9
    assert len(arrivals) >= 4
    events = sse_events(body)
    assert [orjson.loads(d)["choices"][0]["delta"]["content"] for _, d in events[:5]] == [
        f"word{i} " for i in range(5)]
    assert events[-1] == (None, b"[DONE]")


async def test_stream_usage_chunk_is_relayed(mock_provider, make_proxy, http, logs):
    """The final usage chunk (stream_options.include_usage) reaches the client intact."""
    proxy = await start(make_proxy, mock_provider)
    body = {**STREAM, "stream_options": {"include_usage": True}}
    async with http.post(proxy.data_url + "/v1/chat/completions", json=body) as resp:
        raw = await resp.read()
    usage = [orjson.loads(d)["usage"] for _, d in sse_events(raw) if b'"usage"' in d]
    assert usage and usage[0]["completion_tokens"] > 0
    line = access_lines(logs)[-1]
    assert line["outcome"] == "ok" and line["status"] == 200
    assert isinstance(line["t_upstream_first_byte"], float)
    assert line["t_upstream_total"] >= line["t_upstream_first_byte"] * 0  # a float, present


async def test_stream_broken_mid_way_gives_in_band_error(mock_provider, make_proxy, http, logs):
    """A provider that drops the stream after it was committed: the client gets an in-band
    ``event: error`` (never a silent clean end) and the log says stream_interrupted."""
    proxy = await start(make_proxy, mock_provider)
    async with http.post(proxy.data_url + "/v1/chat/completions", json=STREAM,
                         headers={"x-mock-drop": "mid-stream"}) as resp:
        assert resp.status == 200
        raw = await resp.read()
    events = sse_events(raw)
    assert events[0][0] is None and b"word0" in events[0][1]
    name, data = events[-1]
    err = orjson.loads(data)["error"]
    assert name == "error" and err["type"] == "upstream_error"
    assert err["request_id"] == resp.headers["x-request-id"] and err["route"] == "chat"
    assert b"[DONE]" not in raw
    await wait_for(lambda: len(access_lines(logs)) == 1)
    line = access_lines(logs)[0]
    assert line["outcome"] == "stream_interrupted" and line["status"] == 200
    assert "rp_requests_total{code=\"2xx\",outcome=\"stream_interrupted\",route=\"chat\"} 1.0" \
        in proxy.deps.metrics.render().decode()


async def test_idle_timeout_mid_stream_is_in_band_timeout(mock_provider, make_proxy, http, logs):
    """A gap between chunks longer than ``idle``, after the commit: in-band error, type
    timeout, naming the idle timer."""
    proxy = await start(make_proxy, mock_provider, idle="200ms")
    t0 = time.monotonic()
    async with http.post(proxy.data_url + "/v1/chat/completions", json=STREAM,
                         headers={"x-mock-chunk-delay": "3s"}) as resp:
        assert resp.status == 200
        raw = await resp.read()
    assert time.monotonic() - t0 < 2.5  # cut after ~200 ms, not after the 3 s gap
    name, data = sse_events(raw)[-1]
    err = orjson.loads(data)["error"]
    assert name == "error" and err["type"] == "timeout" and "idle" in err["message"]
    await wait_for(lambda: len(access_lines(logs)) == 1)
    assert access_lines(logs)[0]["outcome"] == "stream_interrupted"
    await wait_for(lambda: mock_provider.mock.cancelled == 1)  # the provider saw us hang up


async def test_total_timeout_mid_stream_names_total(mock_provider, make_proxy, http):
    """The stream counts toward ``total``: when total ends first, the in-band error names it."""
    proxy = await start(make_proxy, mock_provider, total="400ms", idle="10s")
    async with http.post(proxy.data_url + "/v1/chat/completions", json=STREAM,
                         headers={"x-mock-chunk-delay": "300ms", "x-mock-chunks": "10"}) as resp:
        raw = await resp.read()
    events = sse_events(raw)
    assert 1 <= len([e for e in events if e[0] is None]) < 10
    err = orjson.loads(events[-1][1])["error"]
    assert events[-1][0] == "error" and err["type"] == "timeout" and "total" in err["message"]


async def test_failure_before_first_chunk_falls_to_next_tier(mock_provider, make_proxy, http):
    """A stream that breaks before its first chunk is not committed: the next tier answers."""
    broken = await RawUpstream(response=b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
                                        b"transfer-encoding: chunked\r\n\r\n",
                               close_after=True).start()
    try:
        proxy = await make_proxy(f"""
providers:
  broken: {{url: "{broken.url}"}}
  good: {{url: "{mock_provider.url}"}}
routes:
  - name: chat
    match: {{path_prefix: /v1/}}
    tiers: [{{provider: broken}}, {{provider: good}}]
""")
        async with http.post(proxy.data_url + "/v1/chat/completions", json=STREAM) as resp:
            assert resp.status == 200
            assert resp.headers["x-rp-tier"] == "2" and resp.headers["x-rp-attempts"] == "2"
            raw = await resp.read()
        assert sse_events(raw)[-1] == (None, b"[DONE]")
        assert broken.connections == 1
    finally:
        await broken.stop()


async def _big_body_app(gap_s: float, parts: int) -> tuple[web.AppRunner, str]:
    async def handler(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"content-type": "application/octet-stream"})
        await resp.prepare(request)
        for i in range(parts):
            await resp.write(bytes([65 + i % 26]) * 32 * 1024)
            await asyncio.sleep(gap_s)
        await resp.write_eof()
        return resp

    app = web.Application()
    app.router.add_get("/{tail:.*}", handler)
    runner = web.AppRunner(app, access_log=None, handler_cancellation=True)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    return runner, f"http://127.0.0.1:{runner.addresses[0][1]}"


async def test_large_non_sse_body_is_streamed_intact(make_proxy, http):
    """A body of unknown length over max_buffered_response is relayed as a stream, intact."""
    runner, url = await _big_body_app(0.0, 8)  # 256 KiB > 64 KiB
    try:
        proxy = await make_proxy(CONFIG.format(mock=url, total="30s", idle="10s"))
        async with http.get(proxy.data_url + "/big") as resp:
            assert resp.status == 200
            body = await resp.read()
        assert body == b"".join(bytes([65 + i]) * 32 * 1024 for i in range(8))
    finally:
        await runner.cleanup()


async def test_non_sse_idle_timeout_cuts_the_connection(make_proxy, http, logs):
    """An idle gap in a streamed non-SSE body cannot be reported in-band: the connection is
    cut, so the client sees an incomplete body rather than a clean end."""
    runner, url = await _big_body_app(0.6, 4)
    try:
        proxy = await make_proxy(CONFIG.format(mock=url, total="30s", idle="300ms"))
        # below the buffer cap the first 32 KiB is buffered; 3 parts go past it
        body = b""
        truncated = False
        async with http.get(proxy.data_url + "/big") as resp:
            try:
                async for chunk in resp.content.iter_any():
                    body += chunk
            except Exception:
                truncated = True
        assert truncated or len(body) < 4 * 32 * 1024
        await wait_for(lambda: len(access_lines(logs)) == 1)
        assert access_lines(logs)[0]["outcome"] == "stream_interrupted"
    finally:
        await runner.cleanup()


async def test_client_leaving_mid_stream_cancels_upstream(mock_provider, make_proxy, logs):
    """A client that hangs up after the first chunk: the upstream stream is closed (the
    provider sees its caller go away) and the request is logged once as client_disconnected."""
    import aiohttp

    proxy = await start(make_proxy, mock_provider)
    async with aiohttp.ClientSession() as session:
        resp = await session.post(proxy.data_url + "/v1/chat/completions", json=STREAM,
                                  headers={"x-mock-chunk-delay": "300ms", "x-mock-chunks": "10"})
        assert b"word0" in await resp.content.readany()
        resp.close()  # drop the connection mid-stream
    await wait_for(lambda: len(access_lines(logs)) == 1)
    line = access_lines(logs)[0]
    assert line["status"] == 499 and line["outcome"] == "client_disconnected"
    await wait_for(lambda: mock_provider.mock.cancelled == 1)
