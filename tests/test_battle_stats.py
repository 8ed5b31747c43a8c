"""The verdict statistics: error rates and power by simulation, Holm, TOST, sample sizes, sequential levels."""
from __future__ import annotations

import itertools

import numpy as np
import pytest
from scipy import stats as sps

from spach.battle import stats
from stats_sim import Population, shift_for, studies

ALPHA = 0.05


def upper_bound(count: int, alpha: float = ALPHA) -> float:
    """The 99.9% binomial upper bound of a rejection rate over ``count`` studies at true rate alpha."""
    return sps.binom.ppf(0.999, count, alpha) / count


def rejection_rate(a: np.ndarray, b: np.ndarray, **kwargs) -> float:
    return float(np.mean([stats.compare(x, y, **kwargs).p < ALPHA for x, y in zip(a, b)]))


@pytest.mark.parametrize("n_a,n_b,m", [(2, 2, 1000), (3, 3, 600), (5, 5, 500), (10, 10, 500), (2, 5, 500)])
def test_aa_comparisons_are_called_different_at_most_alpha_of_the_time(n_a, n_b, m):
    a, b = studies(np.random.default_rng(100 + n_a + n_b), 2000, n_a, n_b, m)
    rate = rejection_rate(a, b)
    assert rate <= upper_bound(2000), f"A/A false-difference rate {rate:.4f} with {n_a}/{n_b} seeds"
    assert rate >= 0.015, f"A/A rate {rate:.4f}: the test is needlessly conservative"


def test_a_two_point_difference_on_1000_examples_is_found_most_of_the_time_with_3_seeds():
    pop = Population(shift=shift_for(2.0))
    a, b = studies(np.random.default_rng(7), 1000, 3, 3, 1000, pop)
    seed_spread = np.sqrt(np.mean(np.var(a.mean(axis=2) * 100, axis=1, ddof=1)))
    assert 0.4 < seed_spread < 0.6
    results = [stats.compare(y, x) for x, y in zip(a, b)]
    assert abs(np.mean([r.diff for r in results]) - 2.0) < 0.1
    power = np.mean([r.outcome == "a better" for r in results])
    assert power >= 0.8, f"power {power:.3f}"  # ~0.9 (benchmarks/RESULTS.md)


def test_the_variance_estimate_is_unbiased_when_architectures_differ_per_example():
    # B has its own per-example strengths, so the example-sampling term matters
    a, b = studies(np.random.default_rng(3), 2000, 3, 3, 500, Population(s_arch=3.0))
    results = [stats.compare(x, y) for x, y in zip(a, b)]
    diffs = np.array([r.diff for r in results])
    ratio = np.mean([r.se**2 for r in results]) / np.var(diffs, ddof=1)
    assert 0.88 < ratio < 1.12, f"mean estimated variance / true variance = {ratio:.3f}"
    naive = np.mean(np.var(a.mean(axis=2) * 100, axis=1, ddof=1) * 2 / 3)
    assert naive < 0.6 * np.var(diffs), "the seeds-only variance should miss the example term here"


def test_identical_arrays_give_no_difference():
    a, _ = studies(np.random.default_rng(0), 1, 3, 3, 200)
    r = stats.compare(a[0], a[0].copy())
    assert r.diff == 0.0 and r.p == 1.0 and r.outcome == "inconclusive"
    assert r.ci[0] <= 0.0 <= r.ci[1]


def test_all_correct_arrays_have_zero_variance_and_no_nan():
    ones = np.ones((3, 50), dtype=bool)
    r = stats.compare(ones, ones, delta=1.0)
    assert (r.diff, r.p, r.ci, r.se) == (0.0, 1.0, (0.0, 0.0), 0.0) and r.outcome == "equivalent"
    r = stats.compare(ones, np.zeros((2, 50), dtype=bool))
    assert r.diff == 100.0 and r.p == 0.0 and r.outcome == "a better" and np.isfinite(r.df)


def test_bad_evidence_is_rejected_with_a_message_naming_the_problem():
    good = np.ones((3, 10), dtype=bool)
    with pytest.raises(ValueError, match=r"\(3, 10\).*\(3, 12\)"):
        stats.compare(good, np.ones((3, 12), dtype=bool))
    with pytest.raises(ValueError, match="at least 2 seeds per side"):
        stats.compare(good, np.ones((1, 10), dtype=bool))
    with pytest.raises(ValueError, match="boolean"):
        stats.compare(good.astype(np.uint8), good)
    with pytest.raises(ValueError, match="2-D"):
        stats.compare(np.ones(10, dtype=bool), good)
    with pytest.raises(ValueError, match="alpha"):
        stats.compare(good, good, alpha=1.5)
    with pytest.raises(ValueError, match="delta"):
        stats.compare(good, good, delta=-1.0)
    with pytest.raises(ValueError, match="at least 2 seeds per side"):
        stats.compare_seeds([1.0], [1.0, 2.0])


