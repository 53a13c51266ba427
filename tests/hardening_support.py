"""Helpers for the hardening suites (security, malformed HTTP, chaos): raw exchanges, the real
CLI in a subprocess, Prometheus text, and a bounded load generator.

- :func:`exchange`: send exact bytes, read one response, and tell whether the server then
  closed the connection.
- :class:`CliProxy`: ``python -m proxy run`` on free loopback ports, its stdout kept (the real
  JSON log lines, as an operator's collector sees them).
- :func:`metric`: one sample of a Prometheus exposition text.
- :class:`Load`: concurrent clients sending until told to stop; every request ends in exactly
  one of ``answered`` (any HTTP status), ``refused`` (the connection was refused: the request
  never reached the proxy) or ``errors`` (anything else, kept by kind).
"""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import orjson

from tests.conftest import free_port

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes
    closed: bool  # the server closed the connection after this answer


async def exchange(url: str, data: bytes, *, timeout: float = 10.0,
                   close_wait: float = 1.0) -> Answer:
    """Send ``data`` on a new connection to ``url``; read one answer (interim 1xx skipped)."""
    host, port = url.removeprefix("http://").rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(data)
        await writer.drain()
        async with asyncio.timeout(timeout):
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                if not head.startswith(b"HTTP/1.1 1"):
                    break
            lines = head.decode("latin-1").split("\r\n")
            headers = {}
            for line in lines[1:]:
                name, _, value = line.partition(":")
                if name:
                    headers[name.strip().lower()] = value.strip()
            body = await reader.readexactly(int(headers.get("content-length", "0")))
        try:
            async with asyncio.timeout(close_wait):
                closed = await reader.read(1) == b""
        except TimeoutError:
            closed = False
        return Answer(int(lines[0].split(" ")[1]), headers, body, closed)
    finally:
        writer.close()


def metric(text: str, name: str, **labels: str) -> float:
    """The value of ``name{labels}`` in a Prometheus text (labels may be a subset; summed)."""
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        found = dict(re.findall(r'(\w+)="([^"]*)"', line.split(" ")[0]))
        if all(found.get(k) == v for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


class CliProxy:
    """``python -m proxy run -c <cfg>`` on free loopback ports; stdout (JSON lines) kept."""

    def __init__(self, cfg: Path, env: dict[str, str] | None = None) -> None:
        self.port, self.admin_port = free_port(), free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.admin_url = f"http://127.0.0.1:{self.admin_port}"
        self.out_path = cfg.with_suffix(".out")
        base = {k: v for k, v in os.environ.items() if not k.startswith("RP_")}
        base["PYTHONUNBUFFERED"] = "1"
        with self.out_path.open("wb") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "proxy", "run", "-c", str(cfg), "--listen",
                 f"127.0.0.1:{self.port}", "--admin-listen", f"127.0.0.1:{self.admin_port}"],
                stdout=out, stderr=subprocess.STDOUT, env={**base, **(env or {})}, cwd=ROOT)

    async def ready(self, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        async with aiohttp.ClientSession() as http:
            while time.monotonic() < deadline:
                assert self.proc.poll() is None, self.output()
                try:
                    async with http.get(self.admin_url + "/readyz") as resp:
                        if resp.status == 200:
                            return
                except aiohttp.ClientError:
                    pass
                await asyncio.sleep(0.05)
        raise AssertionError("the proxy did not become ready")

    async def wait(self, timeout: float) -> int:
        deadline = time.monotonic() + timeout
        while self.proc.poll() is None:
            assert time.monotonic() < deadline, "the proxy did not exit"
            await asyncio.sleep(0.02)
        return self.proc.returncode

    def output(self) -> bytes:
        return self.out_path.read_bytes()

    def events(self) -> list[dict[str, Any]]:
        """Every JSON log line written so far (other lines, e.g. the banner, skipped)."""
        return [orjson.loads(line) for line in self.output().splitlines()
                if line.startswith(b"{")]

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)


Request = Callable[[aiohttp.ClientSession], Awaitable[int]]


@dataclass
class Load:
    """``clients`` concurrent senders of ``request`` until :meth:`stop` (or ``limit_s``)."""

    request: Request
    clients: int = 8
    limit_s: float = 20.0
    answered: int = 0
    refused: int = 0
    statuses: Counter[int] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)
    _stop: asyncio.Event = field(default_factory=asyncio.Event)
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)

    @property
    def sent(self) -> int:
        return self.answered + self.refused + sum(self.errors.values())

    def start(self) -> Load:
        self._tasks = [asyncio.create_task(self._client()) for _ in range(self.clients)]
        return self

    async def _client(self) -> None:
        deadline = time.monotonic() + self.limit_s
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as http:
            while not self._stop.is_set() and time.monotonic() < deadline:
                try:
                    status = await self.request(http)
                except aiohttp.ClientConnectorError:
                    self.refused += 1
                    await asyncio.sleep(0.01)
                    continue
                except (aiohttp.ClientError, TimeoutError) as exc:
                    self.errors[type(exc).__name__] += 1
                    continue
                self.answered += 1
                self.statuses[status] += 1

    async def stop(self) -> None:
        self._stop.set()
        await asyncio.gather(*self._tasks)

    async def until(self, predicate: Callable[[], bool], timeout: float = 10.0) -> None:
        """Keep loading until ``predicate()`` (e.g. enough requests answered)."""
        deadline = time.monotonic() + timeout
        while not predicate():
            assert time.monotonic() < deadline, "load did not reach its mark"
            await asyncio.sleep(0.01)
