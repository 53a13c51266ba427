"""Issue #6's figures, measured for real: three proxy processes sharing one private Redis.

    python bench/budget_fleet.py

Starts, on 127.0.0.1 free ports: a private ``redis-server --save ''``, the mock provider
(``python -m proxy mock``) and three ``python -m proxy run`` processes with one config
(``state.backend: redis``); stops each by its PID at the end. Bounded (~15 s).

1. **No overshoot, exact estimates**: 300 concurrent requests spread over the three
   replicas against a $1.00 monthly budget (70% alert, 85% downgrade, 100% block); each call
   costs exactly $0.01 (400-byte body = 100 input tokens, ``max_tokens`` 900 = the mock's
   900 output tokens, $10 per 1M tokens both ways). Requests admitted, spend in the ledger,
   and the mock's own bill (its token counters × the price), which must agree within 1%.
2. **Under-estimates**: the same, but the requests set no ``max_tokens`` and the budget's
   ``default_output_tokens`` is 500 (estimate $0.006, actual $0.01): the overshoot is bounded
   by what the admitted in-flight calls cost beyond their estimates.
3. **Crossings**: ``budget_threshold_crossed`` lines in the three replicas' logs: each step
   once for the whole fleet.
4. **Streams**: one completion buffered, the same streamed with a final usage chunk, and
   streamed without one (estimated): the cost each access-log line recorded.
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import aiohttp
import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._support import Procs

PRICE = 10.0  # USD per 1M tokens, input and output
OUT_TOKENS = 900
CHAT = "/v1/chat/completions"

CONFIG = """
version: 1
server: {{max_concurrent_requests: 2048}}
state:
  backend: redis
  redis: {{url: "redis://127.0.0.1:{redis}/0", timeout: 1s}}   # a shared 2-core box
providers:
  llm:
    url: "http://127.0.0.1:{mock}"
    format: openai
    max_connections: 400
    pricing: {{"*": {{input: {price}, output: {price}}}}}
budgets:
  exact:
    window: month
    timezone: Asia/Seoul
    limit_usd: 1.00
    thresholds: [{{at: 0.70, action: alert}}, {{at: 0.85, action: downgrade}}, {{at: 1.00, action: block}}]
  under:
    window: month
    limit_usd: 1.00
    default_output_tokens: 500
routes:
  - name: exact
    match: {{path_prefix: /exact}}
    tiers: [{{provider: llm, path: {chat}}}]
    budgets: [exact]
  - name: under
    match: {{path_prefix: /under}}
    tiers: [{{provider: llm, path: {chat}}}]
    budgets: [under]
  - {{name: free, match: {{path_prefix: {chat}}}, provider: llm}}
