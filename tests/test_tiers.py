"""Tiers: the ordered chain per route, fallback reasons, fallback_response, admin numbers.

Real parts: two mock providers on loopback, the real proxy; provider outages are either real
(a refused port, the mock's own error statuses) or rehearsed with ``x-rp-fault`` on one tier.
"""

from __future__ import annotations

import asyncio
import socket

import orjson
from multidict import CIMultiDict, CIMultiDictProxy

from policies.faults import FaultPlan
from proxy.call import Call
from proxy.clock import FakeClock
from proxy.errors import NoTierAvailable
from tests.conftest import access_lines

TWO_TIERS = """
version: 1
providers:
  p1: {{url: "{p1}", format: openai, pricing: {{"*": {{input: 1, output: 1}}}}{p1_extra}}}
  p2: {{url: "{p2}", format: generic, cost_per_request: 0.003}}
routes:
  - name: ocr
    match: {{path: /v1/ocr, methods: [POST]}}
    tiers:
      - {{provider: p1, model: small{t1_extra}}}
      - {{provider: p2, path: /v2/ocr{t2_extra}}}
    timeout: {{attempt: {attempt}, total: 10s}}
    faults: {{}}
{fallback}
"""

FALLBACK = """    fallback_response:
      status: 200
      body: {degraded: true, items: []}
"""


def config(p1: str, p2: str, *, fallback: bool = False, p1_extra: str = "", t1_extra: str = "",
           t2_extra: str = "", attempt: str = "5s") -> str:
    return TWO_TIERS.format(p1=p1, p2=p2, p1_extra=p1_extra, t1_extra=t1_extra,
                            t2_extra=t2_extra, attempt=attempt,
                            fallback=FALLBACK if fallback else "")


def dead_url() -> str:
    """A loopback port nobody listens on: a real connect error."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def fallbacks(proxy, reason: str) -> float:
    value = proxy.deps.metrics.registry.get_sample_value(
        "rp_fallbacks_total", {"route": "ocr", "reason": reason})
    return value or 0.0


async def post(http, proxy, headers=None, body=None):
    async with http.post(proxy.data_url + "/v1/ocr", json=body or {"image": "menu-1"},
                         headers=headers or {}) as resp:
        return resp.status, resp.headers, await resp.read()


async def test_tier1_good_is_served_by_tier1_without_fallback_header(
        mock_provider, mock_provider2, make_proxy, http, logs):
    """A healthy tier 1 answers: x-rp-tier 1, its provider and model, no x-rp-fallback."""
    proxy = await make_proxy(config(mock_provider.url, mock_provider2.url))
    status, headers, _ = await post(http, proxy)
    assert status == 200
    assert headers["x-rp-tier"] == "1" and headers["x-rp-provider"] == "p1"
    assert headers["x-rp-model"] == "small"
    assert "x-rp-fallback" not in headers
    assert mock_provider2.mock.calls == 0
    assert [line["outcome"] for line in access_lines(logs)] == ["ok"]


async def test_refused_tier1_falls_back_to_tier2_with_reason(mock_provider2, make_proxy, http, logs):
    """Tier 1 refusing connections moves to tier 2 (path rewritten), marked connect_error."""
    proxy = await make_proxy(config(dead_url(), mock_provider2.url))
    status, headers, body = await post(http, proxy)
    assert status == 200 and orjson.loads(body)["confidence"] == 0.92
    assert headers["x-rp-tier"] == "2" and headers["x-rp-provider"] == "p2"
    assert headers["x-rp-fallback"] == "connect_error"
    assert headers["x-rp-attempts"] == "2"
    assert mock_provider2.mock.by_path == {"/v2/ocr": 1}
    assert fallbacks(proxy, "connect_error") == 1
    moved = [e for e in logs if e["event"] == "tier_fallback"]
    (line,) = access_lines(logs)
    assert len(moved) == 1 and moved[0]["request_id"] == line["request_id"]
    assert moved[0]["from_tier"] == 1 and moved[0]["to_tier"] == 2
    assert line["outcome"] == "fallback" and line["tier"] == 2 and line["fallback"] == "connect_error"


async def test_tier1_503_falls_back_and_header_names_first_reason(
        mock_provider, mock_provider2, make_proxy, http):
    """A 503 on tier 1 moves on; x-rp-fallback says 503, the metric counts reason=503."""
    proxy = await make_proxy(config(mock_provider.url, mock_provider2.url))
    status, headers, _ = await post(http, proxy, {"x-rp-fault": "abort=503;tier=1"})
    assert status == 200 and headers["x-rp-tier"] == "2"
    assert headers["x-rp-fallback"] == "503"
    assert fallbacks(proxy, "503") == 1
    assert mock_provider.mock.calls == 0 and mock_provider2.mock.calls == 1


async def test_client_error_is_relayed_without_fallback(mock_provider, mock_provider2, make_proxy, http):
    """A provider's 400 is the client's problem: relayed at once, tier 2 never called."""
    proxy = await make_proxy(config(mock_provider.url, mock_provider2.url, fallback=True))
    status, headers, body = await post(http, proxy, {"x-mock-status": "400"})
    assert status == 400 and orjson.loads(body)["error"]["type"] == "mock_error"
    assert headers["x-rp-tier"] == "1" and "x-rp-fallback" not in headers
    assert mock_provider2.mock.calls == 0


async def test_every_tier_down_relays_last_provider_error(mock_provider, mock_provider2, make_proxy, http):
    """No fallback_response: the last tried tier's reply is relayed as it came."""
    proxy = await make_proxy(config(mock_provider.url, mock_provider2.url))
    status, headers, body = await post(http, proxy, {"x-mock-status": "503"})
    assert status == 503 and orjson.loads(body)["error"]["type"] == "mock_error"
    assert headers["x-rp-tier"] == "2" and headers["x-rp-fallback"] == "503"
    assert mock_provider.mock.calls == 1 and mock_provider2.mock.calls == 1


