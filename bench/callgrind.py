"""Instructions per request through a proxy, counted by callgrind (issue #8).

Wall-clock figures on a shared 2-core machine swing by ±10–15% between rounds; callgrind's
instruction counts do not move with the machine's load, so changes of a few percent show.
What it counts is user space only (the kernel's socket work is not in it) and instructions,
not time (a cache miss costs more than an add), so it complements ``bench/perf.py``.

For each target (``naive``, ``rp-bare``, ``rp-full``: the routes of ``bench/perf.py``), the
proxy runs under ``valgrind --tool=callgrind --instr-atstart=no`` on core 0, the mock
(``python -m proxy mock``) on core 1. ``--connections`` (4) keep-alive connections send ``--warmup``
requests, then instrumentation is switched on for ``--requests`` more (unique bodies, the
same shape as perf.py's), switched off, and the total is divided by the count.
``PYTHONHASHSEED=0`` keeps the counts repeatable run after run.

``python bench/callgrind.py`` (about 1 minute per target); ``--target rp-full --keep DIR``
keeps the callgrind output for ``callgrind_annotate``. Needs valgrind.
"""

from __future__ import annotations

import argparse
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent))

from perf import (  # bench/ is not a package: imported from its directory
    BARE,
    CORE_LOAD,
    CORE_PROXY,
    FULL,
    PATH,
    ROOT,
    Procs,
    _read_reply,
    free_port,
    wait_up,
)


def _request(port: int, seq: int) -> bytes:
    user = f"u{seq % 1000}"
    body = orjson.dumps({"model": "gpt-4o-mini", "user": user,
                         "messages": [{"role": "user", "content": f"hi {seq}"}]})
    return (f"POST {PATH} HTTP/1.1\r\nhost: 127.0.0.1:{port}\r\n"
            f"content-type: application/json\r\ncontent-length: {len(body)}\r\n"
            f"x-user-id: {user}\r\n\r\n").encode() + body


def drive(port: int, n: int, start: int, connections: int) -> None:
    """``n`` requests over ``connections`` keep-alive connections, one at a time on each."""
    def worker(i: int) -> None:
        with socket.create_connection(("127.0.0.1", port), timeout=120) as sock:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            for k in range(i, n, connections):
                sock.sendall(_request(port, start + k))
                status, _ = _read_reply(sock, 0.0)
                if status != 200:
                    raise RuntimeError(f"port {port}: status {status}")
    threads = [threading.Thread(target=worker, args=(i,)) for i in range(connections)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def measure(name: str, tmp: Path, procs: Procs, mock_url: str, args: argparse.Namespace,
            seq: int) -> float:
    port = free_port()
    out = tmp / f"{name}.callgrind"
    env_cmd = ["env", "PYTHONHASHSEED=0", "valgrind", "--tool=callgrind",
               "--instr-atstart=no", f"--callgrind-out-file={out}"]
    if name == "naive":
        cmd = [sys.executable, str(ROOT / "bench" / "naive_proxy.py"), f"127.0.0.1:{port}",
               mock_url]
    else:
        cfg = tmp / f"{name}.yaml"
        template = {"rp-bare": BARE, "rp-full": FULL}.get(name) or \
            Path(args.templates[name]).read_text()
        cfg.write_text(template.format(port=port, admin=free_port(), mock=mock_url))
        cmd = [sys.executable, "-m", "proxy", "run", "-c", str(cfg), "--log-level", "info"]
    proc = procs.start(CORE_PROXY, env_cmd + cmd, tmp / f"{name}.log")
    wait_up(port, proc, timeout_s=180)
    drive(port, args.warmup, seq, args.connections)
    pid = str(proc.pid)
    subprocess.run(["callgrind_control", "-i", "on", pid], check=True, capture_output=True)
    drive(port, args.requests, seq + args.warmup, args.connections)
    subprocess.run(["callgrind_control", "-i", "off", pid], check=True, capture_output=True)
    subprocess.run(["callgrind_control", "-d", pid], check=True, capture_output=True)
    time.sleep(0.5)
    total = 0
    for dump in tmp.glob(f"{name}.callgrind*"):
        for line in dump.read_text(errors="replace").splitlines():
            if line.startswith("totals:"):
                total += int(line.split()[1])
                break
    if args.keep:
        for dump in tmp.glob(f"{name}.callgrind*"):
            shutil.copy(dump, Path(args.keep) / dump.name)
    return total / args.requests


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--target", action="append", choices=["naive", "rp-bare", "rp-full"],
                        help="repeatable; default: all three")
    parser.add_argument("--config", action="append", default=[], metavar="NAME=FILE",
                        help="also a proxy on this config template (perf.py's placeholders"
                             " {port}, {admin}, {mock}); repeatable")
    parser.add_argument("--requests", type=int, default=600)
    parser.add_argument("--warmup", type=int, default=400)
    parser.add_argument("--connections", type=int, default=4)
    parser.add_argument("--keep", metavar="DIR", help="copy the callgrind output here")
    args = parser.parse_args()
    if shutil.which("valgrind") is None:
        raise SystemExit("valgrind is missing: apt-get install -y valgrind")
    args.templates = dict(c.split("=", 1) for c in args.config)
    targets = (args.target or ([] if args.templates else ["naive", "rp-bare", "rp-full"])) \
        + list(args.templates)
    tmp = Path(tempfile.mkdtemp(prefix="rp-callgrind-"))
    procs = Procs()
    try:
        mock_port = free_port()
        mock = procs.start(CORE_LOAD, [sys.executable, "-m", "proxy", "mock", "--listen",
                                       f"127.0.0.1:{mock_port}"])
        wait_up(mock_port, mock)
        results = {}
        for i, name in enumerate(targets):
            results[name] = measure(name, tmp, procs, f"http://127.0.0.1:{mock_port}", args,
                                    seq=(i + 1) * 10_000_000)
            print(f"{name:<8} {results[name] / 1000:8.1f} k instructions / request", flush=True)
    finally:
        procs.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    if "naive" in results:
        for name, value in results.items():
            print(f"{name:<8} ×{value / results['naive']:.2f} naive's")


if __name__ == "__main__":
    main()
