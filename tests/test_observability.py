"""Observability (DESIGN §4–5, §8): one access-log line and one rp_requests_total increment
per request whatever the outcome, the log line's fields and types, x-rp-* headers, the
contract's metric names, /admin/status, /healthz and /readyz."""

from __future__ import annotations

import asyncio
from datetime import datetime

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import access_lines, free_port, wait_for

SECRET = "sk-obs-secret-abcdef123456"

CONFIG = """
version: 1
server: {{max_request_body: 1KiB}}
providers:
  p1: {{url: "{mock}", format: openai, headers: {{authorization: "Bearer {secret}"}}}}
  dead: {{url: "http://127.0.0.1:{dead_port}"}}
routes:
  - name: chat
    match: {{path_prefix: /v1/chat/completions}}
    provider: p1
    timeout: {{attempt: 300ms, total: 2s, idle: 300ms}}
  - name: dead
    match: {{path_prefix: /dead}}
    provider: dead
"""

LOG_FIELDS = {
    "request_id": str, "route": str, "method": str, "path": str, "status": int, "outcome": str,
    "provider": (str, type(None)), "used_model": (str, type(None)),
    "prompt_version": (str, type(None)), "tier": (int, type(None)), "attempts": int,
    "cache": (str, type(None)), "canary": (str, type(None)), "cost_usd": (float, type(None)),
    "tokens": (dict, type(None)), "t_queue": float, "t_cache": float,
    "t_upstream_first_byte": (float, type(None)), "t_upstream_total": float, "t_total": float,
}

CONTRACT_METRICS = [
    "rp_requests_total", "rp_request_duration_seconds", "rp_upstream_attempts_total",
    "rp_upstream_duration_seconds", "rp_retries_total", "rp_fallbacks_total",
    "rp_cache_requests_total", "rp_tokens_total", "rp_cost_usd_total", "rp_budget_spend_usd",
    "rp_budget_utilization_ratio", "rp_circuit_state", "rp_canary_weight",
    "rp_rate_limited_total", "rp_config_reloads_total",
]


@pytest.fixture
async def proxy(mock_provider, make_proxy):
    return await make_proxy(CONFIG.format(mock=mock_provider.url, secret=SECRET,
                                          dead_port=free_port()))


def requests_by_outcome(proxy) -> dict[tuple[str, str, str], float]:
    out = {}
    for family in text_string_to_metric_families(proxy.deps.metrics.render().decode()):
        if family.name == "rp_requests":
            for s in family.samples:
                if s.name == "rp_requests_total":
                    out[(s.labels["route"], s.labels["code"], s.labels["outcome"])] = s.value
    return out


def check_line_types(line: dict) -> None:
    for name, kind in LOG_FIELDS.items():
        assert name in line, name
        assert isinstance(line[name], kind), (name, line[name])
    assert not isinstance(line["status"], bool) and not isinstance(line["attempts"], bool)
    if line["tokens"] is not None:
        assert set(line["tokens"]) == {"input", "output"}


async def test_every_outcome_has_one_line_and_one_count(proxy, http, logs, mock_provider):
    """ok, provider error, proxy errors, no route, 413, client disconnect and a broken stream:
    each request gives exactly one access-log line and one rp_requests_total increment."""
    url = proxy.data_url
    chat = url + "/v1/chat/completions"
    async with http.post(chat, json={"model": "m"}, headers={"x-prompt-version": "v7"}) as r:
        assert r.status == 200
    async with http.post(chat, json={}, headers={"x-mock-status": "400"}) as r:
        assert r.status == 400
    async with http.post(chat, json={}, headers={"x-mock-delay": "2s"}) as r:
        assert r.status == 504
    async with http.post(url + "/dead/x", json={}) as r:
        assert r.status == 502
    async with http.get(url + "/nowhere") as r:
        assert r.status == 404
    async with http.post(chat, data=b"x" * 4096) as r:
        assert r.status == 413
    async with http.post(chat, json={"stream": True}, headers={"x-mock-drop": "mid-stream"}) as r:
        await r.read()
    async with aiohttp.ClientSession() as session:
        task = asyncio.create_task(session.post(chat, json={}, headers={"x-mock-delay": "250ms",
                                                                         "x-mock-fail-first": "0"}))
        await wait_for(lambda: mock_provider.mock.calls == 5)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    await wait_for(lambda: len(access_lines(logs)) == 8)
    await asyncio.sleep(0.3)  # nothing more arrives late
    lines = access_lines(logs)
    assert [(x["status"], x["outcome"]) for x in lines] == [
        (200, "ok"), (400, "provider_error"), (504, "timeout"), (502, "upstream_error"),
        (404, "no_route"), (413, "body_too_large"), (200, "stream_interrupted"),
        (499, "client_disconnected"),
    ]
    for line in lines:
        check_line_types(line)
    assert lines[0]["prompt_version"] == "v7" and lines[1]["prompt_version"] is None
    assert len({x["request_id"] for x in lines}) == 8
    counts = requests_by_outcome(proxy)
    assert sum(counts.values()) == 8
    assert counts[("chat", "2xx", "ok")] == 1 and counts[("_none", "4xx", "no_route")] == 1
    assert counts[("chat", "4xx", "client_disconnected")] == 1
    assert counts[("dead", "5xx", "upstream_error")] == 1


