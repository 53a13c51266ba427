"""The response cache on the memory backend: the real proxy in front of the real mock provider
(and a small header-echoing upstream where the mock cannot set a header), plus Hypothesis
properties of the key and the stored entry."""

from __future__ import annotations

import asyncio
import itertools
import json
import random
from types import SimpleNamespace
from typing import Any

import aiohttp
import orjson
from hypothesis import given, settings
from hypothesis import strategies as st
from multidict import CIMultiDict, CIMultiDictProxy

from policies.cache_entry import Entry
from policies.cache_key import CacheKey, normalised_json
from proxy.call import Call, Reply
from proxy.clock import FakeClock
from proxy.config import CacheKeyConfig
from tests.cache_support import cache_results, metric, running_echo
from tests.conftest import access_lines

CHAT = "/v1/chat/completions"
CONFIG = """
version: 1
{server}
providers:
  p1: {{url: "{url}", format: openai}}
routes:
  - name: chat
    match: {{path_prefix: /v1/, methods: [POST]}}
    provider: p1
    cache:
      ttl: 1h
      key: {{headers: [x-tenant-id], ignore_json_fields: [user, metadata.trace_id]}}
      statuses: [200]
{extra}
"""
BODY = {"model": "m1", "messages": [{"role": "user", "content": "barcode 8801234567893"}]}


def config(url: str, extra: str = "", server: str = "") -> str:
    return CONFIG.format(url=url, extra=extra, server=server)


async def post(http: aiohttp.ClientSession, proxy: Any, body: Any = None, path: str = CHAT,
               **headers: str) -> tuple[int, CIMultiDict[str], bytes]:
    data = body if isinstance(body, bytes) else orjson.dumps(BODY if body is None else body)
    hdrs = {k.replace("_", "-"): v for k, v in headers.items()}
    async with http.post(proxy.data_url + path, data=data, headers=hdrs) as resp:
        return resp.status, CIMultiDict(resp.headers), await resp.read()


# --------------------------------------------------------------------------- hit and miss


async def test_second_identical_request_is_a_free_hit(mock_provider, make_proxy, http, logs):
    """A repeat is served from the cache: no upstream call, same body, x-rp-cache hit, cost 0,
    outcome cache_hit, counted by result, t_cache logged."""
    proxy = await make_proxy(config(mock_provider.url))
    s1, h1, b1 = await post(http, proxy)
    s2, h2, b2 = await post(http, proxy)
    assert (s1, s2) == (200, 200)
    assert h1["x-rp-cache"] == "miss" and h2["x-rp-cache"] == "hit"
    assert b2 == b1 and mock_provider.mock.calls == 1
    assert h2["x-rp-cost-usd"] == "0" and h2["x-rp-attempts"] == "0"
    assert h2["x-request-id"] != h1["x-request-id"]
    assert h2["content-type"].startswith("application/json") and "age" in h2
    assert cache_results(proxy) == {"miss": 1, "hit": 1}
    first, second = access_lines(logs)
    assert (first["cache"], second["cache"]) == ("miss", "hit")
    assert second["outcome"] == "cache_hit" and second["cost_usd"] == 0.0
    assert isinstance(second["t_cache"], float) and second["attempts"] == 0


async def test_json_key_order_whitespace_and_ignored_fields_still_hit(mock_provider, make_proxy,
                                                                      http):
    """Key order, whitespace, `user` and the dotted `metadata.trace_id` do not change the key."""
    proxy = await make_proxy(config(mock_provider.url))
    body = {**BODY, "user": "u1", "metadata": {"trace_id": "t1", "app": "pos"}}
    await post(http, proxy, body)
    reordered = json.dumps({"metadata": {"app": "pos", "trace_id": "t2"}, "user": "u2",
                            "messages": BODY["messages"], "model": "m1"}, indent=2).encode()
    _, h, _ = await post(http, proxy, reordered)
    assert h["x-rp-cache"] == "hit" and mock_provider.mock.calls == 1