def test_compare_reports_its_fields():
    a, b = studies(np.random.default_rng(1), 1, 4, 2, 300)
    r = stats.compare(a[0], b[0], delta=2.0)
    assert r.n_seeds == (4, 2) and r.alpha == ALPHA and r.delta == 2.0 and not r.across_seeds_only
    assert r.method == stats.T_METHOD and r.outcome in stats.OUTCOMES
    assert r.ci[0] < r.diff < r.ci[1] and 0.0 <= r.p <= 1.0 and 0.0 <= r.p_equivalence <= 1.0
    assert stats.compare(a[0], b[0]).p_equivalence is None


def test_equivalence_means_the_1_minus_2alpha_interval_lies_inside_the_margin():
    rng = np.random.default_rng(5)
    a, b = studies(rng, 1, 10, 10, 20000)
    r = stats.compare(a[0], b[0], delta=0.5)
    assert r.outcome == "equivalent" and r.p_equivalence < ALPHA
    wide = stats.compare(a[0], b[0], alpha=2 * ALPHA)
    assert -0.5 < wide.ci[0] and wide.ci[1] < 0.5
    a, b = studies(rng, 1, 10, 10, 20000, Population(shift=shift_for(2.0)))
    assert stats.compare(b[0], a[0], delta=0.5).outcome == "a better"
    a, b = studies(rng, 1, 2, 2, 300)
    assert stats.compare(a[0], b[0], delta=0.5).outcome == "inconclusive"  # too little evidence either way


def test_compare_seeds_is_welchs_t_and_its_tost_with_equal_seed_counts():
    a, b = [0.31, 0.35, 0.29, 0.33], [0.40, 0.37, 0.45, 0.36]
    r = stats.compare_seeds(a, b, delta=0.2)
    welch = sps.ttest_ind(a, b, equal_var=False)
    assert r.p == pytest.approx(welch.pvalue, rel=1e-10) and r.diff == pytest.approx(np.mean(a) - np.mean(b))
    low = sps.ttest_ind(np.add(a, 0.2), b, equal_var=False, alternative="greater").pvalue
    high = sps.ttest_ind(np.subtract(a, 0.2), b, equal_var=False, alternative="less").pvalue
    assert r.p_equivalence == pytest.approx(max(low, high), rel=1e-10)
    assert r.across_seeds_only and r.method == stats.SEEDS_METHOD and r.n_seeds == (4, 4)


def test_unequal_seed_counts_cap_the_degrees_of_freedom_at_their_equal_variance_value():
    a, b = [0.31, 0.33], [0.40, 0.37, 0.45, 0.36, 0.41, 0.39]
    r = stats.compare_seeds(a, b)
    cap = (1 / 2 + 1 / 6) ** 2 / (1 / (4 * 1) + 1 / (36 * 5))
    assert r.df == pytest.approx(min(cap, sps.ttest_ind(a, b, equal_var=False).df))
    assert r.p >= sps.ttest_ind(a, b, equal_var=False).pvalue


@pytest.mark.parametrize("n_a,n_b", [(2, 10), (3, 10)])
def test_unequal_seed_counts_hold_the_error_rate_even_when_seed_shifts_dominate(n_a, n_b):
    a, b = studies(np.random.default_rng(40 + n_a), 1500, n_a, n_b, 300, Population(s_seed=0.5))
    assert rejection_rate(a, b) <= upper_bound(1500)


def test_compare_seeds_holds_its_error_rate_on_aa_studies():
    rng = np.random.default_rng(11)
    values = rng.normal(0.5, 0.05, size=(2000, 2, 3))
    rate = np.mean([stats.compare_seeds(x, y).p < ALPHA for x, y in values])
    assert rate <= upper_bound(2000)


def test_holm_on_a_textbook_example():
    # sorted 0.005, 0.01, 0.03, 0.04 times 4, 3, 2, 1 = 0.02, 0.03, 0.06, 0.04 -> running max 0.06
    assert np.allclose(stats.holm([0.01, 0.04, 0.03, 0.005]), [0.03, 0.06, 0.06, 0.02])
    assert np.allclose(stats.holm([0.5, 0.9]), [1.0, 1.0])
    assert np.allclose(stats.holm([0.02]), [0.02])
    assert stats.holm([]).shape == (0,)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        stats.holm([0.1, 1.2])


def test_holm_is_monotone_in_the_raw_order_and_never_below_the_raw_value():
    p = np.random.default_rng(2).uniform(0, 0.2, size=30)
    adj = stats.holm(p)
    order = np.argsort(p)
    assert np.all(np.diff(adj[order]) >= 0) and np.all(adj >= p) and np.all(adj <= 1)


def pilot(effect_points: float, seed: int = 21):
    pop = Population(shift=shift_for(effect_points))
    a, b = studies(np.random.default_rng(seed), 1, 10, 10, 1000, pop)
    return b[0], a[0], pop


