"""Memory under a soak: 200 concurrent SSE streams through the proxy for 2 minutes (issue #8).

Three processes on loopback: the mock provider, the proxy (the full policy set of
``bench/perf.py`` by default: timeout, retry, breaker, rate limit, cache, budget, canary,
log line, metrics; or ``--route bare``) and this client. The client keeps ``--streams``
streamed completions open at all times: each asks the mock for ``--chunks`` chunks
``--chunk-delay`` apart (about a second per stream), reads it to the end, checks it ended
with ``data: [DONE]``, and starts the next one, until ``--duration`` seconds have passed.

Every ``--sample-s`` seconds the proxy's ``VmRSS`` is read from ``/proc``. The verdict
compares the RSS after the warm-up (the first third of the run) with the RSS at the end, and
fits a line through the samples after the warm-up: growth per 10,000 streams. The cache is
bounded (``state.memory.max_size: 8MiB``), so it fills and then evicts.

``python bench/soak_streams.py --duration 120 --json soak.json``; every process it started
is stopped by its PID.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import uvloop

sys.path.insert(0, str(Path(__file__).resolve().parent))
import perf  # the same process helpers and proxy configs

PATH = "/v1/chat/completions"


def rss_mb(pid: int, field: str = "VmRSS:") -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field):
            return int(line.split()[1]) / 1024
    return 0.0


async def client(session: aiohttp.ClientSession, url: str, n: int, args: argparse.Namespace,
                 deadline: float, counts: dict[str, int]) -> None:
    headers = {"content-type": "application/json", "x-mock-chunks": str(args.chunks),
               "x-mock-chunk-delay": f"{args.chunk_delay_ms}ms"}
    seq = 0
    while time.monotonic() < deadline:
        seq += 1
        body = orjson.dumps({"model": "gpt-4o-mini", "stream": True,
                             "stream_options": {"include_usage": True},
                             "messages": [{"role": "user", "content": f"soak {n}-{seq}"}]})
        try:
            async with session.post(url, data=body,
                                    headers={**headers, "x-user-id": f"u{n}"}) as resp:
                data = await resp.read()
            if resp.status == 200 and data.rstrip().endswith(b"data: [DONE]"):
                counts["ok"] += 1
            else:
                counts["bad"] += 1
        except aiohttp.ClientError:
            counts["errors"] += 1


async def sampler(pid: int, every_s: float, deadline: float, started: float,
                  counts: dict[str, int], samples: list[dict[str, float]]) -> None:
    while True:
        samples.append({"t_s": round(time.monotonic() - started, 1), "rss_mb": rss_mb(pid),
                        "streams": counts["ok"]})
        print(f"t={samples[-1]['t_s']:6.1f}s  rss {samples[-1]['rss_mb']:6.1f} MB  "
              f"streams {counts['ok']:6d}  bad {counts['bad']}  errors {counts['errors']}",
              flush=True)
        if time.monotonic() >= deadline:
            return
        await asyncio.sleep(min(every_s, max(0.0, deadline - time.monotonic())))


async def soak(port: int, pid: int, args: argparse.Namespace) -> dict[str, Any]:
    url = f"http://127.0.0.1:{port}{PATH}"
    counts = {"ok": 0, "bad": 0, "errors": 0}
    samples: list[dict[str, float]] = []
    connector = aiohttp.TCPConnector(limit=args.streams)
    timeout = aiohttp.ClientTimeout(total=30)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        started = time.monotonic()
        deadline = started + args.duration
        watch = asyncio.create_task(sampler(pid, args.sample_s, deadline, started, counts,
                                            samples))
        await asyncio.gather(*(client(session, url, n, args, deadline, counts)
                               for n in range(args.streams)))
        await watch
    return {"counts": counts, "samples": samples}


def verdict(result: dict[str, Any], args: argparse.Namespace, hwm: float) -> dict[str, Any]:
    samples = result["samples"]
    warm = [s for s in samples if s["t_s"] >= args.duration / 3]
    first, last = warm[0], warm[-1]
    xs = [s["streams"] for s in warm]
    ys = [s["rss_mb"] for s in warm]
    slope = statistics.linear_regression(xs, ys).slope if len(set(xs)) > 1 else 0.0
    return {
        "streams_completed": result["counts"]["ok"], "bad": result["counts"]["bad"],
        "errors": result["counts"]["errors"],
        "rss_after_warmup_mb": first["rss_mb"], "rss_end_mb": last["rss_mb"],
        "growth_after_warmup_mb": round(last["rss_mb"] - first["rss_mb"], 2),
        "growth_per_10k_streams_mb": round(slope * 10_000, 3), "peak_rss_mb": hwm,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--route", choices=("full", "bare"), default="full")
    parser.add_argument("--streams", type=int, default=200)
    parser.add_argument("--duration", type=float, default=120.0)
    parser.add_argument("--chunks", type=int, default=20)
    parser.add_argument("--chunk-delay-ms", type=int, default=50)
    parser.add_argument("--sample-s", type=float, default=5.0)
    parser.add_argument("--json")
    args = parser.parse_args()
    if not 0 < args.duration <= 600:
        raise SystemExit("--duration must be in (0, 600] seconds")
    tmp = Path(tempfile.mkdtemp(prefix="rp-soak-"))
    procs = perf.Procs()
    try:
        mock_port, port, admin = perf.free_port(), perf.free_port(), perf.free_port()
        mock = procs.start("0,1", [sys.executable, "-m", "proxy", "mock", "--listen",
                                   f"127.0.0.1:{mock_port}"])
        perf.wait_up(mock_port, mock)
        cfg = tmp / "proxy.yaml"
        template = perf.FULL if args.route == "full" else perf.BARE
        cfg.write_text(template.format(port=port, admin=admin,
                                       mock=f"http://127.0.0.1:{mock_port}"))
        proxy = procs.start("0,1", [sys.executable, "-m", "proxy", "run", "-c", str(cfg)],
                            tmp / "proxy.log")
        perf.wait_up(port, proxy)
        result = uvloop.run(soak(port, proxy.pid, args))
        out = verdict(result, args, rss_mb(proxy.pid, "VmHWM:"))
    finally:
        procs.stop()
    lines = sum(1 for _ in open(tmp / "proxy.log", "rb"))
    print(f"\n{args.streams} concurrent streams for {args.duration:g}s through the {args.route} "
          f"route: {out['streams_completed']} streams completed, {out['bad']} bad, "
          f"{out['errors']} errors; RSS {out['rss_after_warmup_mb']:.1f} MB after warm-up -> "
          f"{out['rss_end_mb']:.1f} MB at the end ({out['growth_after_warmup_mb']:+.2f} MB; "
          f"{out['growth_per_10k_streams_mb']:+.3f} MB per 10k streams); peak "
          f"{out['peak_rss_mb']:.1f} MB; {lines} log lines; load {os.getloadavg()[0]:.2f}")
    if args.json:
        Path(args.json).write_bytes(orjson.dumps(
            {"method": vars(args), "verdict": out, "samples": result["samples"]},
            option=orjson.OPT_INDENT_2))


if __name__ == "__main__":
    main()
