"""Retries through the real proxy to the real mock provider, with an injected clock."""

from __future__ import annotations

import asyncio
import time
from email.utils import formatdate

from proxy.clock import FakeClock
from tests.conftest import free_port

CHAT = "/v1/chat/completions"
BODY = {"model": "m1", "messages": [{"role": "user", "content": "hi"}]}


def config(url: str, retry: str = "{}", timeout: str = "{}", url2: str | None = None) -> str:
    tiers = "[{provider: p1}" + (", {provider: p2}]" if url2 else "]")
    p2 = f'  p2: {{url: "{url2}", format: openai}}\n' if url2 else ""
    return f"""
version: 1
providers:
  p1: {{url: "{url}", format: openai}}
{p2}routes:
  - name: chat
    match: {{path_prefix: {CHAT}}}
    tiers: {tiers}
    timeout: {timeout}
    retry: {retry}
"""


def retries(proxy, reason: str) -> float:
    value = proxy.deps.metrics.registry.get_sample_value(
        "rp_retries_total", {"route": "chat", "reason": reason})
    return value or 0.0


async def test_429_retry_after_is_the_wait(mock_provider, make_proxy, http, logs):
    """429 + Retry-After: 1 then 200: the client gets 200 after two attempts and a 1 s wait."""
    clock = FakeClock()
    proxy = await make_proxy(config(mock_provider.url), clock=clock)
    headers = {"x-mock-status": "429", "x-mock-retry-after": "1", "x-mock-fail-first": "1",
               "x-mock-key": "a"}
    async with http.post(proxy.data_url + CHAT, json=BODY, headers=headers) as resp:
        assert resp.status == 200
        assert resp.headers["x-rp-attempts"] == "2"
        rid = resp.headers["x-request-id"]
    assert clock.slept == [1.0]
    assert mock_provider.mock.calls == 2
    assert retries(proxy, "429") == 1
    [line] = [e for e in logs if e["event"] == "upstream_retry"]
    assert (line["request_id"], line["tier"], line["reason"], line["wait_s"]) == (rid, 1, "429", 1.0)
    [access] = [e for e in logs if e["event"] == "request"]
    assert [a["status"] for a in access["attempt_log"]] == [429, 200]


async def test_retry_after_http_date_and_ms(mock_provider, make_proxy, http):
    """Retry-After as an HTTP date, and retry-after-ms, set the wait (not the backoff)."""
    clock = FakeClock()
    proxy = await make_proxy(config(mock_provider.url), clock=clock)
    date = formatdate(clock.time() + 7, usegmt=True)
    for key, extra in (("d", {"x-mock-retry-after": date}),
                       ("m", {"x-mock-headers": '{"retry-after-ms": "2500"}'})):
        headers = {"x-mock-status": "429", "x-mock-fail-first": "1", "x-mock-key": key, **extra}
        async with http.post(proxy.data_url + CHAT, json=BODY, headers=headers) as resp:
            assert resp.status == 200
    assert clock.slept[0] == 7.0
    assert clock.slept[1] == 2.5


async def test_ratelimit_reset_header_is_the_wait(mock_provider, make_proxy, http):
    """A 429 with only x-ratelimit-reset-requests: 6s waits 6 s."""
    clock = FakeClock()
    proxy = await make_proxy(config(mock_provider.url), clock=clock)
    headers = {"x-mock-status": "429", "x-mock-fail-first": "1", "x-mock-key": "r",
               "x-mock-headers": '{"x-ratelimit-remaining-requests": "0", '
                                 '"x-ratelimit-reset-requests": "6s"}'}
    async with http.post(proxy.data_url + CHAT, json=BODY, headers=headers) as resp:
        assert resp.status == 200
    assert clock.slept == [6.0]


async def test_503_retry_after_is_respected_or_not(mock_provider, make_proxy, http):
    """A 503's Retry-After is the wait when respect is on; with respect off, the backoff is."""
    headers = {"x-mock-status": "503", "x-mock-retry-after": "3", "x-mock-fail-first": "1"}
    for respect, key in ((True, "on"), (False, "off")):
        clock = FakeClock()
        proxy = await make_proxy(config(
            mock_provider.url, retry=f"{{retry_after: {{respect: {str(respect).lower()}}}}}"),
            clock=clock)
        async with http.post(proxy.data_url + CHAT, json=BODY,
                             headers={**headers, "x-mock-key": key}) as resp:
            assert resp.status == 200
        if respect:
            assert clock.slept == [3.0]
        else:
            assert len(clock.slept) == 1 and 0 <= clock.slept[0] <= 0.2


