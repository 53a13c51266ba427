"""Soak: mixed traffic with faults against a real proxy process, resources sampled (issue #10).

A proxy process (``python -m proxy run``, Redis state) fronts the mock provider process while
clients send a mix of requests — buffered and streamed completions, cache hits and misses,
canary arms, provider 5xx with retries and fallback, timeouts, resets before the first byte
and mid-stream, malformed replies, injected faults, clients that leave mid-stream, malformed
HTTP, unknown routes — and faults are injected on a schedule: Redis killed and restarted,
the provider killed and restarted, the config reloaded.

Every ``--sample-every`` seconds it records the proxy process's RSS, open file descriptors
(``/proc/<pid>/fd``), asyncio tasks (``/admin/status`` ``process.asyncio_tasks``) and
established upstream connections (the process's own sockets, matched in ``/proc/<pid>/net/tcp``
against the provider's and Redis's ports). After ``--warmup`` the figures must stay flat: the
script prints the table, the first and last sample after the warm-up, and a verdict; exit 1
when a figure grew past its tolerance or the books do not balance (requests answered =
access-log lines = ``rp_requests_total``).

    python bench/soak.py                     # 10 minutes (the figure for the report)
    python bench/soak.py --duration 90       # a shorter check

Loopback only; every process is started here and stopped by PID at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import signal
import statistics
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._support import HOST, PY, Proc, Procs, free_port, wait_http

CONFIG = """
version: 1
server: {{drain_timeout: 5s, header_read_timeout: 2s, max_request_body: 1MiB}}
state: {{backend: redis, redis: {{url: "{redis}", timeout: 100ms}}}}
providers:
  p1:
    url: "{mock}"
    format: openai
    pricing: {{"*": {{input: 0.15, output: 0.60}}}}
    circuit_breaker: {{failure_rate: 0.8, min_requests: 50, window: 10s, open_for: 2s}}
  p2:
    url: "{mock}"
    format: openai
    pricing: {{"*": {{input: 2.5, output: 10}}}}
budgets:
  spend: {{window: day, limit_usd: 1000000, on_state_error: allow, per: "header:x-user",
           thresholds: [{{at: 0.9, action: alert}}, {{at: 1.0, action: block}}]}}
routes:
  - name: chat
    match: {{path_prefix: /v1/chat/completions}}
    tiers: [{{provider: p1, model: small}}, {{provider: p2, model: large}}]
    timeout: {{attempt: 1s, total: {total}, first_byte: 500ms, idle: 1s}}
    retry: {{attempts: 2, backoff: {{initial: 20ms, max: 100ms}}}}
    cache: {{ttl: 30s}}
    budgets: [spend]
    canary: {{weight: 20, hash_on: "header:x-user", variant: {{tiers: [{{provider: p1}}]}}}}
    faults: {{header: x-rp-fault}}
    redact: [email, phone]
  - name: strict
    match: {{path_prefix: /v1/strict}}
    provider: p1
    validate: {{json: true}}
"""

MALFORMED = [
    b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n"
    b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    b"GET /v1/chat/completions HTTP/1.1\nHost: x\n\n",
    b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\nHost: x\r\n\r\n",
]


@dataclass
class Books:
    sent: int = 0
    answered: int = 0
    statuses: Counter[int] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)
    kinds: Counter[str] = field(default_factory=Counter)


@dataclass
class Sample:
    t: float
    rss_kib: int
    fds: int
    tasks: int
    upstream: int  # established connections to the provider and Redis
    requests: int
    sockets: Counter[str] = field(default_factory=Counter)


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


TCP_STATES = {"01": "established", "06": "time_wait", "08": "close_wait", "0A": "listen"}


def sockets(pid: int, ports: set[int]) -> Counter[str]:
    """Process ``pid``'s TCP sockets by role and state: ``upstream:<state>`` (to any of
    ``ports``), ``listen``, ``client:<state>`` (anything else)."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    out: Counter[str] = Counter()
    for table in ("tcp", "tcp6"):
        for line in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
            f = line.split()
            if f[9] not in inodes:
                continue
            state = TCP_STATES.get(f[3], f[3])
            if state == "listen":
                out["listen"] += 1
            elif int(f[2].rsplit(":", 1)[1], 16) in ports:
                out["upstream:" + state] += 1
            else:
                out["client:" + state] += 1
    return out


