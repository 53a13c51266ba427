"""Canary: sticky assignment, operator weights, auto-rollback, the staged ramp and the report,
through the real proxy in front of two mock providers (memory state, injected clock)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from policies.canary import BUCKETS, bucket, in_variant
from proxy.clock import FakeClock
from proxy.loader import load_config
from tests.conftest import access_lines

CONFIG = """
version: 1
providers:
  stable_p: {url: "STABLE_URL", format: openai, pricing: {"*": {input: 1.0, output: 1.0}}}
  variant_p: {url: "VARIANT_URL", format: openai, pricing: {"*": {input: 2.0, output: 2.0}}}
routes:
  - name: chat
    match: {path_prefix: /v1/chat/completions, methods: [POST]}
    provider: stable_p
    canary:
      CANARY
      hash_on: header:x-user-id
      variant:
        provider: variant_p
        VARIANT_EXTRA
      auto_rollback: {window: 10s, consecutive: CONSECUTIVE, min_requests: 10, max_error_rate: 0.05}
  - name: plain
    match: {path_prefix: /v1/generic}
    provider: stable_p
"""

USERS = [f"user-{i}" for i in range(120)]


def config(mock: Any, mock2: Any, *, canary: str = "weight: 50", variant_extra: str = "",
           consecutive: int = 3) -> str:
    return (CONFIG.replace("STABLE_URL", mock.url).replace("VARIANT_URL", mock2.url)
            .replace("CANARY", canary).replace("VARIANT_EXTRA", variant_extra)
            .replace("CONSECUTIVE", str(consecutive)))


async def chat(http: Any, proxy: Any, user: str | None, **headers: str) -> tuple[int, str | None]:
    hdrs = dict(headers)
    if user is not None:
        hdrs["x-user-id"] = user
    async with http.post(proxy.data_url + "/v1/chat/completions", headers=hdrs,
                         json={"model": "m", "messages": [{"role": "user", "content": "hi"}]}) as r:
        await r.read()
        return r.status, r.headers.get("x-rp-canary")


async def admin(http: Any, proxy: Any, method: str, path: str, body: Any = None) -> Any:
    async with http.request(method, proxy.admin_url + path, json=body) as r:
        return r.status, await r.json()


def canary_status(status: dict[str, Any], route: str = "chat") -> dict[str, Any]:
    return next(r for r in status["routes"] if r["name"] == route)["canary"]


# --------------------------------------------------------------------------- assignment


@given(st.text(min_size=1, max_size=40), st.floats(0, 100), st.floats(0, 100))
def test_raising_the_weight_only_moves_keys_into_the_variant(key, w1, w2):
    """A key in the variant at weight w stays in it at any w' >= w (stability as it grows)."""
    lo, hi = min(w1, w2), max(w1, w2)
    if in_variant("chat", key, lo):
        assert in_variant("chat", key, hi)
    assert 0 <= bucket("chat", key) < BUCKETS


def test_share_of_10000_keys_matches_the_weight():
    """10,000 distinct keys at weight 5 put ~5% in the variant; at 10 every one of them stays."""
    keys = [f"user-{i}" for i in range(10_000)]
    at5 = {k for k in keys if in_variant("chat", k, 5)}
    at10 = {k for k in keys if in_variant("chat", k, 10)}
    assert 430 <= len(at5) <= 570 and 930 <= len(at10) <= 1070
    assert at5 <= at10
    assert not in_variant("chat", None, 100) and not in_variant("chat", "", 100)


def test_bucket_is_the_documented_formula():
    """bucket = blake2b(salt + key, 8 bytes) big-endian mod 10000: reproducible anywhere."""
    import hashlib

    digest = hashlib.blake2b(b"chatuser-42", digest_size=8).digest()
    assert bucket("chat", "user-42") == int.from_bytes(digest, "big") % 10_000


