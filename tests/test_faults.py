"""faults: header and percent injection, acting as the provider would on each attempt."""

from __future__ import annotations

import asyncio
import random

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from policies.faults import MALFORMED_BODY, FaultPlan, parse_fault_header
from proxy.clock import FakeClock
from proxy.loader import ConfigError, parse_config
from tests.conftest import access_lines

# --------------------------------------------------------------------------- header grammar


def test_header_forms():
    """Each documented form parses; ;tier=N targets one tier; spaces and case are forgiven."""
    assert parse_fault_header("abort=503") == FaultPlan(abort_status=503)
    assert parse_fault_header("abort=429;tier=2") == FaultPlan(abort_status=429, tier=2)
    assert parse_fault_header("delay=2s") == FaultPlan(delay_s=2.0)
    assert parse_fault_header(" Bad_Response ; tier = 1 ") == FaultPlan(bad_response=True, tier=1)
    assert parse_fault_header("delay=250ms,abort=500") == FaultPlan(abort_status=500, delay_s=0.25)


@pytest.mark.parametrize("bad", ["", "abort", "abort=200", "abort=600", "abort=5xx", "delay=soon",
                                 "explode", "abort=503;tier=0", "abort=503;tier=x",
                                 "abort=503;region=eu", "abort=503,bad_response", "bad_response=1"])
def test_header_garbage_is_refused(bad):
    """A malformed fault is an error, never silently ignored (a rehearsal must not lie)."""
    with pytest.raises(ValueError):
        parse_fault_header(bad)


@given(st.sampled_from(["abort=400", "abort=503", "abort=599", "delay=1s", "delay=10ms",
                        "bad_response"]),
       st.none() | st.integers(1, 99))
def test_header_roundtrip(fault, tier):
    """describe() + tier parse back to the same plan."""
    plan = parse_fault_header(fault + (f";tier={tier}" if tier else ""))
    assert plan.tier == tier
    again = parse_fault_header(plan.describe() + (f";tier={tier}" if tier else ""))
    assert again == plan


def test_header_name_must_be_a_control_header():
    """faults.header must be x-rp-*: a fault header must never reach a provider."""
    text = """
version: 1
providers: {p: {url: "http://127.0.0.1:1"}}
routes: [{name: r, match: {path_prefix: /}, provider: p, faults: {header: x-chaos}}]
"""
    with pytest.raises(ConfigError) as info:
        parse_config(text, env={})
    assert info.value.errors[0].startswith("routes[0].faults.header: must be a header named x-rp-")


# --------------------------------------------------------------------------- end to end

CONFIG = """
version: 1
providers:
  p1: {{url: "{p1}", format: openai}}
  p2: {{url: "{p2}", format: generic}}
routes:
  - name: r
    match: {{path_prefix: /v1/, methods: [POST]}}
    tiers: [{{provider: p1}}{tier2}]
    timeout: {{attempt: {attempt}, total: 10s}}
{faults}
{extra}
"""


def config(m1, m2=None, *, faults="    faults: {}", extra="", attempt="5s"):
    tier2 = ", {provider: p2}" if m2 is not None else ""
    return CONFIG.format(p1=m1.url, p2=(m2 or m1).url, tier2=tier2, faults=faults, extra=extra,
                         attempt=attempt)


async def post(http, proxy, headers=None, body=None):
    async with http.post(proxy.data_url + "/v1/chat/completions",
                         json=body or {"messages": []}, headers=headers or {}) as resp:
        return resp.status, resp.headers, await resp.read()


async def test_abort_answers_like_a_provider_and_nothing_is_sent(mock_provider, make_proxy, http, logs):
    """abort=503: the client gets the injected 503 relayed as a provider error; no upstream call."""
    proxy = await make_proxy(config(mock_provider))
    status, headers, body = await post(http, proxy, {"x-rp-fault": "abort=503"})
    err = orjson.loads(body)["error"]
    assert status == 503 and err["type"] == "injected_fault"
    assert headers["x-rp-provider"] == "p1" and headers["x-rp-tier"] == "1"
    assert mock_provider.mock.calls == 0
    (line,) = access_lines(logs)
    injected = [e for e in logs if e["event"] == "fault_injected"]
    assert line["outcome"] == "provider_error" and line["status"] == 503
    assert injected[0]["request_id"] == line["request_id"] and injected[0]["fault"] == "abort=503"