class Soak:
    def __init__(self, args: argparse.Namespace, procs: Procs) -> None:
        self.args = args
        self.procs = procs
        self.books = Books()
        self.samples: list[Sample] = []
        self.rng = random.Random(args.seed)
        self.stop = asyncio.Event()
        self.faults: list[str] = []

    # ------------------------------------------------------------------ processes

    def start(self) -> None:
        self.redis = self.procs.redis()
        self.mock_port = free_port()
        self.mock = self._start_mock()
        #: two configs the reloads alternate between (they differ in the route's total)
        self.configs = [CONFIG.format(redis=self.redis.url, mock=f"http://{HOST}:{self.mock_port}",
                                      total=total) for total in ("4s", "5s")]
        self.log = self.procs.dir / "proxy.log"
        self.proxy = self.procs.proxy(self.configs[0], log=self.log)
        self.cfg_path = self.procs.dir / "proxy.yaml"
        self.pid = self.proxy.proc.pid

    def _start_mock(self) -> Proc:
        proc = self.procs.start([PY, "-m", "proxy", "mock", "--listen",
                                 f"{HOST}:{self.mock_port}"])
        wait_http(f"http://{HOST}:{self.mock_port}/mock/stats")
        return proc

    # ------------------------------------------------------------------ traffic

    async def client(self, http: aiohttp.ClientSession, pace_s: float) -> None:
        url = self.proxy.url
        while not self.stop.is_set():
            started = time.monotonic()
            kind = self.rng.choices(KINDS, WEIGHTS)[0]
            self.books.sent += 1
            self.books.kinds[kind] += 1
            try:
                status = await getattr(self, "req_" + kind)(http, url)
                self.books.answered += 1
                self.books.statuses[status] += 1
            except (aiohttp.ClientError, TimeoutError, ConnectionError) as exc:
                self.books.errors[f"{kind}:{type(exc).__name__}"] += 1
            await asyncio.sleep(max(0.0, pace_s - (time.monotonic() - started)))

    def _chat_body(self, stream: bool = False) -> bytes:
        prompt = f"question {self.rng.randrange(40)} from mail{self.rng.randrange(5)}@example.com"
        return orjson.dumps({"model": "x", "stream": stream,
                             "stream_options": {"include_usage": True},
                             "messages": [{"role": "user", "content": prompt}]})

    def _headers(self, **extra: str) -> dict[str, str]:
        return {"content-type": "application/json", "x-user": f"user{self.rng.randrange(200)}",
                **extra}

    async def _post(self, http: aiohttp.ClientSession, url: str, body: bytes,
                    headers: dict[str, str]) -> int:
        async with http.post(url, data=body, headers=headers) as resp:
            await resp.read()
            return resp.status

    async def req_chat(self, http: aiohttp.ClientSession, url: str) -> int:
        return await self._post(http, url + "/v1/chat/completions", self._chat_body(),
                                self._headers())

    async def req_stream(self, http: aiohttp.ClientSession, url: str) -> int:
        return await self._post(http, url + "/v1/chat/completions", self._chat_body(True),
                                self._headers(**{"x-mock-chunks": "8",
                                                 "x-mock-chunk-delay": "10ms",
                                                 "x-rp-cache": "bypass"}))

    async def req_error_5xx(self, http: aiohttp.ClientSession, url: str) -> int:
        return await self._post(http, url + "/v1/chat/completions", self._chat_body(),
                                self._headers(**{"x-mock-status": "503", "x-rp-cache": "bypass"}))

    async def req_timeout(self, http: aiohttp.ClientSession, url: str) -> int:
        return await self._post(http, url + "/v1/chat/completions", self._chat_body(),
                                self._headers(**{"x-mock-delay": "800ms", "x-rp-cache": "bypass"}))

    async def req_drop(self, http: aiohttp.ClientSession, url: str) -> int:
        drop = self.rng.choice(["mid-stream", "headers"])
        return await self._post(http, url + "/v1/chat/completions", self._chat_body(True),
                                self._headers(**{"x-mock-drop": drop, "x-rp-cache": "bypass"}))

    async def req_malformed_reply(self, http: aiohttp.ClientSession, url: str) -> int:
        return await self._post(http, url + "/v1/strict", self._chat_body(),
                                self._headers(**{"x-mock-body": "malformed"}))

    async def req_fault(self, http: aiohttp.ClientSession, url: str) -> int:
        return await self._post(http, url + "/v1/chat/completions", self._chat_body(),
                                self._headers(**{"x-rp-fault": "abort=503;tier=1",
                                                 "x-rp-cache": "bypass"}))

    async def req_leave(self, http: aiohttp.ClientSession, url: str) -> int:
        """A client that reads the first chunk of a stream and goes away."""
        async with http.post(url + "/v1/chat/completions", data=self._chat_body(True),
                             headers=self._headers(**{"x-mock-chunks": "50",
                                                      "x-mock-chunk-delay": "20ms",
                                                      "x-rp-cache": "bypass"})) as resp:
            await resp.content.readany()
            resp.close()
            return resp.status

    async def req_no_route(self, http: aiohttp.ClientSession, url: str) -> int:
        async with http.get(url + "/nowhere") as resp:
            await resp.read()
            return resp.status

    async def req_malformed_http(self, http: aiohttp.ClientSession, url: str) -> int:
        reader, writer = await asyncio.open_connection(HOST, self.proxy.port)
        try:
            writer.write(self.rng.choice(MALFORMED))
            async with asyncio.timeout(5):
                head = await reader.readuntil(b"\r\n\r\n")
            return int(head.split(b" ", 2)[1])
        finally:
            writer.close()

    # ------------------------------------------------------------------ faults and samples

    async def faults_loop(self, t0: float) -> None:
        """Reload every 20 s; Redis down for 8 s every 120 s; the provider down for 4 s every
        150 s (first outages at 60 s and 95 s)."""
        a = self.args
        next_reload, next_redis, next_mock = 20.0, 60.0, 95.0
        reloads = 0
        async with aiohttp.ClientSession() as http:
            while not self.stop.is_set():
                now = time.monotonic() - t0
                if now >= next_reload:
                    reloads += 1
                    self.cfg_path.write_text(self.configs[reloads % 2])
                    async with http.post(self.proxy.admin + "/admin/reload") as resp:
                        self.faults.append(f"{now:6.1f}s reload -> {resp.status}")
                    next_reload += 20.0
                if now >= next_redis and now + 8 < a.duration:
                    self.redis.kill()
                    self.faults.append(f"{now:6.1f}s redis killed")
                    await asyncio.sleep(8)
                    self.redis.start()
                    self.faults.append(f"{time.monotonic() - t0:6.1f}s redis restarted")
                    next_redis += 120.0
                if now >= next_mock and now + 4 < a.duration:
                    self.mock.kill()
                    self.mock.wait(5)
                    self.faults.append(f"{now:6.1f}s provider killed")
                    await asyncio.sleep(4)
                    self.mock = self._start_mock()
                    self.faults.append(f"{time.monotonic() - t0:6.1f}s provider restarted")
                    next_mock += 150.0
                await asyncio.sleep(0.2)

    async def sample(self, http: aiohttp.ClientSession, t0: float) -> None:
        async with http.get(self.proxy.admin + "/admin/status") as resp:
            tasks = (await resp.json())["process"]["asyncio_tasks"]
        async with http.get(self.proxy.admin + "/metrics") as resp:
            text = await resp.text()
        requests = sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                       if line.startswith("rp_requests_total{"))
        socks = sockets(self.pid, {self.mock_port, self.redis.port})
        self.samples.append(Sample(
            round(time.monotonic() - t0, 1), rss_kib(self.pid), fds(self.pid), tasks,
            socks["upstream:established"], int(requests), socks))

    async def run(self) -> int:
        a = self.args
        t0 = time.monotonic()
        pace_s = a.clients / a.rate
        admin = aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True))
        async with admin, aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=15)) as http:
            await self.sample(admin, t0)
            baseline = self.samples.pop()  # idle, before any traffic
            clients = [asyncio.create_task(self.client(http, pace_s)) for _ in range(a.clients)]
            faults = asyncio.create_task(self.faults_loop(t0))
            while time.monotonic() - t0 < a.duration:
                await self.sample(admin, t0)
                s = self.samples[-1]
                print(f"{s.t:7.1f}s rss {s.rss_kib / 1024:6.1f} MiB  fds {s.fds:4d}  tasks "
                      f"{s.tasks:4d}  upstream {s.upstream:3d} (+{s.sockets['upstream:close_wait']}"
                      f" closing)  requests {s.requests:7d}", flush=True)
                await asyncio.sleep(a.sample_every)
            self.stop.set()
            await asyncio.gather(*clients, faults)
            loaded = len(self.samples)
            await http.close()  # the clients' keep-alive connections go (and their tasks)
            await asyncio.sleep(2)  # the last answers logged, idle pools settled
            await self.sample(admin, t0)
        return self.report(baseline, self.samples[:loaded], self.samples[-1])

    def report(self, baseline: Sample, loaded: list[Sample], idle: Sample) -> int:
        """Under load after the warm-up: the first third of the samples against the last
        third (medians: a sample catches whatever is in flight at that instant; a leak
        shows as growth). Idle: tasks and non-upstream descriptors back to the baseline."""
        a = self.args
        b = self.books
        after = [s for s in loaded if s.t >= a.warmup] or loaded[-1:]
        first, last = after[0], after[-1]
        third = max(1, len(after) // 3)
        early, late = after[:third], after[-third:]

        def med(samples: list[Sample], attr: str) -> float:
            return float(statistics.median(getattr(s, attr) for s in samples))
        self.procs.stop(self.proxy.proc)  # SIGTERM: drain, flush, exit; its log is complete
        lines = sum(1 for line in self.log.read_bytes().splitlines()
                    if line.startswith(b"{") and b'"event":"request"' in line)
        counted = idle.requests
        print("\nfaults:")
        for f in self.faults:
            print("  " + f)
        print(f"\ntraffic: {b.sent} sent, {b.answered} answered, client-side errors "
              f"{sum(b.errors.values())} {dict(b.errors)}")
        print(f"  statuses {dict(sorted(b.statuses.items()))}")
        print(f"  kinds {dict(sorted(b.kinds.items()))}")
        print(f"  access-log lines {lines}, rp_requests_total {counted}")
        rss_growth = (last.rss_kib - first.rss_kib) / first.rss_kib
        grow = {attr: (med(early, attr), med(late, attr)) for attr in ("fds", "tasks", "upstream")}
        # descriptors that are not sockets to the provider or Redis (pooled, in any state)
        own_fds = tuple(x.fds - sum(n for k, n in x.sockets.items() if k.startswith("upstream"))
                        for x in (baseline, idle))
        checks = {
            f"RSS {first.rss_kib / 1024:.1f} -> {last.rss_kib / 1024:.1f} MiB "
            f"({rss_growth:+.1%}, tolerance +{a.rss_tolerance:.0%})": rss_growth <= a.rss_tolerance,
            **{f"{attr} median {x:g} -> {y:g} (first vs last third; tolerance +5)": y <= x + 5
               for attr, (x, y) in grow.items()},
            f"upstream connections at most {max(s.upstream for s in after)}, closing at most "
            f"{max(s.sockets['upstream:close_wait'] for s in after)} (bound: the pools' limits)":
                max(s.upstream + s.sockets["upstream:close_wait"] for s in after)
                <= 2 * a.clients + 64,
            f"idle: tasks {baseline.tasks} before -> {idle.tasks} after (tolerance +2)":
                idle.tasks <= baseline.tasks + 2,
            f"idle: non-upstream fds {own_fds[0]} before -> {own_fds[1]} after (tolerance +2)":
                own_fds[1] <= own_fds[0] + 2,
            f"books: answered {b.answered} = logged {lines} = counted {counted}":
                b.answered == lines == counted,
        }
        print(f"\nunder load, after the {a.warmup:g}s warm-up (t={first.t}s .. t={last.t}s):")
        for text, ok in checks.items():
            print(f"  {'ok  ' if ok else 'FAIL'} {text}")
        print(f"first / last sample under load: rss {first.rss_kib / 1024:.1f} / "
              f"{last.rss_kib / 1024:.1f} MiB, fds {first.fds} / {last.fds}, tasks "
              f"{first.tasks} / {last.tasks}, upstream {first.upstream} / {last.upstream}")
        print(f"idle before / after: rss {baseline.rss_kib / 1024:.1f} / "
              f"{idle.rss_kib / 1024:.1f} MiB, fds {baseline.fds} / {idle.fds}, tasks "
              f"{baseline.tasks} / {idle.tasks}, upstream {baseline.upstream} / {idle.upstream}")
        print(f"  sockets before {dict(baseline.sockets)}, after {dict(idle.sockets)}")
        return 0 if all(checks.values()) else 1


KINDS = ["chat", "stream", "error_5xx", "timeout", "drop", "malformed_reply", "fault", "leave",
         "no_route", "malformed_http"]
WEIGHTS = [45, 15, 8, 4, 6, 4, 4, 5, 5, 4]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=600.0, help="seconds (default 600)")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--rate", type=float, default=120.0, help="requests per second, total")
    parser.add_argument("--sample-every", type=float, default=10.0)
    parser.add_argument("--warmup", type=float, default=60.0,
                        help="seconds before the first sample that must stay flat")
    parser.add_argument("--rss-tolerance", type=float, default=0.10)
    parser.add_argument("--seed", type=int, default=10)
    args = parser.parse_args()
    args.warmup = min(args.warmup, args.duration / 3)
    with Procs(prefix="rp-soak-") as procs:
        soak = Soak(args, procs)
        soak.start()
        try:
            return asyncio.run(soak.run())
        except KeyboardInterrupt:
            return 130


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    sys.exit(main())

