"""Budgets shared by several replicas through a real Redis, and Redis failures (DESIGN §3)."""

from __future__ import annotations

import asyncio

import pytest
import redis.asyncio as aioredis

from proxy.clock import FakeClock
from tests.conftest import wait_for

JAN_15 = 1_768_478_400.0  # 2026-01-15T12:00:00Z

CONFIG = """
version: 1
state:
  backend: redis
  redis: {{url: "{redis}", timeout: {timeout}}}
providers:
  p: {{url: "{mock}", format: openai, cost_per_request: 0.05}}
budgets:
  fleet:
    window: month
    limit_usd: 1
    thresholds:
      - {{at: 0.70, action: alert}}
      - {{at: 0.85, action: downgrade}}
      - {{at: 1.00, action: block}}
    on_state_error: {on_error}
  users:
    window: day
    limit_requests: 2
    per: header:x-user-id
    on_state_error: {on_error}
routes:
  - name: chat
    match: {{path_prefix: /v1/chat/completions}}
    provider: p
    budgets: [fleet]
  - name: users
    match: {{path_prefix: /users}}
    tiers: [{{provider: p, path: /v1/chat/completions}}]
    budgets: [users]
"""


async def replicas(make_proxy, mock_provider, redis_server, n=3, on_error="block", timeout="2s"):
    """Redis timeout 2 s unless a Redis-down test passes its own: on a loaded CI machine a
    call can exceed 500 ms, and the budget then rightly applies on_state_error (block: 503),
    failing a test about something else."""
    text = CONFIG.format(mock=mock_provider.url, redis=redis_server.url, on_error=on_error,
                         timeout=timeout)
    return [await make_proxy(text, clock=FakeClock(wall=JAN_15)) for _ in range(n)]


async def post(http, proxy, path="/v1/chat/completions", **kw):
    async with http.post(proxy.data_url + path, json={"model": "m"}, **kw) as r:
        return r.status, r.headers, await r.read()


async def budget_row(http, proxy, name="fleet"):
    async with http.get(proxy.admin_url + "/admin/status") as r:
        return [b for b in (await r.json())["budgets"] if b["name"] == name]


async def test_replicas_share_the_budget_without_overshoot(make_proxy, mock_provider,
                                                           redis_server, http, logs):
    """60 calls at once spread over 3 replicas, $0.05 each against $1.00: exactly 20 are
    admitted fleet-wide, and each step is announced once by the whole fleet."""
    fleet = await replicas(make_proxy, mock_provider, redis_server)
    results = await asyncio.gather(*(post(http, fleet[i % 3], headers={"x-mock-delay": "100ms"})
                                     for i in range(60)))
    statuses = [r[0] for r in results]
    assert statuses.count(200) == 20 and statuses.count(429) == 40
    assert mock_provider.mock.calls == 20
    events = [e for e in logs if e.get("event") == "budget_threshold_crossed"]
    assert sorted((e["at"], e["action"]) for e in events) == [
        (0.7, "alert"), (0.85, "downgrade"), (1.0, "block")]
    for proxy in fleet:
        [row] = await budget_row(http, proxy)
        assert row["spend_usd"] == pytest.approx(1.0) and row["requests"] == 20
        assert row["level"] == "block"


async def test_per_key_quota_is_fleet_wide_and_keys_are_digested(make_proxy, mock_provider,
                                                                 redis_server, http):
    """A user's daily quota holds across replicas; Redis keys carry a digest, not the id."""
    fleet = await replicas(make_proxy, mock_provider, redis_server)
    got = [(await post(http, p, "/users", headers={"x-user-id": "alice"}))[0] for p in fleet]
    assert got == [200, 200, 429]
    client = aioredis.Redis.from_url(redis_server.url)
    try:
        keys = [k.decode() for k in await client.keys("*")]
    finally:
        await client.aclose()
    assert keys and all(k.startswith("rp:{b:users:") for k in keys)
    assert not any("alice" in k for k in keys)


async def test_state_down_blocks_and_marks_readyz_blind(make_proxy, mock_provider,
                                                        redis_server, http):
    """on_state_error: block — Redis down answers 503 state_unavailable and /readyz is not
    ready; once Redis is back, calls pass and /readyz recovers."""
    [proxy] = await replicas(make_proxy, mock_provider, redis_server, n=1, timeout="500ms")
    assert (await post(http, proxy))[0] == 200
    redis_server.kill()
    status, _, body = await post(http, proxy)
    assert status == 503 and b'"state_unavailable"' in body
    async with http.get(proxy.admin_url + "/readyz") as r:
        assert r.status == 503 and (await r.json())["blind"] == ["budget"]
    assert mock_provider.mock.calls == 1
    redis_server.start()
    assert (await post(http, proxy))[0] == 200
    async with http.get(proxy.admin_url + "/readyz") as r:
        assert r.status == 200


async def test_state_down_allow_passes_counts_and_settles_later(make_proxy, mock_provider,
                                                                redis_server, http):
    """on_state_error: allow — Redis down, calls pass and each failure is counted; their
    cost is settled once Redis answers again (here: at the next call)."""
    [proxy] = await replicas(make_proxy, mock_provider, redis_server, n=1, on_error="allow",
                              timeout="500ms")
    redis_server.kill()
    for _ in range(3):
        assert (await post(http, proxy))[0] == 200
    errors = proxy.deps.metrics.registry.get_sample_value("rp_state_errors_total",
                                                          {"feature": "budget"})
    assert errors is not None and errors >= 6  # 3 reservations, 3 settlements
    async with http.get(proxy.admin_url + "/readyz") as r:
        assert r.status == 200
    redis_server.start()
    assert (await post(http, proxy))[0] == 200
    budget = proxy.runtime.registry["budget"]["fleet"]
    await wait_for(lambda: not budget._tasks)
    [row] = await budget_row(http, proxy)
    assert row["spend_usd"] == pytest.approx(0.2) and row["requests"] == 4


async def test_a_settlement_lost_to_an_outage_is_flushed(make_proxy, mock_provider,
                                                         redis_server, http):
    """Redis dies while a call is in flight: the call is answered, its settlement is kept
    and written by the shutdown flush once Redis is reachable again."""
    [proxy] = await replicas(make_proxy, mock_provider, redis_server, n=1, timeout="500ms")
    call = asyncio.create_task(post(http, proxy, headers={"x-mock-delay": "500ms"}))
    await wait_for(lambda: mock_provider.mock.calls == 1)
    redis_server.kill()
    assert (await call)[0] == 200
    redis_server.start()  # an empty Redis: the spend is only in the replica's memory
    [row] = await budget_row(http, proxy)
    assert row["spend_usd"] == 0
    await proxy.runtime.registry["flush"]["budget:fleet"]()
    [row] = await budget_row(http, proxy)
    assert row["spend_usd"] == pytest.approx(0.05) and row["requests"] == 1


async def test_status_with_redis_down_shows_last_known_values(make_proxy, mock_provider,
                                                              redis_server, http):
    """/admin/status does not wait on Redis once per key: with Redis down it answers with
    the values this replica saw last."""
    [proxy] = await replicas(make_proxy, mock_provider, redis_server, n=1, timeout="500ms")
    for user in ("a", "b", "b"):
        assert (await post(http, proxy, "/users", headers={"x-user-id": user}))[0] == 200
    budget = proxy.runtime.registry["budget"]["users"]
    await wait_for(lambda: not budget._tasks)
    redis_server.kill()
    rows = {r["key"]: r["requests"] for r in await budget_row(http, proxy, "users")}
    assert rows == {"a": 1, "b": 2}
