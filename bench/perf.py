"""The cost of one proxy hop, against its peers, interleaved in one run (issue #8).

Targets, all in front of the same mock provider (``python -m proxy mock``, aiohttp+uvloop):

- ``direct``: the mock itself (the reference every "added" figure subtracts);
- ``nginx``: Debian's nginx, ``proxy_pass`` with an upstream ``keepalive`` pool
  (``bench/nginx.conf``), one worker;
- ``naive``: ``bench/naive_proxy.py``, a ~40-line aiohttp+uvloop pass-through;
- ``rp-bare``: resilience-proxy on a route with no policy block;
- ``rp-full``: resilience-proxy with timeout, retry, circuit breaker, rate limit (too high
  to throttle), cache (every request a miss: unique bodies, stored into an 8 MiB memory
  cache that evicts), budget (global, high limit, metered), canary (10% of users to a
  variant arm), access-log line and metrics;
- with ``--workers-phase``: ``rp-bare-w2``, the bare route with ``--workers 2``, and
  ``rp-bare-w1x``, one worker placed like them (the control for CPU per request).

Pinning: every proxy under test runs on core 0 (``taskset -c 0``); the mock, the load
generators and this script on core 1. ``rp-bare-w2`` and ``rp-bare-w1x`` may use both
cores (so they share core 1 with the mock and the load generator).

Per round, in a shuffled target order (fixed seed), each target gets:

1. latency: ``wrk -t1 -c1`` (one keep-alive connection, one request at a time) for
   ``--latency-s``: p50 / p99 from wrk's histogram;
2. throughput: ``wrk -t1 -c32`` for ``--rps-s``, with the target's CPU time (utime+stime of
   its process tree from ``/proc/<pid>/stat``) read before and after: RPS and CPU ms/request;

then, for every target at once, 3. SSE: ``--sse`` streamed completions each, on one
keep-alive connection per target (a blocking socket client), interleaved request by
request across the targets (one stream to each in turn, so drift on the shared machine
hits all alike: in blocks of 60 per target the added figures moved by ±200 µs between
runs): time from sending the request to the first ``data:`` bytes.

Every request is a ``POST /v1/chat/completions`` with a unique ~110-byte JSON body (a
counter) and an ``x-user-id`` from 1,000 users; any non-2xx fails the run. Figures are
medians over rounds; "added" subtracts ``direct``'s median of the same round. Peak RSS is
each serving process's ``VmHWM`` at the end. The load average is recorded with every
measurement: the machine is shared, so compare ratios within one run.

``python bench/perf.py --rounds 5 --json perf.json`` (about 3 minutes); every process it
started is stopped by its PID at the end.
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import orjson

ROOT = Path(__file__).resolve().parent.parent
PATH = "/v1/chat/completions"
CORE_PROXY, CORE_LOAD = "0", "1"
TICK_MS = 1000.0 / os.sysconf("SC_CLK_TCK")

WRK_LUA = r"""
local seq = tonumber(os.getenv("PERF_SEQ") or "0")
wrk.method = "POST"
wrk.headers["content-type"] = "application/json"
request = function()
  seq = seq + 1
  local user = "u" .. (seq % 1000)
  wrk.headers["x-user-id"] = user
  local body = '{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hi ' .. seq
    .. '"}],"user":"' .. user .. '"}'
  return wrk.format(nil, nil, nil, body)
end
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'PERFJSON {"requests":%d,"duration_us":%d,"status_errors":%d,"socket_errors":%d,' ..
    '"p50_us":%d,"p99_us":%d,"mean_us":%.1f}\n',
    summary.requests, summary.duration, e.status, e.connect + e.read + e.write + e.timeout,
    latency:percentile(50), latency:percentile(99), latency.mean))
end
"""

BARE = """
version: 1
server: {{listen: "127.0.0.1:{port}", admin_listen: "127.0.0.1:{admin}"}}
providers:
  mock: {{url: "{mock}", format: openai}}
routes:
  - name: chat
    match: {{path_prefix: /v1/chat/completions, methods: [POST]}}
    provider: mock
"""

FULL = """
version: 1
server: {{listen: "127.0.0.1:{port}", admin_listen: "127.0.0.1:{admin}"}}
state: {{backend: memory, memory: {{max_size: 8MiB}}}}
providers:
  mock:
    url: "{mock}"
    format: openai
    rate_limit: {{requests_per_second: 1000000, burst: 1000000}}
    circuit_breaker: {{failure_rate: 0.5, min_requests: 20, window: 30s, open_for: 15s}}
    pricing: {{"*": {{input: 0.15, output: 0.60}}}}
  mock_variant:
    url: "{mock}"
    format: openai
    rate_limit: {{requests_per_second: 1000000, burst: 1000000}}
    circuit_breaker: {{failure_rate: 0.5, min_requests: 20, window: 30s, open_for: 15s}}
    pricing: {{"*": {{input: 0.15, output: 0.60}}}}