async def test_keys_are_sticky_and_the_arm_is_visible(mock_provider, mock_provider2, make_proxy,
                                                      http, logs):
    """Each key lands on its arm every time (x-rp-canary, the log line); no key → stable."""
    proxy = await make_proxy(config(mock_provider, mock_provider2), clock=FakeClock())
    for _ in range(2):
        for user in USERS[:40]:
            status, arm = await chat(http, proxy, user)
            assert status == 200
            assert arm == ("variant" if in_variant("chat", user, 50) else "stable")
    status, arm = await chat(http, proxy, None)
    assert (status, arm) == (200, "stable")
    n_variant = sum(in_variant("chat", u, 50) for u in USERS[:40])
    assert mock_provider2.mock.calls == 2 * n_variant
    assert mock_provider.mock.calls == 2 * (40 - n_variant) + 1
    lines = access_lines(logs)
    assert {line["canary"] for line in lines} == {"stable", "variant"}
    assert all(line["canary"] == "variant" for line in lines if line["provider"] == "variant_p")


async def test_variant_timeout_resets_the_deadline(mock_provider, mock_provider2, make_proxy, http):
    """The variant's own total timeout bounds its requests; stable keeps the route's."""
    cfg = config(mock_provider, mock_provider2, variant_extra="timeout: {total: 150ms}")
    proxy = await make_proxy(cfg)
    variant_user = next(u for u in USERS if in_variant("chat", u, 50))
    stable_user = next(u for u in USERS if not in_variant("chat", u, 50))
    assert await chat(http, proxy, variant_user, **{"x-mock-delay": "400ms"}) == (504, "variant")
    assert await chat(http, proxy, stable_user, **{"x-mock-delay": "400ms"}) == (200, "stable")


# --------------------------------------------------------------------------- weights


async def test_operator_weight_and_rollback(mock_provider, mock_provider2, make_proxy, http):
    """POST a weight: status, metric and routing follow at once; rollback sends all to stable."""
    proxy = await make_proxy(config(mock_provider, mock_provider2, canary="weight: 5"),
                             clock=FakeClock())
    code, body = await admin(http, proxy, "POST", "/admin/canary/chat", {"weight": 60})
    assert code == 200 and body["weight"] == 60 and body["state"] == "active"
    _, status = await admin(http, proxy, "GET", "/admin/status")
    assert canary_status(status)["weight"] == 60
    assert canary_status(status, "plain") == {"weight": 0, "state": "off"}
    assert 'rp_canary_weight{route="chat"} 60.0' in proxy.deps.metrics.render().decode()
    for user in USERS[:30]:
        assert (await chat(http, proxy, user))[1] == ("variant" if in_variant("chat", user, 60)
                                                      else "stable")
    code, body = await admin(http, proxy, "POST", "/admin/canary/chat/rollback")
    assert code == 200 and (body["weight"], body["state"]) == (0, "rolled_back")
    assert {(await chat(http, proxy, u))[1] for u in USERS[:30]} == {"stable"}
    assert (await admin(http, proxy, "POST", "/admin/canary/chat", {"weight": 101}))[0] == 400
    assert (await admin(http, proxy, "POST", "/admin/canary/plain", {"weight": 5}))[0] == 404
    assert (await admin(http, proxy, "GET", "/admin/canary/chat/rollback"))[0] == 405


async def test_weight_survives_reload_unless_the_file_changed_it(
        mock_provider, mock_provider2, make_proxy, http, tmp_path: Path):
    """An operator's weight survives a reload of the same weight; a new file weight wins."""
    path = tmp_path / "canary.yaml"
    text = config(mock_provider, mock_provider2, canary="weight: 5")
    path.write_text(text)
    proxy = await make_proxy(text, path=str(path), clock=FakeClock())
    await admin(http, proxy, "POST", "/admin/canary/chat", {"weight": 30})
    path.write_text(text.replace("max_error_rate: 0.05", "max_error_rate: 0.1"))
    assert (await admin(http, proxy, "POST", "/admin/reload"))[0] == 200
    ctrl = proxy.runtime.registry["canary"]["chat"]
    await ctrl.tick()
    assert ctrl.status()["weight"] == 30
    path.write_text(text.replace("weight: 5", "weight: 15"))
    assert (await admin(http, proxy, "POST", "/admin/reload"))[0] == 200
    ctrl = proxy.runtime.registry["canary"]["chat"]
    await ctrl.tick()
    _, status = await admin(http, proxy, "GET", "/admin/status")
    assert canary_status(status)["weight"] == 15 and canary_status(status)["state"] == "active"