async def test_significant_differences_miss(mock_provider, make_proxy, http):
    """A different field, nested value, query, path, listed header or method is a new entry;
    an unlisted header is not."""
    proxy = await make_proxy(config(mock_provider.url))
    await post(http, proxy, x_tenant_id="a")
    other_msg = {**BODY, "messages": [{"role": "user", "content": "barcode 8801234567894"}]}
    variants = [
        await post(http, proxy, {**BODY, "model": "m2"}, x_tenant_id="a"),
        await post(http, proxy, {**BODY, "metadata": {"app": "x"}}, x_tenant_id="a"),
        await post(http, proxy, other_msg, x_tenant_id="a"),
        await post(http, proxy, path=CHAT + "?v=2", x_tenant_id="a"),
        await post(http, proxy, path="/v1/generic", x_tenant_id="a"),
        await post(http, proxy, x_tenant_id="b"),
        await post(http, proxy),  # the listed header absent
    ]
    assert [h["x-rp-cache"] for _, h, _ in variants] == ["miss"] * len(variants)
    _, h, _ = await post(http, proxy, x_tenant_id="a", x_unlisted="whatever")
    assert h["x-rp-cache"] == "hit"
    assert mock_provider.mock.calls == 1 + len(variants)


async def test_raw_bodies_are_keyed_by_bytes(mock_provider, make_proxy, http):
    """A non-JSON body is keyed by its bytes: equal bytes hit, other bytes miss."""
    proxy = await make_proxy(config(mock_provider.url))
    await post(http, proxy, b"\x00\x01 raw image bytes", path="/v1/generic")
    _, same, _ = await post(http, proxy, b"\x00\x01 raw image bytes", path="/v1/generic")
    _, other, _ = await post(http, proxy, b"\x00\x02 raw image bytes", path="/v1/generic")
    assert (same["x-rp-cache"], other["x-rp-cache"]) == ("hit", "miss")


async def test_clients_never_share_entries(mock_provider, make_proxy, http):
    """With server.clients set, the client identity is in the key: no cross-tenant hit."""
    server = 'server: {clients: {header: x-app-key, keys: ["key-one", "key-two"]}}'
    proxy = await make_proxy(config(mock_provider.url, server=server))
    await post(http, proxy, x_app_key="key-one")
    _, h_two, _ = await post(http, proxy, x_app_key="key-two")
    _, h_one, _ = await post(http, proxy, x_app_key="key-one")
    assert (h_two["x-rp-cache"], h_one["x-rp-cache"]) == ("miss", "hit")


async def test_passthrough_credentials_are_part_of_the_key(mock_provider, make_proxy, http):
    """A pass-through provider sees the app's own key: another (or no) key never gets its hit."""
    proxy = await make_proxy(config(mock_provider.url))
    await post(http, proxy, authorization="Bearer app-key-1")
    _, other, _ = await post(http, proxy, authorization="Bearer app-key-2")
    _, none, _ = await post(http, proxy)
    _, same, _ = await post(http, proxy, authorization="Bearer app-key-1")
    assert [h["x-rp-cache"] for h in (other, none, same)] == ["miss", "miss", "hit"]


async def test_injected_credentials_are_not_in_the_key(mock_provider, make_proxy, http):
    """When the provider injects its own key, the client's (dropped) credentials don't split
    the cache."""
    yaml_text = config(mock_provider.url).replace(
        "format: openai}", "format: openai, headers: {authorization: Bearer sk-provider}}")
    proxy = await make_proxy(yaml_text)
    await post(http, proxy, authorization="Bearer whatever-1")
    _, h, _ = await post(http, proxy, authorization="Bearer whatever-2")
    assert h["x-rp-cache"] == "hit"


async def test_ttl_expiry_on_the_injected_clock(mock_provider, make_proxy, http):
    """An entry is served until its TTL and not after (time from the injected clock)."""
    clock = FakeClock()
    proxy = await make_proxy(config(mock_provider.url), clock=clock)
    await post(http, proxy)
    clock.advance(3599)
    _, h_in, _ = await post(http, proxy)
    clock.advance(2)
    _, h_out, _ = await post(http, proxy)
    assert (h_in["x-rp-cache"], h_out["x-rp-cache"]) == ("hit", "miss")
    assert h_in["age"] == "3599"


