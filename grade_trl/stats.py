"""Statistics for comparing methods across seeds and prompts, with numpy and the standard library only.

Across seeds (one number per run, independent samples): mean with a t confidence interval,
percentile bootstrap interval, Welch's t-test, Cohen's d and Hedges' g. Across prompts within
one seed (two methods scored on the same test prompts): paired t-test, Wilcoxon signed-rank
test and the paired effect size d_z. Holm's step-down adjustment for a family of tests.

The Student t distribution is computed here from the regularised incomplete beta function
(Numerical Recipes' continued fraction), so scipy is not needed to run a comparison and the
tests can use scipy as an independent reference.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Sequence

import numpy as np


class Estimate(NamedTuple):
    """A mean with a two-sided confidence interval (`low`/`high` are None when n < 2)."""

    mean: float | None
    low: float | None
    high: float | None
    n: int


class TestResult(NamedTuple):
    """A two-sided test: statistic, degrees of freedom (None for Wilcoxon) and p-value."""

    statistic: float
    dof: float | None
    p_value: float


# ---------------------------------------------------------------------------------------------
# The t distribution
# ---------------------------------------------------------------------------------------------


def _beta_continued_fraction(a: float, b: float, x: float) -> float:
    """Continued fraction of the incomplete beta function (modified Lentz; Numerical Recipes 6.4)."""
    tiny, qab, qap, qam = 1e-300, a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 1000):
        m2 = 2 * m
        for aa in (m * (b - m) * x / ((qam + m2) * (a + m2)), -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))):
            d = 1.0 + aa * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + aa / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < 1e-15:
            break
    return h


def incomplete_beta(a: float, b: float, x: float) -> float:
    """Regularised incomplete beta I_x(a, b) = B(x; a, b) / B(a, b)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _beta_continued_fraction(a, b, x) / a
    return 1.0 - front * _beta_continued_fraction(b, a, 1.0 - x) / b


def t_two_sided_p(t: float, dof: float) -> float:
    """P(|T| >= |t|) for Student's T with `dof` degrees of freedom: I_{dof/(dof+t^2)}(dof/2, 1/2)."""
    if math.isnan(t) or math.isnan(dof):
        return float("nan")
    if math.isinf(t):
        return 0.0
    return incomplete_beta(dof / 2.0, 0.5, dof / (dof + t * t))


def t_quantile(q: float, dof: float) -> float:
    """The q-quantile of Student's t (inverse of the CDF), by bisection on the two-sided tail."""
    if not 0.0 < q < 1.0:
        raise ValueError(f"quantile must be in (0, 1), got {q}")
    if q == 0.5:
        return 0.0
    tail = 2.0 * min(q, 1.0 - q)  # two-sided tail mass beyond |t|
    lo, hi = 0.0, 1.0
    while t_two_sided_p(hi, dof) > tail:
        hi *= 2.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if t_two_sided_p(mid, dof) > tail else (lo, mid)
    return math.copysign(0.5 * (lo + hi), q - 0.5)


def normal_two_sided_p(z: float) -> float:
    """P(|Z| >= |z|) for a standard normal Z."""
    return math.erfc(abs(z) / math.sqrt(2.0))


# ---------------------------------------------------------------------------------------------
# Intervals
# ---------------------------------------------------------------------------------------------


def _array(values: Sequence[float]) -> np.ndarray:
    return np.asarray([v for v in values if v is not None], dtype=float)


def mean_ci(values: Sequence[float], confidence: float = 0.95) -> Estimate:
    """Mean and t-interval: mean +- t_{(1+c)/2, n-1} * s / sqrt(n), with s the sample std (ddof 1). None values are dropped."""
    x = _array(values)
    if x.size == 0:
        return Estimate(None, None, None, 0)
    mean = float(x.mean())
    if x.size < 2:
        return Estimate(mean, None, None, 1)
    half = t_quantile((1.0 + confidence) / 2.0, x.size - 1) * float(x.std(ddof=1)) / math.sqrt(x.size)
    return Estimate(mean, mean - half, mean + half, int(x.size))


