"""deploy/grafana/resilience-proxy.json: every query names real metrics, parses in a real
Prometheus, and the dashboard has the views operators need."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any

from tests.deploy_support import (
    REPO,
    RICH_CONFIG,
    PrometheusServer,
    drive_traffic,
    exported_metric_names,
    promql_metric_names,
    scrape_config_for,
)

DASHBOARD = REPO / "deploy" / "grafana" / "resilience-proxy.json"


def dashboard() -> dict[str, Any]:
    return dict(json.loads(DASHBOARD.read_text()))


def panels(dash: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for panel in dash["panels"]:
        yield panel
        yield from panel.get("panels", [])  # collapsed rows hold their panels


def queries(dash: dict[str, Any]) -> list[tuple[str, str]]:
    """(where, PromQL) for every panel target, annotation and template variable query."""
    out = [(p["title"], t["expr"]) for p in panels(dash) for t in p.get("targets", [])]
    out += [(f"annotation {a['name']}", a["expr"]) for a in dash["annotations"]["list"] if "expr" in a]
    for var in dash["templating"]["list"]:
        if var["type"] == "query":
            query = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
            out.append((f"${var['name']}", query))
    return out


def as_promql(expr: str) -> str:
    """A query as Grafana sends it, with its variables at typical values."""
    m = re.fullmatch(r"label_values\((.+),\s*(\w+)\)", expr)
    if m:  # Grafana's own function: the series it lists
        expr = f"group by ({m.group(2)}) ({m.group(1)})"
    return (expr.replace("$__rate_interval", "1m").replace("$__range", "1h")
            .replace("$job", ".+").replace("$route", ".+"))


async def test_every_query_references_metrics_the_proxy_exports(mock_provider, mock_provider2,
                                                                 make_proxy, http):
    """Each metric name in a dashboard query is one a live proxy's /metrics has (histograms
    with their _bucket/_count/_sum series): a renamed or invented metric fails here."""
    proxy = await make_proxy(RICH_CONFIG.format(mock=mock_provider.url, mock2=mock_provider2.url))
    async with http.get(proxy.admin_url + "/metrics") as resp:
        exported = exported_metric_names(await resp.text())
    assert "rp_request_duration_seconds_bucket" in exported and "rp_requests_total" in exported
    found = queries(dashboard())
    assert len(found) >= 20
    for where, expr in found:
        names = promql_metric_names(as_promql(expr))
        assert names, f"{where}: no metric in {expr!r}"
        assert names <= exported, f"{where}: {names - exported} not exported"


def test_dashboard_has_the_views_operators_need():
    """Traffic, error rate, p50/p95/p99, fallback rate by tier, cache hit rate, spend vs budget,
    circuit states and canary weight are all on the dashboard, filtered by $job and $route."""
    dash = dashboard()
    exprs = [expr for _, expr in queries(dash)]
    used = set().union(*(promql_metric_names(as_promql(e)) for e in exprs))
    assert {"rp_requests_total", "rp_request_duration_seconds_bucket", "rp_upstream_attempts_total",
            "rp_fallbacks_total", "rp_cache_requests_total", "rp_budget_utilization_ratio",
            "rp_budget_spend_usd", "rp_cost_usd_total", "rp_circuit_state",
            "rp_canary_weight"} <= used
    for q in ("0.50", "0.95", "0.99"):
        assert any(f"histogram_quantile({q}," in e for e in exprs), q
    assert any('code="5xx"' in e and "/" in e for e in exprs), "an error-rate ratio"
    assert any('result="hit"' in e and "/" in e for e in exprs), "a cache hit rate"
    assert any("by (tier)" in e for e in exprs), "answers by tier"
    for p in panels(dash):
        for t in p.get("targets", []):
            if "route" in t["expr"] and "rp_requests_total" in t["expr"]:
                assert 'route=~"$route"' in t["expr"], p["title"]
            assert 'job=~"$job"' in t["expr"], p["title"]


def test_dashboard_layout_is_valid():
    """Unique panel ids, every panel on the ${datasource} variable, inside the 24-column grid,
    and no two panels overlapping."""
    dash = dashboard()
    assert dash["uid"] == "resilience-proxy" and dash["title"]
    ids = [p["id"] for p in panels(dash)]
    assert len(ids) == len(set(ids))
    cells: set[tuple[int, int]] = set()
    for p in panels(dash):
        g = p["gridPos"]
        assert 0 <= g["x"] and g["x"] + g["w"] <= 24, p["title"]
        if p["type"] != "row":
            assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, p["title"]
            assert all(t["datasource"] == p["datasource"] for t in p["targets"]), p["title"]
        mine = {(x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])}
        assert not mine & cells, f"{p['title']} overlaps another panel"
        cells |= mine



async def test_every_query_runs_in_a_real_prometheus(mock_provider, mock_provider2, make_proxy, http,
                                                     prometheus_servers):
    """Every dashboard query is valid PromQL for a real Prometheus scraping a real proxy, and the
    traffic and latency panels have data once it has scraped a few times."""
    proxy = await make_proxy(RICH_CONFIG.format(mock=mock_provider.url, mock2=mock_provider2.url))
    await drive_traffic(http, proxy.data_url, n=8)
    prom = PrometheusServer(scrape_config_for(proxy.admin_url.removeprefix("http://")))
    prometheus_servers.append(prom)
    await prom.wait_for(http, "count_over_time(up[1m]) >= 3")  # rate() needs two scrapes
    await drive_traffic(http, proxy.data_url, n=8)
    await prom.wait_for(http, "count_over_time(up[1m]) >= 5")
    results: dict[str, list[dict[str, Any]]] = {}
    for where, expr in queries(dashboard()):
        results.setdefault(where, []).extend(await prom.query(http, as_promql(expr)))  # fails on an error
    traffic = results["Requests per second by route"]
    assert [s["metric"]["route"] for s in traffic] == ["chat"] and float(traffic[0]["value"][1]) > 0
    latency = {float(s["value"][1]) for s in results["Latency p50 / p95 / p99"]}
    assert len(results["Latency p50 / p95 / p99"]) == 3 and all(0 < v < 60 for v in latency)
    assert {s["metric"]["route"] for s in results["$route"]} == {"chat"}
