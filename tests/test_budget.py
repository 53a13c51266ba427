"""Budgets (DESIGN §3 Budgets, §8): calendar windows, admission, steps, status — one process."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import aiohttp
import pytest
from hypothesis import given
from hypothesis import strategies as st

from policies.budget_state import limits_of
from proxy.clock import FakeClock
from proxy.config import BudgetConfig, Threshold
from proxy.state.ledger import calendar_window, usd_to_nano
from tests.conftest import access_lines, wait_for

SEOUL = ZoneInfo("Asia/Seoul")
NEW_YORK = ZoneInfo("America/New_York")


def ts(text: str) -> float:
    return datetime.fromisoformat(text).timestamp()


# --------------------------------------------------------------------------- windows


def test_a_seoul_month_starts_at_1500_utc_the_day_before():
    """Asia/Seoul is UTC+9: February starts on 31 January at 15:00 UTC."""
    jan = calendar_window("month", SEOUL, ts("2026-01-31T14:59:59+00:00"))
    feb = calendar_window("month", SEOUL, ts("2026-01-31T15:00:00+00:00"))
    assert jan.id == "m202601" and feb.id == "m202602"
    assert jan.end == feb.start == ts("2026-01-31T15:00:00+00:00")
    assert feb.end == ts("2026-02-28T15:00:00+00:00")


def test_days_follow_daylight_saving_time():
    """In New York the spring-forward day lasts 23 hours and the fall-back day 25."""
    spring = calendar_window("day", NEW_YORK, ts("2026-03-08T12:00:00-04:00"))
    fall = calendar_window("day", NEW_YORK, ts("2026-11-01T12:00:00-05:00"))
    assert spring.end - spring.start == 23 * 3600
    assert fall.end - fall.start == 25 * 3600


@given(st.floats(1_600_000_000, 2_000_000_000), st.sampled_from(["day", "month"]),
       st.sampled_from(["UTC", "Asia/Seoul", "America/New_York", "Australia/Lord_Howe"]))
def test_windows_tile_time(now, kind, tz_name):
    """Each instant is in exactly one window; the next window starts where it ends."""
    tz = ZoneInfo(tz_name)
    w = calendar_window(kind, tz, now)
    assert w.start <= now < w.end
    nxt = calendar_window(kind, tz, w.end)
    assert nxt.start == w.end and nxt.id != w.id
    assert calendar_window(kind, tz, w.end - 0.001).id == w.id
    local = datetime.fromtimestamp(w.start, tz)
    assert (local.hour, local.minute) == (0, 0) and (kind == "day" or local.day == 1)


def test_limits_in_ledger_units():
    """Caps come from the lowest block step, degrade points from the downgrade step, and
    request thresholds round up (0.7 × 10 requests is reached at 7)."""
    cfg = BudgetConfig(window="day", limit_usd=100, limit_requests=10, thresholds=[
        Threshold(at=0.7, action="alert"), Threshold(at=0.85, action="downgrade"),
        Threshold(at=0.95, action="block"), Threshold(at=1.0, action="block")])
    lim = limits_of(cfg)
    assert lim.cap_nano == usd_to_nano(95) and lim.cap_requests == 9
    assert lim.degrade_nano == usd_to_nano(85) and lim.degrade_requests == 9
    assert lim.refuse_flag == "0.95:block"
    assert lim.thresholds[0] == ("0.7:alert", usd_to_nano(70), 7)


# --------------------------------------------------------------------------- end to end

JAN_15_SEOUL_NOON = ts("2026-01-15T12:00:00+09:00")

CONFIG = """
version: 1
providers:
  dear: {{url: "{mock}", format: openai, cost_per_request: 0.1}}
  cheap: {{url: "{mock}", format: openai, cost_per_request: 0.01}}
  tok:
    url: "{mock}"
    format: openai
    pricing: {{"*": {{input: 1000, output: 1000}}}}   # $0.001 per token
budgets:
  monthly:
    window: month
    timezone: Asia/Seoul
    limit_usd: 1
    thresholds:
      - {{at: 0.70, action: alert}}
      - {{at: 0.85, action: downgrade}}
      - {{at: 1.00, action: block}}
  per-user:
    window: day
    limit_requests: 3
    per: header:x-user-id
  both:
    window: day
    limit_usd: 1
    limit_requests: 4
  tokens:
    window: day
    limit_usd: 1
    default_output_tokens: 500