async def test_every_tier_down_serves_fallback_response(mock_provider, mock_provider2, make_proxy,
                                                        http, logs):
    """fallback_response: served as configured, x-rp-fallback exhausted, counted, logged with
    every attempt."""
    proxy = await make_proxy(config(mock_provider.url, mock_provider2.url, fallback=True))
    status, headers, body = await post(http, proxy, {"x-mock-status": "502"})
    assert status == 200 and orjson.loads(body) == {"degraded": True, "items": []}
    assert headers["x-rp-fallback"] == "exhausted" and "x-rp-tier" not in headers
    assert fallbacks(proxy, "exhausted") == 1 and fallbacks(proxy, "502") == 1
    (line,) = access_lines(logs)
    assert line["outcome"] == "fallback_response" and line["status"] == 200
    assert [(a["tier"], a["status"]) for a in line["attempt_log"]] == [(1, 502), (2, 502)]
    status_json = await (await http.get(proxy.admin_url + "/admin/status")).json()
    route = status_json["routes"][0]
    assert route["requests"] == 1 and route["fallback_rate"] == 1.0 and route["by_tier"] == {}


async def test_error_after_fallback_keeps_first_reason(mock_provider, make_proxy, http):
    """Tier 1 503, tier 2 unreachable: 502 upstream_error, x-rp-fallback says 503."""
    proxy = await make_proxy(config(mock_provider.url, dead_url()))
    status, headers, body = await post(http, proxy, {"x-rp-fault": "abort=503;tier=1"})
    assert status == 502 and orjson.loads(body)["error"]["type"] == "upstream_error"
    assert headers["x-rp-fallback"] == "503"


async def test_slow_tier1_times_out_to_tier2(mock_provider, mock_provider2, make_proxy, http, logs):
    """An attempt timeout on tier 1 moves to tier 2 (reason timeout) without waiting 5 s."""
    proxy = await make_proxy(config(mock_provider.url, mock_provider2.url, attempt="200ms"))
    started = asyncio.get_running_loop().time()
    status, headers, _ = await post(http, proxy, {"x-rp-fault": "delay=5s;tier=1"})
    assert asyncio.get_running_loop().time() - started < 4
    assert status == 200 and headers["x-rp-tier"] == "2" and headers["x-rp-fallback"] == "timeout"
    moved = [e for e in logs if e["event"] == "tier_fallback"]
    assert "attempt timeout" in moved[0]["detail"]


async def test_rejected_tier1_beats_a_failing_tier2(mock_provider, mock_provider2, make_proxy, http):
    """No fallback_response: tier 1's low-confidence 200 is relayed (x-rp-fallback: rejected)
    rather than tier 2's 503."""
    proxy = await make_proxy(config(
        mock_provider.url, mock_provider2.url,
        t1_extra=', accept: {json_path: "$.confidence", min: 0.9}'))
    status, headers, body = await post(
        http, proxy, {"x-mock-confidence": "0.5", "x-rp-fault": "abort=503;tier=2"})
    assert status == 200 and orjson.loads(body)["confidence"] == 0.5
    assert headers["x-rp-tier"] == "1" and headers["x-rp-fallback"] == "rejected"
    assert fallbacks(proxy, "rejected") == 1


async def test_open_circuit_skips_tier_and_every_open_is_503(mock_provider, mock_provider2,
                                                             make_proxy, http):
    """Tier 1's open circuit is skipped at once (circuit_open); with both open: 503 circuit_open."""
    breaker = ", circuit_breaker: {failure_rate: 0.5, min_requests: 2, open_for: 60s}"
    text = config(mock_provider.url, mock_provider2.url, p1_extra=breaker)
    text = text.replace("format: generic,", "format: generic" + breaker + ",")
    proxy = await make_proxy(text, clock=FakeClock())
    for _ in range(2):
        await post(http, proxy, {"x-rp-fault": "abort=500;tier=1"})
    status, headers, _ = await post(http, proxy)
    assert status == 200 and headers["x-rp-tier"] == "2"
    assert headers["x-rp-fallback"] == "circuit_open"
    assert mock_provider.mock.calls == 0
    for _ in range(3):  # p2's window: 3 successes, then 3 failures: 50% opens it
        await post(http, proxy, {"x-mock-status": "500"})
    status, headers, body = await post(http, proxy)
    assert status == 503 and orjson.loads(body)["error"]["type"] == "circuit_open"


