"""The live status page (GET /admin/ on the admin port), loaded in headless Chromium."""

from __future__ import annotations

import re
from collections.abc import Iterator
from html.parser import HTMLParser
from typing import Any

import pytest
from aiohttp import web

from proxy.admin import STATUS_PAGE_FILE, _status_page_handler
from tests.deploy_support import RICH_CONFIG, Chromium, Page, drive_traffic


@pytest.fixture(scope="module")
def browser() -> Iterator[Chromium]:
    chromium = Chromium()
    yield chromium
    chromium.stop()


class _Cells(HTMLParser):
    """Collects every element with data-* attributes, with its text, in document order."""

    def __init__(self) -> None:
        super().__init__()
        self.stack: list[dict[str, Any]] = []
        self.found: list[dict[str, Any]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in ("meta", "link", "input", "br"):
            return
        node = {"tag": tag, "attrs": dict(attrs), "text": "",
                "scope": dict(self.stack[-1]["scope"]) if self.stack else {}}
        for k, v in attrs:
            if k in ("data-route", "data-budget", "data-key", "data-provider", "data-canary",
                     "data-arm"):
                node["scope"][k] = v
        self.stack.append(node)
        self.found.append(node)

    def handle_endtag(self, tag: str) -> None:
        while self.stack:
            if self.stack.pop()["tag"] == tag:
                break

    def handle_data(self, data: str) -> None:
        for node in self.stack:
            node["text"] += data


def cells(html: str) -> list[dict[str, Any]]:
    parser = _Cells()
    parser.feed(html)
    return parser.found


def field(found: list[dict[str, Any]], name: str, **scope: str) -> dict[str, Any]:
    want = {f"data-{k.replace('_', '-')}": v for k, v in scope.items()}
    hits = [c for c in found if c["attrs"].get("data-field") == name
            and all(c["scope"].get(k) == v for k, v in want.items())]
    assert len(hits) == 1, f"{name} {scope}: {len(hits)} cells"
    return hits[0]


def shown_number(text: str) -> float:
    m = re.search(r"-?[\d,]+(\.\d+)?", text)
    assert m, f"no number in {text!r}"
    return float(m.group(0).replace(",", ""))


def assert_shows(cell: dict[str, Any], value: float, scale: float = 1.0, digits: int = 1) -> None:
    """The cell carries the JSON value exactly and shows it rounded as the page formats it."""
    assert float(cell["attrs"]["data-value"]) == pytest.approx(value, rel=1e-12, abs=1e-12)
    assert shown_number(cell["text"]) == pytest.approx(value * scale, abs=0.51 * 10 ** -digits)


def assert_page_matches(html: str, status: dict[str, Any]) -> None:
    """Every route, provider and budget of an /admin/status answer is on the page, with its numbers."""
    found = cells(html)
    for route in status["routes"]:
        name = route["name"]
        assert_shows(field(found, "requests", route=name), route["requests"], digits=0)
        assert_shows(field(found, "fallback_rate", route=name), route["fallback_rate"], scale=100)
        assert_shows(field(found, "latency_mean", route=name), route["latency_ms"]["mean"])
        assert_shows(field(found, "latency_p95", route=name), route["latency_ms"]["p95"])
        tiers = {c["attrs"]["data-tier"]: int(c["attrs"]["data-value"]) for c in found
                 if "data-tier" in c["attrs"] and c["scope"].get("data-route") == name}
        assert {k: v for k, v in tiers.items() if k != "none"} == route["by_tier"]
        assert tiers.get("none", 0) == route["requests"] - sum(route["by_tier"].values())
        canary = field(found, "canary", route=name)
        assert float(canary["attrs"]["data-value"]) == route["canary"]["weight"]
        assert route["canary"]["state"] in canary["text"]
    for provider in status["providers"]:
        circuit = field(found, "circuit", provider=provider["name"])
        assert circuit["text"] == provider["circuit"].replace("_", "-")
    for budget in status["budgets"]:
        where = {"budget": budget["name"], "key": budget["key"]}
        spend = field(found, "spend_usd", **where)
        assert float(spend["attrs"]["data-value"]) == pytest.approx(budget["spend_usd"])
        if budget["limit_usd"] is not None:
            assert float(spend["attrs"]["data-limit"]) == budget["limit_usd"]
            assert f"{budget['limit_usd']:.2f}" in spend["text"]
        requests = field(found, "requests", **where)
        assert int(requests["attrs"]["data-value"]) == budget["requests"]
        if budget["limit_requests"] is not None:
            assert f"{budget['limit_requests']:,}" in requests["text"]
        assert_shows(field(found, "utilization", **where), budget["utilization"], scale=100)
        assert field(found, "level", **where)["text"] == budget["level"]
    assert not [r for r in status["routes"] if r["canary"]["state"] == "off"
                and any(c["scope"].get("data-canary") == r["name"] for c in found)]


async def open_status_page(http, browser: Chromium, admin_url: str) -> Page:
    page = await Page.open(http, browser)
    await page.goto(admin_url + "/admin/")
    return page


async def test_status_page_shows_the_numbers_of_admin_status(mock_provider, mock_provider2,
                                                              make_proxy, http, browser, tmp_path):
    """The page served by the real admin plane loads without console errors and shows, for every
    route, provider and budget, the numbers /admin/status has."""
    proxy = await make_proxy(RICH_CONFIG.format(mock=mock_provider.url, mock2=mock_provider2.url))
    assert await drive_traffic(http, proxy.data_url) == 12
    page = await open_status_page(http, browser, proxy.admin_url)
    try:
        await page.wait_for("document.body.dataset.loaded")
        html = await page.html()
        png = await page.screenshot()
    finally:
        await page.close()
    async with http.get(proxy.admin_url + "/admin/status") as resp:
        status = await resp.json()
    assert page.errors == []
    assert status["routes"][0]["requests"] == 12
    assert_page_matches(html, status)
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    (tmp_path / "status.png").write_bytes(png)  # kept for a look (pytest --basetemp)


CONTRACT_STATUS = {
    "config": {"path": "/etc/resilience-proxy/config.yaml", "sha256": "ab" * 32,
               "loaded_at": "2026-01-02T03:04:05+00:00"},
    "routes": [
        {"name": "chat", "requests": 12345, "by_tier": {"1": 11000, "2": 1200, "3": 45},
         "fallback_rate": 0.1034, "latency_ms": {"mean": 212.25, "p95": 980.5},
         "canary": {"weight": 5, "state": "active"}},
        {"name": "ocr", "requests": 40, "by_tier": {"1": 30}, "fallback_rate": 0.25,
         "latency_ms": {"mean": 1.5, "p95": 3.0}, "canary": {"weight": 0, "state": "rolled_back"}},
        {"name": "idle", "requests": 0, "by_tier": {}, "fallback_rate": 0.0,
         "latency_ms": {"mean": 0.0, "p95": 0.0}, "canary": {"weight": 0, "state": "off"}},
    ],
    "providers": [{"name": "openai", "circuit": "open"}, {"name": "anthropic", "circuit": "half_open"},
                  {"name": "gemini", "circuit": "closed"}],
    "budgets": [
        {"name": "llm-monthly", "key": "global", "spend_usd": 91.2345, "requests": 5012,
         "limit_usd": 100.0, "limit_requests": None, "utilization": 0.912345, "level": "downgrade",
         "resets_at": "2026-02-01T00:00:00+00:00"},
        {"name": "daily-quota", "key": "user-7", "spend_usd": 0.0, "requests": 5000,
         "limit_usd": None, "limit_requests": 5000, "utilization": 1.0, "level": "block",
         "resets_at": "2026-01-03T00:00:00+00:00"},
    ],
}
CONTRACT_REPORT = {
    "route": "chat", "weight": 5, "state": "active",
    "arms": {"stable": {"requests": 11700, "errors": 12, "error_rate": 0.001026,
                        "latency_ms": {"p50": 180.0, "p95": 950.25, "mean": 210.0},
                        "mean_cost_usd": 0.00042},
             "variant": {"requests": 645, "errors": 9, "error_rate": 0.013953,
                         "latency_ms": {"p50": 240.5, "p95": 1200.0, "mean": 260.0},
                         "mean_cost_usd": 0.00031}},
    "error_rate": {"diff": 0.0129, "ci95": [0.004, 0.022], "p_value": 0.001},
    "latency": {"p50_diff_ms": 60.5, "p95_diff_ms": 249.75, "p_value": 0.01, "test": "mann_whitney_u"},
    "verdict": "variant_worse",
}


async def test_status_page_renders_every_field_of_the_contract(http, browser, tmp_path):
    """Fed the full /admin/status shape of DESIGN (open and half-open circuits, budgets at
    downgrade and block with null limits, an active and a rolled-back canary, their reports),
    the page shows each value, and both arms of each canary."""
    app = web.Application()
    app.router.add_get("/admin/", _status_page_handler())

    async def status(request: web.Request) -> web.Response:
        return web.json_response(CONTRACT_STATUS)

    async def report(request: web.Request) -> web.Response:
        route = request.match_info["route"]
        if route == "chat":
            return web.json_response(CONTRACT_REPORT)
        return web.json_response({**CONTRACT_REPORT, "route": route, "weight": 0,
                                  "state": "rolled_back", "verdict": "not_enough_data"})

    app.router.add_get("/admin/status", status)
    app.router.add_get("/admin/canary/{route}/report", report)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        page = await open_status_page(http, browser, f"http://127.0.0.1:{port}")
        try:
            await page.wait_for("document.body.dataset.loaded")
            html = await page.html()
            png = await page.screenshot()
        finally:
            await page.close()
    finally:
        await runner.cleanup()
    assert page.errors == []
    (tmp_path / "contract.png").write_bytes(png)
    assert_page_matches(html, CONTRACT_STATUS)
    found = cells(html)
    for arm in ("stable", "variant"):
        data = CONTRACT_REPORT["arms"][arm]
        assert_shows(field(found, "requests", canary="chat", arm=arm), data["requests"], digits=0)
        assert_shows(field(found, "error_rate", canary="chat", arm=arm), data["error_rate"], scale=100)
        assert_shows(field(found, "latency_p95", canary="chat", arm=arm), data["latency_ms"]["p95"])
    assert "variant_worse" in field(found, "verdict", canary="chat")["text"]
    assert "not_enough_data" in field(found, "verdict", canary="ocr")["text"]
    # a rolled-back canary is listed (its report says why); the route without a canary is not
    assert [c["attrs"]["data-canary"] for c in found if "data-canary" in c["attrs"]] == ["chat", "ocr"]


async def test_status_page_asks_for_the_admin_token(mock_provider, mock_provider2, make_proxy,
                                                    http, browser):
    """With an admin_token the page shows no data until the token is given; it then keeps the
    token in sessionStorage (never in the URL) and reads /admin/status with it."""
    token = "s3cret-admin-token"
    cfg = RICH_CONFIG.format(mock=mock_provider.url, mock2=mock_provider2.url)
    proxy = await make_proxy(cfg.replace("version: 1\n", f"version: 1\nserver: {{admin_token: {token}}}\n"))
    async with http.get(proxy.admin_url + "/admin/status") as resp:
        assert resp.status == 401
    async with http.get(proxy.admin_url + "/admin/") as resp:  # the static page, no data in it
        assert resp.status == 200 and "text/html" in resp.headers["content-type"]
        assert token not in await resp.text()
    page = await open_status_page(http, browser, proxy.admin_url)
    try:
        await page.wait_for("getComputedStyle(document.getElementById('auth')).display === 'block'")
        assert await page.evaluate("document.body.dataset.loaded") is None
        unauthorized = list(page.errors)
        await page.evaluate(f"document.getElementById('token').value = {token!r}; "
                            "document.getElementById('auth-form').requestSubmit(); true")
        await page.wait_for("document.body.dataset.loaded")
        assert await page.evaluate("sessionStorage.getItem('rp-admin-token')") == token
        assert token not in await page.evaluate("location.href")
        html = await page.html()
    finally:
        await page.close()
    # the only errors are the browser's own notes of the 401 before the token was given
    assert unauthorized and all("401" in e for e in unauthorized)
    assert page.errors == unauthorized
    async with http.get(proxy.admin_url + "/admin/status",
                        headers={"authorization": f"Bearer {token}"}) as resp:
        assert_page_matches(html, await resp.json())


async def test_status_page_is_self_contained_and_locked_down(mock_provider, mock_provider2,
                                                            make_proxy, http):
    """The page loads nothing from elsewhere: no external URL in it, and a CSP that allows only
    its own inline script and style (by hash) and fetches to its own origin."""
    html = STATUS_PAGE_FILE.read_text(encoding="utf-8")
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", html)
    assert not re.search(r"@import|url\(\s*['\"]?(https?:)?//", html)
    assert not re.search(r"innerHTML|outerHTML|insertAdjacentHTML|document\.write", html)
    proxy = await make_proxy(RICH_CONFIG.format(mock=mock_provider.url, mock2=mock_provider2.url))
    async with http.get(proxy.admin_url + "/admin/") as resp:
        assert resp.status == 200
        csp = resp.headers["content-security-policy"]
        assert resp.headers["cache-control"] == "no-store"
    assert "default-src 'none'" in csp and "connect-src 'self'" in csp
    assert "unsafe-inline" not in csp and "unsafe-eval" not in csp
    assert re.search(r"script-src 'sha256-[A-Za-z0-9+/=]+'", csp)
