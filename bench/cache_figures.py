"""The figures of issue #5 (shared state and the response cache), measured for real.

Real processes on 127.0.0.1 ephemeral ports: the mock provider (``python -m proxy mock``), a
private ``redis-server`` (never the machine's 6379), and proxies (``python -m proxy run``).
Bounded (about 40 s in all), loopback only; every process it starts is stopped at the end.

    python bench/cache_figures.py [FIGURE ...]     # all four by default

1. 100 concurrent identical requests on a cold cache (provider answers in 200 ms): upstream
   calls received, memory and Redis backends.
2. Two proxy processes sharing one Redis: a reply cached through A is a hit through B; and
   100 concurrent identical requests split over A and B: upstream calls.
3. Redis killed under steady traffic (8 clients, ~9 s; Redis down from 2 s to 5 s): errors
   seen by clients, cache results per phase, /readyz during the outage, state errors
   counted, and the time from the restart to the first hit.
4. Latency p50 (client round trip, sequential, keep-alive) of a cache hit vs a pass-through
   (the same request on a route without cache) and of a miss, memory and Redis backends.
"""

from __future__ import annotations

import asyncio
import statistics
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import aiohttp
import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._support import Procs, Proxy, Redis

CHAT = "/v1/chat/completions"
BODY = {"model": "m1", "messages": [{"role": "user", "content": "barcode 8801234567893"}]}


def config_text(mock_url: str, state: str) -> str:
    return f"""
version: 1
server: {{max_concurrent_requests: 4096}}
state: {state}
providers:
  p1: {{url: "{mock_url}", format: openai, max_connections: 200}}
routes:
  - name: plain
    match: {{path_prefix: {CHAT}, headers: {{x-route: plain}}}}
    provider: p1
  - name: chat
    match: {{path_prefix: {CHAT}}}
    provider: p1
    cache: {{ttl: 1h, key: {{ignore_json_fields: [user]}}}}
"""


def start_proxy(procs: Procs, mock_url: str, state: str, name: str) -> Proxy:
    return procs.proxy(config_text(mock_url, state), name, log_level="warning")


