"""The figures of issue #3, measured for real: the proxy and the mock provider in this
process on 127.0.0.1 ephemeral ports, the real clock. Bounded (~10 s), loopback only.

    python bench/resilience_figures.py

1. ``429, Retry-After: 1`` then 200: status, ``x-rp-attempts``, the wall time (≈1 s).
2. ``Retry-After: 120`` with ``total: 5s``: status, ``Retry-After``, the wall time (≪ 1 s).
3. 100 concurrent requests to an always-503 provider, ``attempts: 3``: upstream calls with
   the retry budget (``ratio: 0.2``) and without it (``ratio: 1``).
4. The breaker: server-side time to answer while open (median, µs: the access log's
   ``t_total``; and the breaker's own check), client round trip while open vs. closed, and
   the half-open recovery after ``open_for``.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from typing import Any

import aiohttp
import structlog

from proxy import accesslog
from proxy.loader import parse_config
from proxy.metrics import Metrics
from proxy.mock import start_mock
from proxy.server import ProxyServer

CHAT = "/v1/chat/completions"
BODY = {"model": "m1", "messages": [{"role": "user", "content": "hi"}]}


def yaml(url: str, retry: str = "{}", timeout: str = "{}", breaker: str | None = None) -> str:
    cb = f", circuit_breaker: {breaker}" if breaker else ""
    return f"""
version: 1
server: {{max_concurrent_requests: 4096}}
providers:
  p1: {{url: "{url}", format: openai, max_connections: 200{cb}}}
routes:
  - name: chat
    match: {{path_prefix: {CHAT}}}
    provider: p1
    timeout: {timeout}
    retry: {retry}
