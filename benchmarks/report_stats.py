"""The findings' statistics at the paper's scale: every test of a report over 50,000 validation images
x 10 seeds per architecture, and the memory it holds.

    python benchmarks/report_stats.py [--examples 50000] [--seeds 10] [--repeats 3]

The grid is the paper's: conv / attn / mlp / hybrid x SS / MS x three sizes, plus the CPE ablation of
attention and MLP and a shared-weight MLP at each layout and size (36 architectures), with per-example
correctness drawn from a logistic model (example difficulty shared by all, a seed shift per run). It
times `spach.battle.findings.evaluate_findings` (all tests, Holm, verdicts, seeds needed for the
unresolved ones) and the table's per-architecture intervals, and prints the peak traced memory.
"""
from __future__ import annotations

import argparse
import json
import time
import tracemalloc
import zlib

import numpy as np

from spach.battle.findings import Group, Settings, Stat, evaluate_findings
from spach.battle.schema import Arch
from spach.battle.stats import accuracy_interval

SIZES = {"xxs": 1.0, "xs": 2.0, "s": 4.0}


def groups(examples: int, seeds: int) -> list[Group]:
    """The synthetic study: accuracies around 75-82%, seed spread ~0.3 pt, a few points between families."""
    difficulty = np.random.default_rng(0).normal(0.0, 2.0, examples)
    base = {"conv": 1.3, "attn": 1.25, "mlp": 1.15, "hybrid": 1.35}
    out = []
    for family, logit in base.items():
        for layout in ("ss", "ms"):
            for size, scale in SIZES.items():
                ablations = [(True, False)] + ([(False, False)] if family in ("attn", "mlp") else []) \
                    + ([(True, True)] if family == "mlp" else [])
                for cpe, shared in ablations:
                    arch = Arch(family, layout, size, cpe, shared)
                    rng = np.random.default_rng(zlib.crc32(arch.name.encode()))
                    shift = logit + 0.05 * scale + (0.1 if layout == "ms" else 0.0) - (0.0 if cpe else 0.08)
                    p = 1 / (1 + np.exp(-(difficulty + shift + rng.normal(0, 0.02, (seeds, 1)))))
                    correct = rng.random((seeds, examples)) < p
                    top1 = list(100 * correct.mean(1))
                    train = list(rng.normal(0.8 - 0.05 * scale, 0.01, seeds))
                    gaps = list(rng.normal(0.2 + (0.05 * scale if family == "mlp" else 0.0), 0.01, seeds))
                    out.append(Group(
                        name=arch.name, arch=arch, seeds=list(range(seeds)), params=scale * 1e7 * (1.0 if cpe else 0.99),
                        macs=scale * 1e9 * (0.8 if layout == "ms" else 1.0), images_per_s=Stat.of([100.0]),
                        top1=Stat.of(top1), best_top1=Stat.of(top1), train_loss=Stat.of(train),
                        val_loss=Stat.of([t + g for t, g in zip(train, gaps)]), gap=Stat.of(gaps),
                        correct=correct, targets_sha="imagenet-val"))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--examples", type=int, default=50000)
    ap.add_argument("--seeds", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    gs = groups(args.examples, args.seeds)
    evidence_mb = sum(g.correct.nbytes for g in gs) / 2**20
    times, interval_times = [], []
    tracemalloc.start()
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        findings = evaluate_findings(gs, Settings())
        times.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        for g in gs:
            accuracy_interval(g.correct)
        interval_times.append(time.perf_counter() - t0)
    peak = tracemalloc.get_traced_memory()[1] / 2**20
    tests = [t for f in findings for t in f.tests]
    print(json.dumps({
        "architectures": len(gs), "seeds": args.seeds, "examples": args.examples, "tests": len(tests),
        "unresolved": sum(t.verdict == "underpowered" for t in tests),
        "findings_s": min(times), "intervals_s": min(interval_times), "evidence_mb": round(evidence_mb, 1),
        "peak_traced_mb_beyond_evidence": round(peak, 1)}, indent=1))


if __name__ == "__main__":
    main()
