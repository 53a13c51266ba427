"""Issue #7's figures for assignment and the report, measured for real (loopback only).

1. **Sticky split** — one proxy process (``python -m proxy run``, memory state, its bundled
   mock) with a canary at weight 5 on ``header:x-user-id``. 10,000 requests, one per distinct
   key, 32 at a time: the share that ``x-rp-canary`` says went to the variant. Then
   ``POST /admin/canary/chat {"weight": 10}`` and the same 10,000 keys again: the new share,
   and whether every key that was in the variant still is (and which keys moved). Also
   checked: the proxy's arm for each key equals the documented bucket formula.
2. **Report on a fixed data set** — fixed stable/variant observations (seeded log-normal
   latencies rounded to 1 ms, fixed error and cost counts) fed to the canary controller,
   then the same ``report()`` that ``GET /admin/canary/{route}/report`` serves, printed next
   to SciPy/NumPy's independent numbers for the same data.

    python bench/canary_figures.py          # about 25 s on a quiet 2-core machine
"""

from __future__ import annotations

import asyncio
import random
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._support import Procs
from policies.canary import in_variant

CONFIG = """
version: 1
server: {max_concurrent_requests: 4096}
providers:
  stable_p: {url: "mock://", format: openai}
  candidate_p: {url: "mock://", format: openai}
routes:
  - name: chat
    match: {path_prefix: /v1/chat/completions, methods: [POST]}
    provider: stable_p
    canary:
      weight: 5
      hash_on: header:x-user-id
      variant: {provider: candidate_p}
"""
KEYS = [f"user-{i}" for i in range(10_000)]


async def arms(http: aiohttp.ClientSession, url: str) -> dict[str, str]:
    """Each key's arm, as the proxy's x-rp-canary says (32 requests in flight)."""
    out: dict[str, str] = {}
    body = orjson.dumps({"model": "m", "messages": []})
    todo = iter(KEYS)

    async def worker() -> None:
        for key in todo:
            async with http.post(url + "/v1/chat/completions", data=body,
                                 headers={"x-user-id": key}) as r:
                await r.read()
                assert r.status == 200, r.status
                out[key] = r.headers["x-rp-canary"]

    await asyncio.gather(*(worker() for _ in range(32)))
    return out


def sticky_split() -> None:
    with Procs("rp-bench-canary-") as procs:
        proxy = procs.proxy(CONFIG, "canary", log_level="warning")
        at5, t5, at10, t10 = asyncio.run(split(proxy.url, proxy.admin))
    v5 = {k for k, arm in at5.items() if arm == "variant"}
    v10 = {k for k, arm in at10.items() if arm == "variant"}
    print("1. sticky split through the proxy (10,000 distinct x-user-id keys)")
    print(f"   weight 5:  {len(v5)} keys in the variant = {len(v5) / len(KEYS):.2%} "
          f"({t5:.1f} s, {len(KEYS) / t5:.0f} req/s)")
    print(f"   weight 10: {len(v10)} keys in the variant = {len(v10) / len(KEYS):.2%} "
          f"({t10:.1f} s)")
    print(f"   variant keys at 5 still in the variant at 10: {len(v5 & v10)} of {len(v5)}; "
          f"keys that left the variant: {len(v5 - v10)}; keys that moved in: {len(v10 - v5)}")
    formula5 = {k for k in KEYS if in_variant("chat", k, 5)}
    formula10 = {k for k in KEYS if in_variant("chat", k, 10)}
    print(f"   the proxy's arms equal the documented bucket formula: "
          f"{v5 == formula5 and v10 == formula10}")


async def split(url: str, admin_url: str) -> tuple[dict[str, str], float, dict[str, str], float]:
    """Every key's arm at weight 5, then (after the admin POST) at weight 10."""
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as http:
        t = time.monotonic()
        at5 = await arms(http, url)
        t5 = time.monotonic() - t
        async with http.post(admin_url + "/admin/canary/chat", json={"weight": 10}) as r:
            assert r.status == 200 and (await r.json())["weight"] == 10
        t = time.monotonic()
        at10 = await arms(http, url)
        return at5, t5, at10, time.monotonic() - t


def _latencies(seed: int, n: int, mu: float, sigma: float) -> list[float]:
    r = random.Random(seed)
    return [float(round(r.lognormvariate(mu, sigma))) for _ in range(n)]