async def test_removing_the_canary_block_removes_its_weight_gauge(
        mock_provider, mock_provider2, make_proxy, http, tmp_path: Path):
    """A reload without the route's canary block takes ``rp_canary_weight{route}`` out of
    /metrics (it showed the last weight forever); a reload that keeps the block keeps it."""
    path = tmp_path / "canary.yaml"
    text = config(mock_provider, mock_provider2, canary="weight: 40")
    path.write_text(text)
    proxy = await make_proxy(text, path=str(path), clock=FakeClock())
    series = 'rp_canary_weight{route="chat"}'
    assert f"{series} 40.0" in proxy.deps.metrics.render().decode()
    path.write_text(text.replace("max_error_rate: 0.05", "max_error_rate: 0.1"))
    assert (await admin(http, proxy, "POST", "/admin/reload"))[0] == 200
    assert f"{series} 40.0" in proxy.deps.metrics.render().decode()
    start, end = text.index("    canary:"), text.index("  - name: plain")
    path.write_text(text[:start] + text[end:])
    assert (await admin(http, proxy, "POST", "/admin/reload"))[0] == 200
    assert series not in proxy.deps.metrics.render().decode()
    assert (await chat(http, proxy, "user-1"))[0] == 200


# --------------------------------------------------------------------------- auto-rollback


async def run_windows(http: Any, proxy: Any, clock: FakeClock, windows: int,
                      users: list[str] = USERS) -> list[dict[str, Any]]:
    """Send one request per user in each 10 s window, then judge it; the statuses after."""
    ctrl = proxy.runtime.registry["canary"]["chat"]
    seen = []
    for _ in range(windows):
        for user in users:
            await chat(http, proxy, user)
        clock.advance(10)
        await ctrl.tick()
        seen.append(ctrl.status())
    return seen


async def test_rolls_back_after_consecutive_bad_windows(mock_provider, mock_provider2, make_proxy,
                                                        http, logs):
    """Three windows over max_error_rate → weight 0 everywhere, logged and counted once; it
    stays at 0 until an operator sets a weight."""
    mock_provider2.mock.fail_percent = 50
    clock = FakeClock()
    proxy = await make_proxy(config(mock_provider, mock_provider2), clock=clock)
    clock.advance(1.5)  # inside window 0, past the settle time of the next judgement
    seen = await run_windows(http, proxy, clock, 5)
    assert [s["state"] for s in seen] == ["active", "active", "rolled_back", "rolled_back",
                                          "rolled_back"]
    assert [s["weight"] for s in seen][:2] == [50, 50] and seen[2]["weight"] == 0
    assert [s["breaching_windows"] for s in seen][:2] == [1, 2]
    rolled = [e for e in logs if e["event"] == "canary_rolled_back"]
    assert len(rolled) == 1 and rolled[0]["reason"] == "auto"
    assert [w["breached"] for w in rolled[0]["windows"]] == [["error_rate"]] * 3
    assert 'rp_canary_rollbacks_total{route="chat"} 1.0' in proxy.deps.metrics.render().decode()
    assert {(await chat(http, proxy, u))[1] for u in USERS} == {"stable"}
    await admin(http, proxy, "POST", "/admin/canary/chat", {"weight": 50})
    assert "variant" in {(await chat(http, proxy, u))[1] for u in USERS}


async def test_quiet_windows_do_not_roll_back(mock_provider, mock_provider2, make_proxy, http):
    """Windows with fewer than min_requests variant requests never count as breaches."""
    mock_provider2.mock.fail_percent = 100
    clock = FakeClock()
    proxy = await make_proxy(config(mock_provider, mock_provider2), clock=clock)
    clock.advance(1.5)
    few = [u for u in USERS if in_variant("chat", u, 50)][:9]
    seen = await run_windows(http, proxy, clock, 4, users=few)
    assert all(s["state"] == "active" and s["breaching_windows"] == 0 for s in seen)


async def test_staged_ramp_advances_while_healthy(mock_provider, mock_provider2, make_proxy, http,
                                                  logs):
    """steps [10, 50, 100] every 20 s: each step once the weight held 20 s and its last window
    was healthy with enough variant requests."""
    clock = FakeClock()
    cfg = config(mock_provider, mock_provider2, canary="steps: [10, 50, 100]\n      step_every: 20s")
    proxy = await make_proxy(cfg, clock=clock)
    clock.advance(1.5)
    users = [f"user-{i}" for i in range(250)]  # ~10% of them: over min_requests at step 1
    seen = await run_windows(http, proxy, clock, 4, users=users)
    assert [s["weight"] for s in seen] == [10, 50, 50, 100]
    assert [(e["weight_before"], e["weight"]) for e in logs if e["event"] == "canary_step"] == [
        (10, 50), (50, 100)]