budgets:
  monthly:
    window: month
    limit_usd: 1000000000
    thresholds: [{{at: 0.8, action: alert}}, {{at: 1.0, action: block}}]
routes:
  - name: chat
    match: {{path_prefix: /v1/chat/completions, methods: [POST]}}
    tiers:
      - provider: mock
      - provider: mock_variant
    timeout: {{attempt: 10s, total: 30s, first_byte: 10s, idle: 20s}}
    retry: {{attempts: 3, backoff: {{initial: 100ms, max: 2s}}}}
    cache: {{ttl: 10m, key: {{body: true, ignore_json_fields: [user]}}, statuses: [200]}}
    budgets: [monthly]
    canary:
      weight: 10
      hash_on: header:x-user-id
      variant: {{tiers: [{{provider: mock_variant}}]}}
"""


# --------------------------------------------------------------------------- processes


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Procs:
    """Every process this script starts, stopped by PID (SIGTERM, then SIGKILL)."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self, cores: str, args: list[str], log: Path | None = None) -> subprocess.Popen[bytes]:
        env = {k: v for k, v in os.environ.items()
               if not k.startswith("RP_") and k != "PROMETHEUS_MULTIPROC_DIR"}
        env["PYTHONUNBUFFERED"] = "1"  # as the image sets it (the Dockerfile): stdout raw
        out = open(log, "wb") if log is not None else subprocess.DEVNULL
        proc = subprocess.Popen(["taskset", "-c", cores, *args], cwd=ROOT, env=env,
                                stdout=out, stderr=subprocess.DEVNULL)
        if log is not None:
            out.close()  # type: ignore[union-attr]
        self.procs.append(proc)
        return proc

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)