# --------------------------------------------------------------------------- what is stored


async def test_unlisted_status_is_not_stored(mock_provider, make_proxy, http):
    """A 503 (not in statuses) is relayed and never served from the cache."""
    proxy = await make_proxy(config(mock_provider.url))
    s1, _, _ = await post(http, proxy, x_mock_status="503")
    s2, h2, _ = await post(http, proxy, x_mock_status="503")
    assert (s1, s2) == (503, 503) and h2["x-rp-cache"] == "miss"
    assert mock_provider.mock.calls == 2


async def test_listed_error_status_is_stored(mock_provider, make_proxy, http):
    """Only listed statuses are stored, and a listed 404 is."""
    yaml_text = config(mock_provider.url).replace("statuses: [200]", "statuses: [200, 404]")
    proxy = await make_proxy(yaml_text)
    await post(http, proxy, x_mock_status="404")
    s, h, _ = await post(http, proxy, x_mock_status="404")
    assert (s, h["x-rp-cache"]) == (404, "hit")


async def test_set_cookie_and_no_store_are_not_stored(make_proxy, http):
    """Replies with Set-Cookie or Cache-Control: no-store are not stored; no-cache is."""
    async with running_echo() as echo:
        proxy = await make_proxy(config(echo.url))
        for header in ("set-cookie=session=abc", "cache-control=private, no-store"):
            await post(http, proxy, {"q": header}, x_echo_header=header)
            _, h, _ = await post(http, proxy, {"q": header}, x_echo_header=header)
            assert h["x-rp-cache"] == "miss", header
        await post(http, proxy, {"q": "nc"}, x_echo_header="cache-control=no-cache")
        _, h, _ = await post(http, proxy, {"q": "nc"}, x_echo_header="cache-control=no-cache")
        assert h["x-rp-cache"] == "hit"
        assert echo.calls == 5


async def test_per_request_headers_are_not_replayed(make_proxy, http):
    """A hit keeps the provider's content headers but not its per-request ones."""
    async with running_echo() as echo:
        proxy = await make_proxy(config(echo.url))
        sent = {"x-echo-header": "openai-model=m1"}
        async with http.post(proxy.data_url + CHAT, json=BODY, headers=[
                ("x-echo-header", "openai-model=m1"),
                ("x-echo-header", "x-ratelimit-remaining-requests=9"),
                ("x-echo-header", "x-request-id=upstream-id")]) as resp:
            assert resp.headers["x-ratelimit-remaining-requests"] == "9"
        async with http.post(proxy.data_url + CHAT, json=BODY, headers=sent) as resp:
            assert resp.headers["x-rp-cache"] == "hit"
            assert resp.headers["openai-model"] == "m1"
            assert "x-ratelimit-remaining-requests" not in resp.headers
            assert resp.headers["x-request-id"] != "upstream-id"


async def test_entries_above_max_entry_size_are_not_stored(make_proxy, http):
    """A reply body over max_entry_size is relayed but not stored."""
    async with running_echo() as echo:
        yaml_text = config(echo.url).replace("statuses: [200]",
                                             "statuses: [200]\n      max_entry_size: 1KiB")
        proxy = await make_proxy(yaml_text)
        await post(http, proxy, {"q": "big"}, x_echo_size="2000")
        _, big, _ = await post(http, proxy, {"q": "big"}, x_echo_size="2000")
        await post(http, proxy, {"q": "small"}, x_echo_size="10")
        _, small, _ = await post(http, proxy, {"q": "small"}, x_echo_size="10")
        assert (big["x-rp-cache"], small["x-rp-cache"]) == ("miss", "hit")


async def test_reply_carrying_a_secret_is_never_stored(mock_provider, make_proxy, http, logs):
    """A reply that echoes a configured provider key is relayed but never written to the store."""
    yaml_text = config(mock_provider.url).replace(
        "format: openai}", "format: openai, headers: {x-vendor-secret: s3cr3t-vendor-key}}")
    proxy = await make_proxy(yaml_text)
    body = {"barcode": "s3cr3t-vendor-key"}  # the mock's generic endpoint echoes it back
    await post(http, proxy, body, path="/v1/generic")
    _, h, _ = await post(http, proxy, body, path="/v1/generic")
    assert h["x-rp-cache"] == "miss"
    assert any(e["event"] == "cache_store_refused" for e in logs)