async def test_staged_ramp_holds_while_breaching(mock_provider, mock_provider2, make_proxy, http):
    """A variant over its limits never advances (and rolls back after enough windows)."""
    mock_provider2.mock.fail_percent = 50
    clock = FakeClock()
    cfg = config(mock_provider, mock_provider2, consecutive=5,
                 canary="steps: [10, 50, 100]\n      step_every: 20s")
    proxy = await make_proxy(cfg, clock=clock)
    clock.advance(1.5)
    seen = await run_windows(http, proxy, clock, 4, users=[f"user-{i}" for i in range(250)])
    assert [s["weight"] for s in seen] == [10, 10, 10, 10]
    assert seen[-1]["breaching_windows"] == 4


# --------------------------------------------------------------------------- report


async def test_report_counts_each_arm(mock_provider, mock_provider2, make_proxy, http):
    """The report counts what each arm served (errors included, costs metered) and judges."""
    mock_provider2.mock.fail_percent = 50
    proxy = await make_proxy(config(mock_provider, mock_provider2), clock=FakeClock())
    arms = {"stable": [0, 0], "variant": [0, 0]}
    for user in USERS:
        status, arm = await chat(http, proxy, user)
        assert arm is not None
        arms[arm][0] += 1
        arms[arm][1] += status >= 500
    code, rep = await admin(http, proxy, "GET", "/admin/canary/chat/report")
    assert code == 200
    assert set(rep) >= {"route", "weight", "state", "arms", "error_rate", "latency", "verdict"}
    for arm, (requests, errors) in arms.items():
        assert (rep["arms"][arm]["requests"], rep["arms"][arm]["errors"]) == (requests, errors)
        assert set(rep["arms"][arm]["latency_ms"]) >= {"p50", "p95", "mean"}
    assert rep["arms"]["stable"]["mean_cost_usd"] > 0
    assert rep["error_rate"]["diff"] == pytest.approx(arms["variant"][1] / arms["variant"][0])
    assert rep["error_rate"]["ci95"][0] > 0 and rep["error_rate"]["p_value"] < 0.001
    assert rep["latency"]["test"] == "mann_whitney_u"
    assert rep["verdict"] == "variant_worse"
    code, off = await admin(http, proxy, "GET", "/admin/canary/plain/report")
    assert code == 200 and off["state"] == "off" and off["verdict"] == "not_enough_data"


async def test_stream_cost_is_added_when_it_ends(mock_provider, mock_provider2, make_proxy, http):
    """A streamed variant reply counts at commit and adds its metered cost when it closes."""
    proxy = await make_proxy(config(mock_provider, mock_provider2, canary="weight: 100"),
                             clock=FakeClock())
    async with http.post(proxy.data_url + "/v1/chat/completions", headers={"x-user-id": "u1"},
                         json={"model": "m", "stream": True, "messages": []}) as r:
        assert r.headers["x-rp-canary"] == "variant"
        await r.read()
    rep = (await admin(http, proxy, "GET", "/admin/canary/chat/report"))[1]
    assert rep["arms"]["variant"]["requests"] == 1
    assert rep["arms"]["variant"]["mean_cost_usd"] > 0


# --------------------------------------------------------------------------- example


EXAMPLE = Path(__file__).resolve().parent.parent / "config" / "examples" / "canary-rollout.yaml"