async def test_abort_429_carries_retry_after(mock_provider, make_proxy, http):
    """abort=429 answers with Retry-After: 1, as a rate-limited provider would."""
    proxy = await make_proxy(config(mock_provider))
    status, headers, _ = await post(http, proxy, {"x-rp-fault": "abort=429"})
    assert status == 429 and headers["retry-after"] == "1"


async def test_tier_targeted_fault_spares_other_tiers_and_never_goes_upstream(
        mock_provider, mock_provider2, make_proxy, http):
    """;tier=2 leaves tier 1 alone, and the fault header is not among what the provider saw."""
    proxy = await make_proxy(config(mock_provider, mock_provider2))
    status, headers, _ = await post(http, proxy, {"x-rp-fault": "abort=503;tier=2"})
    assert status == 200 and headers["x-rp-tier"] == "1"
    seen = {k.lower() for k in mock_provider.mock.recent[-1]["headers"]}
    assert "x-rp-fault" not in seen


async def test_delay_is_a_real_wait_cut_by_the_attempt_timeout(mock_provider, make_proxy, http):
    """delay waits for real; longer than the attempt timer it ends as a 504 timeout."""
    proxy = await make_proxy(config(mock_provider, attempt="300ms"))
    loop = asyncio.get_running_loop()
    started = loop.time()
    status, _, _ = await post(http, proxy, {"x-rp-fault": "delay=100ms"})
    assert status == 200 and loop.time() - started >= 0.1
    started = loop.time()
    status, _, body = await post(http, proxy, {"x-rp-fault": "delay=30s"})
    assert status == 504 and orjson.loads(body)["error"]["type"] == "timeout"
    assert loop.time() - started < 10  # cut at 300 ms, not 30 s
    assert mock_provider.mock.calls == 1


async def test_bad_response_is_a_malformed_200(mock_provider, make_proxy, http):
    """Without validate, bad_response reaches the client as the malformed 200 it is."""
    proxy = await make_proxy(config(mock_provider))
    status, _, body = await post(http, proxy, {"x-rp-fault": "bad_response"})
    assert status == 200 and body == MALFORMED_BODY and mock_provider.mock.calls == 0


async def test_retry_and_fallback_react_to_injected_faults(mock_provider, mock_provider2, make_proxy,
                                                          http):
    """abort=503;tier=1 with retries: tier 1 is retried as in a real outage, then tier 2 answers."""
    extra = "    retry: {attempts: 3, backoff: {initial: 100ms, max: 1s}}"
    proxy = await make_proxy(config(mock_provider, mock_provider2, extra=extra), clock=FakeClock())
    status, headers, _ = await post(http, proxy, {"x-rp-fault": "abort=503;tier=1"})
    assert status == 200 and headers["x-rp-tier"] == "2" and headers["x-rp-fallback"] == "503"
    assert headers["x-rp-attempts"] == "4"  # 3 on tier 1, 1 on tier 2
    assert mock_provider.mock.calls == 0 and mock_provider2.mock.calls == 1


async def test_faults_are_off_unless_configured(mock_provider, make_proxy, http):
    """Without a faults block the header does nothing (and still does not go upstream)."""
    proxy = await make_proxy(config(mock_provider, faults=""))
    status, _, _ = await post(http, proxy, {"x-rp-fault": "abort=503"})
    assert status == 200 and mock_provider.mock.calls == 1
    assert "x-rp-fault" not in {k.lower() for k in mock_provider.mock.recent[-1]["headers"]}


async def test_malformed_header_is_400(mock_provider, make_proxy, http):
    """A typo in a rehearsal is the client's error: 400 bad_request naming the header."""
    proxy = await make_proxy(config(mock_provider))
    status, _, body = await post(http, proxy, {"x-rp-fault": "abort=5O3"})
    err = orjson.loads(body)["error"]
    assert status == 400 and err["type"] == "bad_request" and err["message"].startswith("x-rp-fault:")
    assert mock_provider.mock.calls == 0


async def test_percent_abort_hits_the_drawn_share(mock_provider, make_proxy, http):
    """abort.percent: requests drawn below it (deps.rand) fail, the others reach the provider."""
    faults = "    faults: {abort: {percent: 30, status: 502}}"
    proxy = await make_proxy(config(mock_provider, faults=faults), rand=random.Random(7))
    statuses = [(await post(http, proxy))[0] for _ in range(40)]
    replay = random.Random(7)
    expected = [502 if replay.random() < 0.30 else 200 for _ in range(40)]
    assert statuses == expected and 5 < statuses.count(502) < 20
    assert mock_provider.mock.calls == statuses.count(200)
