"""Added latency of one proxy hop, on loopback: the proxy vs direct to the mock provider.

Method (see ``bench/RESULTS.md``):

- three processes besides this one: the mock provider (``resilience-proxy mock``), the proxy
  (``resilience-proxy run``) on a bare route in front of that mock, and optionally the naive
  aiohttp pass-through (``bench/naive_proxy.py``) in front of the same mock;
- one client, sequential (one request at a time) on one keep-alive connection per target,
  so the figure is the hop's latency, not a throughput contest;
- targets interleaved in blocks (``--block`` requests each, target order shuffled every
  round with a fixed seed), so drift in machine load hits every target alike;
- warm-up requests per target first, not counted; then ``--requests`` per target;
- the same small non-streaming chat completion body for every request; every answer must be
  a 200 or the run fails.

Prints a table and writes JSON (``--json``). ``python bench/latency.py --requests 2000``.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import platform
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import uvloop

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._support import PY, ROOT, Procs, free_port

BODY = orjson.dumps({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]})
BARE_ROUTE = """
version: 1
providers:
  mock: {{url: "{mock}", format: openai}}
routes:
  - name: chat
    match: {{path_prefix: /v1/chat/completions, methods: [POST]}}
    provider: mock
"""


async def wait_ready(session: aiohttp.ClientSession, url: str) -> None:
    deadline = time.monotonic() + 30
    while True:
        try:
            async with session.post(url, data=BODY) as resp:
                if resp.status == 200:
                    await resp.read()
                    return
        except aiohttp.ClientError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"{url} did not come up")
        await asyncio.sleep(0.1)


async def one(session: aiohttp.ClientSession, url: str) -> float:
    t0 = time.perf_counter()
    async with session.post(url, data=BODY,
                            headers={"content-type": "application/json"}) as resp:
        await resp.read()
        if resp.status != 200:
            raise RuntimeError(f"{url}: status {resp.status}")
    return (time.perf_counter() - t0) * 1000


def quantile(sorted_ms: list[float], q: float) -> float:
    """Nearest-rank quantile of an ascending list."""
    index = min(len(sorted_ms) - 1, max(0, math.ceil(q * len(sorted_ms)) - 1))
    return sorted_ms[index]


def summary(samples: list[float]) -> dict[str, float]:
    s = sorted(samples)
    return {"n": len(s), "p50": quantile(s, 0.50), "p90": quantile(s, 0.90),
            "p99": quantile(s, 0.99), "mean": statistics.fmean(s), "min": s[0]}


async def measure(targets: dict[str, str], requests: int, block: int, warmup: int,
                  seed: int) -> dict[str, Any]:
    sessions = {name: aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1))
                for name in targets}
    samples: dict[str, list[float]] = {name: [] for name in targets}
    block_p50: dict[str, list[float]] = {name: [] for name in targets}
    try:
        for name, url in targets.items():
            await wait_ready(sessions[name], url)
            for _ in range(warmup):
                await one(sessions[name], url)
        rng = random.Random(seed)
        order = list(targets)
        for _ in range(requests // block):
            rng.shuffle(order)
            for name in order:
                got = [await one(sessions[name], targets[name]) for _ in range(block)]
                samples[name].extend(got)
                block_p50[name].append(statistics.median(got))
    finally:
        for s in sessions.values():
            await s.close()
    return {"samples": samples, "block_p50": block_p50}


def report(result: dict[str, Any], args: argparse.Namespace, wall_s: float) -> dict[str, Any]:
    stats = {name: summary(v) for name, v in result["samples"].items()}
    direct = stats["direct"]
    out: dict[str, Any] = {
        "machine": {"python": platform.python_version(), "cpus": os.cpu_count(),
                    "platform": platform.platform(), "loadavg_after": os.getloadavg()},
        "method": {"requests_per_target": args.requests, "block": args.block,
                   "warmup": args.warmup, "client": "sequential, 1 keep-alive connection",
                   "seed": args.seed, "wall_s": round(wall_s, 1)},
        "targets": stats, "added_ms": {},
    }
    print(f"{'target':<8} {'n':>5} {'p50 ms':>8} {'p90 ms':>8} {'p99 ms':>8} {'mean ms':>8}")
    for name, s in stats.items():
        print(f"{name:<8} {s['n']:>5} {s['p50']:>8.3f} {s['p90']:>8.3f} {s['p99']:>8.3f} "
              f"{s['mean']:>8.3f}")
    for name, s in stats.items():
        if name == "direct":
            continue
        blocks = [p - d for p, d in zip(result["block_p50"][name], result["block_p50"]["direct"],
                                        strict=True)]
        added = {"p50": s["p50"] - direct["p50"], "p99": s["p99"] - direct["p99"],
                 "mean": s["mean"] - direct["mean"],
                 "block_median_p50_diff": statistics.median(blocks)}
        out["added_ms"][name] = added
        print(f"added by {name}: p50 {added['p50']:+.3f} ms, p99 {added['p99']:+.3f} ms, "
              f"mean {added['mean']:+.3f} ms (median of per-block p50 differences "
              f"{added['block_median_p50_diff']:+.3f} ms)")
    print(f"wall {wall_s:.1f}s, load average after {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs")
    return out


async def run(args: argparse.Namespace) -> dict[str, Any]:
    with Procs("rp-bench-latency-") as procs:
        mock = procs.mock().url
        proxy = procs.proxy(BARE_ROUTE.format(mock=mock), log_level=args.log_level)
        path = "/v1/chat/completions"
        targets = {"direct": mock + path, "proxy": proxy.url + path}
        if args.naive:
            naive_port = free_port()
            procs.start([PY, str(ROOT / "bench" / "naive_proxy.py"), f"127.0.0.1:{naive_port}",
                         mock])
            targets["naive"] = f"http://127.0.0.1:{naive_port}{path}"
        t0 = time.monotonic()
        result = await measure(targets, args.requests, args.block, args.warmup, args.seed)
        return report(result, args, time.monotonic() - t0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=2000, help="measured requests per target")
    parser.add_argument("--block", type=int, default=100, help="requests per interleaved block")
    parser.add_argument("--warmup", type=int, default=200, help="unmeasured requests per target")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--no-naive", dest="naive", action="store_false",
                        help="leave out the naive aiohttp pass-through")
    parser.add_argument("--log-level", default="info",
                        help="the proxy's log level (info: one access-log line per request)")
    parser.add_argument("--json", help="write the figures to this file")
    args = parser.parse_args()
    out = uvloop.run(run(args))
    if args.json:
        Path(args.json).write_bytes(orjson.dumps(out, option=orjson.OPT_INDENT_2))


if __name__ == "__main__":
    main()