async def test_long_retry_after_is_not_slept(mock_provider, make_proxy, http, logs):
    """Retry-After: 120 with total 5s: the 429 comes back at once with its Retry-After."""
    clock = FakeClock()
    proxy = await make_proxy(config(mock_provider.url, timeout="{total: 5s}",
                                    retry="{retry_after: {max: 10m}}"), clock=clock)
    headers = {"x-mock-status": "429", "x-mock-retry-after": "120"}
    start = time.monotonic()
    async with http.post(proxy.data_url + CHAT, json=BODY, headers=headers) as resp:
        assert resp.status == 429
        assert resp.headers["retry-after"] == "120"
        assert resp.headers["x-rp-attempts"] == "1"
    assert time.monotonic() - start < 5  # generous: it did not wait 120 s
    assert clock.slept == [] and mock_provider.mock.calls == 1
    [skip] = [e for e in logs if e["event"] == "upstream_retry_skipped"]
    assert skip["why"] == "deadline"


async def test_retry_after_over_max_moves_to_next_tier(mock_provider, mock_provider2,
                                                       make_proxy, http):
    """A hint above retry_after.max is not waited: the next tier answers at once."""
    clock = FakeClock()
    proxy = await make_proxy(config(mock_provider.url, url2=mock_provider2.url,
                                    retry="{retry_after: {max: 20s}}"), clock=clock)
    headers = {"x-mock-status": "429", "x-mock-retry-after": "60", "x-mock-key": "k",
               "x-mock-fail-first": "1"}
    async with http.post(mock_provider2.url + CHAT, json=BODY, headers=headers):
        pass  # tier 2's one failure for key k is spent: it will answer 200
    async with http.post(proxy.data_url + CHAT, json=BODY, headers=headers) as resp:
        assert resp.status == 200
        assert resp.headers["x-rp-tier"] == "2"
        assert resp.headers["x-rp-fallback"] == "429"
    assert clock.slept == []
    assert (mock_provider.mock.calls, mock_provider2.mock.calls) == (1, 2)


async def test_backoff_with_full_jitter_on_503(mock_provider, make_proxy, http, logs):
    """A 503 is retried attempts-1 times; each wait is within the backoff cap."""
    clock = FakeClock()
    proxy = await make_proxy(config(
        mock_provider.url, retry="{attempts: 4, backoff: {initial: 100ms, max: 300ms}}"),
        clock=clock)
    async with http.post(proxy.data_url + CHAT, json=BODY,
                         headers={"x-mock-status": "503"}) as resp:
        assert resp.status == 503
        assert resp.headers["x-rp-attempts"] == "4"
    assert mock_provider.mock.calls == 4
    assert len(clock.slept) == 3
    for wait, cap in zip(clock.slept, (0.1, 0.2, 0.3), strict=True):
        assert 0 <= wait <= cap
    assert retries(proxy, "503") == 3


async def test_client_errors_are_never_retried(mock_provider, mock_provider2, make_proxy, http):
    """400/401/403/404/413/422 are relayed after one call, without trying tier 2."""
    proxy = await make_proxy(config(mock_provider.url, url2=mock_provider2.url),
                             clock=FakeClock())
    for status in (400, 401, 403, 404, 413, 422):
        async with http.post(proxy.data_url + CHAT, json=BODY,
                             headers={"x-mock-status": str(status)}) as resp:
            assert resp.status == status
            assert resp.headers["x-rp-attempts"] == "1"
    assert (mock_provider.mock.calls, mock_provider2.mock.calls) == (6, 0)


async def test_quota_exhausted_429_is_not_retried(mock_provider, mock_provider2, make_proxy, http):
    """An insufficient_quota 429 is not retried; the next tier is tried instead."""
    clock = FakeClock()
    proxy = await make_proxy(config(mock_provider.url, url2=mock_provider2.url), clock=clock)
    headers = {"x-mock-status": "429", "x-mock-error-code": "insufficient_quota",
               "x-mock-retry-after": "1", "x-mock-key": "q", "x-mock-fail-first": "1"}
    async with http.post(mock_provider2.url + CHAT, json=BODY, headers=headers):
        pass  # tier 2's one failure for key q is spent: it will answer 200
    async with http.post(proxy.data_url + CHAT, json=BODY, headers=headers) as resp:
        assert resp.status == 200 and resp.headers["x-rp-tier"] == "2"
    assert mock_provider.mock.calls == 1 and clock.slept == []


async def test_non_idempotent_false(mock_provider, make_proxy, http):
    """non_idempotent: false: a POST is not retried after a 503 or a reset, but is after a 429."""
    clock = FakeClock()
    proxy = await make_proxy(config(mock_provider.url, retry="{non_idempotent: false}"),
                             clock=clock)
    async with http.post(proxy.data_url + CHAT, json=BODY,
                         headers={"x-mock-status": "503"}) as resp:
        assert resp.status == 503 and resp.headers["x-rp-attempts"] == "1"
    async with http.post(proxy.data_url + CHAT, json=BODY,
                         headers={"x-mock-drop": "headers"}) as resp:
        assert resp.status == 502 and resp.headers["x-rp-attempts"] == "1"
    async with http.post(proxy.data_url + CHAT, json=BODY,
                         headers={"x-mock-status": "429", "x-mock-fail-first": "1",
                                  "x-mock-key": "n"}) as resp:
        assert resp.status == 200 and resp.headers["x-rp-attempts"] == "2"
    assert mock_provider.mock.calls == 4