"""


def body_of(size: int, **extra: Any) -> bytes:
    """A chat request of exactly ``size`` bytes."""
    doc = {"model": "m", "messages": [{"role": "user", "content": ""}], **extra}
    pad = size - len(orjson.dumps(doc))
    doc["messages"][0]["content"] = "x" * pad
    raw = orjson.dumps(doc)
    assert len(raw) == size, len(raw)
    return raw


class Fleet:
    """Redis, the mock provider and three replicas of one config (logs in the scratch dir)."""

    def __init__(self, procs: Procs) -> None:
        redis = procs.redis()
        mock = procs.mock(log=procs.dir / "mock.log")
        self.mock_port = mock.port
        config = CONFIG.format(redis=redis.port, mock=mock.port, price=PRICE, chat=CHAT)
        replicas = [procs.proxy(config, "fleet", log=procs.dir / f"proxy{i}.log", wait=False)
                    for i in range(3)]
        procs.wait_ready(*replicas)
        # (data url, admin url, log file)
        self.proxies: list[tuple[str, str, Path]] = [(p.url, p.admin, procs.dir / f"proxy{i}.log")
                                                     for i, p in enumerate(replicas)]


async def burst(http: aiohttp.ClientSession, fleet: Fleet, path: str, body: bytes,
                n: int = 300) -> list[int]:
    headers = {"content-type": "application/json", "x-mock-output-tokens": str(OUT_TOKENS),
               "x-mock-delay": "300ms"}

    async def one(i: int) -> int:
        url = fleet.proxies[i % 3][0] + path
        async with http.post(url, data=body, headers=headers) as r:
            await r.read()
            return r.status

    return list(await asyncio.gather(*(one(i) for i in range(n))))


async def mock_bill(http: aiohttp.ClientSession, fleet: Fleet, reset: bool = False) -> dict[str, Any]:
    base = f"http://127.0.0.1:{fleet.mock_port}"
    async with http.get(base + "/mock/stats") as r:
        stats = await r.json()
    if reset:
        async with http.post(base + "/mock/reset") as r:
            await r.read()
    tokens = stats["tokens"]
    return {"calls": stats["calls"], "tokens": tokens,
            "billed_usd": (tokens["input"] * PRICE + tokens["output"] * PRICE) / 1e6}


async def budget_status(http: aiohttp.ClientSession, fleet: Fleet, name: str) -> list[dict[str, Any]]:
    rows = []
    for _, admin, _ in fleet.proxies:
        async with http.get(admin + "/admin/status") as r:
            rows += [b for b in (await r.json())["budgets"] if b["name"] == name]
    return rows


def log_lines(fleet: Fleet) -> list[dict[str, Any]]:
    out = []
    for i, (_, _, path) in enumerate(fleet.proxies):
        for line in path.read_bytes().splitlines():
            if line.startswith(b"{"):
                try:
                    out.append({"replica": i, **orjson.loads(line)})
                except orjson.JSONDecodeError:
                    pass
    return out


async def scenario(http: aiohttp.ClientSession, fleet: Fleet, name: str, body: bytes,
                   estimate_usd: float, actual_usd: float) -> None:
    t0 = time.monotonic()
    statuses = await burst(http, fleet, "/" + name, body)
    elapsed = time.monotonic() - t0
    bill = await mock_bill(http, fleet, reset=True)
    rows = await budget_status(http, fleet, name)
    spend = rows[0]["spend_usd"]
    admitted = statuses.count(200)
    print(f"\n== {name}: 300 concurrent requests over 3 replicas, $1.00 budget "
          f"(estimate ${estimate_usd:.4f}/call, actual ${actual_usd:.4f}/call), {elapsed:.2f}s")
    others = Counter(s for s in statuses if s not in (200, 429))
    print(f"  admitted (200): {admitted}   refused (429): {statuses.count(429)}   "
          f"other: {dict(others) or 0}")
    spends = ", ".join(f"${r['spend_usd']:.6f}" for r in rows)
    print(f"  ledger spend (each replica's /admin/status): {spends}; "
          f"requests {rows[0]['requests']}; level {rows[0]['level']}")
    print(f"  mock provider: {bill['calls']} calls, tokens {bill['tokens']}, "
          f"billed ${bill['billed_usd']:.6f}")
    diff = abs(spend - bill["billed_usd"]) / bill["billed_usd"] * 100 if bill["billed_usd"] else 0
    print(f"  ledger vs provider bill: {diff:.3f}% apart")
    bound = 1.0 + admitted * max(0.0, actual_usd - estimate_usd)
    print(f"  overshoot: ${max(0.0, spend - 1.0):.6f} (bound: limit + in-flight excess over "
          f"estimates = ${bound:.6f}) -> {'OK' if spend <= bound + 1e-9 else 'VIOLATED'}")


async def streams(http: aiohttp.ClientSession, fleet: Fleet) -> None:
    """A 200-chunk completion streamed with a usage chunk (the provider's count), the same
    completion buffered (its count forced to match), and streamed without a usage chunk."""
    url = fleet.proxies[0][0] + CHAT
    base = {"content-type": "application/json", "x-mock-chunks": "200"}
    print("\n== one completion (400-byte request, 200 streamed chunks), $10/1M tokens")
    results: dict[str, dict[str, Any]] = {}

    async def run(label: str, body: bytes, headers: dict[str, str]) -> None:
        rid = "stream-" + "".join(c if c.isalnum() else "-" for c in label)
        async with http.post(url, data=body, headers={**base, **headers, "x-request-id": rid}) as r:
            await r.read()
            header = r.headers.get("x-rp-cost-usd")
        await asyncio.sleep(0.2)
        line = next(e for e in log_lines(fleet) if e.get("event") == "request"
                    and e.get("request_id") == rid)
        results[label] = line
        print(f"  {label:24s} cost_usd={line['cost_usd']:.8f} tokens={line['tokens']} "
              f"estimated={line.get('tokens_estimated', False)} x-rp-cost-usd={header}")

    await run("stream + usage chunk",
              body_of(400, stream=True, stream_options={"include_usage": True}), {})
    out = results["stream + usage chunk"]["tokens"]["output"]
    await run("buffered", body_of(400), {"x-mock-output-tokens": str(out)})
    await run("stream, no usage chunk", body_of(400, stream=True), {})
    exact = results["buffered"]["cost_usd"]
    for label in ("stream + usage chunk", "stream, no usage chunk"):
        diff = (results[label]["cost_usd"] - exact) / exact * 100
        print(f"  {label} vs buffered: {diff:+.3f}%")


async def main() -> None:
    with Procs("rp-budget-bench-") as procs:
        fleet = Fleet(procs)
        conn = aiohttp.TCPConnector(limit=1000)
        async with aiohttp.ClientSession(connector=conn,
                                         timeout=aiohttp.ClientTimeout(total=30)) as http:
            await streams(http, fleet)
            await mock_bill(http, fleet, reset=True)
            # 400 bytes = 100 input tokens; 900 output tokens: (100 + 900) × $10/1M = $0.01
            await scenario(http, fleet, "exact", body_of(400, max_tokens=OUT_TOKENS), 0.01, 0.01)
            # no max_tokens: estimate 100 + 500 tokens = $0.006, actual $0.01
            await scenario(http, fleet, "under", body_of(400), 0.006, 0.01)
            await asyncio.sleep(0.3)
            print("\n== budget_threshold_crossed in the three replicas' logs")
            events = sorted((e for e in log_lines(fleet)
                             if e.get("event") == "budget_threshold_crossed"),
                            key=lambda e: e["timestamp"])
            for e in events:
                fields = {k: e[k] for k in ("budget", "key", "at", "action", "spend_usd",
                                            "reserved_usd", "trigger", "request_id")}
                print(f"  replica {e['replica']}: {orjson.dumps(fields).decode()}")
            for budget in ("exact", "under"):
                steps = Counter(e["action"] for e in events if e["budget"] == budget)
                print(f"  {budget}: each step fired {dict(steps)} time(s) fleet-wide")


if __name__ == "__main__":
    asyncio.run(main())
