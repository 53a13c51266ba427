"""The circuit breaker through the real proxy and mock provider, on an injected clock."""

from __future__ import annotations

import asyncio

from multidict import CIMultiDict

from proxy.clock import FakeClock

CHAT = "/v1/chat/completions"
BODY = {"model": "m1", "messages": []}
FAIL = {"x-mock-status": "503"}
BREAKER = "{failure_rate: 0.5, min_requests: 4, window: 10s, open_for: 5s}"


def config(url: str, url2: str | None = None, breaker: str = BREAKER, extra_route: bool = False,
           retry: str = "") -> str:
    tiers = "[{provider: p1}" + (", {provider: p2}]" if url2 else "]")
    p2 = f'  p2: {{url: "{url2}", format: openai}}\n' if url2 else ""
    other = """  - name: other
    match: {path_prefix: /v1/other}
    provider: p1
""" if extra_route else ""
    return f"""
version: 1
providers:
  p1: {{url: "{url}", format: openai, circuit_breaker: {breaker}}}
{p2}routes:
  - name: chat
    match: {{path_prefix: {CHAT}}}
    tiers: {tiers}
{retry}{other}"""


def state(proxy) -> float | None:
    return proxy.deps.metrics.registry.get_sample_value("rp_circuit_state", {"provider": "p1"})


async def post(http, proxy, headers=None, path=CHAT):
    async with http.post(proxy.data_url + path, json=BODY, headers=headers or {}) as resp:
        return resp.status, CIMultiDict(resp.headers), await resp.read()


async def trip(http, proxy, n: int = 4) -> None:
    for _ in range(n):
        assert (await post(http, proxy, FAIL))[0] == 503


async def test_opens_on_failure_rate_and_fails_fast(mock_provider, make_proxy, http, logs):
    """min_requests failures at >= failure_rate open it; then requests fail fast, no upstream call."""
    proxy = await make_proxy(config(mock_provider.url), clock=FakeClock())
    await post(http, proxy)  # one success: 3 failures of 4 is 75 %
    await trip(http, proxy, 2)
    assert state(proxy) == 0
    await trip(http, proxy, 1)
    assert state(proxy) == 2
    status, _, body = await post(http, proxy)
    assert status == 503 and b'"circuit_open"' in body
    assert mock_provider.mock.calls == 4
    [change] = [e for e in logs if e["event"] == "circuit_state_changed"]
    assert (change["provider"], change["previous"], change["state"]) == ("p1", "closed", "open")
    assert change["request_id"]


async def test_below_min_requests_stays_closed(mock_provider, make_proxy, http):
    """Fewer outcomes than min_requests never open it, however many failed."""
    proxy = await make_proxy(config(mock_provider.url), clock=FakeClock())
    await trip(http, proxy, 3)
    assert state(proxy) == 0
    assert (await post(http, proxy))[0] == 200


async def test_4xx_and_429_are_not_failures(mock_provider, make_proxy, http):
    """429s and client errors say the provider is alive: they never open the breaker."""
    proxy = await make_proxy(config(mock_provider.url), clock=FakeClock())
    for status in ("429", "404", "400", "429", "429", "422"):
        await post(http, proxy, {"x-mock-status": status})
    assert state(proxy) == 0


async def test_failures_slide_out_of_the_window(mock_provider, make_proxy, http):
    """Failures older than the window do not count."""
    clock = FakeClock()
    proxy = await make_proxy(config(mock_provider.url), clock=clock)
    await trip(http, proxy, 3)
    clock.advance(11)
    await post(http, proxy)
    await trip(http, proxy, 1)
    assert state(proxy) == 0  # 1 failure of 2 in the window: under min_requests
    await trip(http, proxy, 2)
    assert state(proxy) == 2  # 3 of 4 in the window


async def test_half_open_probe_closes_it(mock_provider, make_proxy, http, logs):
    """After open_for, one probe goes through; its success closes the breaker."""
    clock = FakeClock()
    proxy = await make_proxy(config(mock_provider.url), clock=clock)
    await trip(http, proxy)
    assert (await post(http, proxy))[0] == 503
    clock.advance(5)
    status, headers, _ = await post(http, proxy)
    assert status == 200 and headers["x-rp-attempts"] == "1"
    assert state(proxy) == 0
    assert (await post(http, proxy))[0] == 200
    states = [(e["previous"], e["state"]) for e in logs if e["event"] == "circuit_state_changed"]
    assert states == [("closed", "open"), ("open", "half_open"), ("half_open", "closed")]