async def _raw_upstream(header: bytes) -> tuple[asyncio.Server, str, list[int]]:
    """A bare HTTP/1.1 upstream whose replies carry ``header`` as raw bytes (not UTF-8)."""
    calls = [0]

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                           if line.lower().startswith(b"content-length:")), 0)
            await reader.readexactly(length)
            calls[0] += 1
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n" + header
                         + b"\r\ncontent-length: 2\r\n\r\n{}")
            await writer.drain()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    return server, f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}", calls


async def test_non_utf8_reply_header_is_relayed_but_not_stored(make_proxy, http, logs):
    """A provider header that is not UTF-8 cannot be stored: the reply is still relayed (never
    a 500) and the next request goes upstream again."""
    server, url, calls = await _raw_upstream(b"x-odd: caf\xe9")
    try:
        proxy = await make_proxy(config(url))
        s1, _, _ = await post(http, proxy)
        s2, h2, _ = await post(http, proxy)
        assert (s1, s2) == (200, 200) and h2["x-rp-cache"] == "miss" and calls[0] == 2
        assert any(e["event"] == "cache_store_refused" for e in logs)
    finally:
        server.close()


async def _raw_post(proxy: Any, header: bytes) -> tuple[int, bytes]:
    host, port = proxy.data_url.removeprefix("http://").rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    body = orjson.dumps(BODY)
    writer.write(b"POST " + CHAT.encode() + b" HTTP/1.1\r\nhost: x\r\nconnection: close\r\n"
                 + header + b"\r\ncontent-type: application/json\r\ncontent-length: "
                 + str(len(body)).encode() + b"\r\n\r\n" + body)
    data = await reader.read()
    writer.close()
    status = int(data.split(b" ", 2)[1])
    cache = next((line.split(b":", 1)[1].strip() for line in data.split(b"\r\n")
                  if line.lower().startswith(b"x-rp-cache:")), b"")
    return status, cache


async def test_non_utf8_request_header_is_keyed_not_an_error(mock_provider, make_proxy):
    """A listed request header with non-UTF-8 bytes is part of the key like any other value."""
    proxy = await make_proxy(config(mock_provider.url))
    assert await _raw_post(proxy, b"x-tenant-id: caf\xe9") == (200, b"miss")
    assert await _raw_post(proxy, b"x-tenant-id: caf\xe9") == (200, b"hit")
    assert await _raw_post(proxy, b"x-tenant-id: caf\xea") == (200, b"miss")


async def test_hits_do_not_touch_the_quota(mock_provider, make_proxy, http):
    """The cache sits before the budget: a user at quota still gets hits; a miss is refused."""
    quota = """budgets:
  q: {window: day, limit_requests: 1, per: "header:x-user-id", thresholds: [{at: 1.0, action: block}]}
"""
    yaml_text = config(mock_provider.url, extra="    budgets: [q]").replace(
        "providers:", quota + "providers:")
    proxy = await make_proxy(yaml_text)
    s1, h1, _ = await post(http, proxy, x_user_id="u1")
    s2, h2, _ = await post(http, proxy, x_user_id="u1")
    s3, _, b3 = await post(http, proxy, {**BODY, "model": "m2"}, x_user_id="u1")
    assert (s1, h1["x-rp-cache"]) == (200, "miss")
    assert (s2, h2["x-rp-cache"]) == (200, "hit")
    assert s3 == 429 and orjson.loads(b3)["error"]["type"] == "budget_exceeded"
    assert mock_provider.mock.calls == 1


