"""config/examples/llm-monthly-cap.yaml, run end to end: the seed's monthly cap and quota."""

from __future__ import annotations

import os
from datetime import datetime
from pathlib import Path

import pytest

from proxy.cli import main as cli_main
from proxy.clock import FakeClock
from proxy.loader import load_config
from tests.conftest import access_lines

EXAMPLE = Path(__file__).resolve().parent.parent / "config" / "examples" / "llm-monthly-cap.yaml"
SEOUL_JAN_20 = datetime.fromisoformat("2026-01-20T10:00:00+09:00").timestamp()
FEB_1_SEOUL = datetime.fromisoformat("2026-02-01T00:00:00+09:00").timestamp()


def env_for(**extra: str) -> dict[str, str]:
    base = {k: v for k, v in os.environ.items()
            if k not in ("LLM_MONTHLY_CAP_USD", "USER_DAILY_REQUESTS", "RP_STATE_BACKEND")}
    return {**base, "OPENAI_API_KEY": "sk-example-key", **extra}


def test_production_defaults_and_environment_overrides(capsys, monkeypatch):
    """Without overrides the cap is $100/month in Seoul and the quota 200 requests a day;
    LLM_MONTHLY_CAP_USD and USER_DAILY_REQUESTS change them per environment; `check` passes."""
    prod = load_config(EXAMPLE, env=env_for()).config
    cap, quota = prod.budgets["llm-monthly"], prod.budgets["user-daily"]
    assert (cap.limit_usd, cap.window, cap.timezone) == (100.0, "month", "Asia/Seoul")
    assert [(t.at, t.action) for t in cap.thresholds] == [
        (0.7, "alert"), (0.85, "downgrade"), (1.0, "block")]
    assert (quota.limit_requests, quota.per) == (200, "header:x-user-id")
    staging = load_config(EXAMPLE, env=env_for(LLM_MONTHLY_CAP_USD="10",
                                                USER_DAILY_REQUESTS="50")).config
    assert staging.budgets["llm-monthly"].limit_usd == 10
    assert staging.budgets["user-daily"].limit_requests == 50
    monkeypatch.setenv("OPENAI_API_KEY", "sk-example-key")
    assert cli_main(["check", "-c", str(EXAMPLE)]) == 0
    assert "llm-monthly: $100 per month (Asia/Seoul)" in capsys.readouterr().out


async def test_cap_steps_and_user_quota_end_to_end(make_proxy, mock_provider, http, logs):
    """With a $0.05 staging cap: gpt-4o until 85%, then gpt-4o-mini (x-rp-fallback:
    downgrade), then 429 budget_exceeded until the Seoul month ends; each step logged once;
    spend never past the cap; and a user past the daily quota is refused on its own."""
    env = env_for(OPENAI_BASE_URL=mock_provider.url, LLM_MONTHLY_CAP_USD="0.05",
                  USER_DAILY_REQUESTS="4")
    proxy = await make_proxy(EXAMPLE.read_text(), env=env, clock=FakeClock(wall=SEOUL_JAN_20))
    body = {"messages": [{"role": "user", "content": "hello"}], "max_tokens": 600}
    served = []
    for i in range(40):
        headers = {"x-user-id": f"user-{i // 4}", "x-mock-output-tokens": "600"}
        async with http.post(proxy.data_url + "/v1/chat/completions", json=body,
                             headers=headers) as r:
            if r.status == 429:
                assert (await r.json())["error"]["type"] == "budget_exceeded"
                assert int(r.headers["retry-after"]) == pytest.approx(FEB_1_SEOUL - SEOUL_JAN_20,
                                                                      abs=1)
                break
            assert r.status == 200
            served.append((r.headers["x-rp-model"], r.headers.get("x-rp-fallback")))
    expensive = served.index(("gpt-4o-mini", "downgrade"))
    assert expensive >= 7 and set(served[:expensive]) == {("gpt-4o", None)}
    assert set(served[expensive:]) == {("gpt-4o-mini", "downgrade")}
    steps = [(e["budget"], e["action"]) for e in logs if e.get("event") == "budget_threshold_crossed"]
    assert [s for s in steps if s[0] == "llm-monthly"] == [
        ("llm-monthly", "alert"), ("llm-monthly", "downgrade"), ("llm-monthly", "block")]
    async with http.get(proxy.admin_url + "/admin/status") as r:
        rows = {(b["name"], b["key"]): b for b in (await r.json())["budgets"]}
    cap = rows[("llm-monthly", "global")]
    assert cap["level"] == "block" and cap["spend_usd"] <= 0.05
    assert cap["spend_usd"] == pytest.approx(sum(ln["cost_usd"] for ln in access_lines(logs)
                                                 if ln["status"] == 200))
    assert cap["resets_at"] == "2026-01-31T15:00:00+00:00"


async def test_user_quota_refuses_a_fifth_request(make_proxy, mock_provider, http):
    """A user's fifth request of the day (quota 4) is refused; another user is served."""
    env = env_for(OPENAI_BASE_URL=mock_provider.url, USER_DAILY_REQUESTS="4")
    proxy = await make_proxy(EXAMPLE.read_text(), env=env, clock=FakeClock(wall=SEOUL_JAN_20))
    statuses = []
    for user in ["kim"] * 5 + ["lee"]:
        async with http.post(proxy.data_url + "/v1/chat/completions", json={"messages": []},
                             headers={"x-user-id": user}) as r:
            statuses.append(r.status)
    assert statuses == [200, 200, 200, 200, 429, 200]
