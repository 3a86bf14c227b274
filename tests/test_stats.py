"""grade_trl.stats: the scipy calls behind it checked against values worked out by hand, and our own effect sizes, Holm
adjustment and prompt pairing against hand values and scipy relations."""

import math

import numpy as np
import pytest
import scipy.stats as ss

from grade_trl import stats


def test_mean_ci_matches_scipy_and_hand():
    x = [0.5, 0.6, 0.8]
    est = stats.mean_ci(x)
    low, high = ss.t.interval(0.95, len(x) - 1, loc=np.mean(x), scale=ss.sem(x))
    assert (est.low, est.high) == (pytest.approx(low, rel=1e-9), pytest.approx(high, rel=1e-9))
    # By hand: mean 0.6333, s = sqrt(((-0.1333)^2 + (-0.0333)^2 + 0.1667^2) / 2) = 0.15275, half-width 4.30265 * 0.15275 / sqrt(3) = 0.37946.
    assert est.mean == pytest.approx(0.633333, abs=1e-6) and est.high - est.mean == pytest.approx(0.37946, abs=1e-5)
    assert stats.mean_ci([0.7]) == (0.7, None, None, 1) and stats.mean_ci([]) == (None, None, None, 0)
    assert stats.mean_ci([1.0, None, 3.0]).n == 2  # missing values are dropped


def test_bootstrap_ci_matches_scipy_and_an_enumerable_case():
    x = np.random.default_rng(1).normal(0.5, 0.1, size=12)
    ours = stats.bootstrap_ci(x, n_resamples=20_000, seed=3)
    # The normal-theory interval of the mean, mean +- 1.96 s / sqrt(n), is what the percentile bootstrap approaches.
    half = 1.96 * x.std(ddof=0) / math.sqrt(x.size)
    assert ours.low == pytest.approx(x.mean() - half, abs=0.01) and ours.high == pytest.approx(x.mean() + half, abs=0.01)
    assert stats.bootstrap_ci(x, seed=3) == stats.bootstrap_ci(x, seed=3)  # seeded
    # [0, 1] resampled: the mean is 0, 0.5, 1 with probability 1/4, 1/2, 1/4, so the 95% interval is [0, 1]
    # and the 40% interval (30th-70th percentile) is [0.5, 0.5].
    assert stats.bootstrap_ci([0.0, 1.0], n_resamples=4000).low == 0.0 and stats.bootstrap_ci([0.0, 1.0], n_resamples=4000).high == 1.0
    narrow = stats.bootstrap_ci([0.0, 1.0], confidence=0.4, n_resamples=4000)
    assert (narrow.low, narrow.high) == (0.5, 0.5)


def test_welch_matches_scipy_and_hand():
    a, b = [1, 2, 3, 4], [2, 4, 6, 8]
    ours = stats.welch_t_test(a, b)
    ref = ss.ttest_ind(a, b, equal_var=False)
    assert ours.statistic == pytest.approx(ref.statistic, rel=1e-12) and ours.dof == pytest.approx(ref.df, rel=1e-12)
    assert ours.p_value == pytest.approx(ref.pvalue, rel=1e-9)
    # By hand: var a = 5/3, var b = 20/3; se^2 = 5/12 + 20/12 = 25/12; t = -2.5 / sqrt(25/12) = -sqrt(3);
    # dof = (25/12)^2 / ((5/12)^2 / 3 + (20/12)^2 / 3) = 625 / 141.67 = 4.41176.
    assert ours.statistic == pytest.approx(-math.sqrt(3)) and ours.dof == pytest.approx(75 / 17)
    rng = np.random.default_rng(0)
    x, y = rng.normal(0, 1, 5), rng.normal(1, 3, 9)
    ref = ss.ttest_ind(x, y, equal_var=False)
    assert stats.welch_t_test(x, y).p_value == pytest.approx(ref.pvalue, rel=1e-9)
    assert math.isnan(stats.welch_t_test([1.0], [2.0, 3.0]).p_value)


def test_paired_t_matches_scipy_and_hand():
    rng = np.random.default_rng(2)
    x = rng.normal(size=20)
    y = x + rng.normal(0.3, 1, size=20)
    ours, ref = stats.paired_t_test(x, y), ss.ttest_rel(x, y)
    assert ours.statistic == pytest.approx(ref.statistic, rel=1e-12) and ours.p_value == pytest.approx(ref.pvalue, rel=1e-9) and ours.dof == 19
    # By hand: differences 1, 2, 3 -> mean 2, s_d 1, t = 2 / (1 / sqrt(3)) = 3.4641, dof 2, p = 0.0742.
    hand = stats.paired_t_test([2, 4, 6], [1, 2, 3])
    assert hand.statistic == pytest.approx(2 * math.sqrt(3)) and hand.p_value == pytest.approx(0.07418, abs=1e-5)


