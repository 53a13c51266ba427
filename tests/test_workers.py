"""--workers N: processes sharing the port, metrics aggregated, drain on SIGTERM."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import sys
import time

import aiohttp

from tests.conftest import free_port


async def _wait_ready(url: str, proc: asyncio.subprocess.Process) -> None:
    deadline = time.monotonic() + 20
    async with aiohttp.ClientSession() as s:
        while time.monotonic() < deadline:
            assert proc.returncode is None, "the supervisor exited early"
            try:
                async with s.get(url) as r:
                    if r.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.1)
    raise AssertionError("workers did not come up")


async def test_two_workers_share_port_and_metrics(tmp_path):
    """Requests spread over two workers are all counted by one scrape; SIGTERM exits 0."""
    port, admin = free_port(), free_port()
    env = {**os.environ, "RP_LISTEN": f"127.0.0.1:{port}", "RP_ADMIN_LISTEN": f"127.0.0.1:{admin}"}
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "proxy", "run", "-c", "config/default.yaml", "--workers", "2",
        env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )
    try:
        await _wait_ready(f"http://127.0.0.1:{admin}/healthz", proc)
        await asyncio.sleep(1.0)  # both workers listening
        async with aiohttp.ClientSession() as s:
            for _ in range(60):
                async with s.post(f"http://127.0.0.1:{port}/v1/chat/completions", json={},
                                  headers={"connection": "close"}) as r:
                    assert r.status == 200
            # each worker adds its values to the shared files every FLUSH_S (0.25 s)
            for _ in range(40):
                async with s.get(f"http://127.0.0.1:{admin}/metrics") as r:
                    text = await r.text()
                m = re.search(r'^rp_requests_total\{code="2xx",outcome="ok",route="chat"\} (\S+)$',
                              text, re.M)
                if m is not None and float(m.group(1)) == 60.0:
                    break
                await asyncio.sleep(0.1)
        assert m is not None and float(m.group(1)) == 60.0
        proc.send_signal(signal.SIGTERM)
        out, _ = await asyncio.wait_for(proc.communicate(), 30)
        assert proc.returncode == 0
        log = out.decode()
        assert log.count('"event":"started"') == 2
        assert log.count('"event":"stopped"') == 2
        pids = {int(p) for p in re.findall(r"supervisor (\d+)", log)}
        assert len(pids) == 1
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