async def fixed_report() -> None:
    import numpy as np
    import structlog
    from scipy import stats

    from policies.canary_control import CanaryController
    from proxy.clock import FakeClock
    from proxy.config import CanaryConfig, StateConfig
    from proxy.context import Deps
    from proxy.metrics import Metrics
    from proxy.state.backend import StateBackend
    from proxy.state.canary import MemoryCanaryStore

    stable = _latencies(1, 400, 5.0, 0.4)
    variant = _latencies(2, 300, 5.15, 0.45)
    s_err, v_err = set(range(0, 400, 100)), set(range(0, 300, 20))  # 4/400 and 15/300
    clock, metrics = FakeClock(), Metrics()
    deps = Deps(clock=clock, metrics=metrics, log=structlog.get_logger(),
                state=StateBackend(StateConfig(), metrics, structlog.get_logger(), clock))
    cfg = CanaryConfig.model_validate({"weight": 10, "variant": {"provider": "p"},
                                       "auto_rollback": {"window": "60s", "min_requests": 20}})
    ctrl = CanaryController("chat", cfg, "bench", MemoryCanaryStore(), deps)
    for i, ms in enumerate(stable):
        ctrl.observe("stable", i in s_err, ms / 1000, 0.002)
    for i, ms in enumerate(variant):
        ctrl.observe("variant", i in v_err, ms / 1000, 0.0025)
    rep: dict[str, Any] = await ctrl.report()

    chi = stats.chi2_contingency([[4, 396], [15, 285]], correction=False)
    mwu = stats.mannwhitneyu(variant, stable, method="asymptotic")
    welch = stats.ttest_ind(variant, stable, equal_var=False)
    ci = welch.confidence_interval(0.95)
    pooled = np.sqrt((399 * np.var(stable, ddof=1) + 299 * np.var(variant, ddof=1)) / 698)
    wl = [stats.binomtest(4, 400).proportion_ci(method="wilson"),
          stats.binomtest(15, 300).proportion_ci(method="wilson")]
    p_s, p_v = 4 / 400, 15 / 300
    newcombe = (p_v - p_s - np.hypot(p_v - wl[1].low, wl[0].high - p_s),
                p_v - p_s + np.hypot(wl[1].high - p_v, p_s - wl[0].low))
    a, v = rep["arms"]["stable"], rep["arms"]["variant"]
    rows = [
        ("stable requests / errors", f"{a['requests']} / {a['errors']}", "400 / 4"),
        ("variant requests / errors", f"{v['requests']} / {v['errors']}", "300 / 15"),
        ("stable p50 / p95 / mean ms", f"{a['latency_ms']['p50']} / {a['latency_ms']['p95']} / "
         f"{a['latency_ms']['mean']}", f"{np.percentile(stable, 50):.3f} / "
         f"{np.percentile(stable, 95):.3f} / {np.mean(stable):.3f}"),
        ("variant p50 / p95 / mean ms", f"{v['latency_ms']['p50']} / {v['latency_ms']['p95']} / "
         f"{v['latency_ms']['mean']}", f"{np.percentile(variant, 50):.3f} / "
         f"{np.percentile(variant, 95):.3f} / {np.mean(variant):.3f}"),
        ("mean cost usd (stable, variant)", f"{a['mean_cost_usd']:.6f}, {v['mean_cost_usd']:.6f}",
         "0.002000, 0.002500"),
        ("error-rate diff", f"{rep['error_rate']['diff']:.6f}", f"{p_v - p_s:.6f}"),
        ("error-rate ci95 (Newcombe)", "[{:.6f}, {:.6f}]".format(*rep["error_rate"]["ci95"]),
         f"[{newcombe[0]:.6f}, {newcombe[1]:.6f}] (from scipy's Wilson intervals)"),
        ("error-rate p (z-test)", f"{rep['error_rate']['p_value']:.10f}",
         f"{chi.pvalue:.10f} (chi2_contingency, no correction)"),
        ("latency p (Mann-Whitney U)", f"{rep['latency']['p_value']:.10f}",
         f"{mwu.pvalue:.10f} (mannwhitneyu asymptotic)"),
        ("mean diff ms, Welch ci95", "{} [{}, {}]".format(rep["latency"]["mean_diff_ms"],
                                                         *rep["latency"]["mean_diff_ci95"]),
         f"{np.mean(variant) - np.mean(stable):.3f} [{ci.low:.3f}, {ci.high:.3f}]"),
        ("Welch p", f"{rep['latency']['welch_p_value']:.10f}", f"{welch.pvalue:.10f}"),
        ("Cohen's d", f"{rep['latency']['cohens_d']:.6f}",
         f"{(np.mean(variant) - np.mean(stable)) / pooled:.6f}"),
        ("p50 / p95 diff ms", f"{rep['latency']['p50_diff_ms']} / {rep['latency']['p95_diff_ms']}",
         f"{np.percentile(variant, 50) - np.percentile(stable, 50):.3f} / "
         f"{np.percentile(variant, 95) - np.percentile(stable, 95):.3f}"),
        ("verdict", rep["verdict"], "variant_worse expected (both p < 0.05, variant worse)"),
    ]
    print("2. report on a fixed data set (ours | SciPy/NumPy)")
    for name, ours, ref in rows:
        print(f"   {name:32} {ours:40} | {ref}")


def main() -> int:
    sticky_split()
    asyncio.run(fixed_report())
    return 0


if __name__ == "__main__":
    sys.exit(main())
