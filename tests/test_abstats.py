"""The canary report's statistics against SciPy/NumPy (test-only) on fixed data sets."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from scipy import special, stats

from policies.canary_control import build_report
from proxy import abstats
from proxy.state.canary import ArmStats


def _latencies(seed: int, n: int, mu: float, sigma: float) -> list[float]:
    """A fixed, skewed latency sample in ms, rounded to 1 ms so it has ties."""
    r = random.Random(seed)
    return [float(round(r.lognormvariate(mu, sigma))) for _ in range(n)]


STABLE = _latencies(1, 400, 5.0, 0.4)  # ~150 ms median
VARIANT_SLOW = _latencies(2, 300, 5.15, 0.45)
VARIANT_SAME = _latencies(3, 350, 5.0, 0.4)
SMALL_A = [12.0, 15.0, 15.0, 18.0, 20.0, 20.0, 20.0, 31.0]
SMALL_B = [14.0, 20.0, 22.0, 25.0, 25.0, 40.0]


@pytest.mark.parametrize(("a", "b"), [(STABLE, VARIANT_SLOW), (STABLE, VARIANT_SAME),
                                      (SMALL_A, SMALL_B)])
def test_welch_matches_scipy(a, b):
    """Welch's t, its df, p-value and 95% interval equal scipy.stats.ttest_ind(equal_var=False)."""
    ours = abstats.welch_t(a, b)
    ref = stats.ttest_ind(b, a, equal_var=False)
    assert ours is not None
    assert ours.t == pytest.approx(ref.statistic, rel=1e-9)
    assert ours.df == pytest.approx(ref.df, rel=1e-9)
    assert ours.p_value == pytest.approx(ref.pvalue, rel=1e-7, abs=1e-12)
    ci = ref.confidence_interval(0.95)
    assert ours.ci95 == pytest.approx((ci.low, ci.high), rel=1e-7)
    pooled = math.sqrt(((len(a) - 1) * np.var(a, ddof=1) + (len(b) - 1) * np.var(b, ddof=1))
                       / (len(a) + len(b) - 2))
    assert ours.cohens_d == pytest.approx((np.mean(b) - np.mean(a)) / pooled, rel=1e-9)


@pytest.mark.parametrize(("a", "b"), [(STABLE, VARIANT_SLOW), (STABLE, VARIANT_SAME),
                                      (SMALL_A, SMALL_B), ([1.0] * 5, [1.0] * 4 + [2.0])])
def test_mann_whitney_matches_scipy(a, b):
    """U (of the variant) and the tie- and continuity-corrected p equal scipy's asymptotic test."""
    ours = abstats.mann_whitney_u(a, b)
    ref = stats.mannwhitneyu(b, a, alternative="two-sided", method="asymptotic",
                             use_continuity=True)
    assert ours is not None
    assert ours.u == pytest.approx(ref.statistic)
    assert ours.p_value == pytest.approx(ref.pvalue, rel=1e-9, abs=1e-15)


@pytest.mark.parametrize(("xa", "na", "xb", "nb"), [
    (48, 80, 56, 70), (3, 1000, 12, 1000), (10, 500, 10, 500), (0, 200, 5, 150), (7, 90, 1, 60)])
def test_two_proportion_p_matches_chi_square(xa, na, xb, nb):
    """The pooled z-test's p equals the 2x2 chi-square test without continuity correction."""
    ours = abstats.two_proportion(xa, na, xb, nb)
    table = [[xa, na - xa], [xb, nb - xb]]
    ref = stats.chi2_contingency(table, correction=False)
    assert ours.p_value == pytest.approx(ref.pvalue, rel=1e-9)
    assert ours.z**2 == pytest.approx(ref.statistic, rel=1e-9)
    assert ours.diff == pytest.approx(xb / nb - xa / na)


@pytest.mark.parametrize(("x", "n"), [(0, 50), (3, 100), (48, 80), (50, 50), (1, 7)])
def test_wilson_matches_scipy(x, n):
    """The Wilson interval the Newcombe interval is built from equals SciPy's."""
    ci = stats.binomtest(x, n).proportion_ci(confidence_level=0.95, method="wilson")
    assert abstats.wilson(x, n) == pytest.approx((ci.low, ci.high), rel=1e-9, abs=1e-12)


def test_newcombe_interval_matches_the_paper():
    """Newcombe (1998), Table II example (a): 56/70 − 48/80 → 0.0524 to 0.3339 (method 10)."""
    ours = abstats.two_proportion(48, 80, 56, 70)
    assert ours.ci95[0] == pytest.approx(0.0524, abs=5e-5)
    assert ours.ci95[1] == pytest.approx(0.3339, abs=5e-5)


def test_no_errors_anywhere_is_no_evidence():
    """Zero errors in both arms: p = 1 and an interval that still has width (not Wald's [0, 0])."""
    ours = abstats.two_proportion(0, 300, 0, 40)
    assert ours.p_value == 1.0 and ours.diff == 0.0
    assert ours.ci95[0] < 0 < ours.ci95[1]


@pytest.mark.parametrize("df", [1.0, 2.5, 7.0, 30.0, 389.9, 5000.0])
def test_t_quantile_and_incomplete_beta(df):
    """The t critical value and the regularized incomplete beta match scipy.special/stats."""
    assert abstats.t_quantile_975(df) == pytest.approx(stats.t.ppf(0.975, df), rel=1e-9)
    for x in (0.01, 0.3, 0.5, 0.97):
        assert abstats.betainc(df / 2, 0.5, x) == pytest.approx(
            special.betainc(df / 2, 0.5, x), rel=1e-9, abs=1e-15)


