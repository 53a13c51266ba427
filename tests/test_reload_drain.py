"""Reload and drain (DESIGN §1, §3, §8): POST /admin/reload and SIGHUP (atomic; an invalid
file changes nothing), requests in flight finish on their config, retired sessions closed,
SIGTERM drains within drain_timeout and exits 0; admin token and POST-only mutations."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import orjson
import pytest

from tests.conftest import access_lines, free_port, wait_for

ROOT = Path(__file__).resolve().parent.parent

CONFIG = """
version: 1
server: {{admin_token: "{token}", drain_timeout: {drain}}}
providers:
  {pname}: {{url: "{mock}"}}
routes:
  - name: {route}
    match: {{path_prefix: {prefix}}}
    provider: {pname}
"""


def config(mock: str, *, route: str = "old", prefix: str = "/old", pname: str = "p_old",
           token: str = "", drain: str = "25s") -> str:
    return CONFIG.format(mock=mock, route=route, prefix=prefix, pname=pname, token=token,
                         drain=drain)


@pytest.fixture
def cfg_file(tmp_path):
    return tmp_path / "proxy.yaml"


async def reload(http, proxy, token: str | None = None):
    headers = {"authorization": f"Bearer {token}"} if token else {}
    async with http.post(proxy.admin_url + "/admin/reload", headers=headers) as resp:
        return resp.status, await resp.json()


def reloads(proxy, result: str) -> float:
    for line in proxy.deps.metrics.render().decode().splitlines():
        if line.startswith(f'rp_config_reloads_total{{result="{result}"}}'):
            return float(line.split()[-1])
    return 0.0


async def test_reload_good_file(mock_provider, make_proxy, http, cfg_file, logs):
    """A good file: 200 {"reloaded": true}, the new routes are live, the old ones gone."""
    cfg_file.write_text(config(mock_provider.url))
    proxy = await make_proxy(cfg_file.read_text(), path=str(cfg_file))
    cfg_file.write_text(config(mock_provider.url, route="new", prefix="/new"))
    status, body = await reload(http, proxy)
    assert status == 200 and body["reloaded"] is True
    async with http.post(proxy.data_url + "/new/x") as resp:
        assert resp.status == 200 and resp.headers["x-rp-route"] == "new"
    async with http.post(proxy.data_url + "/old/x") as resp:
        assert resp.status == 404
    assert reloads(proxy, "ok") == 2.0  # the initial load counts as ok
    assert any(e["event"] == "config_reloaded" for e in logs)


async def test_reload_invalid_file_changes_nothing(mock_provider, make_proxy, http, cfg_file, logs):
    """An invalid file: 400 invalid_config with located errors, the old config keeps serving,
    counted as rp_config_reloads_total{result="error"} and logged with its errors."""
    cfg_file.write_text(config(mock_provider.url))
    proxy = await make_proxy(cfg_file.read_text(), path=str(cfg_file))
    sha = proxy.loaded.sha256
    cfg_file.write_text(config(mock_provider.url, route="new", prefix="no-slash")
                        + "    retry: {attempts: 0}\n")
    status, body = await reload(http, proxy)
    assert status == 400
    err = body["error"]
    assert err["type"] == "invalid_config" and err["message"]
    assert "routes[0].retry.attempts: must be >= 1" in err["errors"]
    assert any(e.startswith("routes[0].match") for e in err["errors"])
    async with http.post(proxy.data_url + "/old/x") as resp:
        assert resp.status == 200
    assert proxy.loaded.sha256 == sha
    assert reloads(proxy, "error") == 1.0 and reloads(proxy, "ok") == 1.0
    failed = [e for e in logs if e["event"] == "config_reload_failed"]
    assert failed and "routes[0].retry.attempts: must be >= 1" in failed[0]["errors"]


async def test_reload_unreadable_file_keeps_config(mock_provider, make_proxy, http, cfg_file):
    """A file that vanished is an invalid reload too, not a crash."""
    cfg_file.write_text(config(mock_provider.url))
    proxy = await make_proxy(cfg_file.read_text(), path=str(cfg_file))
    cfg_file.unlink()
    status, body = await reload(http, proxy)
    assert status == 400 and body["error"]["errors"][0].startswith("<file>: cannot read")


async def test_in_flight_requests_finish_on_their_config(mock_provider, mock_provider2,
                                                         make_proxy, http, cfg_file):
    """A request in flight during a reload finishes on the config it started with; the
    replaced runtime's sessions are closed when its last request ends (no leak)."""
    cfg_file.write_text(config(mock_provider.url, prefix="/"))
    proxy = await make_proxy(cfg_file.read_text(), path=str(cfg_file))
    old_runtime = proxy.runtime
    slow = asyncio.create_task(http.post(proxy.data_url + "/x", headers={"x-mock-delay": "600ms"}))
    await wait_for(lambda: mock_provider.mock.calls == 1)
    cfg_file.write_text(config(mock_provider2.url, prefix="/", pname="p_new"))
    assert (await reload(http, proxy))[0] == 200
    async with http.post(proxy.data_url + "/x") as resp:
        assert resp.headers["x-rp-provider"] == "p_new"
    assert mock_provider2.mock.calls == 1
    old_session = old_runtime.providers["p_old"].client.session
    assert old_session is not None and not old_session.closed  # still serving the slow one
    async with await slow as resp:
        assert resp.status == 200 and resp.headers["x-rp-provider"] == "p_old"
    await wait_for(lambda: old_session.closed)
    assert old_runtime.retired and old_runtime.active == 0