async def metric(http: aiohttp.ClientSession, proxy: Proxy, name: str, **labels: str) -> float:
    async with http.get(proxy.admin + "/metrics") as resp:
        text = await resp.text()
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in text.splitlines():
        if line.startswith(f"{name}{{{want}}} "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


async def mock_calls(http: aiohttp.ClientSession, mock_url: str) -> int:
    async with http.get(mock_url + "/mock/stats") as resp:
        return int((await resp.json())["calls"])


async def post(http: aiohttp.ClientSession, url: str, body: Any = None,
               headers: dict[str, str] | None = None) -> tuple[int, str, float]:
    t0 = time.perf_counter()
    try:
        async with http.post(url + CHAT, data=orjson.dumps(body or BODY),
                             headers=headers or {}) as resp:
            await resp.read()
            return resp.status, resp.headers.get("x-rp-cache", "-"), time.perf_counter() - t0
    except aiohttp.ClientError as exc:
        return 0, type(exc).__name__, time.perf_counter() - t0


# --------------------------------------------------------------------------- figures


async def figure_1(http: aiohttp.ClientSession, procs: Procs, mock_url: str, redis: Redis) -> None:
    print("1. 100 concurrent identical requests, cold cache, provider latency 200 ms")
    for backend, state in (("memory", "{backend: memory}"),
                           ("redis", f'{{backend: redis, redis: {{url: "{redis.url}"}}}}')):
        proxy = start_proxy(procs, mock_url, state, f"fig1-{backend}")
        before = await mock_calls(http, mock_url)
        body = {**BODY, "fig": f"1-{backend}"}
        replies = await asyncio.gather(*(post(http, proxy.url, body, {"x-mock-delay": "200ms"})
                                         for _ in range(100)))
        calls = await mock_calls(http, mock_url) - before
        statuses = Counter(s for s, _, _ in replies)
        caches = Counter(c for _, c, _ in replies)
        print(f"   {backend:6}: upstream calls {calls}; statuses {dict(statuses)}; "
              f"x-rp-cache {dict(caches)}")
        procs.stop(proxy.proc)


async def figure_2(http: aiohttp.ClientSession, procs: Procs, mock_url: str, redis: Redis) -> None:
    print("2. two proxy processes sharing one Redis")
    state = f'{{backend: redis, redis: {{url: "{redis.url}"}}}}'
    a = start_proxy(procs, mock_url, state, "fig2-a")
    b = start_proxy(procs, mock_url, state, "fig2-b")
    before = await mock_calls(http, mock_url)
    body = {**BODY, "fig": "2"}
    sa, ca, _ = await post(http, a.url, body)
    sb, cb, _ = await post(http, b.url, body)
    calls = await mock_calls(http, mock_url) - before
    print(f"   via A: {sa} x-rp-cache {ca}; then via B: {sb} x-rp-cache {cb}; "
          f"upstream calls {calls}")
    before = await mock_calls(http, mock_url)
    body = {**BODY, "fig": "2-concurrent"}
    replies = await asyncio.gather(*(post(http, p.url, body, {"x-mock-delay": "200ms"})
                                     for _ in range(50) for p in (a, b)))
    calls = await mock_calls(http, mock_url) - before
    print(f"   100 concurrent identical requests, 50 to A and 50 to B: upstream calls {calls}; "
          f"statuses {dict(Counter(s for s, _, _ in replies))}; "
          f"x-rp-cache {dict(Counter(c for _, c, _ in replies))}")
    procs.stop(a.proc)
    procs.stop(b.proc)


async def figure_3(http: aiohttp.ClientSession, procs: Procs, mock_url: str, redis: Redis) -> None:
    print("3. Redis killed under steady traffic (8 clients; Redis down from t=2 s to t=5 s)")
    state = f'{{backend: redis, redis: {{url: "{redis.url}", timeout: 100ms}}}}'
    proxy = start_proxy(procs, mock_url, state, "fig3")
    t0 = time.monotonic()
    phases: dict[str, Counter[tuple[int, str]]] = {p: Counter() for p in ("before", "down", "after")}
    state_box = {"phase": "before", "restarted_at": 0.0, "first_hit_after": None}
    latencies: dict[str, list[float]] = {p: [] for p in phases}

    async def client(n: int) -> None:
        i = 0
        while time.monotonic() - t0 < 9.0:
            # 5 distinct requests per client, none shared between clients: a hit comes from
            # the store, never from coalescing with another client's identical request
            body = {**BODY, "fig": "3", "client": n, "item": i % 5}
            i += 1
            status, cache, took = await post(http, proxy.url, body)
            phase = state_box["phase"]
            phases[phase][(status, cache)] += 1
            latencies[phase].append(took)
            if phase == "after" and cache == "hit" and state_box["first_hit_after"] is None:
                state_box["first_hit_after"] = time.monotonic() - state_box["restarted_at"]

    async def chaos() -> None:
        await asyncio.sleep(2.0)
        redis.kill()
        state_box["phase"] = "down"
        await asyncio.sleep(1.0)
        async with http.get(proxy.admin + "/readyz") as resp:
            print(f"   /readyz while Redis is down: {resp.status}")
        await asyncio.sleep(2.0)
        redis.start()
        state_box["restarted_at"] = time.monotonic()
        state_box["phase"] = "after"

    await asyncio.gather(chaos(), *(client(n) for n in range(8)))
    errors = sum(n for phase in phases.values() for (s, _), n in phase.items() if s != 200)
    total = sum(sum(phase.values()) for phase in phases.values())
    print(f"   requests {total}, errors seen by clients: {errors}")
    for phase, counts in phases.items():
        results = Counter()
        for (_, cache), n in counts.items():
            results[cache] += n
        p50 = statistics.median(latencies[phase]) * 1000 if latencies[phase] else 0.0
        print(f"   {phase:6}: {dict(results)}  p50 {p50:.2f} ms")
    first = state_box["first_hit_after"]
    print(f"   first cache hit {first * 1000:.0f} ms after the restart" if first is not None
          else "   no hit after the restart")
    errors_counted = await metric(http, proxy, "rp_state_errors_total", feature="cache")
    print(f"   rp_state_errors_total{{feature=\"cache\"}} = {errors_counted:.0f}")
    procs.stop(proxy.proc)


async def figure_4(http: aiohttp.ClientSession, procs: Procs, mock_url: str, redis: Redis) -> None:
    print("4. latency p50 / p90, 400 sequential requests each (client round trip, keep-alive)")
    n = 400
    for backend, state in (("memory", "{backend: memory}"),
                           ("redis", f'{{backend: redis, redis: {{url: "{redis.url}"}}}}')):
        proxy = start_proxy(procs, mock_url, state, f"fig4-{backend}")
        body = {**BODY, "fig": f"4-{backend}"}
        for _ in range(50):  # warm connections, both paths
            await post(http, proxy.url, body, {"x-route": "plain"})
            await post(http, proxy.url, body)
        plain = [(await post(http, proxy.url, body, {"x-route": "plain"}))[2] for _ in range(n)]
        hits = [(await post(http, proxy.url, body))[2] for _ in range(n)]
        misses = [(await post(http, proxy.url, {**body, "user": None, "u": i}))[2]
                  for i in range(n)]

        def q(xs: list[float], p: float) -> float:
            return sorted(xs)[int(p * (len(xs) - 1))] * 1000

        print(f"   {backend:6}: pass-through p50 {q(plain, .5):.3f} ms (p90 {q(plain, .9):.3f}); "
              f"hit p50 {q(hits, .5):.3f} ms (p90 {q(hits, .9):.3f}); "
              f"miss p50 {q(misses, .5):.3f} ms (p90 {q(misses, .9):.3f}); "
              f"hit - pass-through p50 {q(hits, .5) - q(plain, .5):+.3f} ms; "
              f"miss - pass-through p50 {q(misses, .5) - q(plain, .5):+.3f} ms")
        procs.stop(proxy.proc)


async def main() -> None:
    with Procs("rp-bench-cache-") as procs:
        mock_url = procs.mock().url
        redis = procs.redis()
        timeout = aiohttp.ClientTimeout(total=30)
        connector = aiohttp.TCPConnector(limit=0)
        async with aiohttp.ClientSession(timeout=timeout, connector=connector) as http:
            figures = (figure_1, figure_2, figure_3, figure_4)
            chosen = {int(a) for a in sys.argv[1:]} or {1, 2, 3, 4}
            for i, figure in enumerate(figures, start=1):
                if i in chosen:
                    await figure(http, procs, mock_url, redis)


if __name__ == "__main__":
    asyncio.run(main())