async def test_half_open_probe_failure_reopens(mock_provider, make_proxy, http):
    """A failed probe opens it again for a full open_for."""
    clock = FakeClock()
    proxy = await make_proxy(config(mock_provider.url), clock=clock)
    await trip(http, proxy)
    clock.advance(5)
    assert (await post(http, proxy, FAIL))[0] == 503
    assert state(proxy) == 2
    calls = mock_provider.mock.calls
    clock.advance(4)
    assert b"circuit_open" in (await post(http, proxy))[2]
    assert mock_provider.mock.calls == calls


async def test_half_open_admits_only_the_probes(mock_provider, make_proxy, http):
    """While the half-open probe is in flight, other requests fail fast."""
    clock = FakeClock()
    proxy = await make_proxy(config(mock_provider.url), clock=clock)
    await trip(http, proxy)
    clock.advance(5)
    probe = asyncio.create_task(post(http, proxy, {"x-mock-delay": "300ms"}))
    await asyncio.sleep(0.1)
    assert state(proxy) == 1
    status, _, body = await post(http, proxy)
    assert status == 503 and b"circuit_open" in body
    assert (await probe)[0] == 200
    assert state(proxy) == 0


async def test_open_tier_is_skipped(mock_provider, mock_provider2, make_proxy, http):
    """With tier 1's circuit open, tier 2 answers without a call to tier 1."""
    proxy = await make_proxy(config(mock_provider.url, url2=mock_provider2.url), clock=FakeClock())
    for _ in range(4):
        async with http.post(mock_provider.url + "/mock/reset"):
            pass
        await post(http, proxy, {"x-mock-status": "503", "x-mock-key": "x",
                                 "x-mock-fail-first": "1"})
    assert state(proxy) == 2
    before = mock_provider.mock.calls
    status, headers, _ = await post(http, proxy)
    assert status == 200 and headers["x-rp-tier"] == "2"
    assert headers["x-rp-fallback"] == "circuit_open"
    assert mock_provider.mock.calls == before


async def test_shared_by_routes_and_survives_reload(mock_provider, make_proxy, http, tmp_path):
    """One breaker per provider: another route sees it open, and a reload keeps it open."""
    text = config(mock_provider.url, extra_route=True)
    path = tmp_path / "rp.yaml"
    path.write_text(text)
    proxy = await make_proxy(text, clock=FakeClock(), path=str(path))
    await trip(http, proxy)
    assert b"circuit_open" in (await post(http, proxy, path="/v1/other"))[2]
    async with http.post(proxy.admin_url + "/admin/reload") as resp:
        assert resp.status == 200
    assert b"circuit_open" in (await post(http, proxy))[2]


async def test_admin_status_and_reset(mock_provider, make_proxy, http):
    """/admin/status shows the state; POST /admin/circuit/p1/reset closes it."""
    proxy = await make_proxy(config(mock_provider.url), clock=FakeClock())
    await trip(http, proxy)
    async with http.get(proxy.admin_url + "/admin/status") as resp:
        providers = (await resp.json())["providers"]
    assert {"name": "p1", "circuit": "open"} in providers
    async with http.post(proxy.admin_url + "/admin/circuit/p1/reset") as resp:
        assert resp.status == 200
    assert state(proxy) == 0
    assert (await post(http, proxy))[0] == 200


async def test_retries_stop_when_it_opens(mock_provider, make_proxy, http, logs):
    """A breaker that opens during a request's retries stops them; the provider's 503 stands."""
    proxy = await make_proxy(config(
        mock_provider.url, breaker="{failure_rate: 0.5, min_requests: 2, open_for: 30s}",
        retry="    retry: {attempts: 5, backoff: {initial: 0s}}\n"), clock=FakeClock())
    status, headers, body = await post(http, proxy, FAIL)
    assert status == 503 and b"mock provider answered 503" in body
    assert mock_provider.mock.calls == 2
    assert headers["x-rp-attempts"] == "2"  # two upstream tries; the open circuit sent nothing
    assert [e["why"] for e in logs if e["event"] == "upstream_retry_skipped"] == ["circuit_open"]
