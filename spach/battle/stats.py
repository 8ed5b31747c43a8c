"""The battle's verdict statistics: paired two-level comparisons of accuracy, Holm, power, sequential levels.

Pure functions over numpy arrays (no database, report or torch code). The evidence of a comparison
is two boolean matrices ``a`` (n_a seeds x m examples) and ``b`` (n_b x m): whether each run of
architecture A (resp. B) classified each validation image correctly, the same m images on both sides.

**The estimand.** The difference of mean accuracy, in percentage points, between A and B over both
sources of noise: a new set of training seeds on each side, and a new validation sample of m images
from the same population.

**The statistic** (``compare``, method ``"t"``). ``D = mean(a) - mean(b)``. Write ``A_s`` for the
accuracy of seed s of A, ``p_i`` for the expected correctness of A on example i over seeds,
``delta_i = p_i(A) - p_i(B)`` and ``d_i`` for the observed per-example difference of the seed means.
By the law of total variance over the examples,

    Var D = E[Var(D | examples)] + Var(E[D | examples])
          = E[Var(A_s | ex)]/n_a + E[Var(B_s | ex)]/n_b + Var(delta)/m.

Given the examples, seeds are i.i.d., so the sample variance ``S_a`` of the per-seed accuracies is
unbiased for ``Var(A_s | ex)`` (likewise ``S_b``). The sample variance ``S_d`` of the ``d_i`` across
examples also contains the seed noise of each example, minus its part common to all examples:

    E[S_d | ex] = s^2(delta) + m/(m-1) * ((W_a - Var(A_s|ex))/n_a + (W_b - Var(B_s|ex))/n_b),

with ``W_a`` the mean over examples of the per-example variance across seeds (estimated unbiasedly by
the mean of the per-example sample variances across seeds). Hence the unbiased estimator

    V = S_a/n_a + S_b/n_b + [S_d - m/(m-1) * ((W_a - S_a)/n_a + (W_b - S_b)/n_b)] / m,

whose example term is truncated at 0 (a variance cannot be negative; the truncation only widens the
interval). ``t = D / sqrt(V)`` is referred to Student's t with Satterthwaite's (1946) degrees of freedom
(the seed terms have n_a - 1 and n_b - 1 degrees of freedom, the example term m - 1), the Welch (1947)
construction extended by the paired example term. The seed part's degrees of freedom are capped at
their value for equal seed variances on both sides: with equal seed counts this changes nothing, with
unequal ones (2 vs 10 seeds) it keeps the test from being liberal, as plain Welch is there. At least 2 seeds per side are needed: with one seed
a side's seed-to-seed variance cannot be estimated, and no honest interval exists.

**Assumptions.** Seeds are i.i.d. draws of the training randomness on each side; the validation
images are a random sample of their population; both sides are scored on the same images (paired).
A/A simulations (``tests/test_battle_stats.py``, ``benchmarks/RESULTS.md``) check the error rate with
2 to 10 seeds per side.

**Outcome.** ``"a better"`` / ``"b better"`` when p < alpha (the 1 - alpha interval excludes 0);
otherwise ``"equivalent"`` when a margin ``delta`` is given and the two one-sided tests (TOST,
Schuirmann 1987) reject at level alpha, i.e. the 1 - 2 alpha interval lies inside (-delta, delta);
otherwise ``"inconclusive"``.

Per-seed quantities (generalisation gap, train loss) have no per-example evidence: ``compare_seeds``
is Welch's t across seeds only. It cannot separate the examples' sampling noise from the seeds', and
its few degrees of freedom (n_a + n_b - 2 at most) make its intervals wide with 2-3 seeds.

References: F. E. Satterthwaite, "An approximate distribution of estimates of variance components",
Biometrics Bulletin 2 (1946); B. L. Welch, "The generalization of Student's problem when several
different population variances are involved", Biometrika 34 (1947); S. Holm, "A simple sequentially
rejective multiple test procedure", Scand. J. Statist. 6 (1979); D. J. Schuirmann, "A comparison of
the two one-sided tests procedure and the power approach for assessing the equivalence of average
bioavailability", J. Pharmacokin. Biopharm. 15 (1987); X. Bouthillier et al., "Accounting for variance
in machine learning benchmarks", MLSys 2021; J. Dodge et al., "Show your work: improved reporting of
experimental results", EMNLP 2019.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import special
from scipy import stats as sps

OUTCOMES = ("a better", "b better", "equivalent", "inconclusive")
T_METHOD = "paired two-level t (Satterthwaite)"
SEEDS_METHOD = "Welch t across seeds only (no per-example evidence)"


@dataclass(frozen=True)
class Result:
    """One comparison of A against B: effect, interval, p-value and verdict."""

    diff: float
    ci: tuple[float, float]
    p: float
    n_seeds: tuple[int, int]
    outcome: str
    se: float
    df: float
    alpha: float
    delta: float | None
    p_equivalence: float | None
    method: str
    across_seeds_only: bool


@dataclass(frozen=True)
class Components:
    """The measured variance components of a paired comparison, in accuracy fractions squared.

    ``seed_a``/``seed_b``: sample variance of the per-seed accuracies; ``examples``: estimated variance of
    the per-example true difference ``delta_i`` across the example population (truncated at 0); ``m``:
    the number of examples.
    """

    seed_a: float
    seed_b: float
    examples: float
    m: int


def _check_level(alpha: float, delta: float | None) -> None:
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must lie strictly between 0 and 1, got {alpha}")
    if delta is not None and not (delta > 0 and math.isfinite(delta)):
        raise ValueError(f"the equivalence margin delta must be a positive number of points, got {delta}")


def _check_matrices(a, b) -> tuple[np.ndarray, np.ndarray]:
    a, b = np.asarray(a), np.asarray(b)
    for name, x in (("a", a), ("b", b)):
        if x.dtype != np.bool_:
            raise ValueError(f"{name} must be a boolean (seeds, examples) array of per-example correctness, "
                             f"got dtype {x.dtype} (convert 0/1 data with .astype(bool))")
        if x.ndim != 2:
            raise ValueError(f"{name} must be 2-D (seeds, examples), got shape {x.shape}")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"a and b must be scored on the same validation examples: a has shape {a.shape}, "
                         f"b has shape {b.shape} ({a.shape[1]} vs {b.shape[1]} examples)")
    if a.shape[1] < 2:
        raise ValueError(f"at least 2 validation examples are needed, got {a.shape[1]}")
    for name, x in (("a", a), ("b", b)):
        if x.shape[0] < 2:
            raise ValueError(f"{name} has {x.shape[0]} seed(s): at least 2 seeds per side are needed to "
                             "estimate the seed-to-seed variance (run more seeds)")
    return a, b


def _side_moments(x: np.ndarray) -> tuple[np.ndarray, float, float]:
    """Per-example seed means, sample variance of the per-seed accuracies, mean per-example seed variance."""
    n, m = x.shape
    per_example = x.sum(axis=0, dtype=np.int64).astype(np.float64)  # correct seeds per example
    per_seed = x.sum(axis=1, dtype=np.int64) / m
    seed_var = float(np.var(per_seed, ddof=1))
    # for 0/1 data the sample variance across seeds of example i is (k - k^2/n)/(n - 1)
    within = float(np.mean(per_example - per_example**2 / n)) / (n - 1)
    return per_example / n, seed_var, within


def components(a, b) -> Components:
    """The variance components of ``compare`` (see the module docstring) from the boolean matrices a, b."""
    a, b = _check_matrices(a, b)
    (n_a, m), n_b = a.shape, b.shape[0]
    mean_a, s_a, w_a = _side_moments(a)
    mean_b, s_b, w_b = _side_moments(b)
    s_d = float(np.var(mean_a - mean_b, ddof=1))
    seed_part = m / (m - 1) * ((w_a - s_a) / n_a + (w_b - s_b) / n_b)
    return Components(s_a, s_b, max(0.0, s_d - seed_part), m)


def _seed_part(v_a: float, v_b: float, n_a: int, n_b: int) -> tuple[float, float]:
    """Welch's variance ``v_a/n_a + v_b/n_b`` of a difference of seed means, and its degrees of freedom.

    Satterthwaite's estimate, capped at its value for equal seed variances on both sides,
    ``(1/n_a + 1/n_b)^2 / (1/(n_a^2 (n_a-1)) + 1/(n_b^2 (n_b-1)))``. The cap changes nothing with equal
    seed counts (it is then 2(n-1), the most Satterthwaite can give); with unequal counts such as 2 vs 10,
    the plain estimate is liberal (about 10% false differences at alpha = 0.05 with equal variances,
    because a small draw of the 2-seed variance inflates both t and the estimated df), the capped one is
    conservative (``benchmarks/RESULTS.md``).
    """
    terms = np.array([v_a / n_a, v_b / n_b])
    dfs = np.array([n_a - 1, n_b - 1], dtype=np.float64)
    var = float(terms.sum())
    cap = float((1 / n_a + 1 / n_b) ** 2 / np.sum(1.0 / (np.array([n_a, n_b], dtype=np.float64) ** 2 * dfs)))
    if var == 0.0:
        return 0.0, cap
    return var, min(cap, float(var**2 / np.sum(terms**2 / dfs)))


def _variance_and_df(c: Components, n_a: int, n_b: int) -> tuple[float, float]:
    """V = S_a/n_a + S_b/n_b + examples/m, and its Satterthwaite degrees of freedom.

    The seed part's degrees of freedom are those of ``_seed_part``; the example term has m - 1.
    """
    seeds, seeds_df = _seed_part(c.seed_a, c.seed_b, n_a, n_b)
    examples = c.examples / c.m
    var = seeds + examples
    if var == 0.0:
        return 0.0, seeds_df
    return var, float(var**2 / (seeds**2 / seeds_df + examples**2 / (c.m - 1)))


def _verdict(diff: float, se: float, df: float, n_seeds: tuple[int, int], *, alpha: float,
             delta: float | None, method: str, across_seeds_only: bool) -> Result:
    """The t interval, p-value, TOST p-value and outcome of ``diff`` with standard error ``se``."""
    if se == 0.0:  # no variation anywhere: the difference is exact
        p = 1.0 if diff == 0.0 else 0.0
        ci = (diff, diff)
        p_eq = None if delta is None else (0.0 if abs(diff) < delta else 1.0)
    else:
        # scipy.special.stdtr(df, x) is Student's t cdf, stdtrit its inverse (the fast scalar forms)
        p = float(2.0 * special.stdtr(df, -abs(diff) / se))
        half = float(special.stdtrit(df, 1.0 - alpha / 2.0)) * se
        ci = (diff - half, diff + half)
        p_eq = None
        if delta is not None:
            p_low = special.stdtr(df, -(diff + delta) / se)  # H0: diff <= -delta
            p_high = special.stdtr(df, (diff - delta) / se)  # H0: diff >= +delta
            p_eq = float(max(p_low, p_high))
    if p < alpha:
        outcome = "a better" if diff > 0 else "b better"
    elif p_eq is not None and p_eq < alpha:
        outcome = "equivalent"
    else:
        outcome = "inconclusive"
    return Result(diff=diff, ci=ci, p=p, n_seeds=n_seeds, outcome=outcome, se=se, df=df, alpha=alpha,
                  delta=delta, p_equivalence=p_eq, method=method, across_seeds_only=across_seeds_only)


def compare(a, b, *, alpha: float = 0.05, delta: float | None = None, seed: int = 0,
            method: str = "t") -> Result:
    """Compare architectures A and B from per-seed, per-example correctness on the same validation images.

    ``a``: bool (n_a, m), ``b``: bool (n_b, m), n_a, n_b >= 2. ``diff`` and ``ci`` are in percentage
    points of accuracy (A minus B); ``delta`` is an equivalence margin in points. Method ``"t"``: the
    paired two-level t with Satterthwaite degrees of freedom of the module docstring, which accounts for
    seed-to-seed variation and for the sampling of the validation examples; it is deterministic, so
    ``seed`` (kept in the signature for a resampling method) does not change its result.
    """
    _check_level(alpha, delta)
    if method != "t":
        raise ValueError(f"unknown comparison method {method!r}: the available method is 't'")
    c = components(a, b)
    n_a, n_b = np.shape(a)[0], np.shape(b)[0]
    var, df = _variance_and_df(c, n_a, n_b)
    diff = 100.0 * (float(np.mean(a)) - float(np.mean(b)))
    return _verdict(diff, 100.0 * math.sqrt(var), df, (n_a, n_b), alpha=alpha, delta=delta,
                    method=T_METHOD, across_seeds_only=False)


def _check_vectors(a, b) -> tuple[np.ndarray, np.ndarray]:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    for name, x in (("a", a), ("b", b)):
        if x.ndim != 1:
            raise ValueError(f"{name} must be 1-D (one value per seed), got shape {x.shape}")
        if x.size < 2:
            raise ValueError(f"{name} has {x.size} seed(s): at least 2 seeds per side are needed to estimate "
                             "the seed-to-seed variance (run more seeds)")
        if not np.all(np.isfinite(x)):
            raise ValueError(f"{name} holds non-finite values: {x.tolist()}")
    return a, b


def compare_seeds(a, b, *, alpha: float = 0.05, delta: float | None = None) -> Result:
    """Compare a per-seed quantity (generalisation gap, train loss) of A and B: Welch's t across seeds only.

    ``a``: float (n_a,), ``b``: float (n_b,), n_a, n_b >= 2; ``diff``, ``ci`` and ``delta`` are in the
    quantity's own unit. Without per-example evidence the test cannot pair the examples or separate their
    sampling noise from the seeds'; it rests on n_a + n_b - 2 degrees of freedom at most, so with 2-3 seeds
    per side its intervals are wide and only large effects are resolved (``Result.across_seeds_only``).
    """
    _check_level(alpha, delta)
    a, b = _check_vectors(a, b)
    var, df = _seed_part(float(np.var(a, ddof=1)), float(np.var(b, ddof=1)), a.size, b.size)
    diff = float(a.mean() - b.mean())
    return _verdict(diff, math.sqrt(var), df, (a.size, b.size), alpha=alpha, delta=delta,
                    method=SEEDS_METHOD, across_seeds_only=True)


def holm(p) -> np.ndarray:
    """Holm-Bonferroni adjusted p-values (Holm 1979), in the order of the input.

    Sorting the k p-values ascending, the j-th smallest (j = 1..k) is adjusted to
    ``max over i <= j of min(1, (k - i + 1) * p_(i))``; rejecting where the adjusted value is below alpha
    controls the family-wise error at alpha under any dependence between the tests.
    """
    p = np.asarray(p, dtype=np.float64)
    if p.ndim != 1:
        raise ValueError(f"holm takes a 1-D sequence of p-values, got shape {p.shape}")
    if not np.all((p >= 0) & (p <= 1)):
        raise ValueError(f"p-values must lie in [0, 1], got {p.tolist()}")
    k = p.size
    order = np.argsort(p, kind="stable")
    stepped = np.minimum(1.0, (k - np.arange(k)) * p[order])
    adjusted = np.empty(k)
    adjusted[order] = np.maximum.accumulate(stepped)
    return adjusted


def _power(effect: float, var_of_n: np.ndarray, df_of_n: np.ndarray, alpha: float) -> np.ndarray:
    """Two-sided power of a level-alpha t test of ``effect``: P(|T| > t_crit), T noncentral t."""
    power = np.ones_like(var_of_n)
    ok = var_of_n > 0
    crit = sps.t.ppf(1.0 - alpha / 2.0, df_of_n[ok])
    ncp = abs(effect) / np.sqrt(var_of_n[ok])
    power[ok] = sps.nct.sf(crit, df_of_n[ok], ncp) + sps.nct.cdf(-crit, df_of_n[ok], ncp)
    return power


def _first_reaching(effect: float, n: np.ndarray, var: np.ndarray, df: np.ndarray, alpha: float,
                    power: float) -> int | None:
    if effect == 0.0:
        return None
    reached = np.nonzero(_power(effect, var, df, alpha) >= power)[0]
    return int(n[reached[0]]) if reached.size else None


def _check_power_args(alpha: float, power: float, max_seeds: int) -> np.ndarray:
    _check_level(alpha, None)
    if not 0.0 < power < 1.0:
        raise ValueError(f"power must lie strictly between 0 and 1, got {power}")
    if max_seeds < 2:
        raise ValueError(f"max_seeds must be at least 2, got {max_seeds}")
    return np.arange(2, int(max_seeds) + 1)


def seeds_needed(a, b, *, effect: float | None = None, alpha: float = 0.05, power: float = 0.8,
                 max_seeds: int = 200) -> int | None:
    """Seeds per side for ``compare`` to detect ``effect`` points with probability ``power`` at level alpha.

    From the measured variance components of ``a``, ``b`` (as in ``compare``): with n seeds per side the
    statistic's variance is ``S_a/n + S_b/n + examples/m`` with Satterthwaite degrees of freedom, and its
    power is that of the noncentral t with noncentrality ``effect / se(n)``. ``effect`` defaults to the
    observed difference. Returns the smallest n in 2..max_seeds reaching ``power``, or None when none does
    (the example-sampling term alone may be too large: more seeds cannot remove it) or the effect is 0.
    """
    n = _check_power_args(alpha, power, max_seeds)
    c = components(a, b)
    if effect is None:
        effect = 100.0 * (float(np.mean(a)) - float(np.mean(b)))
    pairs = [_variance_and_df(c, k, k) for k in n]
    var = np.array([v for v, _ in pairs]) * 100.0**2
    df = np.array([d for _, d in pairs])
    return _first_reaching(float(effect), n, var, df, alpha, power)


def seeds_needed_seeds(a, b, *, effect: float | None = None, alpha: float = 0.05, power: float = 0.8,
                       max_seeds: int = 200) -> int | None:
    """Seeds per side for ``compare_seeds`` (Welch) to detect ``effect`` (the quantity's unit) at ``power``.

    Uses the measured per-seed variances of ``a`` and ``b`` and the noncentral t power of Welch's statistic
    with n seeds per side; ``effect`` defaults to the observed difference. None when not reachable within
    ``max_seeds`` or when the effect is 0.
    """
    n = _check_power_args(alpha, power, max_seeds)
    a, b = _check_vectors(a, b)
    if effect is None:
        effect = float(a.mean() - b.mean())
    v_a, v_b = float(np.var(a, ddof=1)), float(np.var(b, ddof=1))
    pairs = [_seed_part(v_a, v_b, k, k) for k in n]
    var = np.array([v for v, _ in pairs])
    df = np.array([d for _, d in pairs])
    return _first_reaching(float(effect), n, var, df, alpha, power)


def spending(alpha: float, looks: int) -> list[float]:
    """Per-look significance levels for a sequential design with ``looks`` looks, summing to alpha.

    Each look tests at ``alpha / looks`` (a Bonferroni split, Pocock-like in spending equally). A false
    difference over the whole design means a false rejection at some look; by the union bound its
    probability is at most the sum of the per-look levels, alpha, whatever the correlation between the
    looks (they share seeds, so they are strongly correlated, which makes the bound conservative).
    """
    _check_level(alpha, None)
    if int(looks) != looks or looks < 1:
        raise ValueError(f"looks must be a positive integer, got {looks}")
    return [alpha / looks] * int(looks)


def expected_max(values, n: int) -> tuple[float, float]:
    """Expected maximum of n draws with replacement from the empirical distribution of ``values``, and its variance.

    Dodge et al. 2019 ("Show your work"): with the N values sorted ascending, v_(1) <= ... <= v_(N), the
    maximum of n draws equals v_(i) with probability ``(i/N)^n - ((i-1)/N)^n``; the mean and variance follow
    exactly from this distribution (no simulation).
    """
    v = np.sort(np.asarray(values, dtype=np.float64).ravel())
    if v.size == 0:
        raise ValueError("expected_max needs at least one value")
    if not np.all(np.isfinite(v)):
        raise ValueError(f"expected_max needs finite values, got {v.tolist()}")
    if int(n) != n or n < 1:
        raise ValueError(f"n (the number of draws) must be a positive integer, got {n}")
    i = np.arange(1, v.size + 1, dtype=np.float64)
    prob = (i / v.size) ** n - ((i - 1) / v.size) ** n
    mean = float(np.sum(prob * v))
    var = float(max(0.0, np.sum(prob * (v - mean) ** 2)))
    return mean, var


def accuracy_interval(a, *, alpha: float = 0.05) -> tuple[float, float, float]:
    """(mean accuracy, lower, upper) in percent: the (1 - alpha) interval of one architecture's accuracy.

    ``a``: bool (n, m), n >= 2 seeds, per-example correctness on m validation images. The one-sided
    analogue of :func:`compare`: with x_s the seed accuracies, u_i the per-example means over seeds and
    w the mean within-example variance over seeds, V = S_x/n + max(0, S_u - w/n)/m (seed and
    example-sampling noise), a t interval with Satterthwaite degrees of freedom.
    """
    x = _check_matrices(a, a)[0]
    n, m = x.shape
    xf = x.astype(np.float64)
    seed_acc = xf.mean(axis=1)
    per_example = xf.mean(axis=0)
    s_x = float(np.var(seed_acc, ddof=1))
    within = float(np.mean(per_example * (1.0 - per_example)) * n / (n - 1))
    s_u = float(np.var(per_example, ddof=1))
    terms = np.array([s_x / n, max(0.0, s_u - within / n) / m])
    var = float(terms.sum())
    mean = 100.0 * float(per_example.mean())
    if var == 0.0:
        return mean, mean, mean
    df = var ** 2 / float(np.sum(terms ** 2 / np.array([n - 1, m - 1], dtype=np.float64)))
    half = 100.0 * float(sps.t.ppf(1.0 - alpha / 2.0, df)) * math.sqrt(var)
    return mean, mean - half, mean + half


def mean_interval(values, *, alpha: float = 0.05) -> tuple[float, float, float]:
    """(mean, lower, upper): Student's t interval of a per-seed quantity's mean (across seeds only)."""
    x = np.asarray(values, dtype=np.float64)
    if x.ndim != 1 or x.size < 2 or not np.all(np.isfinite(x)):
        raise ValueError(f"an interval needs at least 2 finite per-seed values, got {x.tolist()}")
    half = float(sps.t.ppf(1.0 - alpha / 2.0, x.size - 1)) * float(np.std(x, ddof=1)) / math.sqrt(x.size)
    return float(x.mean()), float(x.mean()) - half, float(x.mean()) + half