def bootstrap_ci(values: Sequence[float], confidence: float = 0.95, n_resamples: int = 10_000, seed: int = 0, statistic=np.mean) -> Estimate:
    """Percentile bootstrap: resample the values with replacement `n_resamples` times (seeded) and take the
    (1-c)/2 and (1+c)/2 percentiles of the statistic. With 2-3 seeds it is narrower than the t-interval
    (it cannot see beyond the observed range); report both."""
    x = _array(values)
    if x.size == 0:
        return Estimate(None, None, None, 0)
    if x.size < 2:
        return Estimate(float(statistic(x)), None, None, 1)
    rng = np.random.default_rng(seed)
    resampled = statistic(x[rng.integers(0, x.size, size=(n_resamples, x.size))], axis=1)
    alpha = (1.0 - confidence) / 2.0
    low, high = np.percentile(resampled, [100 * alpha, 100 * (1 - alpha)])
    return Estimate(float(statistic(x)), float(low), float(high), int(x.size))


# ---------------------------------------------------------------------------------------------
# Tests and effect sizes
# ---------------------------------------------------------------------------------------------


def welch_t_test(a: Sequence[float], b: Sequence[float]) -> TestResult:
    """Welch's unequal-variance t-test of mean(a) = mean(b).

    t = (mean_a - mean_b) / sqrt(s_a^2/n_a + s_b^2/n_b), dof (Welch-Satterthwaite) =
    (s_a^2/n_a + s_b^2/n_b)^2 / ((s_a^2/n_a)^2/(n_a-1) + (s_b^2/n_b)^2/(n_b-1)). NaN when either has < 2 values
    or both have zero variance.
    """
    x, y = _array(a), _array(b)
    if x.size < 2 or y.size < 2:
        return TestResult(float("nan"), None, float("nan"))
    va, vb = x.var(ddof=1) / x.size, y.var(ddof=1) / y.size
    if va + vb == 0:
        return TestResult(float("nan"), None, float("nan"))
    t = float((x.mean() - y.mean()) / math.sqrt(va + vb))
    dof = float((va + vb) ** 2 / (va**2 / (x.size - 1) + vb**2 / (y.size - 1)))
    return TestResult(t, dof, t_two_sided_p(t, dof))


def _differences(a: Sequence[float], b: Sequence[float]) -> np.ndarray:
    x, y = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if x.shape != y.shape:
        raise ValueError(f"paired samples must have the same length, got {x.size} and {y.size}")
    return x - y


def paired_t_test(a: Sequence[float], b: Sequence[float]) -> TestResult:
    """Paired t-test of mean(a - b) = 0: t = mean(d) / (s_d / sqrt(n)), dof = n - 1."""
    d = _differences(a, b)
    if d.size < 2 or d.std(ddof=1) == 0:
        return TestResult(float("nan"), None, float("nan"))
    t = float(d.mean() / (d.std(ddof=1) / math.sqrt(d.size)))
    return TestResult(t, float(d.size - 1), t_two_sided_p(t, d.size - 1))


def _average_ranks(x: np.ndarray) -> np.ndarray:
    """Ranks 1..n, ties given the mean of the ranks they span."""
    order = np.argsort(x, kind="mergesort")
    ranks = np.empty(x.size)
    sorted_x = x[order]
    start = 0
    for end in range(1, x.size + 1):
        if end == x.size or sorted_x[end] != sorted_x[start]:
            ranks[order[start:end]] = 0.5 * (start + 1 + end)
            start = end
    return ranks