"""


async def start(text: str) -> ProxyServer:
    server = ProxyServer(parse_config(text, "<bench>", env={}), metrics=Metrics())
    await server.start(listen="127.0.0.1:0", admin_listen="127.0.0.1:0")
    return server


async def post(http: aiohttp.ClientSession, url: str, headers: dict[str, str] | None = None
               ) -> tuple[int, Any, float]:
    t0 = time.perf_counter()
    async with http.post(url + CHAT, json=BODY, headers=headers or {}) as resp:
        await resp.read()
        return resp.status, resp.headers, time.perf_counter() - t0


async def figure_1(http: aiohttp.ClientSession, mock_url: str) -> None:
    proxy = await start(yaml(mock_url))
    try:
        status, headers, took = await post(http, proxy.data_url, {
            "x-mock-status": "429", "x-mock-retry-after": "1", "x-mock-fail-first": "1",
            "x-mock-key": "fig1"})
        print(f"1. 429 + Retry-After: 1, then 200 -> status {status}, "
              f"x-rp-attempts {headers['x-rp-attempts']}, wall time {took:.3f} s "
              f"(backoff alone would be 0-0.2 s)")
    finally:
        await proxy.stop()


async def figure_2(http: aiohttp.ClientSession, mock_url: str) -> None:
    proxy = await start(yaml(mock_url, retry="{retry_after: {max: 10m}}", timeout="{total: 5s}"))
    try:
        status, headers, took = await post(http, proxy.data_url, {
            "x-mock-status": "429", "x-mock-retry-after": "120"})
        print(f"2. Retry-After: 120 with total 5s -> status {status}, "
              f"Retry-After {headers.get('retry-after')}, x-rp-attempts "
              f"{headers['x-rp-attempts']}, wall time {took * 1000:.1f} ms")
    finally:
        await proxy.stop()


async def figure_3(http: aiohttp.ClientSession, mock: Any, mock_url: str) -> None:
    for label, budget in (("ratio 0.2 (min_per_second 5)", "{ratio: 0.2}"),
                          ("no budget (ratio 1.0)", "{ratio: 1.0, min_per_second: 0}")):
        proxy = await start(yaml(mock_url, retry=f"{{attempts: 3, budget: {budget}}}"))
        try:
            mock.reset()
            t0 = time.perf_counter()
            results = await asyncio.gather(*(post(http, proxy.data_url, {
                "x-mock-status": "503", "x-mock-delay": "20ms"}) for _ in range(100)))
            took = time.perf_counter() - t0
            async with http.get(mock_url + "/mock/stats") as resp:
                calls = (await resp.json())["calls"]
            refused = proxy.deps.metrics.registry.get_sample_value(
                "rp_retries_total", {"route": "chat", "reason": "budget_exhausted"}) or 0
            statuses = {s for s, _, _ in results}
            print(f"3. 100 concurrent, always 503, attempts 3, {label}: provider received "
                  f"{calls} calls (max 300), budget_exhausted {int(refused)}, "
                  f"statuses {sorted(statuses)}, {took:.2f} s")
        finally:
            await proxy.stop()


async def figure_4(http: aiohttp.ClientSession, mock: Any, mock_url: str,
                   logs: list[dict[str, Any]]) -> None:
    breaker = "{failure_rate: 0.5, min_requests: 5, window: 10s, open_for: 2s}"
    proxy = await start(yaml(mock_url, breaker=breaker))
    try:
        for _ in range(5):
            await post(http, proxy.data_url, {"x-mock-status": "503"})
        opened = time.perf_counter()
        mock.reset()
        mark = len(logs)
        open_rtt = [(await post(http, proxy.data_url))[2] for _ in range(200)]
        lines = [e for e in logs[mark:] if e.get("event") == "request"]
        server_ms = [e["t_total"] for e in lines]
        assert all(e["status"] == 503 and e["outcome"] == "circuit_open" for e in lines)
        calls_while_open = mock.calls
        breaker_obj = proxy.runtime.registry["circuit"]["p1"]
        check_us = []
        for _ in range(2000):
            t0 = time.perf_counter()
            try:
                breaker_obj.admit(None)
            except Exception:
                pass
            check_us.append((time.perf_counter() - t0) * 1e6)
        print(f"4. breaker open: server-side answer median {statistics.median(server_ms) * 1000:.0f} µs "
              f"(access-log t_total, n={len(server_ms)}); breaker check median "
              f"{statistics.median(check_us):.2f} µs; client round trip median "
              f"{statistics.median(open_rtt) * 1e6:.0f} µs; provider calls while open: "
              f"{calls_while_open}")
        await asyncio.sleep(max(0.0, 2.0 - (time.perf_counter() - opened)) + 0.05)
        mark = len(logs)
        status, _, _ = await post(http, proxy.data_url)
        after, _, _ = await post(http, proxy.data_url)
        changes = [(e["previous"], e["state"]) for e in logs[mark:]
                   if e.get("event") == "circuit_state_changed"]
        recovered = time.perf_counter() - opened
        closed_rtt = [(await post(http, proxy.data_url))[2] for _ in range(200)]
        print(f"   half-open recovery {recovered:.2f} s after opening (open_for 2s): probe -> "
              f"{status}, next request -> {after}, state changes {changes}, state now "
              f"{breaker_obj.state_name()}; closed round trip median "
              f"{statistics.median(closed_rtt) * 1e6:.0f} µs (to the mock, for scale)")
    finally:
        await proxy.stop()


async def main() -> None:
    accesslog.configure("info", cache=False)
    mock, runner, mock_url = await start_mock()
    try:
        with structlog.testing.capture_logs() as logs:  # read, not printed
            async with aiohttp.ClientSession(
                    connector=aiohttp.TCPConnector(limit=200),
                    timeout=aiohttp.ClientTimeout(total=30)) as http:
                await asyncio.wait_for(figure_1(http, mock_url), 10)
                await asyncio.wait_for(figure_2(http, mock_url), 10)
                await asyncio.wait_for(figure_3(http, mock, mock_url), 20)
                await asyncio.wait_for(figure_4(http, mock, mock_url, logs), 20)
    finally:
        await runner.cleanup()


if __name__ == "__main__":
    asyncio.run(main())