def test_seeds_needed_falls_as_the_effect_grows():
    a, b, _ = pilot(1.0)
    needed = [stats.seeds_needed(a, b, effect=e) for e in (0.5, 0.75, 1.0, 2.0, 4.0)]
    assert all(n is not None for n in needed) and needed == sorted(needed, reverse=True)
    assert needed[0] > needed[-1] >= 2
    assert stats.seeds_needed(a, b, effect=0.0) is None
    assert stats.seeds_needed(a, b, effect=0.01, max_seeds=20) is None


def test_seeds_needed_is_none_when_the_example_term_alone_is_too_large():
    pop = Population(s_arch=4.0)
    a, b = studies(np.random.default_rng(4), 1, 5, 5, 300, pop)
    assert stats.seeds_needed(a[0], b[0], effect=0.3) is None  # ~1 pt of example noise on 300 images


def test_seeds_needed_reaches_the_target_power_by_simulation():
    a, b, pop = pilot(1.0)
    n = stats.seeds_needed(a, b, effect=1.0)
    assert n is not None and 3 <= n <= 30
    x, y = studies(np.random.default_rng(22), 500, n, n, 1000, pop)
    power = np.mean([stats.compare(q, p).outcome == "a better" for p, q in zip(x, y)])
    assert 0.68 <= power <= 0.95, f"{n} seeds per side gave power {power:.3f}, target 0.8"


def test_seeds_needed_seeds_reaches_the_target_power_by_simulation():
    rng = np.random.default_rng(9)
    a, b = rng.normal(1.0, 0.1, 20), rng.normal(1.1, 0.1, 20)
    n = stats.seeds_needed_seeds(a, b, effect=0.1)
    assert n is not None and 5 <= n <= 25
    sims = rng.normal(1.0, 0.1, size=(2000, 2, n)) + np.array([0.0, 0.1])[None, :, None]
    power = np.mean([stats.compare_seeds(y, x).p < ALPHA for x, y in sims])
    assert 0.7 <= power <= 0.9, f"{n} seeds per side gave power {power:.3f}"
    assert stats.seeds_needed_seeds(a, b, effect=0.2) < n


def test_spending_splits_alpha_over_the_looks():
    for looks in (1, 2, 3, 4, 7):
        levels = stats.spending(ALPHA, looks)
        assert len(levels) == looks and sum(levels) == pytest.approx(ALPHA, rel=1e-12)
    with pytest.raises(ValueError, match="looks"):
        stats.spending(ALPHA, 0)


def test_four_sequential_looks_keep_the_family_wise_error_below_alpha():
    a, b = studies(np.random.default_rng(13), 1000, 5, 5, 500)
    levels = stats.spending(ALPHA, 4)
    false = 0
    for x, y in zip(a, b):  # look k uses the first k + 1 seeds of each side, stops at the first rejection
        false += any(stats.compare(x[:k + 2], y[:k + 2]).p < level for k, level in enumerate(levels))
    assert false / len(a) <= upper_bound(len(a))


def test_expected_max_matches_enumeration():
    values = [3.0, 1.0, 2.0, 2.0]
    for n in (1, 2, 3):
        maxima = [max(t) for t in itertools.product(values, repeat=n)]
        mean, var = stats.expected_max(values, n)
        assert mean == pytest.approx(np.mean(maxima)) and var == pytest.approx(np.var(maxima))
    assert stats.expected_max([1.0, 5.0], 200)[0] == pytest.approx(5.0)
    with pytest.raises(ValueError, match="at least one value"):
        stats.expected_max([], 2)


@pytest.mark.parametrize("n", [2, 5])
def test_the_accuracy_interval_covers_the_population_accuracy(n):
    """One architecture's (1 - alpha) interval covers the accuracy expected over seeds and example populations
    about 1 - alpha of the time (both noise sources counted)."""
    from stats_sim import Population, studies

    pop = Population(s_seed=0.3)
    rng = np.random.default_rng(7 + n)
    big = pop.mu + pop.s_ex * rng.standard_normal(2_000_000)
    truth = 100 * float(np.mean(1 / (1 + np.exp(-(big + pop.s_seed * rng.standard_normal(big.size)
                                                   + pop.s_int * rng.standard_normal(big.size))))))
    a, _ = studies(rng, 1000, n, 2, 500, pop)
    covered = np.mean([lo <= truth <= hi for _, lo, hi in (stats.accuracy_interval(x) for x in a)])
    assert covered >= 0.95 - 3.1 * np.sqrt(0.05 * 0.95 / 1000), covered


def test_the_mean_interval_is_students_t():
    mean, lo, hi = stats.mean_interval([1.0, 2.0, 3.0])
    assert mean == 2.0 and hi - mean == pytest.approx(4.302652729911275 * 1.0 / np.sqrt(3))
    with pytest.raises(ValueError, match="at least 2 finite per-seed values"):
        stats.mean_interval([1.0])