async def test_example_config_end_to_end(mock_provider, mock_provider2, redis_server, make_proxy,
                                         http, logs):
    """config/examples/canary-rollout.yaml on Redis: a sticky 5% first step, a broken
    candidate rolled back after three bad windows, and a report that says variant_worse."""
    env = {**os.environ, "OPENAI_URL": mock_provider.url, "DEEPSEEK_URL": mock_provider2.url,
           "REDIS_URL": redis_server.url, "OPENAI_API_KEY": "sk-test-stable",
           "DEEPSEEK_API_KEY": "sk-test-candidate"}
    loaded = load_config(str(EXAMPLE), env=env)
    canary = loaded.config.routes[0].canary
    assert loaded.config.state.backend == "redis"
    assert canary is not None and canary.weight == 5 and canary.auto_rollback is not None
    window = canary.auto_rollback.window
    mock_provider2.mock.fail_percent = 100  # the candidate is down: retries cannot hide it
    clock = FakeClock()
    # the example's Redis timeout is 100 ms; on a busy machine a timed-out canary call keeps
    # the last weight or drops an observation (by design), which this count cannot allow
    text = EXAMPLE.read_text()
    assert "timeout: 100ms" in text
    proxy = await make_proxy(text.replace("timeout: 100ms", "timeout: 2s", 1), env=env,
                             clock=clock)
    ctrl = proxy.runtime.registry["canary"]["chat"]
    users = [f"u{i}" for i in range(3000)]
    variant_users = [u for u in users if in_variant("chat-rollout", u, 5)]
    assert 110 <= len(variant_users) <= 190
    clock.advance(1.5)
    states = []
    for _ in range(4):
        for user in variant_users[:60] + users[:60]:
            await chat(http, proxy, user)
        clock.advance(window)
        await ctrl.tick()
        states.append(ctrl.status()["state"])
    assert states == ["active", "active", "rolled_back", "rolled_back"]
    rep = (await admin(http, proxy, "GET", "/admin/canary/chat/report"))[1]
    assert rep["state"] == "rolled_back" and rep["weight"] == 0
    variant = rep["arms"]["variant"]
    per_window = 60 + len(set(variant_users) & set(users[:60]))
    assert variant["requests"] == variant["errors"] == 3 * per_window  # none after rollback
    assert rep["verdict"] == "variant_worse"
    lines = access_lines(logs)
    assert {line["canary"] for line in lines} == {"stable", "variant"}
    assert [e["reason"] for e in logs if e["event"] == "canary_rolled_back"] == ["auto"]


async def test_requests_in_flight_across_a_reload_still_count(
        mock_provider, mock_provider2, make_proxy, http, tmp_path: Path):
    """An observation made by the replaced config's canary lands in the new one's report."""
    path = tmp_path / "canary.yaml"
    text = config(mock_provider, mock_provider2)
    path.write_text(text)
    proxy = await make_proxy(text, path=str(path), clock=FakeClock())
    old = proxy.runtime.registry["canary"]["chat"]
    path.write_text(text.replace("max_error_rate: 0.05", "max_error_rate: 0.1"))
    assert (await admin(http, proxy, "POST", "/admin/reload"))[0] == 200
    new = proxy.runtime.registry["canary"]["chat"]
    assert new is not old
    old.observe("variant", True, 0.25, 0.0)  # a request that started before the reload ends
    rep = await new.report()
    assert (rep["arms"]["variant"]["requests"], rep["arms"]["variant"]["errors"]) == (1, 1)


@pytest.mark.parametrize(("canary", "problem"), [
    ("steps: [10, 5]\n      step_every: 1m", "strictly increasing"),
    ("weight: 5\n      step_every: 1m", "step_every needs steps"),
    ("steps: [5, 10]", "steps need step_every"),
])
def test_ramp_config_errors_are_located(mock_provider, mock_provider2, canary, problem):
    """A malformed ramp is refused at load, located at routes[0].canary."""
    from proxy.loader import ConfigError, parse_config

    with pytest.raises(ConfigError) as exc:
        parse_config(config(mock_provider, mock_provider2, canary=canary), "<test>", env={})
    assert any(e.startswith("routes[0].canary") and problem in e for e in exc.value.errors)


def test_ramp_needs_auto_rollback_and_a_limit():
    """steps without auto_rollback, and auto_rollback without any limit, are refused."""
    from pydantic import ValidationError

    from proxy.config import CanaryConfig

    base = {"variant": {"provider": "p"}}
    with pytest.raises(ValidationError, match="steps need auto_rollback"):
        CanaryConfig.model_validate({**base, "steps": [5, 50], "step_every": "1m"})
    with pytest.raises(ValidationError, match="at least one limit"):
        CanaryConfig.model_validate({**base, "auto_rollback": {"max_error_rate": None}})
    ramp = CanaryConfig.model_validate({**base, "steps": [5, 50], "step_every": "1m",
                                        "auto_rollback": {}})
    assert ramp.weight == 5