async def test_canary_arms_never_share_entries(mock_provider, make_proxy, http):
    """The arm is part of the key (DESIGN §8): the first request of each arm is a miss, later
    ones of the same arm hit, whatever the user."""
    canary = """    canary:
      weight: 50
      hash_on: header:x-user-id
      variant: {tiers: [{provider: p1, model: m-variant}]}"""
    proxy = await make_proxy(config(mock_provider.url, extra=canary))
    seen: dict[str, list[str]] = {}
    for i in range(24):
        _, h, _ = await post(http, proxy, x_user_id=f"user-{i}")
        seen.setdefault(h["x-rp-canary"], []).append(h["x-rp-cache"])
    assert set(seen) == {"stable", "variant"}
    for results in seen.values():
        assert results == ["miss"] + ["hit"] * (len(results) - 1)
    assert mock_provider.mock.calls == 2


# --------------------------------------------------------------------------- control header


async def test_bypass_neither_reads_nor_writes(mock_provider, make_proxy, http):
    """x-rp-cache: bypass goes upstream and stores nothing; the entry stays as it was."""
    proxy = await make_proxy(config(mock_provider.url))
    _, h1, _ = await post(http, proxy, x_rp_cache="bypass")
    _, h2, _ = await post(http, proxy)
    await post(http, proxy, x_rp_cache="bypass", x_mock_model="other")
    _, h3, b3 = await post(http, proxy)
    assert [h1["x-rp-cache"], h2["x-rp-cache"], h3["x-rp-cache"]] == ["bypass", "miss", "hit"]
    assert orjson.loads(b3)["model"] == "m1"
    assert cache_results(proxy) == {"bypass": 2, "miss": 1, "hit": 1}


async def test_refresh_renews_the_entry(mock_provider, make_proxy, http):
    """x-rp-cache: refresh goes upstream and replaces the stored reply."""
    proxy = await make_proxy(config(mock_provider.url))
    await post(http, proxy)
    _, h, _ = await post(http, proxy, x_rp_cache="refresh", x_mock_model="renewed")
    _, hit, body = await post(http, proxy)
    assert h["x-rp-cache"] == "refresh" and hit["x-rp-cache"] == "hit"
    assert orjson.loads(body)["model"] == "renewed" and mock_provider.mock.calls == 2


# --------------------------------------------------------------------------- streams


STREAM = {**BODY, "stream": True}


async def test_stream_is_stored_after_completion_and_replayed_as_sse(mock_provider, make_proxy,
                                                                     http):
    """A completed SSE stream is stored and a hit replays the same bytes as text/event-stream."""
    proxy = await make_proxy(config(mock_provider.url))
    _, h1, b1 = await post(http, proxy, STREAM)
    _, h2, b2 = await post(http, proxy, STREAM)
    assert h1["x-rp-cache"] == "miss" and h2["x-rp-cache"] == "hit"
    assert h2["content-type"].startswith("text/event-stream")
    assert b2 == b1 and b1.endswith(b"data: [DONE]\n\n") and b1.count(b"data:") >= 6
    assert mock_provider.mock.calls == 1


async def test_broken_stream_is_not_stored(mock_provider, make_proxy, http):
    """A stream that breaks mid-way is never stored: the next request goes upstream."""
    proxy = await make_proxy(config(mock_provider.url))
    _, _, b1 = await post(http, proxy, STREAM, x_mock_drop="mid-stream")
    assert b"event: error" in b1
    _, h2, b2 = await post(http, proxy, STREAM)
    assert h2["x-rp-cache"] == "miss" and b2.endswith(b"data: [DONE]\n\n")
    assert mock_provider.mock.calls == 2


async def test_stream_over_max_entry_size_is_not_stored(mock_provider, make_proxy, http):
    """A stream longer than max_entry_size is relayed whole but not stored."""
    yaml_text = config(mock_provider.url).replace("statuses: [200]",
                                                  "statuses: [200]\n      max_entry_size: 300")
    proxy = await make_proxy(yaml_text)
    _, _, b1 = await post(http, proxy, STREAM, x_mock_chunks="20")
    _, h2, _ = await post(http, proxy, STREAM, x_mock_chunks="20")
    assert len(b1) > 300 and b1.endswith(b"data: [DONE]\n\n")
    assert h2["x-rp-cache"] == "miss"


# --------------------------------------------------------------------------- coalescing