def _call(proxy, *, downgrade: bool) -> Call:
    rt = proxy.runtime
    route = rt.routes[0]
    now = proxy.deps.clock.monotonic()
    call = Call(runtime=rt, route=route, clock=proxy.deps.clock, request_id="rq-downgrade",
                method="POST", path="/v1/ocr", query="",
                headers=CIMultiDictProxy(CIMultiDict({"content-type": "application/json"})),
                body=b'{"image": "m"}', remote="127.0.0.1", started=now, deadline=now + 10)
    call.downgrade = downgrade
    return call


async def test_downgrade_skips_expensive_tiers(mock_provider, mock_provider2, make_proxy):
    """A budget downgrade (call.downgrade) skips expensive tiers: tier 2 answers, reason downgrade."""
    proxy = await make_proxy(config(mock_provider.url, mock_provider2.url,
                                    t1_extra=", expensive: true"))
    route = proxy.runtime.routes[0]
    reply = await route.handler(_call(proxy, downgrade=True))
    assert reply.tier == 2 and reply.fallback_reason == "downgrade"
    assert mock_provider.mock.calls == 0 and fallbacks(proxy, "downgrade") == 1
    reply = await route.handler(_call(proxy, downgrade=False))
    assert reply.tier == 1 and reply.fallback_reason is None


async def test_nothing_tried_for_mixed_reasons_is_no_tier_available(mock_provider, mock_provider2,
                                                                    make_proxy):
    """Tier 1 downgraded and tier 2's circuit open: nothing tried, 503 no_tier_available."""
    breaker = ", circuit_breaker: {failure_rate: 0.5, min_requests: 1, open_for: 60s}"
    text = config(mock_provider.url, mock_provider2.url, t1_extra=", expensive: true")
    text = text.replace("format: generic,", "format: generic" + breaker + ",")
    proxy = await make_proxy(text, clock=FakeClock())
    route = proxy.runtime.routes[0]
    failing = _call(proxy, downgrade=True)
    failing.fault = FaultPlan(abort_status=500)
    await route.handler(failing)
    try:
        await route.handler(_call(proxy, downgrade=True))
    except NoTierAvailable as exc:
        assert "circuit_open" in exc.message and "downgrade" in exc.message
    else:
        raise AssertionError("expected no_tier_available")


async def test_admin_status_reports_tiers_fallback_rate_and_latency(
        mock_provider, mock_provider2, make_proxy, http):
    """/admin/status: requests by tier, fallback rate and mean/p95 latency match what was sent."""
    proxy = await make_proxy(config(mock_provider.url, mock_provider2.url))
    for i in range(16):
        await post(http, proxy, body={"image": f"m{i}"})
    for i in range(3):
        await post(http, proxy, {"x-rp-fault": "abort=503;tier=1"}, body={"image": f"f{i}"})
    await post(http, proxy, {"x-mock-delay": "300ms"}, body={"image": "slow"})
    async with http.get(proxy.admin_url + "/admin/status") as resp:
        route = (await resp.json())["routes"][0]
    assert route["requests"] == 20
    assert route["by_tier"] == {"1": 17, "2": 3}
    assert route["fallback_rate"] == 3 / 20
    assert route["latency_ms"]["p95"] >= 300  # the slowest of 20 is the 95th percentile
    assert 300 / 20 <= route["latency_ms"]["mean"] < route["latency_ms"]["p95"]


async def test_rate_limited_tier1_moves_on_and_alone_is_429(mock_provider, mock_provider2,
                                                            make_proxy, http):
    """The local rate limit refusing tier 1 moves to tier 2 (rate_limited); with one tier
    the refusal is 429 rate_limited with Retry-After."""
    limit = ", rate_limit: {requests_per_second: 0.5, burst: 1, max_wait: 0s}"
    proxy = await make_proxy(config(mock_provider.url, mock_provider2.url, p1_extra=limit),
                             clock=FakeClock())
    assert (await post(http, proxy))[1]["x-rp-tier"] == "1"
    status, headers, _ = await post(http, proxy, body={"image": "menu-2"})
    assert status == 200 and headers["x-rp-tier"] == "2"
    assert headers["x-rp-fallback"] == "rate_limited" and mock_provider.mock.calls == 1
    single = config(mock_provider.url, mock_provider2.url, p1_extra=limit).replace(
        "      - {provider: p2, path: /v2/ocr}\n", "")
    proxy = await make_proxy(single, clock=FakeClock())
    await post(http, proxy)
    status, headers, body = await post(http, proxy)
    assert status == 429 and orjson.loads(body)["error"]["type"] == "rate_limited"
    assert headers["retry-after"] == "2"
