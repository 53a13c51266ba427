"""The response cache on the Redis backend: real redis-server (killed and restarted for the
failure cases), real proxies (two sharing one Redis), real mock provider."""

from __future__ import annotations

import asyncio
import socket
import time
from typing import Any

import orjson
import redis.asyncio as aioredis

from proxy.clock import FakeClock
from tests.cache_support import cache_results, metric
from tests.conftest import RedisServer
from tests.test_cache import BODY, STREAM, post

CONFIG = """
version: 1
state: {{backend: redis, redis: {{url: "{redis}", timeout: {timeout}}}}}
providers:
  p1: {{url: "{mock}", format: openai{headers}}}
routes:
  - name: chat
    match: {{path_prefix: /v1/, methods: [POST]}}
    provider: p1
    cache: {{ttl: 1h, key: {{headers: [x-tenant-id]}}}}
"""


def config(mock: str, redis_url: str, headers: str = "", timeout: str = "2s") -> str:
    """Redis timeout 2 s unless a test of a dead or silent Redis passes its own: on a loaded
    CI machine a call can exceed 100 ms, and the cache then rightly fails open (a miss),
    failing a test about something else."""
    return CONFIG.format(mock=mock, redis=redis_url, headers=headers, timeout=timeout)


async def _dump(url: str) -> dict[bytes, bytes]:
    r = aioredis.Redis.from_url(url)
    try:
        return {k: await r.get(k) or b"" for k in await r.keys("*")}
    finally:
        await r.aclose()


async def test_reply_cached_through_one_proxy_is_a_hit_through_another(
        mock_provider, make_proxy, http, redis_server: RedisServer):
    """Two proxies sharing one Redis: a reply cached by A is served by B without upstream."""
    yaml_text = config(mock_provider.url, redis_server.url)
    a, b = await make_proxy(yaml_text), await make_proxy(yaml_text)
    _, ha, body_a = await post(http, a)
    _, hb, body_b = await post(http, b)
    assert (ha["x-rp-cache"], hb["x-rp-cache"]) == ("miss", "hit")
    assert body_b == body_a and mock_provider.mock.calls == 1
    keys = list(await _dump(redis_server.url))
    assert len(keys) == 1 and keys[0].startswith(b"rp:{cache:") and keys[0].endswith(b"}")


async def test_stream_replayed_from_redis(mock_provider, make_proxy, http, redis_server):
    """A completed stream stored in Redis by A replays as the same SSE bytes through B."""
    yaml_text = config(mock_provider.url, redis_server.url)
    a, b = await make_proxy(yaml_text), await make_proxy(yaml_text)
    _, _, first = await post(http, a, STREAM)
    _, hb, replay = await post(http, b, STREAM)
    assert hb["x-rp-cache"] == "hit" and hb["content-type"].startswith("text/event-stream")
    assert replay == first and mock_provider.mock.calls == 1


async def test_concurrent_requests_on_two_replicas_make_one_upstream_call(
        mock_provider, make_proxy, http, redis_server):
    """Identical requests in flight on two replicas: the Redis lease lets one replica call
    upstream while the other polls the cache; one upstream call in all."""
    yaml_text = config(mock_provider.url, redis_server.url)
    a, b = await make_proxy(yaml_text), await make_proxy(yaml_text)
    replies = await asyncio.gather(*(post(http, p, x_mock_delay="300ms")
                                     for _ in range(10) for p in (a, b)))
    assert {s for s, _, _ in replies} == {200} and len({body for _, _, body in replies}) == 1
    assert mock_provider.mock.calls == 1
    assert not [k for k in await _dump(redis_server.url) if k.endswith(b":lease}")]


async def test_orphaned_lease_delays_at_most_half_the_time_left(
        mock_provider, make_proxy, http, redis_server):
    """A lease whose holder died: a request polls for at most half its time left, then goes
    upstream itself (time on the injected clock)."""
    clock = FakeClock()
    proxy = await make_proxy(config(mock_provider.url, redis_server.url), clock=clock)
    await post(http, proxy, x_tenant_id="probe")  # learn where this request's key lives
    (entry_key,) = await _dump(redis_server.url)
    r = aioredis.Redis.from_url(redis_server.url)
    await r.flushall()
    await r.set(entry_key[:-1] + b":lease}", b"dead-replica", px=600_000)
    await r.aclose()
    status, h, _ = await post(http, proxy, x_tenant_id="probe")
    assert (status, h["x-rp-cache"]) == (200, "miss")
    assert 55 <= sum(clock.slept) <= 60.5  # half of the default 120 s total
    assert mock_provider.mock.calls == 2


