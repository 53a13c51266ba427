"""deploy/prometheus: promtool on the rules and config, and a real Prometheus scraping a real proxy."""

from __future__ import annotations

import asyncio
import re
import subprocess
import time

import yaml

from tests.deploy_support import (
    PROM_DIR,
    RICH_CONFIG,
    PrometheusServer,
    drive_traffic,
    exported_metric_names,
    promql_metric_names,
    scrape_config_for,
    tool,
)

RUNBOOK = PROM_DIR.parent.parent / "docs" / "runbook.md"

# The alerts the operators asked for: name -> severity.
SEED_ALERTS = {
    "ResilienceProxyHighErrorRate": "critical",
    "ResilienceProxyHighLatency": "warning",
    "ResilienceProxyTierFallbackHigh": "warning",
    "ResilienceProxyBudgetNearLimit": "warning",
    "ResilienceProxyBudgetExhausted": "critical",
    "ResilienceProxyCircuitOpen": "warning",
    "ResilienceProxyCanaryRolledBack": "warning",
}


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([tool("promtool"), *args], cwd=PROM_DIR, capture_output=True, text=True,
                          timeout=120)


def rules() -> list[dict]:
    doc = yaml.safe_load((PROM_DIR / "alerts.yml").read_text())
    return [rule for group in doc["groups"] for rule in group["rules"]]


def test_promtool_check_rules():
    """`promtool check rules` accepts alerts.yml and counts every rule in it."""
    out = promtool("check", "rules", "alerts.yml")
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"SUCCESS: {len(rules())} rules found" in out.stdout


def test_promtool_rule_unit_tests():
    """`promtool test rules` passes: each alert fires on the series that should page and stays
    silent on low traffic, thresholds not crossed, short blips and reset counters."""
    out = promtool("test", "rules", "alerts_test.yml")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "SUCCESS" in out.stdout
    tested = set(re.findall(r"alertname: (\w+)", (PROM_DIR / "alerts_test.yml").read_text()))
    assert tested == {r["alert"] for r in rules() if "alert" in r}, "every alert has a unit test"


def test_promtool_check_config():
    """The static scrape config is valid for Prometheus and loads alerts.yml."""
    out = promtool("check", "config", "prometheus.yml")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "SUCCESS: 1 rule files found" in out.stdout


def test_seed_alerts_severities_and_runbook_links():
    """The seeds' alerts exist with their severities, and every alert links to a runbook section
    that exists in docs/runbook.md."""
    alerts = {r["alert"]: r for r in rules() if "alert" in r}
    assert {name: alerts[name]["labels"]["severity"] for name in SEED_ALERTS} == SEED_ALERTS
    anchors = {re.sub(r"[^a-z0-9 -]", "", h.strip().lower()).replace(" ", "-")
               for h in re.findall(r"^#+ (.+)$", RUNBOOK.read_text(), re.M)}
    for name, rule in alerts.items():
        assert rule["labels"]["severity"] in ("critical", "warning"), name
        assert rule["annotations"]["summary"] and rule["annotations"]["description"], name
        link = rule["annotations"]["runbook_url"]
        assert link.startswith("docs/runbook.md#") and link.split("#", 1)[1] in anchors, name


async def test_rules_reference_only_metrics_the_proxy_exports(mock_provider, mock_provider2,
                                                              make_proxy, http):
    """Every metric name in alerts.yml is one a live proxy's /metrics really has (or a recording
    rule of the same file, or Prometheus' own `up`): a renamed metric breaks this test."""
    proxy = await make_proxy(RICH_CONFIG.format(mock=mock_provider.url, mock2=mock_provider2.url))
    async with http.get(proxy.admin_url + "/metrics") as resp:
        exported = exported_metric_names(await resp.text())
    recorded = {r["record"] for r in rules() if "record" in r}
    for rule in rules():
        unknown = promql_metric_names(rule["expr"]) - exported - recorded - {"up"}
        assert not unknown, f"{rule.get('alert') or rule.get('record')}: {unknown}"


def test_promql_metric_names_reads_selectors_not_functions_or_labels():
    """The name extractor the metric checks rely on finds exactly the selected metrics."""
    expr = ('histogram_quantile(0.95, sum by (route, le) (rate(rp_x_bucket{route=~"$route",le!="1"}'
            '[$__rate_interval]))) / on (route) group_left () sum(rp_y_total offset 5m) > bool 0.5 '
            'or vector(0) unless max_over_time(rp_z[1m:10s]) and last_over_time(up[5m])')
    assert promql_metric_names(expr) == {"rp_x_bucket", "rp_y_total", "rp_z", "up"}


# --------------------------------------------------------------------------- a real Prometheus



async def test_real_prometheus_scrapes_the_proxy(mock_provider, mock_provider2, make_proxy, http,
                                                 prometheus_servers):
    """A real Prometheus, with the shipped scrape config and alert rules, scrapes a running proxy:
    `rp_requests_total` through its HTTP API equals the requests sent, the target is up, and
    every rule evaluates without error."""
    proxy = await make_proxy(RICH_CONFIG.format(mock=mock_provider.url, mock2=mock_provider2.url))
    sent = await drive_traffic(http, proxy.data_url, n=12)
    target = proxy.admin_url.removeprefix("http://")
    prom = PrometheusServer(scrape_config_for(target))
    prometheus_servers.append(prom)

    [series] = await prom.wait_for(http, 'sum by (job, route) (rp_requests_total{route="chat"})')
    assert series["metric"] == {"job": "resilience-proxy", "route": "chat"}
    assert float(series["value"][1]) == sent
    [up] = await prom.query(http, 'up{job="resilience-proxy"}')
    assert up["metric"]["instance"] == target and up["value"][1] == "1"
    by_outcome = {s["metric"]["outcome"]: float(s["value"][1])
                  for s in await prom.query(http, 'rp_requests_total{route="chat"}')}
    assert sum(by_outcome.values()) == sent and by_outcome.get("ok", 0) > 0

    # the rule groups loaded, and every rule evaluated cleanly against the real data
    deadline = time.monotonic() + 30
    while True:
        async with http.get(prom.url + "/api/v1/rules") as resp:
            groups = (await resp.json())["data"]["groups"]
        evaluated = [r for g in groups for r in g["rules"]]
        if evaluated and all(not r.get("lastEvaluation", "0001").startswith("0001") for r in evaluated):
            break
        assert time.monotonic() < deadline, "rules were never evaluated"
        await asyncio.sleep(0.25)
    assert len(evaluated) == len(rules())
    assert [r["name"] for r in evaluated if r["health"] != "ok"] == []