def test_wilcoxon_exact_and_normal_match_scipy():
    rng = np.random.default_rng(0)
    x = rng.normal(size=20)
    y = x + rng.normal(0.3, 1, size=20)
    ours, ref = stats.wilcoxon_signed_rank(x, y), ss.wilcoxon(x, y, method="exact")
    assert ours.statistic == ref.statistic and ours.p_value == pytest.approx(ref.pvalue, rel=1e-9)
    x = rng.normal(size=80)
    y = np.round(x + rng.normal(0.2, 1, size=80), 1)  # ties and n > 50: normal approximation with tie correction
    x = np.round(x, 1)
    ours, ref = stats.wilcoxon_signed_rank(x, y), ss.wilcoxon(x, y, method="approx")
    assert ours.statistic == ref.statistic and ours.p_value == pytest.approx(ref.pvalue, rel=1e-9)


def test_wilcoxon_by_hand():
    # Differences 1, 2, 3, 4, -5 (ranks = |d|): W+ = 10, W- = 5, W = 5. Of the 2^5 = 32 equally likely sign patterns,
    # 10 have a positive-rank sum <= 5 ({}, {1}, {2}, {3}, {4}, {5}, {1,2}, {1,3}, {1,4}, {2,3}), so p = 2 * 10 / 32 = 0.625.
    result = stats.wilcoxon_signed_rank([1, 2, 3, 4, -5], [0, 0, 0, 0, 0])
    assert result.statistic == 5 and result.p_value == pytest.approx(0.625)
    # A zero difference is dropped.
    assert stats.wilcoxon_signed_rank([1, 2, 3, 4, -5, 7], [0, 0, 0, 0, 0, 7]) == result


def test_effect_sizes_against_scipy_relations_and_hand():
    rng = np.random.default_rng(4)
    a, b = rng.normal(0.6, 0.1, 4), rng.normal(0.5, 0.2, 5)
    # Cohen's d = Student's pooled t * sqrt(1/n_a + 1/n_b).
    student = ss.ttest_ind(a, b, equal_var=True).statistic
    assert stats.cohens_d(a, b) == pytest.approx(student * math.sqrt(1 / 4 + 1 / 5), rel=1e-12)
    # By hand: a = [1, 2, 3], b = [3, 4, 5]: pooled s = 1, d = -2; m = 4, J = Gamma(2) / (sqrt(2) Gamma(1.5)) = 1 / (sqrt(2) * 0.886227) = 0.797885.
    assert stats.cohens_d([1, 2, 3], [3, 4, 5]) == pytest.approx(-2.0)
    assert stats.hedges_g([1, 2, 3], [3, 4, 5]) == pytest.approx(-2.0 * 0.797885, abs=1e-6)
    # d_z = paired t / sqrt(n); by hand for differences 1, 2, 3: mean 2 / s_d 1 = 2.
    x, y = rng.normal(size=15), rng.normal(size=15)
    assert stats.paired_effect_size(x, y) == pytest.approx(ss.ttest_rel(x, y).statistic / math.sqrt(15), rel=1e-12)
    assert stats.paired_effect_size([2, 4, 6], [1, 2, 3]) == pytest.approx(2.0)


