"""The client-side rate limit through the real proxy and mock, on an injected clock."""

from __future__ import annotations

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st
from multidict import CIMultiDict

from policies.ratelimit import TokenBucket
from proxy.clock import FakeClock

CHAT = "/v1/chat/completions"
BODY = {"model": "m1", "messages": []}


def config(url: str, limit: str, url2: str | None = None, timeout: str = "{}") -> str:
    tiers = "[{provider: p1}" + (", {provider: p2}]" if url2 else "]")
    p2 = f'  p2: {{url: "{url2}", format: openai}}\n' if url2 else ""
    return f"""
version: 1
providers:
  p1: {{url: "{url}", format: openai, rate_limit: {limit}}}
{p2}routes:
  - name: chat
    match: {{path_prefix: {CHAT}}}
    tiers: {tiers}
    timeout: {timeout}
"""


def counted(proxy, result: str) -> float:
    value = proxy.deps.metrics.registry.get_sample_value(
        "rp_rate_limited_total", {"provider": "p1", "result": result})
    return value or 0.0


async def post(http, proxy, headers=None):
    async with http.post(proxy.data_url + CHAT, json=BODY, headers=headers or {}) as resp:
        return resp.status, CIMultiDict(resp.headers), await resp.read()


async def test_burst_then_paced(mock_provider, make_proxy, http):
    """`burst` requests go at once, the next waits 1/requests_per_second."""
    clock = FakeClock()
    proxy = await make_proxy(config(mock_provider.url, "{requests_per_second: 10, burst: 2}"),
                             clock=clock)
    for _ in range(2):
        assert (await post(http, proxy))[0] == 200
    assert clock.slept == []
    assert (await post(http, proxy))[0] == 200
    assert clock.slept == pytest.approx([0.1])
    assert (await post(http, proxy))[0] == 200  # the clock moved 0.1 s: one more slot
    assert clock.slept == pytest.approx([0.1, 0.1])
    assert counted(proxy, "delayed") == 2 and mock_provider.mock.calls == 4


async def test_wait_over_max_wait_fails_fast(mock_provider, make_proxy, http, logs):
    """A wait longer than max_wait: 429 rate_limited with Retry-After, nothing sent."""
    clock = FakeClock()
    proxy = await make_proxy(config(
        mock_provider.url, "{requests_per_second: 0.5, burst: 1, max_wait: 500ms}"), clock=clock)
    assert (await post(http, proxy))[0] == 200
    status, headers, body = await post(http, proxy)
    assert status == 429
    assert orjson.loads(body)["error"]["type"] == "rate_limited"
    assert headers["retry-after"] == "2"
    assert mock_provider.mock.calls == 1 and clock.slept == []
    assert counted(proxy, "rejected") == 1
    assert [e["provider"] for e in logs if e["event"] == "rate_limited"] == ["p1"]


async def test_wait_over_time_left_fails_fast(mock_provider, make_proxy, http):
    """A wait that fits max_wait but not what is left of total is not waited."""
    clock = FakeClock()
    proxy = await make_proxy(config(mock_provider.url,
                                    "{requests_per_second: 1, burst: 1, max_wait: 10s}",
                                    timeout="{total: 800ms}"), clock=clock)
    assert (await post(http, proxy))[0] == 200
    status, headers, _ = await post(http, proxy)
    assert status == 429 and headers["retry-after"] == "1"
    assert clock.slept == []


async def test_rate_limited_tier_moves_to_next(mock_provider, mock_provider2, make_proxy, http):
    """When tier 1's limit refuses, tier 2 answers."""
    proxy = await make_proxy(config(mock_provider.url,
                                    "{requests_per_second: 1, burst: 1, max_wait: 0s}",
                                    url2=mock_provider2.url), clock=FakeClock())
    assert (await post(http, proxy))[1]["x-rp-tier"] == "1"
    status, headers, _ = await post(http, proxy)
    assert status == 200 and headers["x-rp-tier"] == "2"
    assert headers["x-rp-fallback"] == "rate_limited"
    assert (mock_provider.mock.calls, mock_provider2.mock.calls) == (1, 1)


async def test_adaptive_holds_until_reset(mock_provider, make_proxy, http):
    """adaptive: remaining-requests 0 holds the next request until the reset (no 429 met)."""
    clock = FakeClock()
    proxy = await make_proxy(config(
        mock_provider.url, "{requests_per_second: 100, max_wait: 5s, adaptive: true}"),
        clock=clock)
    exhausted = {"x-mock-headers": '{"x-ratelimit-remaining-requests": "0", '
                                   '"x-ratelimit-reset-requests": "1.5s"}'}
    assert (await post(http, proxy, exhausted))[0] == 200
    assert (await post(http, proxy))[0] == 200
    assert clock.slept == pytest.approx([1.5])