def _signed_rank_sum_cdf(w: float, n: int) -> float:
    """P(W+ <= w) under H0 for n untied non-zero differences: each rank 1..n joins W+ with probability 1/2."""
    counts = np.zeros(n * (n + 1) // 2 + 1)
    counts[0] = 1.0
    for rank in range(1, n + 1):
        counts[rank:] = counts[rank:] + counts[:-rank].copy()
    return float(counts[: int(math.floor(w)) + 1].sum() / 2.0**n)


def wilcoxon_signed_rank(a: Sequence[float], b: Sequence[float]) -> TestResult:
    """Wilcoxon signed-rank test of a - b symmetric about 0 (two-sided).

    Zero differences are dropped (Wilcoxon's convention); |d| is ranked with average ranks for ties;
    the statistic is min(W+, W-). p-value: exact null distribution when n <= 50 and no ties, else the
    normal approximation z = (W - n(n+1)/4) / sqrt(n(n+1)(2n+1)/24 - sum(t^3 - t)/48) without continuity
    correction (scipy.stats.wilcoxon's defaults).
    """
    d = _differences(a, b)
    d = d[d != 0]
    n = d.size
    if n == 0:
        return TestResult(float("nan"), None, float("nan"))
    ranks = _average_ranks(np.abs(d))
    w_plus, w_minus = float(ranks[d > 0].sum()), float(ranks[d < 0].sum())
    w = min(w_plus, w_minus)
    _, tie_counts = np.unique(np.abs(d), return_counts=True)
    if n <= 50 and np.all(tie_counts == 1):
        return TestResult(w, None, min(1.0, 2.0 * _signed_rank_sum_cdf(w, n)))
    variance = n * (n + 1) * (2 * n + 1) / 24.0 - float(np.sum(tie_counts**3 - tie_counts)) / 48.0
    if variance <= 0:
        return TestResult(w, None, float("nan"))
    z = (w - n * (n + 1) / 4.0) / math.sqrt(variance)
    return TestResult(w, None, normal_two_sided_p(z))


def cohens_d(a: Sequence[float], b: Sequence[float]) -> float:
    """Cohen's d = (mean_a - mean_b) / s_pooled, s_pooled^2 = ((n_a-1) s_a^2 + (n_b-1) s_b^2) / (n_a + n_b - 2)."""
    x, y = _array(a), _array(b)
    if x.size < 2 or y.size < 2:
        return float("nan")
    pooled = ((x.size - 1) * x.var(ddof=1) + (y.size - 1) * y.var(ddof=1)) / (x.size + y.size - 2)
    return float((x.mean() - y.mean()) / math.sqrt(pooled)) if pooled > 0 else float("nan")


def hedges_g(a: Sequence[float], b: Sequence[float]) -> float:
    """Hedges' g = J * d, the small-sample bias correction J = Gamma(m/2) / (sqrt(m/2) Gamma((m-1)/2)), m = n_a + n_b - 2
    (Hedges 1981; about 1 - 3 / (4 m - 1)). With 3 seeds per method J = 0.80: d overstates the effect by 25%."""
    x, y = _array(a), _array(b)
    m = x.size + y.size - 2
    if m < 2:
        return float("nan")
    correction = math.exp(math.lgamma(m / 2.0) - math.lgamma((m - 1) / 2.0)) / math.sqrt(m / 2.0)
    return correction * cohens_d(x, y)


def paired_effect_size(a: Sequence[float], b: Sequence[float]) -> float:
    """Cohen's d_z = mean(a - b) / s_d for paired samples (= t / sqrt(n))."""
    d = _differences(a, b)
    if d.size < 2 or d.std(ddof=1) == 0:
        return float("nan")
    return float(d.mean() / d.std(ddof=1))


def holm_adjust(p_values: Sequence[float]) -> list[float]:
    """Holm's step-down adjusted p-values (controls the family-wise error rate): sort ascending,
    p_(i) * (m - i + 1), running maximum, capped at 1; returned in the input order. NaN stays NaN and
    does not count in m."""
    p = np.asarray(p_values, dtype=float)
    valid = np.flatnonzero(~np.isnan(p))
    adjusted = np.full(p.shape, np.nan)
    order = valid[np.argsort(p[valid], kind="mergesort")]
    running = 0.0
    for i, index in enumerate(order):
        running = max(running, min(1.0, p[index] * (order.size - i)))
        adjusted[index] = running
    return adjusted.tolist()


def pair_by_prompt(prompts_a: Sequence[str], rewards_a: Sequence[float], prompts_b: Sequence[str], rewards_b: Sequence[float]) -> tuple[list[float], list[float]]:
    """The rewards of the prompts both runs scored, matched by prompt text (a repeated prompt by its occurrence)."""

    def keyed(prompts, rewards):
        seen: dict[str, int] = {}
        out = {}
        for prompt, reward in zip(prompts, rewards):
            seen[prompt] = seen.get(prompt, 0) + 1
            out[(prompt, seen[prompt])] = reward
        return out

    a, b = keyed(prompts_a, rewards_a), keyed(prompts_b, rewards_b)
    shared = [key for key in a if key in b]
    return [a[k] for k in shared], [b[k] for k in shared]
