"""A/B statistics for the canary report, in pure Python (``math`` only; SciPy is a test-only
dependency that checks these numbers).

Every difference is ``b − a`` where ``a`` is the control (stable) and ``b`` the treatment
(variant). All tests are two-sided at the 95% level.

- :func:`two_proportion` — error rates: the pooled two-proportion z-test (the same p-value as
  a 2×2 chi-square test without continuity correction) and Newcombe's hybrid score interval
  for the difference (Newcombe 1998, method 10: built from the two Wilson intervals). The
  Wald interval is not used: with error rates near 1% it is too narrow and collapses to
  ``[0, 0]`` when neither arm has an error.
- :func:`welch_t` — means: Welch's unequal-variance t-test, its Welch–Satterthwaite degrees
  of freedom, a 95% interval for the mean difference and Cohen's d (pooled SD).
- :func:`mann_whitney_u` — distributions: the Mann–Whitney U test with the normal
  approximation, average ranks and the tie correction, with continuity correction (as
  ``scipy.stats.mannwhitneyu(method="asymptotic")``). Latency is skewed and heavy-tailed,
  so this is the report's latency test.
- :func:`percentile` — linear interpolation between order statistics (NumPy's default).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

Z95 = 1.959963984540054  # the standard normal's 0.975 quantile
_EPS = 1e-15


def normal_sf(z: float) -> float:
    """P(Z > z) for a standard normal Z."""
    return 0.5 * math.erfc(z / math.sqrt(2.0))


def percentile(values: Sequence[float], q: float, *, presorted: bool = False) -> float:
    """The ``q``-th percentile (0–100) by linear interpolation; ``values`` must be non-empty."""
    ordered = values if presorted else sorted(values)
    if not ordered:
        raise ValueError("percentile of no values")
    pos = (len(ordered) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def mean_var(values: Sequence[float]) -> tuple[float, float]:
    """Mean and unbiased sample variance (0 for a single value)."""
    n = len(values)
    mean = math.fsum(values) / n
    if n < 2:
        return mean, 0.0
    return mean, math.fsum((v - mean) ** 2 for v in values) / (n - 1)


# ----------------------------------------------------------------------- proportions


@dataclass(frozen=True, slots=True)
class ProportionTest:
    diff: float  # p_b − p_a
    ci95: tuple[float, float]
    z: float
    p_value: float


def wilson(x: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval for a proportion ``x / n`` (``n`` > 0)."""
    p = x / n
    denom = 1.0 + z * z / n
    center = (p + z * z / (2 * n)) / denom
    half = z / denom * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, center - half), min(1.0, center + half)


def two_proportion(x_a: int, n_a: int, x_b: int, n_b: int) -> ProportionTest:
    """Compare ``x_b / n_b`` with ``x_a / n_a`` (both ``n`` > 0)."""
    p_a, p_b = x_a / n_a, x_b / n_b
    diff = p_b - p_a
    pooled = (x_a + x_b) / (n_a + n_b)
    se = math.sqrt(pooled * (1 - pooled) * (1 / n_a + 1 / n_b))
    if se < _EPS:  # no errors (or only errors) anywhere: no evidence of a difference
        z, p_value = 0.0, 1.0
    else:
        z = diff / se
        p_value = min(1.0, 2 * normal_sf(abs(z)))
    l_a, u_a = wilson(x_a, n_a)
    l_b, u_b = wilson(x_b, n_b)
    lower = diff - math.sqrt((p_b - l_b) ** 2 + (u_a - p_a) ** 2)
    upper = diff + math.sqrt((u_b - p_b) ** 2 + (p_a - l_a) ** 2)
    return ProportionTest(diff, (lower, upper), z, p_value)


# ----------------------------------------------------------------------- Student's t


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the incomplete beta function (modified Lentz)."""
    tiny = 1e-300
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 500):
        m2 = 2 * m
        aa = m * (b - m) * x / ((qam + m2) * (a + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        h *= d * c
        aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        delta = d * c
        h *= delta
        if abs(delta - 1.0) < 1e-15:
            break
    return h


def betainc(a: float, b: float, x: float) -> float:
    """The regularized incomplete beta function I_x(a, b)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_front = (math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b)
                 + a * math.log(x) + b * math.log1p(-x))
    front = math.exp(log_front)
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _betacf(a, b, x) / a
    return 1.0 - front * _betacf(b, a, 1.0 - x) / b