async def test_identical_concurrent_requests_share_one_upstream_call(mock_provider, make_proxy,
                                                                     http):
    """30 identical requests in flight: one upstream call, everyone gets the same body."""
    proxy = await make_proxy(config(mock_provider.url))
    replies = await asyncio.gather(*(post(http, proxy, x_mock_delay="300ms") for _ in range(30)))
    assert mock_provider.mock.calls == 1
    assert {b for _, _, b in replies} == {replies[0][2]} and {s for s, _, _ in replies} == {200}
    caches = sorted(h["x-rp-cache"] for _, h, _ in replies)
    assert caches == ["hit"] * 29 + ["miss"]
    assert cache_results(proxy) == {"miss": 1, "coalesced": 29}


async def test_coalesce_off_sends_each_request(mock_provider, make_proxy, http):
    """coalesce: false — concurrent identical requests each go upstream."""
    yaml_text = config(mock_provider.url).replace("statuses: [200]",
                                                  "statuses: [200]\n      coalesce: false")
    proxy = await make_proxy(yaml_text)
    await asyncio.gather(*(post(http, proxy, x_mock_delay="200ms") for _ in range(5)))
    assert mock_provider.mock.calls == 5


async def test_leader_error_is_shared_not_stampeded(mock_provider, make_proxy, http):
    """The leader's upstream error is every follower's answer: one upstream call in all."""
    proxy = await make_proxy(config(mock_provider.url))
    replies = await asyncio.gather(*(post(http, proxy, x_mock_delay="200ms", x_mock_status="503")
                                     for _ in range(10)))
    assert [s for s, _, _ in replies] == [503] * 10
    assert mock_provider.mock.calls == 1


async def test_leader_timeout_is_shared(mock_provider, make_proxy, http):
    """A leader that times out gives every follower the 504, not ten more slow calls."""
    yaml_text = config(mock_provider.url, extra="    timeout: {total: 300ms}")
    proxy = await make_proxy(yaml_text)
    replies = await asyncio.gather(*(post(http, proxy, x_mock_delay="2s") for _ in range(10)))
    assert [s for s, _, _ in replies] == [504] * 10
    assert {orjson.loads(b)["error"]["type"] for _, _, b in replies} == {"timeout"}
    assert mock_provider.mock.calls == 1


async def test_leader_client_gone_hands_over_to_one_follower(mock_provider, make_proxy, http):
    """When the leader's client disconnects, exactly one follower calls upstream for the rest."""
    proxy = await make_proxy(config(mock_provider.url))
    leader = asyncio.create_task(post(http, proxy, x_mock_delay="400ms"))
    await asyncio.sleep(0.1)
    followers = [asyncio.create_task(post(http, proxy, x_mock_delay="400ms")) for _ in range(8)]
    await asyncio.sleep(0.1)
    leader.cancel()
    replies = await asyncio.gather(*followers)
    assert [s for s, _, _ in replies] == [200] * 8
    assert mock_provider.mock.calls == 2  # the cancelled leader's, and one follower's


async def test_streams_coalesce_and_followers_get_the_replay(mock_provider, make_proxy, http):
    """Concurrent identical stream requests: one upstream stream, followers get its replay."""
    proxy = await make_proxy(config(mock_provider.url))
    replies = await asyncio.gather(*(post(http, proxy, STREAM, x_mock_chunk_delay="50ms")
                                     for _ in range(10)))
    assert mock_provider.mock.calls == 1
    assert len({b for _, _, b in replies}) == 1
    assert all(h["content-type"].startswith("text/event-stream") for _, h, _ in replies)


async def test_followers_of_a_broken_stream_retry_once(mock_provider, make_proxy, http):
    """A leader's stream that breaks is handed over: one follower streams again for the rest."""
    proxy = await make_proxy(config(mock_provider.url))
    leader = asyncio.create_task(post(http, proxy, STREAM, x_mock_drop="mid-stream",
                                      x_mock_delay="200ms"))
    await asyncio.sleep(0.05)
    followers = await asyncio.gather(*(post(http, proxy, STREAM, x_mock_delay="200ms")
                                       for _ in range(5)))
    _, _, broken = await leader
    assert b"event: error" in broken
    assert all(b.endswith(b"data: [DONE]\n\n") for _, _, b in followers)
    assert mock_provider.mock.calls == 2