async def test_redis_killed_under_traffic_fails_open_and_recovers(
        mock_provider, make_proxy, http, redis_server, logs):
    """Redis down: every request still answers 200 (a miss), errors are counted for the cache,
    logged once, /readyz stays ready; Redis back: entries are stored and hit again."""
    proxy = await make_proxy(config(mock_provider.url, redis_server.url, timeout="100ms"))
    await post(http, proxy)
    _, h, _ = await post(http, proxy)
    assert h["x-rp-cache"] == "hit"
    redis_server.kill()
    down = [await post(http, proxy, {**BODY, "n": i}) for i in range(10)]
    assert [(s, h["x-rp-cache"]) for s, h, _ in down] == [(200, "miss")] * 10
    # one failed call per request: after a failed lookup the request skips lease and store
    assert metric(proxy, "rp_state_errors_total", feature="cache") == 10
    assert [e["event"] for e in logs if e.get("feature") == "cache"] == ["state_unavailable"]
    async with http.get(proxy.admin_url + "/readyz") as resp:
        assert resp.status == 200
    redis_server.start()
    errors_before = metric(proxy, "rp_state_errors_total", feature="cache")
    _, h1, _ = await post(http, proxy, {**BODY, "after": 1})
    _, h2, _ = await post(http, proxy, {**BODY, "after": 1})
    assert (h1["x-rp-cache"], h2["x-rp-cache"]) == ("miss", "hit")
    assert metric(proxy, "rp_state_errors_total", feature="cache") == errors_before
    assert any(e["event"] == "state_recovered" for e in logs)


async def test_unresponsive_redis_holds_a_request_at_most_the_timeout(mock_provider, make_proxy,
                                                                     http):
    """A Redis that accepts connections but never answers costs a request one
    state.redis.timeout (the lookup; lease and store are then skipped): answered, a miss."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(64)
        url = f"redis://127.0.0.1:{silent.getsockname()[1]}/0"
        proxy = await make_proxy(config(mock_provider.url, url, timeout="100ms"))
        started = time.monotonic()
        status, h, _ = await post(http, proxy)
        elapsed = time.monotonic() - started
    assert (status, h["x-rp-cache"]) == (200, "miss")
    assert elapsed < 3  # cut at 100 ms: never a hang
    assert metric(proxy, "rp_state_errors_total", feature="cache") == 1


async def test_redis_holds_no_secret(mock_provider, make_proxy, http, redis_server):
    """Neither keys nor values in Redis contain the provider key or the client's key."""
    secret = "sk-live-provider-key-123"
    server_block = 'server: {clients: {header: x-app-key, keys: ["app-key-456"]}}\n'
    yaml_text = config(mock_provider.url, redis_server.url,
                       headers=f", headers: {{authorization: Bearer {secret}}}")
    yaml_text = yaml_text.replace("version: 1\n", "version: 1\n" + server_block)
    proxy = await make_proxy(yaml_text)
    for body in (BODY, STREAM):
        await post(http, proxy, body, x_app_key="app-key-456")
        _, h, _ = await post(http, proxy, body, x_app_key="app-key-456")
        assert h["x-rp-cache"] == "hit"
    dump = await _dump(redis_server.url)
    assert len(dump) == 2
    blob = b"".join(k + v for k, v in dump.items())
    assert secret.encode() not in blob and b"app-key-456" not in blob


async def test_cache_hit_skips_upstream_and_counts(mock_provider, make_proxy, http, redis_server):
    """With Redis, results are counted like with memory (miss, then hit)."""
    proxy = await make_proxy(config(mock_provider.url, redis_server.url))
    replies: list[Any] = [await post(http, proxy) for _ in range(3)]
    assert [h["x-rp-cache"] for _, h, _ in replies] == ["miss", "hit", "hit"]
    assert cache_results(proxy) == {"miss": 1, "hit": 2}
    assert orjson.loads(replies[2][2]) == orjson.loads(replies[0][2])
