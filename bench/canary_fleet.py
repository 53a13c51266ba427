"""Issue #7, the fleet figure: three replicas sharing one Redis roll a bad candidate back.

Real processes on 127.0.0.1 ephemeral ports: a private ``redis-server`` (``--save ''``, never
the machine's 6379) and three proxies (``python -m proxy run -c FILE --listen ...
--admin-listen ...``), each with its bundled mock (``mock://``). The candidate's provider
fails 5% of its calls (``x-mock-fail-percent: 5`` in its ``headers:``: every 20th call
answers 503; no retries, so every failure reaches a user). The canary starts at 50% with
``auto_rollback: {window: 2s, consecutive: 3, min_requests: 20, max_error_rate: 0.01}``.

Eight clients send requests round-robin over the three replicas, each with a new
``x-user-id``, until every replica reports ``rolled_back`` in ``/admin/status`` (at most
20 s). Printed: the windows judged until the rollback (from the ``canary_rolled_back`` log
line of the replica that performed it), each replica's weight, state and
``rp_canary_rollbacks_total`` afterwards, and the arms of the requests sent after it.
Every process it starts is stopped by PID at the end.

    python bench/canary_fleet.py
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

WINDOW_S = 2.0
DEADLINE_S = 20.0

CONFIG = """
version: 1
server: {{max_concurrent_requests: 4096}}
state:
  backend: redis
  redis: {{url: "redis://127.0.0.1:{redis_port}/0", timeout: 100ms}}
providers:
  stable_p: {{url: "mock://", format: openai}}
  candidate_p:
    url: "mock://"
    format: openai
    headers: {{x-mock-fail-percent: "5", x-mock-key: candidate}}
routes:
  - name: chat
    match: {{path_prefix: /v1/chat/completions, methods: [POST]}}
    provider: stable_p
    canary:
      weight: 50
      hash_on: header:x-user-id
      variant: {{provider: candidate_p}}
      auto_rollback: {{window: {window}s, consecutive: 3, min_requests: 20, max_error_rate: 0.01}}
"""


class Fleet:
    """Redis and three replicas, each logging to its own file."""

    def __init__(self, procs: Procs) -> None:
        redis = procs.redis()
        config = CONFIG.format(redis_port=redis.port, window=WINDOW_S)
        proxies = [procs.proxy(config, "fleet", log=procs.dir / f"replica{i}.log", wait=False)
                   for i in range(3)]
        procs.wait_ready(*proxies)
        self.replicas: list[dict[str, Any]] = [
            {"name": f"replica{i}", "url": p.url, "admin": p.admin, "log": p.log}
            for i, p in enumerate(proxies)]

    def logs(self, event: str) -> list[tuple[str, dict[str, Any]]]:
        out = []
        for r in self.replicas:
            with open(r["log"], "rb") as f:
                for line in f:
                    if line.startswith(b"{"):
                        entry = orjson.loads(line)
                        if entry.get("event") == event:
                            out.append((r["name"], entry))
        return out


async def canary_of(http: aiohttp.ClientSession, replica: dict[str, Any]) -> dict[str, Any]:
    async with http.get(replica["admin"] + "/admin/status") as r:
        status = await r.json()
    return dict(next(route for route in status["routes"] if route["name"] == "chat")["canary"])


async def rollbacks_total(http: aiohttp.ClientSession, replica: dict[str, Any]) -> float:
    async with http.get(replica["admin"] + "/metrics") as r:
        text = await r.text()
    for line in text.splitlines():
        if line.startswith('rp_canary_rollbacks_total{route="chat"}'):
            return float(line.split()[-1])
    return 0.0


async def run(fleet: Fleet) -> None:
    replicas = fleet.replicas
    seen: Counter[tuple[str, int]] = Counter()  # (arm, status class)
    rolled_at: dict[str, float] = {}
    stop = asyncio.Event()
    counter = iter(range(10**9))
    body = orjson.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}]})

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as http:
        async def client(k: int) -> None:
            i = k
            while not stop.is_set():
                replica = replicas[i % 3]
                i += 1
                headers = {"x-user-id": f"user-{next(counter)}",
                           "content-type": "application/json"}
                async with http.post(replica["url"] + "/v1/chat/completions", data=body,
                                     headers=headers) as r:
                    await r.read()
                    seen[(r.headers.get("x-rp-canary", "?"), r.status // 100)] += 1

        async def watch() -> None:
            while len(rolled_at) < 3 and time.monotonic() - t0 < DEADLINE_S:
                for r in replicas:
                    if r["name"] not in rolled_at and \
                            (await canary_of(http, r))["state"] == "rolled_back":
                        rolled_at[r["name"]] = time.monotonic() - t0
                await asyncio.sleep(0.05)
            stop.set()

        t0 = time.monotonic()
        t0_wall = time.time()
        await asyncio.gather(watch(), *(client(k) for k in range(8)))
        elapsed = time.monotonic() - t0
        before = dict(seen)
        seen.clear()
        stop.clear()
        tail = asyncio.gather(*(client(k) for k in range(4)))
        await asyncio.sleep(1.0)
        stop.set()
        await tail
        after = dict(seen)
        states = [(r["name"], await canary_of(http, r), await rollbacks_total(http, r))
                  for r in replicas]

    total = sum(before.values())
    variant = sum(n for (arm, _), n in before.items() if arm == "variant")
    variant_5xx = before.get(("variant", 5), 0)
    print(f"traffic until every replica rolled back: {elapsed:.2f} s, {total} requests "
          f"({total / elapsed:.0f}/s), {variant} on the variant, {variant_5xx} of them 5xx "
          f"({variant_5xx / max(variant, 1):.1%}); stable 5xx: {before.get(('stable', 5), 0)}")
    performed = fleet.logs("canary_rolled_back")
    print(f"canary_rolled_back logged by: {[name for name, _ in performed]}")
    for _name, entry in performed:
        wids = [w["window"] for w in entry["windows"]]
        first_window = int(t0_wall // WINDOW_S)
        print(f"  judged windows (newest first): {wids}; traffic began in window "
              f"{first_window}, so the rollback came after {max(wids) - first_window + 1} "
              f"windows of traffic ({WINDOW_S:g} s each)")
        for w in entry["windows"]:
            print(f"    window {w['window']}: {w['requests']} variant requests, error rate "
                  f"{w['error_rate']:.2%}, p95 {w['p95_ms']:.1f} ms, breached {w['breached']}")
    for name, canary, count in states:
        at = rolled_at.get(name)
        print(f"{name}: /admin/status canary={canary} rp_canary_rollbacks_total={count:g} "
              f"(saw rolled_back at {at:.2f} s)" if at is not None else
              f"{name}: /admin/status canary={canary} (never saw the rollback)")
    print(f"after the rollback (1 s more traffic): {after}")


def main() -> int:
    with Procs("rp-bench-canary-") as procs:
        asyncio.run(run(Fleet(procs)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