async def test_non_idempotent_false_still_retries_connect_errors(make_proxy, http):
    """A connect error means the body never left: retried even with non_idempotent: false."""
    dead = f"http://127.0.0.1:{free_port()}"
    proxy = await make_proxy(config(dead, retry="{non_idempotent: false}"), clock=FakeClock())
    async with http.post(proxy.data_url + CHAT, json=BODY) as resp:
        assert resp.status == 502
        assert (await resp.json())["error"]["type"] == "upstream_error"
        assert resp.headers["x-rp-attempts"] == "3"
    assert retries(proxy, "connect_error") == 2


async def test_reset_is_retried(mock_provider, make_proxy, http):
    """A connection closed before the response headers is retried (reset)."""
    proxy = await make_proxy(config(mock_provider.url), clock=FakeClock())
    async with http.post(proxy.data_url + CHAT, json=BODY,
                         headers={"x-mock-drop": "headers"}) as resp:
        assert resp.status == 502 and resp.headers["x-rp-attempts"] == "3"
    assert mock_provider.mock.calls == 3
    assert retries(proxy, "reset") == 2


async def test_attempt_timeout_is_retried(mock_provider, make_proxy, http):
    """An attempt timeout is retried, and the last one answers 504 naming the timer."""
    proxy = await make_proxy(config(mock_provider.url, timeout="{attempt: 50ms}",
                                    retry="{attempts: 2}"), clock=FakeClock())
    async with http.post(proxy.data_url + CHAT, json=BODY,
                         headers={"x-mock-delay": "1s"}) as resp:
        assert resp.status == 504
        assert "attempt" in (await resp.json())["error"]["message"]
        assert resp.headers["x-rp-attempts"] == "2"
    assert retries(proxy, "timeout") == 1


async def test_committed_stream_is_not_retried(mock_provider, make_proxy, http, logs):
    """A stream that breaks after its first chunk is not retried: in-band error, one call."""
    proxy = await make_proxy(config(mock_provider.url), clock=FakeClock())
    async with http.post(proxy.data_url + CHAT, json={**BODY, "stream": True},
                         headers={"x-mock-drop": "mid-stream"}) as resp:
        text = await resp.text()
    assert "event: error" in text
    assert mock_provider.mock.calls == 1
    assert not [e for e in logs if e["event"] == "upstream_retry"]


async def test_budget_ratio_zero_refuses_every_retry(mock_provider, make_proxy, http):
    """With ratio 0 and no floor, concurrent failures get no retries: budget_exhausted."""
    proxy = await make_proxy(config(
        mock_provider.url, retry="{attempts: 3, budget: {ratio: 0, min_per_second: 0}}"),
        clock=FakeClock())

    async def one() -> int:
        async with http.post(proxy.data_url + CHAT, json=BODY,
                             headers={"x-mock-status": "503"}) as resp:
            return resp.status

    assert await asyncio.gather(*(one() for _ in range(20))) == [503] * 20
    assert mock_provider.mock.calls == 20
    assert retries(proxy, "budget_exhausted") == 20


async def test_budget_caps_a_retry_storm(mock_provider, make_proxy, http):
    """20 concurrent requests to a dead provider, ratio 0.2: far fewer than 60 calls."""
    proxy = await make_proxy(config(
        mock_provider.url,
        retry="{attempts: 3, backoff: {initial: 0s}, budget: {ratio: 0.2, min_per_second: 0}}"),
        clock=FakeClock())

    async def one() -> None:
        async with http.post(proxy.data_url + CHAT, json=BODY,
                             headers={"x-mock-status": "503", "x-mock-delay": "50ms"}) as resp:
            assert resp.status == 503

    await asyncio.gather(*(one() for _ in range(20)))
    calls = mock_provider.mock.calls
    assert 20 < calls <= 30  # without the budget: 60
    assert retries(proxy, "budget_exhausted") > 0


async def test_budget_floor_per_second(mock_provider, make_proxy, http):
    """min_per_second retries are allowed even with ratio 0, refilled with time."""
    clock = FakeClock()
    proxy = await make_proxy(config(
        mock_provider.url,
        retry="{attempts: 2, backoff: {initial: 0s}, budget: {ratio: 0, min_per_second: 1}}"),
        clock=clock)

    async def one() -> str:
        async with http.post(proxy.data_url + CHAT, json=BODY,
                             headers={"x-mock-status": "503"}) as resp:
            return resp.headers["x-rp-attempts"]

    assert [await one() for _ in range(3)] == ["2", "1", "1"]
    clock.advance(1.0)
    assert await one() == "2"
    assert retries(proxy, "budget_exhausted") == 2


async def test_no_retry_block_means_one_attempt(mock_provider, make_proxy, http):
    """Without a retry block a 503 is tried once."""
    text = config(mock_provider.url).replace("    retry: {}\n", "")
    proxy = await make_proxy(text, clock=FakeClock())
    async with http.post(proxy.data_url + CHAT, json=BODY,
                         headers={"x-mock-status": "503"}) as resp:
        assert resp.status == 503 and resp.headers["x-rp-attempts"] == "1"
