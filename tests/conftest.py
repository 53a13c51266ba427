"""Shared fixtures: real parts on loopback.

- ``mock_provider``: the project's mock provider, a real aiohttp server on 127.0.0.1:<free>.
- ``redis_server``: a real ``redis-server`` on a free port (never the machine's 6379), with
  ``kill()`` / ``restart()`` for failure cases.
- ``make_proxy``: the real proxy app from a YAML text, data and admin planes on free ports.
- ``http``: an aiohttp client session.
- ``logs``: every structlog line of the test (``structlog.testing.capture_logs``);
  ``access_lines(logs)`` keeps the access-log lines; ``wait_for(predicate)`` polls until true.

Raw-HTTP helpers and scripted upstreams for the core's tests are in ``tests/core_support.py``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest
import structlog

from proxy import accesslog
from proxy.clock import Clock
from proxy.loader import LoadedConfig, parse_config
from proxy.metrics import Metrics
from proxy.mock import MockProvider, start_mock
from proxy.server import ProxyServer

accesslog.configure("debug", cache=False)


@dataclass
class MockHandle:
    mock: MockProvider
    url: str


@pytest.fixture
async def mock_provider() -> AsyncIterator[MockHandle]:
    mock, runner, url = await start_mock()
    yield MockHandle(mock, url)
    await runner.cleanup()


@pytest.fixture
async def mock_provider2() -> AsyncIterator[MockHandle]:
    """A second, independent provider (e.g. the tier-2 vendor)."""
    mock, runner, url = await start_mock()
    yield MockHandle(mock, url)
    await runner.cleanup()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class RedisServer:
    """A private redis-server process for the tests (killed and restarted at will)."""

    def __init__(self) -> None:
        exe = shutil.which("redis-server")
        if exe is None:
            raise RuntimeError("redis-server is not installed: .ci/run installs it "
                               "(apt-get install redis-server)")
        self.exe = exe
        self.port = free_port()
        self.dir = tempfile.mkdtemp(prefix="rp-redis-")
        self.proc: subprocess.Popen[bytes] | None = None
        self.url = f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [self.exe, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", self.dir, "--protected-mode", "no"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(16).startswith(b"+PONG"):
                        return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("redis-server did not start")

    def kill(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(5)
            self.proc = None

    def restart(self) -> None:
        self.kill()
        self.start()

    def flush(self) -> None:
        with socket.create_connection(("127.0.0.1", self.port), timeout=2) as s:
            s.sendall(b"FLUSHALL\r\n")
            s.recv(16)


@pytest.fixture(scope="session")
def redis_session() -> Iterator[RedisServer]:
    server = RedisServer()
    server.start()
    yield server
    server.kill()
    shutil.rmtree(server.dir, ignore_errors=True)


@pytest.fixture
def redis_server(redis_session: RedisServer) -> Iterator[RedisServer]:
    """The session's redis-server, flushed, and running again after a test that killed it."""
    if redis_session.proc is None or redis_session.proc.poll() is not None:
        redis_session.start()
    redis_session.flush()
    yield redis_session
    if redis_session.proc is None or redis_session.proc.poll() is not None:
        redis_session.start()


MakeProxy = Callable[..., Awaitable[ProxyServer]]

#: the Redis timeout of a test proxy whose config sets none (the product default is 100 ms)
TEST_REDIS_TIMEOUT = 2.0


def with_test_redis_timeout(loaded: LoadedConfig) -> LoadedConfig:
    """``state.redis.timeout: 2s`` when the state backend is Redis and the config sets no
    timeout there; a config's own timeout (e.g. a test of a slow or dead Redis) is kept.

    Why: on a loaded CI machine a Redis call can take over 100 ms and the feature then fails
    open by design, failing a test about something else; fail-open is tested on its own."""
    state = loaded.config.state
    if state.backend != "redis" or "timeout" in state.redis.model_fields_set:
        return loaded
    redis = state.redis.model_copy(update={"timeout": TEST_REDIS_TIMEOUT})
    config = loaded.config.model_copy(update={"state": state.model_copy(update={"redis": redis})})
    return dataclasses.replace(loaded, config=config)


@pytest.fixture
async def make_proxy() -> AsyncIterator[MakeProxy]:
    """Start the real proxy from a YAML text; ``{mock}`` etc. are filled by the caller."""
    started: list[ProxyServer] = []

    async def make(yaml_text: str, *, clock: Clock | None = None, env: dict[str, str] | None = None,
                   path: str | None = None, **kwargs: Any) -> ProxyServer:
        loaded = parse_config(yaml_text, path or "<test>", env=env or dict(os.environ))
        if path is None:  # a file-backed config is re-read on reload: it must stay as written
            loaded = with_test_redis_timeout(loaded)
        server = ProxyServer(loaded, clock=clock, metrics=Metrics(), **kwargs)
        await server.start(listen="127.0.0.1:0", admin_listen="127.0.0.1:0")
        started.append(server)
        return server

    yield make
    for server in started:
        await server.stop()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
        yield session


@pytest.fixture
def logs() -> Iterator[list[dict[str, Any]]]:
    with structlog.testing.capture_logs() as captured:
        yield captured


def access_lines(captured: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [e for e in captured if e.get("event") == "request"]


async def wait_for(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.01)


@pytest.fixture
def prometheus_servers() -> Iterator[list[Any]]:
    """Real Prometheus servers a test starts (``tests.deploy_support.PrometheusServer``);
    each is stopped by its PID afterwards."""
    servers: list[Any] = []
    yield servers
    for server in servers:
        server.stop()