def t_two_sided_p(t: float, df: float) -> float:
    """P(|T| > |t|) for Student's t with ``df`` degrees of freedom."""
    if math.isinf(t):
        return 0.0
    return min(1.0, betainc(df / 2.0, 0.5, df / (df + t * t)))


def t_quantile_975(df: float) -> float:
    """The 0.975 quantile of Student's t (the 95% two-sided critical value), by bisection."""
    lo, hi = 0.0, 1.0
    while t_two_sided_p(hi, df) > 0.05:
        hi *= 2.0
    for _ in range(200):
        mid = (lo + hi) / 2.0
        if t_two_sided_p(mid, df) > 0.05:
            lo = mid
        else:
            hi = mid
        if hi - lo < 1e-12:
            break
    return (lo + hi) / 2.0


@dataclass(frozen=True, slots=True)
class WelchTest:
    mean_diff: float  # mean(b) − mean(a)
    ci95: tuple[float, float]
    t: float
    df: float
    p_value: float
    cohens_d: float | None  # None when both samples are constant


def welch_t(a: Sequence[float], b: Sequence[float]) -> WelchTest | None:
    """Welch's t-test of mean(b) against mean(a); None unless both have 2+ values."""
    n_a, n_b = len(a), len(b)
    if n_a < 2 or n_b < 2:
        return None
    m_a, v_a = mean_var(a)
    m_b, v_b = mean_var(b)
    diff = m_b - m_a
    s2_a, s2_b = v_a / n_a, v_b / n_b
    se = math.sqrt(s2_a + s2_b)
    pooled_sd = math.sqrt(((n_a - 1) * v_a + (n_b - 1) * v_b) / (n_a + n_b - 2))
    d = diff / pooled_sd if pooled_sd > _EPS else None
    if se < _EPS:
        df = float(n_a + n_b - 2)
        t = 0.0 if diff == 0 else math.copysign(math.inf, diff)
        return WelchTest(diff, (diff, diff), t, df, 1.0 if diff == 0 else 0.0, d)
    df = (s2_a + s2_b) ** 2 / (s2_a**2 / (n_a - 1) + s2_b**2 / (n_b - 1))
    t = diff / se
    half = t_quantile_975(df) * se
    return WelchTest(diff, (diff - half, diff + half), t, df, t_two_sided_p(t, df), d)


# ----------------------------------------------------------------------- Mann–Whitney U


@dataclass(frozen=True, slots=True)
class MannWhitneyTest:
    u: float  # U of b: pairs where b > a, ties counting one half
    z: float
    p_value: float
    #: P(b > a) + P(b = a) / 2 — above 0.5 means b tends to be larger
    prob_b_greater: float


def mann_whitney_u(a: Sequence[float], b: Sequence[float]) -> MannWhitneyTest | None:
    """Two-sided Mann–Whitney U test (normal approximation); None if either is empty."""
    n_a, n_b = len(a), len(b)
    if n_a == 0 or n_b == 0:
        return None
    pooled = sorted([(v, 0) for v in a] + [(v, 1) for v in b])
    n = n_a + n_b
    rank_sum_b = 0.0
    tie_term = 0.0
    i = 0
    while i < n:
        j = i
        while j + 1 < n and pooled[j + 1][0] == pooled[i][0]:
            j += 1
        size = j - i + 1
        avg_rank = (i + j) / 2.0 + 1.0  # ranks are 1-based
        rank_sum_b += avg_rank * sum(1 for k in range(i, j + 1) if pooled[k][1] == 1)
        tie_term += size**3 - size
        i = j + 1
    u_b = rank_sum_b - n_b * (n_b + 1) / 2.0
    u_a = n_a * n_b - u_b
    mu = n_a * n_b / 2.0
    sigma = math.sqrt(n_a * n_b / 12.0 * ((n + 1) - tie_term / (n * (n - 1)))) if n > 1 else 0.0
    if sigma < _EPS:
        return MannWhitneyTest(u_b, 0.0, 1.0, u_b / (n_a * n_b))
    z = (max(u_a, u_b) - mu - 0.5) / sigma  # continuity-corrected, as SciPy does
    p_value = min(1.0, 2 * normal_sf(z))
    return MannWhitneyTest(u_b, z, p_value, u_b / (n_a * n_b))