def test_holm_by_hand():
    # Sorted 0.01, 0.03, 0.04 -> 0.01*3 = 0.03, 0.03*2 = 0.06, max(0.04*1, 0.06) = 0.06; back in input order.
    assert stats.holm_adjust([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    adjusted = stats.holm_adjust([0.5, float("nan"), 0.2])  # NaN is not counted in m
    assert adjusted[0] == pytest.approx(0.5) and math.isnan(adjusted[1]) and adjusted[2] == pytest.approx(0.4)
    assert stats.holm_adjust([0.9, 0.3]) == pytest.approx([0.9, 0.6])  # 0.3*2 = 0.6, then max(0.9*1, 0.6)
    assert stats.holm_adjust([0.9, 0.8]) == pytest.approx([1.0, 1.0])  # 0.8*2 capped at 1; monotone: max(0.9, 1)


def test_pair_by_prompt_matches_text_not_position():
    a, b = stats.pair_by_prompt(["p1", "p2", "p3", "p2"], [1.0, 2.0, 3.0, 4.0], ["p3", "p2", "p9", "p2"], [30.0, 20.0, 90.0, 40.0])
    assert a == [2.0, 3.0, 4.0] and b == [20.0, 30.0, 40.0]  # p2 (1st), p3, p2 (2nd); p1 and p9 unmatched


def test_bootstrap_coverage_is_below_nominal_with_few_seeds_and_the_t_interval_holds():
    """What bootstrap_ci's docstring and the analysis report say, simulated: normal data, true mean 0.8; the
    percentile bootstrap's nominal 95% covers it far less often with 3 values, the t-interval about 95% of the time."""
    rng = np.random.default_rng(0)
    rounds, covered_boot, covered_t = 400, 0, 0
    for r in range(rounds):
        x = rng.normal(0.8, 0.05, 3)
        boot, t = stats.bootstrap_ci(x, n_resamples=1000, seed=r), stats.mean_ci(x)
        covered_boot += boot.low <= 0.8 <= boot.high
        covered_t += t.low <= 0.8 <= t.high
    # binomial standard error at 400 rounds: about 0.011 at 0.95, 0.022 at 0.75
    assert 0.65 <= covered_boot / rounds <= 0.85 and 0.92 <= covered_t / rounds <= 0.98


def test_no_spread_beyond_rounding_gives_nan_not_a_huge_statistic():
    # 0.7 - 0.6, 0.8 - 0.7 and 0.9 - 0.8 differ in their last bits only: exact `std == 0` took them for a spread (t = 2.7e15).
    assert math.isnan(stats.paired_t_test([0.7, 0.8, 0.9], [0.6, 0.7, 0.8]).p_value)
    assert math.isnan(stats.paired_effect_size([0.7, 0.8, 0.9], [0.6, 0.7, 0.8]))
    assert math.isnan(stats.welch_t_test([0.1 + 0.2, 0.3, 0.3], [0.5, 0.5, 0.5]).p_value)
    assert math.isnan(stats.cohens_d([0.1 + 0.2, 0.3, 0.3], [0.5, 0.5, 0.5]))
    # one side constant, the other varying: Welch is defined (its variance comes from the varying side)
    # by hand: t = (0.3 - 0.6) / sqrt(0 / 3 + 0.01 / 3) = -3 sqrt(3), dof = n_b - 1 = 2 (all the variance is b's)
    one_sided = stats.welch_t_test([0.3, 0.3, 0.3], [0.5, 0.6, 0.7])
    assert one_sided.statistic == pytest.approx(-3 * math.sqrt(3)) and one_sided.dof == pytest.approx(2.0)
    assert one_sided.p_value == pytest.approx(2 * ss.t.sf(3 * math.sqrt(3), 2))
    # differences of large values: judged against the values' size (t = 2e10 before), also Wilcoxon's zeros
    assert math.isnan(stats.paired_t_test([100000.3, 100000.7, 100000.9], [100000.2, 100000.6, 100000.8]).p_value)
    assert math.isnan(stats.wilcoxon_signed_rank([0.1 + 0.2, 0.1 + 0.2], [0.3, 0.3]).p_value)
    # a small real spread is kept
    assert stats.paired_t_test([1e-9, 3e-9, 2e-9], [0.0, 0.0, 0.0]).p_value == pytest.approx(ss.ttest_rel([1e-9, 3e-9, 2e-9], [0, 0, 0]).pvalue)


def test_paired_tests_drop_pairs_with_a_missing_value():
    # results.json stores a NaN reward as null: that prompt's pair is left out of every paired statistic
    a, b = [1.0, 2.0, None, 4.0, 5.0, float("nan")], [0.0, 1.0, 1.0, 2.0, 6.0, 1.0]
    kept_a, kept_b = [1.0, 2.0, 4.0, 5.0], [0.0, 1.0, 2.0, 6.0]
    assert stats.paired_t_test(a, b) == stats.paired_t_test(kept_a, kept_b)
    assert stats.paired_t_test(a, b).dof == 3
    assert stats.wilcoxon_signed_rank(a, b) == stats.wilcoxon_signed_rank(kept_a, kept_b)
    assert stats.paired_effect_size(a, b) == stats.paired_effect_size(kept_a, kept_b)
    with pytest.raises(ValueError, match="same length"):
        stats.paired_t_test([1.0, 2.0], [1.0])


def test_wilcoxon_with_ties_is_the_exact_sign_flip_distribution_by_enumeration():
    """Ties and n <= 13 non-zero differences: the p-value of all 2^n sign flips (enumerated here), whatever the number
    of zero differences dropped before (the choice depends on the non-zero count)."""
    import itertools

    rng = np.random.default_rng(5)
    for _ in range(20):
        n = int(rng.integers(3, 12))
        d = rng.integers(-3, 4, size=n).astype(float)
        d[d == 0] = 1.0  # non-zero, with ties
        magnitudes = ss.rankdata(np.abs(d))
        observed = min(magnitudes[d > 0].sum(), magnitudes[d < 0].sum())
        flips = [sum(m for m, s in zip(magnitudes, signs) if s) for signs in itertools.product([0, 1], repeat=n)]
        total = magnitudes.sum()
        p = np.mean([min(w, total - w) <= observed + 1e-9 for w in flips])
        padded = np.concatenate([d, np.zeros(60)])  # 60 zero differences: still the non-zero count that decides
        for diffs in (d, padded):
            result = stats.wilcoxon_signed_rank(diffs, np.zeros_like(diffs))
            assert result.statistic == observed and result.p_value == pytest.approx(min(1.0, p), rel=1e-9)