async def test_reload_keeps_nothing_open_without_traffic(mock_provider, make_proxy, http, cfg_file):
    """Reloads with nothing in flight close each replaced runtime's sessions at once."""
    cfg_file.write_text(config(mock_provider.url))
    proxy = await make_proxy(cfg_file.read_text(), path=str(cfg_file))
    replaced = []
    for _ in range(3):
        replaced.append(proxy.runtime)
        assert (await reload(http, proxy))[0] == 200
    sessions = [rt.providers["p_old"].client.session for rt in replaced]
    await wait_for(lambda: all(s is not None and s.closed for s in sessions))


async def test_admin_token_enforced(mock_provider, make_proxy, http, cfg_file):
    """With admin_token set, /admin/* needs the bearer token (401 otherwise); probes and
    /metrics stay open."""
    token = "adm-secret-123"
    cfg_file.write_text(config(mock_provider.url, token=token))
    proxy = await make_proxy(cfg_file.read_text(), path=str(cfg_file))
    for headers in ({}, {"authorization": "Bearer wrong"}, {"authorization": token}):
        async with http.get(proxy.admin_url + "/admin/status", headers=headers) as resp:
            assert resp.status == 401
            assert (await resp.json())["error"]["type"] == "unauthorized"
        async with http.post(proxy.admin_url + "/admin/reload", headers=headers) as resp:
            assert resp.status == 401
    async with http.get(proxy.admin_url + "/admin/status",
                        headers={"authorization": f"Bearer {token}"}) as resp:
        assert resp.status == 200
        assert token not in await resp.text()
    assert (await reload(http, proxy, token))[0] == 200
    for path in ("/healthz", "/readyz", "/metrics"):
        async with http.get(proxy.admin_url + path) as resp:
            assert resp.status == 200, path


@pytest.mark.parametrize("path", ["/admin/reload", "/admin/canary/old",
                                  "/admin/canary/old/rollback", "/admin/circuit/p_old/reset"])
async def test_admin_mutations_as_get_are_405(mock_provider, make_proxy, http, cfg_file, path):
    """An admin mutation sent as GET answers 405 and changes nothing."""
    cfg_file.write_text(config(mock_provider.url))
    proxy = await make_proxy(cfg_file.read_text(), path=str(cfg_file))
    async with http.get(proxy.admin_url + path) as resp:
        assert resp.status == 405 and resp.headers["Allow"] == "POST"
        assert (await resp.json())["error"]["type"] == "method_not_allowed"
    assert reloads(proxy, "ok") == 1.0


# ---------------------------------------------------------------- the real CLI, with signals