@pytest.mark.parametrize("q", [0, 5, 50, 95, 99, 100])
def test_percentile_matches_numpy(q):
    """Percentiles interpolate linearly between order statistics, as numpy.percentile."""
    assert abstats.percentile(VARIANT_SLOW, q) == pytest.approx(np.percentile(VARIANT_SLOW, q))


@given(st.integers(0, 500), st.integers(1, 500), st.integers(0, 500), st.integers(1, 500))
def test_two_proportion_interval_holds_the_difference(xa, na, xb, nb):
    """The interval contains the observed difference, stays in [-1, 1], and p is in [0, 1]."""
    xa, xb = min(xa, na), min(xb, nb)
    r = abstats.two_proportion(xa, na, xb, nb)
    assert -1 - 1e-12 <= r.ci95[0] <= r.diff + 1e-12 <= r.ci95[1] + 2e-12 <= 1 + 3e-12
    assert 0.0 <= r.p_value <= 1.0


@given(st.lists(st.integers(0, 50), min_size=1, max_size=40),
       st.lists(st.integers(0, 50), min_size=1, max_size=40))
def test_mann_whitney_is_symmetric(a, b):
    """Swapping the arms keeps p and swaps U (U_a + U_b = n_a·n_b)."""
    fa, fb = [float(v) for v in a], [float(v) for v in b]
    ab, ba = abstats.mann_whitney_u(fa, fb), abstats.mann_whitney_u(fb, fa)
    assert ab is not None and ba is not None
    assert ab.p_value == pytest.approx(ba.p_value)
    assert ab.u + ba.u == pytest.approx(len(a) * len(b))


def test_report_numbers_on_a_fixed_data_set():
    """The admin report's figures for fixed arms equal an independent SciPy/NumPy computation."""
    stable = ArmStats(requests=400, errors=4, cost_usd=0.8, latencies_ms=list(STABLE))
    variant = ArmStats(requests=300, errors=15, cost_usd=0.75, latencies_ms=list(VARIANT_SLOW))
    rep = build_report("chat", 10.0, "active", {"stable": stable, "variant": variant}, 20)
    v, s = rep["arms"]["variant"], rep["arms"]["stable"]
    assert (s["requests"], s["errors"], v["requests"], v["errors"]) == (400, 4, 300, 15)
    assert v["error_rate"] == 0.05 and s["error_rate"] == 0.01
    assert v["mean_cost_usd"] == pytest.approx(0.0025) and s["mean_cost_usd"] == pytest.approx(0.002)
    for arm, data in (("stable", STABLE), ("variant", VARIANT_SLOW)):
        lat = rep["arms"][arm]["latency_ms"]
        assert lat["p50"] == pytest.approx(np.percentile(data, 50), abs=1e-3)
        assert lat["p95"] == pytest.approx(np.percentile(data, 95), abs=1e-3)
        assert lat["mean"] == pytest.approx(np.mean(data), abs=1e-3)
    chi = stats.chi2_contingency([[4, 396], [15, 285]], correction=False)
    assert rep["error_rate"]["diff"] == pytest.approx(0.04)
    assert rep["error_rate"]["p_value"] == pytest.approx(chi.pvalue, rel=1e-9)
    mwu = stats.mannwhitneyu(VARIANT_SLOW, STABLE, method="asymptotic")
    welch = stats.ttest_ind(VARIANT_SLOW, STABLE, equal_var=False)
    lat = rep["latency"]
    assert lat["test"] == "mann_whitney_u"
    assert lat["p_value"] == pytest.approx(mwu.pvalue, rel=1e-9)
    assert lat["welch_p_value"] == pytest.approx(welch.pvalue, rel=1e-7)
    assert lat["p50_diff_ms"] == pytest.approx(
        np.percentile(VARIANT_SLOW, 50) - np.percentile(STABLE, 50), abs=2e-3)
    assert lat["p95_diff_ms"] == pytest.approx(
        np.percentile(VARIANT_SLOW, 95) - np.percentile(STABLE, 95), abs=2e-3)
    assert rep["verdict"] == "variant_worse"


def test_report_verdicts():
    """Too few requests → not_enough_data; equal arms → no_significant_difference;
    fewer errors and no slower → variant_better."""
    same = {"stable": ArmStats(400, 4, 0.0, list(STABLE)),
            "variant": ArmStats(350, 4, 0.0, list(VARIANT_SAME))}
    assert build_report("r", 5, "active", same, 20)["verdict"] == "no_significant_difference"
    few = {"stable": ArmStats(400, 4, 0.0, list(STABLE)),
           "variant": ArmStats(10, 9, 0.0, VARIANT_SAME[:10])}
    assert build_report("r", 5, "active", few, 20)["verdict"] == "not_enough_data"
    better = {"stable": ArmStats(400, 40, 0.0, list(STABLE)),
              "variant": ArmStats(350, 2, 0.0, list(VARIANT_SAME))}
    assert build_report("r", 5, "active", better, 20)["verdict"] == "variant_better"
    empty = {"stable": ArmStats(), "variant": ArmStats()}
    rep = build_report("r", 0, "active", empty, 20)
    assert rep["verdict"] == "not_enough_data" and rep["error_rate"]["p_value"] is None