# --------------------------------------------------------------------------- properties


def _call(body: bytes, *, headers: dict[str, str] | None = None, method: str = "POST",
          path: str = "/v1/chat/completions", query: str = "", client: str | None = None,
          arm: str = "stable") -> Call:
    route = SimpleNamespace(stable=SimpleNamespace(name=arm))
    call = Call(runtime=None, route=route, clock=FakeClock(), request_id="r",  # type: ignore[arg-type]
                method=method, path=path, query=query,
                headers=CIMultiDictProxy(CIMultiDict(headers or {})), body=body, remote=None,
                started=0.0, deadline=10.0)
    call.client_id = client
    return call


KEY_CFG = CacheKeyConfig(headers=["x-tenant-id"], ignore_json_fields=["user", "meta.trace"])
KEY = CacheKey("chat", KEY_CFG)
# orjson (the proxy's JSON) holds integers within 64 bits; larger ones are read as floats
json_leaf = st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.text(max_size=8) | st.floats(
    allow_nan=False, allow_infinity=False)
json_value = st.recursive(json_leaf, lambda kids: st.lists(kids, max_size=4) | st.dictionaries(
    st.text(max_size=6), kids, max_size=4), max_leaves=16)
json_object = st.dictionaries(st.text(max_size=6).filter(lambda k: k not in ("user", "meta")),
                              json_value, max_size=6)


def _shuffled(data: Any, rnd: random.Random) -> Any:
    if isinstance(data, dict):
        items = list(data.items())
        rnd.shuffle(items)
        return {k: _shuffled(v, rnd) for k, v in items}
    if isinstance(data, list):
        return [_shuffled(v, rnd) for v in data]
    return data


@settings(max_examples=200)
@given(data=json_object, rnd=st.randoms(use_true_random=False), user=json_value,
       trace=json_value)
def test_key_invariant_under_key_order_whitespace_and_ignored_fields(data, rnd, user, trace):
    """The key ignores JSON key order (at any depth), whitespace and the ignored fields (top
    level `user`, dotted `meta.trace`)."""
    base = KEY(_call(orjson.dumps({**data, "meta": {"trace": 0, "kept": 1}})))
    noisy = {**data, "user": user, "meta": {"kept": 1, "trace": trace}}
    assert KEY(_call(json.dumps(_shuffled(noisy, rnd), indent=1).encode())) == base
    assert KEY(_call(orjson.dumps(_shuffled(data, rnd)))) == KEY(_call(orjson.dumps(data)))


@settings(max_examples=200)
@given(data=json_object, field=st.text(max_size=6), value=json_value, nested=st.booleans())
def test_key_changes_with_any_significant_field(data, field, value, nested):
    """Changing or adding any field that is not ignored (top level or nested) changes the key."""
    if field in ("user", "meta"):
        return
    changed = dict(data)
    if nested:
        inner = changed.get("obj") if isinstance(changed.get("obj"), dict) else {}
        if field in inner and normalised_json(inner[field]) == normalised_json(value):
            return
        changed["obj"] = {**inner, field: value}
    else:
        if field in data and normalised_json(data[field]) == normalised_json(value):
            return
        changed[field] = value
    assert KEY(_call(orjson.dumps(changed))) != KEY(_call(orjson.dumps(data)))


def test_key_changes_with_route_method_path_query_header_client_and_arm():
    """Every request-side part of the key changes it (and two builds agree on the same call)."""
    body = orjson.dumps(BODY)
    keys = {
        "base": KEY(_call(body, headers={"x-tenant-id": "t"})),
        "same": CacheKey("chat", KEY_CFG)(_call(body, headers={"x-tenant-id": "t"})),
        "route": CacheKey("other", KEY_CFG)(_call(body, headers={"x-tenant-id": "t"})),
        "method": KEY(_call(body, headers={"x-tenant-id": "t"}, method="PUT")),
        "path": KEY(_call(body, headers={"x-tenant-id": "t"}, path="/v1/other")),
        "query": KEY(_call(body, headers={"x-tenant-id": "t"}, query="a=1")),
        "header": KEY(_call(body, headers={"x-tenant-id": "u"})),
        "empty header": KEY(_call(body, headers={"x-tenant-id": ""})),
        "no header": KEY(_call(body)),
        "client": KEY(_call(body, headers={"x-tenant-id": "t"}, client="c1")),
        "arm": KEY(_call(body, headers={"x-tenant-id": "t"}, arm="variant")),
        "raw": KEY(_call(body + b" x", headers={"x-tenant-id": "t"})),
    }
    assert keys["same"] == keys["base"]
    assert len(set(keys.values())) == len(keys) - 1