async def test_success_line_contents(proxy, http, logs):
    """A served request's line names route, provider, tier, attempts and real stage timings."""
    async with http.post(proxy.data_url + "/v1/chat/completions?x=1", json={"model": "m"},
                         headers={"x-request-id": "obs-1", "x-mock-delay": "50ms"}) as resp:
        assert resp.status == 200
    line = access_lines(logs)[-1]
    assert line["request_id"] == "obs-1" and line["route"] == "chat" and line["method"] == "POST"
    assert line["path"] == "/v1/chat/completions"  # no query string in the log
    assert (line["provider"], line["tier"], line["attempts"]) == ("p1", 1, 1)
    fb, up, total = line["t_upstream_first_byte"], line["t_upstream_total"], line["t_total"]
    assert 50 <= fb <= total and 50 <= up <= total
    assert line["t_queue"] <= fb


async def test_first_byte_is_real_on_streams(proxy, http, logs):
    """t_upstream_first_byte is when the headers arrived, not the end of the stream."""
    async with http.post(proxy.data_url + "/v1/chat/completions", json={"stream": True},
                         headers={"x-mock-chunk-delay": "100ms", "x-mock-chunks": "4"}) as r:
        await r.read()
    line = access_lines(logs)[-1]
    assert line["t_upstream_first_byte"] < 150
    assert line["t_upstream_total"] >= 300 and line["t_total"] >= 300


async def test_no_secret_in_logs_or_metrics(proxy, http, logs):
    """The provider key never reaches a log line or the metrics, even on an error path."""
    for headers in ({}, {"x-mock-status": "401", "x-mock-echo-auth": "true"}):
        async with http.post(proxy.data_url + "/v1/chat/completions", json={},
                             headers={**headers, "authorization": "Bearer client-key-zzz"}) as r:
            await r.read()
    text = repr(logs) + proxy.deps.metrics.render().decode()
    assert SECRET not in text and "client-key-zzz" not in text


async def test_response_headers(proxy, http):
    """Answers carry x-request-id and the x-rp-* headers of DESIGN §4."""
    async with http.post(proxy.data_url + "/v1/chat/completions", json={"model": "m"}) as resp:
        h = resp.headers
        assert h["x-rp-route"] == "chat" and h["x-rp-provider"] == "p1"
        assert h["x-rp-tier"] == "1" and h["x-rp-attempts"] == "1"
        assert len(h["x-request-id"]) >= 16 and "x-rp-fallback" not in h


async def test_metrics_expose_the_contract_names(proxy, http):
    """/metrics serves Prometheus text with every metric name the contract lists."""
    async with http.post(proxy.data_url + "/v1/chat/completions", json={}) as r:
        await r.read()
    async with http.get(proxy.admin_url + "/metrics") as resp:
        assert resp.status == 200
        assert resp.headers["content-type"].startswith("text/plain")
        text = await resp.text()
    families = {f.name for f in text_string_to_metric_families(text)}
    for name in CONTRACT_METRICS:
        base = name.removesuffix("_total")
        assert base in families or name in families, name
    assert 'rp_config_reloads_total{result="ok"} 1.0' in text
    assert "rp_requests_in_flight 0.0" in text
    assert 'rp_upstream_attempts_total{provider="p1",result="2xx",route="chat",tier="1"} 1.0' in text


async def test_admin_status_shape(proxy, http):
    """/admin/status has the §8 shape: config, routes (requests, by_tier, fallback_rate,
    latency, canary), providers (circuit), budgets."""
    for _ in range(3):
        async with http.post(proxy.data_url + "/v1/chat/completions", json={}) as r:
            await r.read()
    async with http.get(proxy.admin_url + "/admin/status") as resp:
        assert resp.status == 200
        status = await resp.json()
    assert set(status) >= {"config", "routes", "providers", "budgets"}
    assert set(status["config"]) >= {"path", "loaded_at", "sha256"}
    datetime.fromisoformat(status["config"]["loaded_at"])
    chat = next(r for r in status["routes"] if r["name"] == "chat")
    assert chat["requests"] == 3 and chat["by_tier"] == {"1": 3}
    assert chat["fallback_rate"] == 0.0
    assert set(chat["latency_ms"]) == {"mean", "p95"} and chat["latency_ms"]["p95"] > 0
    assert chat["canary"] == {"weight": 0, "state": "off"}
    assert {p["name"]: p["circuit"] for p in status["providers"]} == {"p1": "closed",
                                                                      "dead": "closed"}
    assert status["budgets"] == []
    assert SECRET not in str(status)


async def test_health_and_ready(proxy, http):
    """/healthz is alive; /readyz is ready once the config is loaded (memory state)."""
    async with http.get(proxy.admin_url + "/healthz") as resp:
        assert resp.status == 200 and (await resp.json())["status"] == "ok"
    async with http.get(proxy.admin_url + "/readyz") as resp:
        assert resp.status == 200 and (await resp.json())["ready"] is True