routes:
  - name: tiered
    match: {{path_prefix: /tiered}}
    tiers:
      - {{provider: dear, path: /v1/chat/completions, expensive: true}}
      - {{provider: cheap, path: /v1/chat/completions}}
    budgets: [monthly]
  - name: users
    match: {{path_prefix: /users}}
    tiers: [{{provider: cheap, path: /v1/chat/completions}}]
    budgets: [per-user]
  - name: both
    match: {{path_prefix: /both}}
    tiers: [{{provider: cheap, path: /v1/chat/completions}}]
    budgets: [both]
  - name: soft
    match: {{path_prefix: /soft}}
    tiers: [{{provider: dear, path: /v1/chat/completions}}]
    budgets: [both]
    fallback_response: {{status: 200, body: {{degraded: true}}}}
  - name: cached
    match: {{path_prefix: /cached}}
    tiers: [{{provider: dear, path: /v1/chat/completions}}]
    cache: {{ttl: 1h}}
    budgets: [both]
  - name: tokens
    match: {{path_prefix: /tokens}}
    tiers: [{{provider: tok, path: /v1/chat/completions}}]
    budgets: [tokens]
"""


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(wall=JAN_15_SEOUL_NOON)


@pytest.fixture
async def proxy(make_proxy, mock_provider, clock):
    return await make_proxy(CONFIG.format(mock=mock_provider.url), clock=clock)


async def post(http, proxy, path: str, **kw):
    kw.setdefault("json", {"model": "m", "messages": []})
    async with http.post(proxy.data_url + path, **kw) as r:
        return r.status, r.headers, await r.read()


async def status_rows(http, proxy, name: str) -> list[dict]:
    async with http.get(proxy.admin_url + "/admin/status") as r:
        return [b for b in (await r.json())["budgets"] if b["name"] == name]


def crossings(logs) -> list[tuple]:
    return [(e["budget"], e["key"], e["at"], e["action"], e["spend_usd"])
            for e in logs if e.get("event") == "budget_threshold_crossed"]


async def test_steps_alert_downgrade_block(proxy, mock_provider, http, logs):
    """70%: one alert; 85%: expensive tiers skipped (x-rp-fallback: downgrade); 100%: 429
    budget_exceeded with Retry-After to the end of the Seoul month; each step logged once."""
    tiers = []
    for _ in range(19):
        status, headers, _ = await post(http, proxy, "/tiered")
        assert status == 200
        tiers.append((headers["x-rp-tier"], headers.get("x-rp-fallback")))
    assert tiers[:9] == [("1", None)] * 9  # 0.9 spent by the expensive tier
    assert tiers[9:] == [("2", "downgrade")] * 10  # then 10 × 0.01 by the cheap one
    status, headers, body = await post(http, proxy, "/tiered")
    assert status == 429 and b'"budget_exceeded"' in body
    feb_seoul = ts("2026-02-01T00:00:00+09:00")
    assert int(headers["retry-after"]) == pytest.approx(feb_seoul - JAN_15_SEOUL_NOON, abs=1)
    assert crossings(logs) == [("monthly", "global", 0.7, "alert", pytest.approx(0.7)),
                               ("monthly", "global", 0.85, "downgrade", pytest.approx(0.9)),
                               ("monthly", "global", 1.0, "block", pytest.approx(1.0))]
    m = proxy.deps.metrics.registry
    for action in ("alert", "downgrade", "block"):
        assert m.get_sample_value("rp_budget_threshold_crossings_total",
                                  {"budget": "monthly", "action": action}) == 1
    assert m.get_sample_value("rp_budget_spend_usd", {"budget": "monthly", "key": "global"}) == \
        pytest.approx(1.0)
    assert mock_provider.mock.calls == 19
    assert access_lines(logs)[-1]["outcome"] == "budget_exceeded"


async def test_the_next_seoul_month_starts_afresh(proxy, clock, http):
    """Blocked on 31 January 14:59:59 UTC (23:59:59 in Seoul); one second later it is
    February in Seoul and the budget admits again."""
    clock.set_wall(ts("2026-01-31T14:59:00+00:00"))
    for _ in range(19):
        await post(http, proxy, "/tiered")
    clock.set_wall(ts("2026-01-31T14:59:59+00:00"))
    status, headers, _ = await post(http, proxy, "/tiered")
    assert status == 429 and headers["retry-after"] == "1"
    clock.set_wall(ts("2026-01-31T15:00:00+00:00"))
    status, headers, _ = await post(http, proxy, "/tiered")
    assert status == 200 and headers["x-rp-tier"] == "1"


async def test_per_user_request_quota(proxy, http):
    """Each x-user-id value has its own daily count; a request without it shares '(none)'."""
    for _ in range(3):
        assert (await post(http, proxy, "/users", headers={"x-user-id": "alice"}))[0] == 200
    assert (await post(http, proxy, "/users", headers={"x-user-id": "alice"}))[0] == 429
    assert (await post(http, proxy, "/users", headers={"x-user-id": "bob"}))[0] == 200
    assert (await post(http, proxy, "/users"))[0] == 200
    rows = {r["key"]: r for r in await status_rows(http, proxy, "per-user")}
    assert set(rows) == {"alice", "bob", "(none)"}
    assert rows["alice"]["requests"] == 3 and rows["alice"]["level"] == "block"
    assert rows["bob"]["utilization"] == pytest.approx(1 / 3) and rows["bob"]["level"] == "ok"
    gauge = proxy.deps.metrics.registry.get_sample_value(
        "rp_budget_utilization_ratio", {"budget": "per-user", "key": "per_key_max"})
    assert gauge == 1.0


async def test_credential_headers_are_never_shown(make_proxy, mock_provider, http, logs):
    """A per-key budget on a credential header shows a digest, never the key."""
    text = CONFIG.replace("per: header:x-user-id", "per: header:x-api-key")
    proxy = await make_proxy(text.format(mock=mock_provider.url))
    for _ in range(4):
        await post(http, proxy, "/users", headers={"x-api-key": "sk-very-secret"})
    rows = await status_rows(http, proxy, "per-user")
    assert rows[0]["key"].startswith("sha256:")
    assert "sk-very-secret" not in repr(logs) + repr(rows)


async def test_utilization_is_the_larger_ratio(proxy, http):
    """With limit_usd and limit_requests, utilization is the larger ratio; the request
    limit blocks first here (4 requests at $0.01)."""
    for _ in range(4):
        assert (await post(http, proxy, "/both"))[0] == 200
    assert (await post(http, proxy, "/both"))[0] == 429
    [row] = await status_rows(http, proxy, "both")
    assert row["requests"] == 4 and row["spend_usd"] == pytest.approx(0.04)
    assert row["utilization"] == 1.0 and row["level"] == "block"


async def test_block_serves_the_fallback_response(proxy, http):
    """A route with fallback_response answers it with x-rp-fallback: budget when blocked."""
    for _ in range(4):
        await post(http, proxy, "/both")
    status, headers, body = await post(http, proxy, "/soft")
    assert status == 200 and headers["x-rp-fallback"] == "budget"
    assert body == b'{"degraded":true}'


async def test_cache_hits_cost_nothing_and_do_not_count(proxy, mock_provider, http):
    """A cache hit never reaches the budget: spend and requests stay as the miss left them."""
    for _ in range(3):
        status, headers, _ = await post(http, proxy, "/cached", json={"q": 1})
        assert status == 200
    assert headers["x-rp-cache"] == "hit" and headers["x-rp-cost-usd"] == "0"
    [row] = await status_rows(http, proxy, "both")
    assert row["requests"] == 1 and row["spend_usd"] == pytest.approx(0.1)
    assert mock_provider.mock.calls == 1


async def test_failed_calls_are_refunded(proxy, http):
    """A provider error costs nothing and does not count; the hold is released."""
    for _ in range(5):
        status, _, _ = await post(http, proxy, "/both", headers={"x-mock-status": "400"})
        assert status == 400
    [row] = await status_rows(http, proxy, "both")
    assert row["requests"] == 0 and row["spend_usd"] == 0
    assert (await post(http, proxy, "/both"))[0] == 200


async def test_client_disconnect_releases_the_hold(proxy, mock_provider, http, logs):
    """A client that goes away mid-call leaves nothing reserved and nothing spent."""
    timeout = aiohttp.ClientTimeout(total=0.3)
    with pytest.raises(asyncio.TimeoutError):
        await post(http, proxy, "/both", headers={"x-mock-delay": "3s"}, timeout=timeout)
    await wait_for(lambda: len(access_lines(logs)) == 1, timeout=5)
    assert access_lines(logs)[0]["outcome"] == "client_disconnected"
    budget = proxy.runtime.registry["budget"]["both"]
    ledger = budget._ledger

    async def reserved() -> int:
        now = proxy.deps.clock.time()
        win = budget.window(now)
        totals = await ledger.read(budget._counter("b:both:global", win))
        return totals.reserved_requests

    await wait_for(lambda: not budget._tasks, timeout=5)
    assert await reserved() == 0
    [row] = await status_rows(http, proxy, "both")
    assert row["requests"] == 0 and row["spend_usd"] == 0


async def test_concurrent_calls_cannot_overshoot(proxy, http):
    """30 calls at once at $0.10 against $1.00 (block at 100%): exactly 10 are admitted."""
    results = await asyncio.gather(*(post(http, proxy, "/tiered", headers={"x-mock-delay": "200ms"})
                                     for _ in range(30)))
    statuses = sorted(r[0] for r in results)
    assert statuses.count(200) == 10 and statuses.count(429) == 20
    [row] = await status_rows(http, proxy, "monthly")
    assert row["spend_usd"] == pytest.approx(1.0)


async def test_estimate_uses_max_tokens_or_the_default(proxy, mock_provider, http):
    """The hold is input bytes/4 + max_tokens (or default_output_tokens) at the tier's
    price: a call whose estimate alone exceeds the limit is refused before it is sent."""
    body = {"model": "m", "max_tokens": 2000}
    assert (await post(http, proxy, "/tokens", json=body))[0] == 429
    body = {"model": "m"}  # default_output_tokens 500 → ≈ $0.5 + input
    status, _, _ = await post(http, proxy, "/tokens", json=body,
                              headers={"x-mock-output-tokens": "10"})
    assert status == 200
    assert mock_provider.mock.calls == 1


async def test_status_lists_global_budgets_from_the_start(proxy, http):
    """Before any request, each global budget is listed with key 'global', zero spend,
    level ok and the window's end in UTC."""
    [row] = await status_rows(http, proxy, "monthly")
    assert row == {"name": "monthly", "key": "global", "spend_usd": 0, "requests": 0,
                   "limit_usd": 1.0, "limit_requests": None, "utilization": 0, "level": "ok",
                   "resets_at": "2026-01-31T15:00:00+00:00"}
    assert await status_rows(http, proxy, "per-user") == []
    assert datetime.fromisoformat(row["resets_at"]) - datetime.fromtimestamp(
        JAN_15_SEOUL_NOON, UTC) > timedelta(days=16)