async def test_adaptive_tokens_exhausted_over_max_wait(mock_provider, make_proxy, http):
    """adaptive: remaining-tokens 0 with a 6m0s reset refuses at once with that Retry-After."""
    clock = FakeClock()
    proxy = await make_proxy(config(
        mock_provider.url, "{requests_per_second: 100, adaptive: true}"), clock=clock)
    exhausted = {"x-mock-headers": '{"x-ratelimit-remaining-tokens": "0", '
                                   '"x-ratelimit-reset-tokens": "6m0s"}'}
    assert (await post(http, proxy, exhausted))[0] == 200
    status, headers, _ = await post(http, proxy)
    assert status == 429 and headers["retry-after"] == "360"
    assert mock_provider.mock.calls == 1


async def test_adaptive_paces_when_remaining_is_low(mock_provider, make_proxy, http):
    """adaptive: 2 requests left for the next 10 s are spread 5 s apart."""
    clock = FakeClock()
    proxy = await make_proxy(config(
        mock_provider.url, "{requests_per_second: 100, burst: 10, max_wait: 10s, adaptive: true}"),
        clock=clock)
    low = {"x-mock-headers": '{"x-ratelimit-remaining-requests": "2", '
                             '"x-ratelimit-reset-requests": "10s"}'}
    assert (await post(http, proxy, low))[0] == 200
    assert (await post(http, proxy))[0] == 200
    assert clock.slept == pytest.approx([5.0])


async def test_adaptive_pacing_with_a_known_limit(mock_provider, make_proxy, http):
    """adaptive: with x-ratelimit-limit-requests, the pace is the refill rate (10 back in 10 s)."""
    clock = FakeClock()
    proxy = await make_proxy(config(
        mock_provider.url, "{requests_per_second: 100, burst: 10, max_wait: 10s, adaptive: true}"),
        clock=clock)
    low = {"x-mock-headers": '{"x-ratelimit-limit-requests": "12", '
                             '"x-ratelimit-remaining-requests": "2", '
                             '"x-ratelimit-reset-requests": "10s"}'}
    assert (await post(http, proxy, low))[0] == 200
    assert (await post(http, proxy))[0] == 200
    assert clock.slept == pytest.approx([1.0])


async def test_adaptive_429_hint_holds(mock_provider, make_proxy, http):
    """adaptive: a provider 429 with Retry-After holds the following requests."""
    clock = FakeClock()
    proxy = await make_proxy(config(
        mock_provider.url, "{requests_per_second: 100, max_wait: 5s, adaptive: true}"),
        clock=clock)
    assert (await post(http, proxy, {"x-mock-status": "429", "x-mock-retry-after": "2"}))[0] == 429
    assert (await post(http, proxy))[0] == 200
    assert clock.slept == pytest.approx([2.0])


async def test_not_adaptive_ignores_headers(mock_provider, make_proxy, http):
    """Without adaptive the provider's headers change nothing."""
    clock = FakeClock()
    proxy = await make_proxy(config(mock_provider.url, "{requests_per_second: 100}"), clock=clock)
    exhausted = {"x-mock-headers": '{"x-ratelimit-remaining-requests": "0", '
                                   '"x-ratelimit-reset-requests": "1s"}'}
    await post(http, proxy, exhausted)
    assert (await post(http, proxy))[0] == 200
    assert clock.slept == []


async def test_fleet_scope_warns_it_acts_locally(mock_provider, make_proxy, http, logs):
    """scope: fleet is accepted, and a warning says the limit acts per replica for now."""
    await make_proxy(config(mock_provider.url, "{requests_per_second: 5, scope: fleet}"),
                     clock=FakeClock())
    [warning] = [e for e in logs if e["event"] == "rate_limit_scope_local"]
    assert warning["provider"] == "p1" and warning["log_level"] == "warning"


@given(st.floats(min_value=0.5, max_value=100), st.integers(min_value=1, max_value=20),
       st.lists(st.floats(min_value=0, max_value=0.5), min_size=1, max_size=80))
def test_bucket_never_exceeds_rate_plus_burst(rate, burst, gaps):
    """Over any stretch, requests let through <= burst + rate x its length (no max_wait)."""
    clock = FakeClock()
    bucket = TokenBucket(rate, burst, clock)
    starts = []
    for gap in gaps:
        clock.advance(gap)
        reservation = bucket.reserve(float("inf"))
        assert reservation is not None and reservation.wait_s >= 0
        starts.append(clock.monotonic() + reservation.wait_s)
    assert starts == sorted(starts)
    for i in range(len(starts)):
        for j in range(i, len(starts)):
            assert j - i + 1 <= burst + rate * (starts[j] - starts[i]) + 1e-6


def test_bucket_gives_back_a_cancelled_slot():
    """A reservation given back (its request cancelled while waiting) frees its slot."""
    clock = FakeClock()
    bucket = TokenBucket(1.0, 1, clock)
    assert bucket.reserve(0.0) is not None
    waiting = bucket.reserve(5.0)
    assert waiting is not None and waiting.wait_s == pytest.approx(1.0)
    bucket.give_back(waiting)
    again = bucket.reserve(5.0)
    assert again is not None and again.wait_s == pytest.approx(1.0)
    assert bucket.reserve(0.5) is None