def tree(pid: int) -> list[int]:
    """``pid`` and its descendants (from /proc)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat[stat.rindex(")") + 2:].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return out


def cpu_ms(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            continue
        rest = fields[fields.rindex(")") + 2:].split()
        total += int(rest[11]) + int(rest[12])  # utime, stime (fields 14 and 15)
    return total * TICK_MS


def hwm_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


def wait_up(port: int, proc: subprocess.Popen[bytes], timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args!r} exited with {proc.returncode}")
        try:
            status, _ = post_once(port, stream=False)
            if status == 200:
                return
        except OSError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"port {port} did not come up")


# --------------------------------------------------------------------------- clients


def _request(port: int, seq: int, stream: bool) -> bytes:
    body = orjson.dumps({"model": "gpt-4o-mini", "stream": stream,
                         "messages": [{"role": "user", "content": f"sse {seq}"}]})
    head = (f"POST {PATH} HTTP/1.1\r\nhost: 127.0.0.1:{port}\r\n"
            f"content-type: application/json\r\ncontent-length: {len(body)}\r\n"
            f"x-user-id: u{seq % 1000}\r\n")
    if stream:
        head += "x-mock-chunks: 4\r\nx-mock-chunk-delay: 2ms\r\n"
    return head.encode() + b"\r\n" + body


def _read_reply(sock: socket.socket, t0: float) -> tuple[int, float | None]:
    """Read one whole response; (status, seconds to the first body bytes)."""
    buf = b""
    first: float | None = None
    while b"\r\n\r\n" not in buf:
        data = sock.recv(65536)
        if not data:
            raise ConnectionError("closed before the response head")
        buf += data
    head, _, body = buf.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.strip().lower(): v.strip() for k, _, v in (x.partition(":") for x in lines[1:])}
    if body:
        first = time.perf_counter() - t0
    if "content-length" in headers:
        need = int(headers["content-length"])
        while len(body) < need:
            data = sock.recv(65536)
            if not data:
                raise ConnectionError("closed mid-body")
            body += data
            first = first if first is not None else time.perf_counter() - t0
        return status, first
    while not body.endswith(b"0\r\n\r\n"):  # chunked: read to the last chunk
        data = sock.recv(65536)
        if not data:
            raise ConnectionError("closed mid-stream")
        body += data
        first = first if first is not None else time.perf_counter() - t0
    return status, first


def post_once(port: int, stream: bool) -> tuple[int, float | None]:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        t0 = time.perf_counter()
        sock.sendall(_request(port, 0, stream))
        return _read_reply(sock, t0)


def sse_interleaved_ms(ports: dict[str, int], n: int, seq: int) -> dict[str, list[float]]:
    """``n`` streamed completions to each port, one to each in turn, on one keep-alive
    connection per port: ms to the first body bytes of each."""
    out: dict[str, list[float]] = {name: [] for name in ports}
    socks: dict[str, socket.socket] = {}
    try:
        for name, port in ports.items():
            sock = socks[name] = socket.create_connection(("127.0.0.1", port), timeout=10)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for i in range(n):
            for name, sock in socks.items():
                port = ports[name]
                request = _request(port, seq + i, True)
                t0 = time.perf_counter()
                sock.sendall(request)
                status, first = _read_reply(sock, t0)
                if status != 200 or first is None:
                    raise RuntimeError(f"SSE through port {port}: status {status}")
                out[name].append(first * 1000)
    finally:
        for sock in socks.values():
            sock.close()
    return out


def sse_ttfb_ms(port: int, n: int, seq: int) -> list[float]:
    """``n`` sequential streamed completions on one keep-alive connection: ms to the first
    body bytes of each (the mock sends 4 chunks 2 ms apart: a buffering hop shows)."""
    return sse_interleaved_ms({"target": port}, n, seq)["target"]


class Wrk:
    def __init__(self, script: Path) -> None:
        self.script = script
        self.seq = 0

    def run(self, port: int, connections: int, seconds: float) -> dict[str, Any]:
        self.seq += 10_000_000  # unique bodies across runs: the cache never hits
        env = {**os.environ, "PERF_SEQ": str(self.seq)}
        out = subprocess.run(
            ["taskset", "-c", CORE_LOAD, "wrk", "-t1", f"-c{connections}", f"-d{seconds}s",
             "--timeout", "10s", "-s", str(self.script), f"http://127.0.0.1:{port}{PATH}"],
            env=env, capture_output=True, text=True, timeout=seconds + 30, check=True).stdout
        line = next(x for x in out.splitlines() if x.startswith("PERFJSON "))
        result: dict[str, Any] = orjson.loads(line[len("PERFJSON "):])
        if result["status_errors"]:
            raise RuntimeError(f"port {port}: {result['status_errors']} non-2xx answers")
        return result


# --------------------------------------------------------------------------- targets


class Target:
    def __init__(self, name: str, port: int, proc: subprocess.Popen[bytes] | None,
                 log: Path | None = None) -> None:
        self.name, self.port, self.proc, self.log = name, port, proc, log
        self.pids: list[int] = []
        self.serving: list[int] = []  # the processes that serve requests (for RSS)
        self.rounds: list[dict[str, Any]] = []

    def discover(self) -> None:
        if self.proc is None:
            return
        self.pids = tree(self.proc.pid)
        # nginx and --workers N: the children serve (and the supervisor / master only watch)
        kids = [p for p in self.pids if p != self.proc.pid]
        self.serving = kids if self.name in ("nginx",) or self.name.endswith("-w2") else \
            [self.proc.pid]
        if self.name.endswith("-w2"):
            # the multiprocessing resource tracker is a child too; keep the workers
            self.serving = [p for p in kids if b"resource_tracker" not in
                            Path(f"/proc/{p}/cmdline").read_bytes()]


_RUN_FROM = ("import sys; sys.path.insert(0, sys.argv.pop(1)); from proxy.cli import main; "
             "sys.exit(main(sys.argv[1:]))")


def extract(rev: str, tmp: Path) -> Path:
    """The ``proxy`` and ``policies`` packages of git revision ``rev``, in a directory."""
    out = tmp / f"src-{rev}"
    out.mkdir()
    archive = subprocess.run(["git", "archive", rev, "proxy", "policies"], cwd=ROOT,
                             capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(out)], input=archive, check=True)
    return out


def start_targets(procs: Procs, tmp: Path, workers_phase: bool,
                  baseline: str | None = None) -> tuple[list[Target], int]:
    mock_port = free_port()
    mock_url = f"http://127.0.0.1:{mock_port}"
    mock = procs.start(CORE_LOAD, [sys.executable, "-m", "proxy", "mock", "--listen",
                                   f"127.0.0.1:{mock_port}"])
    wait_up(mock_port, mock)
    targets = [Target("direct", mock_port, None)]

    nginx_port = free_port()
    conf = (ROOT / "bench" / "nginx.conf").read_text().replace("@PREFIX@", str(tmp)) \
        .replace("@LISTEN@", f"127.0.0.1:{nginx_port}").replace("@UPSTREAM@", f"127.0.0.1:{mock_port}")
    (tmp / "nginx.conf").write_text(conf)
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    targets.append(Target("nginx", nginx_port, procs.start(
        CORE_PROXY, [nginx, "-p", str(tmp), "-c", str(tmp / "nginx.conf"), "-e",
                     str(tmp / "error.log")])))

    naive_port = free_port()
    targets.append(Target("naive", naive_port, procs.start(
        CORE_PROXY, [sys.executable, str(ROOT / "bench" / "naive_proxy.py"),
                     f"127.0.0.1:{naive_port}", mock_url])))

    specs = [("rp-bare", BARE, CORE_PROXY, 1), ("rp-full", FULL, CORE_PROXY, 1)]
    if workers_phase:  # both on both cores, sharing them with the mock and the load
        specs.append(("rp-bare-w1x", BARE, f"{CORE_PROXY},{CORE_LOAD}", 1))
        specs.append(("rp-bare-w2", BARE, f"{CORE_PROXY},{CORE_LOAD}", 2))
    src = {}
    if baseline:  # the same routes, served by the code of another revision
        src[f"rp-bare@{baseline}"] = src[f"rp-full@{baseline}"] = extract(baseline, tmp)
        specs += [(f"rp-bare@{baseline}", BARE, CORE_PROXY, 1),
                  (f"rp-full@{baseline}", FULL, CORE_PROXY, 1)]
    for name, template, cores, workers in specs:
        port, admin = free_port(), free_port()
        cfg = tmp / f"{name}.yaml"
        cfg.write_text(template.format(port=port, admin=admin, mock=mock_url))
        log = tmp / f"{name}.log"
        args = [sys.executable, "-m", "proxy", "run", "-c", str(cfg), "--log-level", "info"]
        if name in src:
            args = [sys.executable, "-c", _RUN_FROM, str(src[name]), "run", "-c", str(cfg),
                    "--log-level", "info"]
        if workers > 1:
            args += ["--workers", str(workers)]
        targets.append(Target(name, port, procs.start(cores, args, log), log))
    for t in targets[1:]:
        assert t.proc is not None
        wait_up(t.port, t.proc)
    return targets, mock_port


def measure(targets: list[Target], args: argparse.Namespace, wrk: Wrk) -> None:
    for t in targets:  # warm-up: connection pools, code paths, allocator
        wrk.run(t.port, 32, 1)
        sse_ttfb_ms(t.port, 20, 0)
        t.discover()
    time.sleep(1.0)
    rng = random.Random(args.seed)
    order = list(targets)
    for r in range(args.rounds):
        rng.shuffle(order)
        for t in order:
            load = os.getloadavg()[0]
            lat = wrk.run(t.port, 1, args.latency_s)
            before = cpu_ms(t.pids)
            thr = wrk.run(t.port, 32, args.rps_s)
            spent = cpu_ms(t.pids) - before
            t.rounds.append({
                "round": r, "load1": load,
                "p50_ms": lat["p50_us"] / 1000, "p99_ms": lat["p99_us"] / 1000,
                "rps": thr["requests"] / (thr["duration_us"] / 1e6),
                "socket_errors": thr["socket_errors"] + lat["socket_errors"],
                "cpu_ms_per_req": spent / thr["requests"] if t.proc is not None else None,
            })
        ttfb = sse_interleaved_ms({t.name: t.port for t in order}, args.sse,
                                  wrk.seq + 5_000_000)
        for t in order:
            t.rounds[-1]["sse_ttfb_ms"] = statistics.median(ttfb[t.name])
        print(f"round {r + 1}/{args.rounds} done, load {os.getloadavg()[0]:.2f}", flush=True)


def summarise(targets: list[Target]) -> dict[str, Any]:
    direct = next(t for t in targets if t.name == "direct")
    out: dict[str, Any] = {}
    for t in targets:
        rows = t.rounds
        med = {k: statistics.median(row[k] for row in rows)
               for k in ("p50_ms", "p99_ms", "rps", "sse_ttfb_ms", "load1")}
        added = {k: statistics.median(row[k] - d[k] for row, d in zip(rows, direct.rounds,
                                                                     strict=True))
                 for k in ("p50_ms", "p99_ms", "sse_ttfb_ms")}
        cpu = [row["cpu_ms_per_req"] for row in rows if row["cpu_ms_per_req"] is not None]
        out[t.name] = {
            "rps": med["rps"], "p50_ms": med["p50_ms"], "p99_ms": med["p99_ms"],
            "added_p50_ms": added["p50_ms"], "added_p99_ms": added["p99_ms"],
            "added_sse_ttfb_ms": added["sse_ttfb_ms"],
            "cpu_ms_per_req": statistics.median(cpu) if cpu else None,
            "peak_rss_mb": max((hwm_mb(p) for p in t.serving), default=None),
            "load1": med["load1"],
            "socket_errors": sum(row["socket_errors"] for row in rows),
            "rounds": rows,
        }
    return out


def report(summary: dict[str, Any]) -> None:
    print(f"\n{'target':<16} {'RPS@c32':>8} {'added p50':>10} {'added p99':>10} "
          f"{'CPU ms/req':>10} {'peak RSS':>9} {'SSE TTFB+':>10} {'load':>5}")
    for name, s in summary.items():
        cpu = f"{s['cpu_ms_per_req']:.3f}" if s["cpu_ms_per_req"] is not None else "-"
        rss = f"{s['peak_rss_mb']:.0f} MB" if s["peak_rss_mb"] is not None else "-"
        print(f"{name:<16} {s['rps']:>8.0f} {s['added_p50_ms'] * 1000:>+8.0f}µs "
              f"{s['added_p99_ms'] * 1000:>+8.0f}µs {cpu:>10} {rss:>9} "
              f"{s['added_sse_ttfb_ms'] * 1000:>+8.0f}µs {s['load1']:>5.2f}")
    naive = summary["naive"]
    for name in ("rp-bare", "rp-full"):
        s = summary[name]
        print(f"{name} vs naive: throughput ×{s['rps'] / naive['rps']:.2f}, added p50 "
              f"×{s['added_p50_ms'] / naive['added_p50_ms']:.2f}, SSE TTFB added "
              f"{(s['added_sse_ttfb_ms'] - naive['added_sse_ttfb_ms']) * 1000:+.0f}µs vs naive")
    for name in [n for n in summary if "@" in n]:
        now = summary[name.split("@")[0]]
        print(f"{name.split('@')[0]} now vs {name}: throughput ×{now['rps'] / summary[name]['rps']:.2f}"
              f", CPU ms/req ×{now['cpu_ms_per_req'] / summary[name]['cpu_ms_per_req']:.2f}")
    if "rp-bare-w2" in summary:
        w1, w1x, w2 = summary["rp-bare"], summary["rp-bare-w1x"], summary["rp-bare-w2"]
        print(f"--workers 2 (cores 0-1) vs 1 worker on core 0: throughput "
              f"×{w2['rps'] / w1['rps']:.2f}; vs 1 worker on cores 0-1: throughput "
              f"×{w2['rps'] / w1x['rps']:.2f}, CPU ms/req "
              f"×{w2['cpu_ms_per_req'] / w1x['cpu_ms_per_req']:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--latency-s", type=int, default=2)
    parser.add_argument("--rps-s", type=int, default=3)
    parser.add_argument("--sse", type=int, default=60, help="streams per target per round")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--workers-phase", action="store_true",
                        help="also measure the bare route with --workers 2 (both cores)")
    parser.add_argument("--baseline", metavar="REV",
                        help="also run both routes on the code of git revision REV")
    parser.add_argument("--json", help="write every figure to this file")
    args = parser.parse_args()
    for tool in ("wrk", "taskset"):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} is missing: apt-get install -y nginx wrk util-linux")
    os.sched_setaffinity(0, {int(CORE_LOAD)})
    tmp = Path(tempfile.mkdtemp(prefix="rp-perf-"))
    os.chmod(tmp, 0o755)
    (tmp / "perf.lua").write_text(WRK_LUA)
    procs = Procs()
    started = time.monotonic()
    try:
        targets, _ = start_targets(procs, tmp, args.workers_phase, args.baseline)
        measure(targets, args, Wrk(tmp / "perf.lua"))
        summary = summarise(targets)
    finally:
        procs.stop()
    log_lines = {t.name: sum(1 for _ in open(t.log, "rb")) for t in targets if t.log}
    shutil.rmtree(tmp, ignore_errors=True)
    report(summary)
    wall = time.monotonic() - started
    print(f"wall {wall:.0f}s; proxy log lines (one per request, plus start/stop): {log_lines}")
    if args.json:
        out = {"machine": {"python": platform.python_version(), "cpus": os.cpu_count(),
                           "platform": platform.platform()},
               "method": vars(args), "wall_s": wall, "targets": summary,
               "log_lines": log_lines}
        Path(args.json).write_bytes(orjson.dumps(out, option=orjson.OPT_INDENT_2))


if __name__ == "__main__":
    main()