async def test_streams_settle_when_they_close(proxy, http, logs):
    """A streamed call is settled with its metered cost once the stream has ended."""
    body = {"model": "m", "stream": True, "messages": [],
            "stream_options": {"include_usage": True}}
    status, _, raw = await post(http, proxy, "/tokens", json=body,
                                headers={"x-mock-output-tokens": "20"})
    assert status == 200 and raw.endswith(b"data: [DONE]\n\n")
    budget = proxy.runtime.registry["budget"]["tokens"]
    await wait_for(lambda: not budget._tasks, timeout=5)
    [row] = await status_rows(http, proxy, "tokens")
    assert row["requests"] == 1
    assert row["spend_usd"] == pytest.approx(access_lines(logs)[-1]["cost_usd"])


async def test_reload_keeps_the_spend(make_proxy, mock_provider, clock, http, tmp_path):
    """A reload that raises the limit keeps what was spent this window."""
    path = tmp_path / "rp.yaml"
    path.write_text(CONFIG.format(mock=mock_provider.url))
    proxy = await make_proxy(path.read_text(), clock=clock, path=str(path))
    for _ in range(3):
        await post(http, proxy, "/tiered")
    path.write_text(CONFIG.format(mock=mock_provider.url).replace("limit_usd: 1\n", "limit_usd: 2\n", 1))
    assert await proxy.reload() == []
    [row] = await status_rows(http, proxy, "monthly")
    assert row["limit_usd"] == 2 and row["spend_usd"] == pytest.approx(0.3)