class ProxyProcess:
    """``python -m proxy run`` in a subprocess on free loopback ports."""

    def __init__(self, cfg: Path) -> None:
        self.port, self.admin_port = free_port(), free_port()
        self.data_url = f"http://127.0.0.1:{self.port}"
        self.admin_url = f"http://127.0.0.1:{self.admin_port}"
        env = {k: v for k, v in os.environ.items() if not k.startswith("RP_")}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "proxy", "run", "-c", str(cfg), "--listen",
             f"127.0.0.1:{self.port}", "--admin-listen", f"127.0.0.1:{self.admin_port}"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=ROOT)

    async def ready(self, http: aiohttp.ClientSession) -> None:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.proc.communicate()
            try:
                async with http.get(self.admin_url + "/healthz") as resp:
                    if resp.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.05)
        raise AssertionError("proxy did not start")

    async def wait(self, timeout: float) -> int:
        deadline = time.monotonic() + timeout
        while self.proc.poll() is None:
            assert time.monotonic() < deadline, "proxy did not exit"
            await asyncio.sleep(0.05)
        return self.proc.returncode

    def log_lines(self) -> list[dict]:
        out = self.proc.stdout.read() if self.proc.stdout else b""
        return [orjson.loads(line) for line in out.splitlines() if line.startswith(b"{")]

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)


@pytest.fixture
def spawn():
    procs: list[ProxyProcess] = []

    def start(cfg: Path) -> ProxyProcess:
        p = ProxyProcess(cfg)
        procs.append(p)
        return p

    yield start
    for p in procs:
        p.kill()


async def test_sighup_reloads_and_keeps_last_good(mock_provider, http, cfg_file, spawn):
    """SIGHUP re-reads the file: a good one is applied; an invalid one is logged with its
    errors and the last good config keeps serving."""
    cfg_file.write_text(config(mock_provider.url))
    p = spawn(cfg_file)
    await p.ready(http)
    cfg_file.write_text(config(mock_provider.url, route="new", prefix="/new"))
    p.proc.send_signal(signal.SIGHUP)

    async def status(path: str) -> int:
        async with http.post(p.data_url + path) as resp:
            return resp.status

    deadline = time.monotonic() + 10
    while await status("/new/x") != 200:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.05)
    cfg_file.write_text("version: 1\nroutes: []\n")
    p.proc.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 10
    while True:  # wait for the failed reload to be counted
        async with http.get(p.admin_url + "/metrics") as resp:
            if 'rp_config_reloads_total{result="error"} 1.0' in await resp.text():
                break
        assert time.monotonic() < deadline
        await asyncio.sleep(0.05)
    assert await status("/new/x") == 200
    p.proc.send_signal(signal.SIGTERM)
    assert await p.wait(15) == 0
    events = p.log_lines()
    assert any(e["event"] == "config_reloaded" for e in events)
    failed = [e for e in events if e["event"] == "config_reload_failed"]
    assert failed and any(x.startswith("providers") for x in failed[0]["errors"])


async def test_sigterm_drains_in_flight_requests(mock_provider, http, cfg_file, spawn):
    """SIGTERM: stop accepting, let the request in flight finish, exit 0."""
    cfg_file.write_text(config(mock_provider.url, prefix="/"))
    p = spawn(cfg_file)
    await p.ready(http)
    async with aiohttp.ClientSession() as other:
        slow = asyncio.create_task(other.post(p.data_url + "/x",
                                              headers={"x-mock-delay": "800ms"}))
        await wait_for(lambda: mock_provider.mock.calls == 1)
        p.proc.send_signal(signal.SIGTERM)
        async with await slow as resp:
            assert resp.status == 200
            await resp.read()
        assert await p.wait(15) == 0
    events = p.log_lines()
    lines = access_lines(events)
    assert len(lines) == 1 and lines[0]["status"] == 200
    assert [e["event"] for e in events].count("stopped") == 1


async def test_sigterm_gives_up_after_drain_timeout(mock_provider, http, cfg_file, spawn):
    """A request longer than drain_timeout does not hold the exit: the process exits 0
    shortly after drain_timeout, the request logged once."""
    cfg_file.write_text(config(mock_provider.url, prefix="/", drain="300ms"))
    p = spawn(cfg_file)
    await p.ready(http)
    async with aiohttp.ClientSession() as other:
        slow = asyncio.create_task(other.post(p.data_url + "/x", headers={"x-mock-delay": "20s"}))
        await wait_for(lambda: mock_provider.mock.calls == 1)
        t0 = time.monotonic()
        p.proc.send_signal(signal.SIGTERM)
        assert await p.wait(10) == 0
        assert time.monotonic() - t0 < 5
        with pytest.raises(aiohttp.ClientError):
            async with await slow as resp:
                await resp.read()
    lines = access_lines(p.log_lines())
    assert len(lines) == 1 and lines[0]["outcome"] == "client_disconnected"
    await wait_for(lambda: mock_provider.mock.cancelled == 1)
