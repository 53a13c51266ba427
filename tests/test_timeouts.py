"""The timeout policy (DESIGN §3, §8): attempt, total, first_byte, idle, each firing as a
504 ``timeout`` that names the timer that fired, and safe defaults without a block."""

from __future__ import annotations

import asyncio
import time

from aiohttp import web

from proxy.config import TimeoutConfig
from tests.conftest import access_lines

CONFIG = """
version: 1
providers:
  p1: {{url: "{mock}"}}
  p2: {{url: "{mock}"}}
routes:
  - name: timed
    match: {{path_prefix: /timed}}
    provider: p1
    timeout: {timeout}
  - name: two_tiers
    match: {{path_prefix: /tiers}}
    tiers: [{{provider: p1}}, {{provider: p2}}]
    timeout: {timeout}
  - name: bare
    match: {{path_prefix: /bare}}
    provider: p1
"""


async def proxy_with(make_proxy, url: str, timeout: str):
    return await make_proxy(CONFIG.format(mock=url, timeout=timeout))


async def expect_timeout(http, url: str, timer: str, headers: dict[str, str]) -> dict:
    t0 = time.monotonic()
    async with http.post(url, json={}, headers=headers) as resp:
        body = await resp.json()
        assert resp.status == 504, body
    assert time.monotonic() - t0 < 3.0  # fired on time, not after the provider's delay
    err = body["error"]
    assert err["type"] == "timeout"
    assert err["message"].startswith(f"the {timer} timeout"), err["message"]
    return err


async def test_attempt_timeout(mock_provider, make_proxy, http, logs):
    """An attempt longer than ``attempt`` ends with 504 naming ``attempt``."""
    proxy = await proxy_with(make_proxy, mock_provider.url,
                             "{attempt: 200ms, total: 10s, first_byte: 5s}")
    err = await expect_timeout(http, proxy.data_url + "/timed", "attempt", {"x-mock-delay": "5s"})
    assert "0.2s" in err["message"]
    line = access_lines(logs)[-1]
    assert line["status"] == 504 and line["outcome"] == "timeout" and line["attempts"] == 1


async def test_first_byte_timeout(mock_provider, make_proxy, http):
    """Response headers later than ``first_byte`` end with 504 naming ``first_byte``."""
    proxy = await proxy_with(make_proxy, mock_provider.url,
                             "{attempt: 5s, total: 10s, first_byte: 200ms}")
    await expect_timeout(http, proxy.data_url + "/timed", "first_byte", {"x-mock-delay": "5s"})


async def test_total_timeout(mock_provider, make_proxy, http):
    """A request longer than ``total`` ends with 504 naming ``total``."""
    proxy = await proxy_with(make_proxy, mock_provider.url,
                             "{attempt: 5s, total: 300ms, first_byte: 5s}")
    err = await expect_timeout(http, proxy.data_url + "/timed", "total", {"x-mock-delay": "5s"})
    assert "0.3s" in err["message"]


async def test_attempt_cut_to_total_is_named_total(mock_provider, make_proxy, http):
    """An attempt timer cut to what is left of ``total`` is reported as ``total``."""
    proxy = await proxy_with(make_proxy, mock_provider.url,
                             "{attempt: 1s, total: 250ms, first_byte: 900ms}")
    await expect_timeout(http, proxy.data_url + "/timed", "total", {"x-mock-delay": "5s"})


async def test_total_bounds_every_tier(mock_provider, make_proxy, http):
    """``total`` covers tiers too: tier 1 times out its attempt, tier 2 is cut by total."""
    proxy = await proxy_with(make_proxy, mock_provider.url,
                             "{attempt: 250ms, total: 400ms, first_byte: 5s}")
    await expect_timeout(http, proxy.data_url + "/tiers", "total", {"x-mock-delay": "5s"})
    assert mock_provider.mock.calls == 2


async def _slow_first_chunk_app() -> tuple[web.AppRunner, str]:
    async def handler(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await resp.prepare(request)  # headers at once...
        await asyncio.sleep(2.0)  # ...the first chunk much later
        await resp.write(b"data: late\n\n")
        await resp.write_eof()
        return resp

    app = web.Application()
    app.router.add_post("/{tail:.*}", handler)
    runner = web.AppRunner(app, access_log=None, handler_cancellation=True)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    return runner, f"http://127.0.0.1:{runner.addresses[0][1]}"


async def test_attempt_covers_a_stream_until_its_first_chunk(make_proxy, http):
    """For a streamed reply the attempt runs until the first chunk (the commit point), so
    headers alone do not stop the attempt timer: 504 ``attempt``, nothing committed."""
    runner, url = await _slow_first_chunk_app()
    try:
        proxy = await proxy_with(make_proxy, url, "{attempt: 300ms, total: 10s, first_byte: 5s}")
        await expect_timeout(http, proxy.data_url + "/timed", "attempt", {})
    finally:
        await runner.cleanup()


async def test_defaults_when_no_timeout_block(mock_provider, make_proxy):
    """A route without ``timeout`` still has finite timers: 30s / 120s / 30s / 60s."""
    proxy = await proxy_with(make_proxy, mock_provider.url, "{total: 1s}")
    bare = next(r for r in proxy.runtime.routes if r.name == "bare")
    assert bare.stable.timeout == TimeoutConfig()
    t = bare.stable.timeout
    assert (t.attempt, t.total, t.first_byte, t.idle) == (30.0, 120.0, 30.0, 60.0)
    assert bare.total_s == 120.0


async def test_partial_block_keeps_other_defaults(mock_provider, make_proxy, http):
    """Setting one timer leaves the others at their safe defaults; the set one fires."""
    proxy = await proxy_with(make_proxy, mock_provider.url, "{total: 300ms}")
    timed = next(r for r in proxy.runtime.routes if r.name == "timed")
    assert (timed.stable.timeout.attempt, timed.stable.timeout.idle) == (30.0, 60.0)
    await expect_timeout(http, proxy.data_url + "/timed", "total", {"x-mock-delay": "5s"})


async def test_attempt_timeout_moves_to_next_tier(mock_provider, make_proxy, http, logs):
    """An attempt timeout is a tier failure, not the end: the next tier answers in time."""
    runner, slow_url = await _slow_first_chunk_app()
    try:
        proxy = await make_proxy(f"""
providers:
  slow: {{url: "{slow_url}"}}
  fast: {{url: "{mock_provider.url}"}}
routes:
  - name: r
    match: {{path_prefix: /}}
    tiers: [{{provider: slow}}, {{provider: fast}}]
    timeout: {{attempt: 300ms, total: 5s}}
""")
        async with http.post(proxy.data_url + "/v1/chat/completions", json={}) as resp:
            assert resp.status == 200 and resp.headers["x-rp-tier"] == "2"
        line = access_lines(logs)[-1]
        assert line["attempts"] == 2 and line["tier"] == 2
        assert [a["error"] for a in line["attempt_log"]] == ["timeout", None]
    finally:
        await runner.cleanup()