@given(a=st.text(max_size=12), b=st.text(max_size=12),
       part=st.sampled_from(["header", "query", "path", "client", "arm", "route"]))
def test_key_changes_with_any_request_part_value(a, b, part):
    """Two different values of any one request part (a listed header, query, path, client,
    arm, route) never share a key; equal values always do."""
    body = orjson.dumps(BODY)

    def key(v: str) -> str:
        if part == "route":
            return CacheKey(v, KEY_CFG)(_call(body))
        kwargs: dict[str, Any] = {"header": {"headers": {"x-tenant-id": v}}, "query": {"query": v},
                                  "path": {"path": v}, "client": {"client": v or None},
                                  "arm": {"arm": v}}[part]
        return KEY(_call(body, **kwargs))

    assert (key(a) == key(b)) == (a == b or (part == "client" and not a and not b))


def test_key_without_body_ignores_it():
    """key.body: false — the body is not part of the key."""
    key = CacheKey("chat", CacheKeyConfig(body=False))
    assert key(_call(b'{"a": 1}')) == key(_call(b"anything"))


headers_st = st.lists(st.tuples(st.text(min_size=1, max_size=10), st.text(max_size=20)),
                      max_size=6)


@given(status=st.integers(100, 599), headers=headers_st, body=st.binary(max_size=300),
       cuts=st.lists(st.integers(0, 300), max_size=5), streamed=st.booleans(),
       provider=st.none() | st.text(max_size=8), now=st.floats(0, 2e9))
def test_entry_round_trips(status, headers, body, cuts, streamed, provider, now):
    """Any entry decodes to itself; a streamed one replays exactly its chunks."""
    chunks = None
    if streamed and body:
        edges = sorted({0, len(body), *(c for c in cuts if c < len(body))})
        chunks = tuple(b - a for a, b in itertools.pairwise(edges))
    entry = Entry(status, tuple(headers), body, chunks, provider, "m", now)
    assert Entry.decode(entry.encode()) == entry
    reply = entry.reply(now + 5)
    assert reply.source == "cache" and reply.cost_usd == 0.0
    assert ("age", "5") in reply.headers


def test_entry_of_reply_drops_per_request_headers():
    """Stored headers exclude hop-by-hop-adjacent and per-request ones."""
    reply = Reply(200, [("content-type", "application/json"), ("date", "x"),
                        ("x-request-id", "r"), ("x-rp-route", "chat"), ("set-cookie", "a=b"),
                        ("x-ratelimit-remaining-tokens", "1"), ("openai-model", "m")],
                  body=b"{}", provider="p1", model="m")
    entry = Entry.of(reply, b"{}", None, 0.0)
    assert entry.headers == (("content-type", "application/json"), ("openai-model", "m"))


def test_garbage_is_a_miss_not_an_error():
    """Bytes that are not an entry of this version decode to None."""
    for junk in (b"", b"RPC1", b"RPC1\x00\x00\x00\x05{bad}", b"XXXX\x00\x00\x00\x00", b"\xff" * 40):
        assert Entry.decode(junk) is None


async def test_metrics_exported(mock_provider, make_proxy, http):
    """rp_cache_requests_total is on /metrics with route and result labels."""
    proxy = await make_proxy(config(mock_provider.url))
    await post(http, proxy)
    async with http.get(proxy.admin_url + "/metrics") as resp:
        text = await resp.text()
    assert 'rp_cache_requests_total{result="miss",route="chat"} 1.0' in text
    assert metric(proxy, "rp_cache_requests_total", route="chat", result="miss") == 1
