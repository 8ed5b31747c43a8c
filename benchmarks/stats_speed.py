"""Speed, memory, error rate and power of the battle's verdict statistics (``spach.battle.stats``).

    python benchmarks/stats_speed.py                 # everything (a few minutes on 2 cores)
    python benchmarks/stats_speed.py --part speed    # only the timings

Part ``speed``: ``compare`` on (10, 50,000) per side (ImageNet's validation set, 10 seeds), median of
repeated calls and its peak memory (tracemalloc); a "full report": 40 such comparisons, each with
``seeds_needed``, then Holm over the 40 p-values. Part ``rates``: A/A false-difference rates at
alpha = 0.05 (2, 3, 5, 10 seeds per side, and unequal counts) and the power to find a 2-point
difference on 1,000 examples, from the generator of ``tests/stats_sim.py`` (seed spread ~0.5 point);
the rate of Welch's t on the per-seed accuracies (the usual practice, which ignores the sampling of
the examples) is printed alongside, also for architectures equal on the example population but
different example by example, where that practice calls differences that a new validation sample
would not reproduce.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
import tracemalloc
import warnings
from pathlib import Path

import numpy as np
from scipy import stats as sps

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from spach.battle import stats  # noqa: E402
from stats_sim import Population, shift_for, studies  # noqa: E402

ALPHA = 0.05


def speed(repeats: int) -> None:
    a, b = studies(np.random.default_rng(0), 2, 10, 10, 50_000, Population(shift=shift_for(0.3)))
    stats.compare(a[0], b[0])  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        stats.compare(a[0], b[0])
        times.append(time.perf_counter() - t0)
    tracemalloc.start()
    stats.compare(a[0], b[0])
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    print(f"compare (10, 50000) per side: median {1e3 * statistics.median(times):.1f} ms "
          f"over {repeats} calls, peak extra memory {peak / 2**20:.1f} MiB (inputs {2 * a[0].nbytes / 2**20:.1f} MiB)")
    t0 = time.perf_counter()
    p = []
    for k in range(40):
        x, y = (a[0], b[0]) if k % 2 else (b[1], a[1])
        r = stats.compare(x, y)
        stats.seeds_needed(x, y)
        p.append(r.p)
    stats.holm(p)
    print(f"full report (40 comparisons + seeds_needed each + Holm): {time.perf_counter() - t0:.2f} s")


def rate(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """Rejection rates of ``compare`` (b against a) and of Welch's t on the per-seed accuracies."""
    ours = np.mean([stats.compare(y, x).p < ALPHA for x, y in zip(a, b)])
    with warnings.catch_warnings():  # scipy warns on studies whose seeds all scored alike
        warnings.simplefilter("ignore", RuntimeWarning)
        welch = np.mean(sps.ttest_ind(b.mean(axis=2), a.mean(axis=2), axis=1, equal_var=False).pvalue < ALPHA)
    return float(ours), float(welch)


def rates(count: int) -> None:
    rng = np.random.default_rng(1)
    print(f"\nA/A false-difference rate at alpha = {ALPHA} ({count} studies, 1000 examples; "
          f"99.9% binomial bound {sps.binom.ppf(0.999, count, ALPHA) / count:.4f})")
    print("| seeds A/B | seed spread (pt) | paired two-level t | Welch on per-seed accuracy |")
    print("|---|---|---|---|")
    for pop, label in ((Population(), ""), (Population(s_seed=0.5), " (seed shifts x10)")):
        for n_a, n_b in ((2, 2), (3, 3), (5, 5), (10, 10), (2, 5), (2, 10)):
            a, b = studies(rng, count, n_a, n_b, 1000, pop)
            spread = np.sqrt(np.mean(np.var(a.mean(axis=2) * 100, axis=1, ddof=1)))
            ours, welch = rate(a, b)
            print(f"| {n_a}/{n_b}{label} | {spread:.2f} | {ours:.4f} | {welch:.4f} |")
    print("\nNo difference on the example population, but B has its own per-example strengths (s_arch):")
    print("| s_arch | seeds per side | paired two-level t | Welch on per-seed accuracy |")
    print("|---|---|---|---|")
    for s_arch in (2.0, 4.0):
        pop = Population(shift=shift_for(0.0, Population(s_arch=s_arch)), s_arch=s_arch)
        for n in (3, 10):
            ours, welch = rate(*studies(rng, count // 2, n, n, 1000, pop))
            print(f"| {s_arch:g} | {n} | {ours:.4f} | {welch:.4f} |")
    print(f"\nPower to find a 2-point difference (1000 examples, {count // 2} studies)")
    print("| B's own per-example strengths s_arch | seeds per side | paired two-level t | Welch on per-seed accuracy |")
    print("|---|---|---|---|")
    for s_arch in (0.0, 2.0, 4.0):
        pop = Population(shift=shift_for(2.0, Population(s_arch=s_arch)), s_arch=s_arch)
        for n in (2, 3, 5, 10):
            ours, welch = rate(*studies(rng, count // 2, n, n, 1000, pop))
            print(f"| {s_arch:g} | {n} | {ours:.3f} | {welch:.3f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=("speed", "rates", "all"), default="all")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--studies", type=int, default=4000, help="simulated A/A studies per row")
    args = parser.parse_args()
    if args.part in ("speed", "all"):
        speed(args.repeats)
    if args.part in ("rates", "all"):
        rates(args.studies)


if __name__ == "__main__":
    main()
