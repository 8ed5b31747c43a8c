"""The verdict rules of the findings on hand-made groups (no training): per-example evidence drawn from a
known generator, Holm over the whole report, the four verdicts, costs, seeds needed, older databases."""
from __future__ import annotations

import zlib

import numpy as np
import pytest

from spach.battle.findings import Group, Settings, Stat, evaluate_findings
from spach.battle.schema import Arch

M = 2000  # validation images


def correct(acc: float, seeds: int, rng, seed_sd: float = 0.05) -> np.ndarray:
    """(seeds, M) correctness: example difficulty shared by every architecture, a seed shift per run."""
    difficulty = np.random.default_rng(123).normal(0.0, 1.5, M)  # the same images for every group
    logit = np.log(acc / (1 - acc)) + difficulty[None, :] + rng.normal(0.0, seed_sd, (seeds, 1))
    return rng.random((seeds, M)) < 1 / (1 + np.exp(-logit))


def group(family, layout, acc, seeds=3, params=100e3, macs=1e6, cpe=True, shared=False, size="tiny",
          gap=(0.1, 0.02), train=(0.5, 0.02), evidence=True, weight_free=None, rng=None):
    rng = rng or np.random.default_rng(zlib.crc32(f"{family}{layout}{cpe}{shared}{size}{acc}".encode()))
    c = correct(acc, seeds, rng)
    gaps = list(rng.normal(gap[0], gap[1], seeds))
    trains = list(rng.normal(train[0], train[1], seeds))
    name = Arch(family, layout, size, cpe, shared).name
    return Group(name=name, arch=Arch(family, layout, size, cpe, shared), seeds=list(range(seeds)),
                 params=params, macs=macs, images_per_s=Stat.of([1000.0]), top1=Stat.of(list(100 * c.mean(1))),
                 best_top1=Stat.of(list(100 * c.mean(1))), train_loss=Stat.of(trains),
                 val_loss=Stat.of([t + g for t, g in zip(trains, gaps)]), gap=Stat.of(gaps),
                 correct=c if evidence else None, targets_sha="same" if evidence else None, weight_free=weight_free)


def findings(groups, **settings):
    return {f.number: f for f in evaluate_findings(groups, Settings(**settings))}


def test_multistage_verdicts_follow_the_tests_and_the_costs():
    ss = group("conv", "ss", 0.70, params=100e3, macs=5e6)
    assert findings([ss, group("conv", "ms", 0.85, params=90e3, macs=1e6)])[1].verdict == "supported"
    assert findings([group("conv", "ss", 0.85, params=50e3, macs=1e6),
                     group("conv", "ms", 0.70, params=90e3, macs=2e6)])[1].verdict == "contradicted"
    costly = findings([ss, group("conv", "ms", 0.85, params=300e3, macs=1e6)])[1]
    assert costly.verdict == "not comparable" and "also the costlier" in costly.lines[0]
    mixed = findings([ss, group("conv", "ms", 0.85, params=90e3, macs=1e6),
                      group("attn", "ss", 0.85, params=50e3, macs=1e6),
                      group("attn", "ms", 0.70, params=50e3, macs=1e6)])[1].verdict
    assert mixed == "mixed: supported in 1, contradicted in 1 of 2 comparisons"


def test_every_line_carries_effect_interval_adjusted_p_and_seeds():
    f = findings([group("conv", "ss", 0.70, macs=5e6), group("conv", "ms", 0.85, macs=1e6)])[1]
    line = f.lines[0]
    for part in ("top-1 MS - SS: +", "95% CI [", "p = ", "(Holm ", "seeds 3+3", "per-example on 2000 validation images"):
        assert part in line, (part, line)
    t = f.tests[0]
    assert t.result.ci[0] < t.result.diff < t.result.ci[1] and t.p_adj >= t.result.p


def test_no_difference_is_equivalent_with_enough_evidence_and_underpowered_without():
    rng = np.random.default_rng(5)
    a = group("attn", "ms", 0.80, seeds=8, rng=rng)
    b = group("attn", "ms", 0.80, seeds=8, cpe=False, params=99e3, macs=0.99e6, rng=rng)
    eq = findings([a, b], margin=2.0)[2]
    assert eq.verdict == "equivalent", eq.lines
    few = findings([group("attn", "ms", 0.80, seeds=2), group("attn", "ms", 0.80, seeds=2, cpe=False)], margin=0.2)[2]
    assert few.verdict == "underpowered"
    assert "seeds per side would resolve" in few.lines[0] or "no feasible number of seeds" in few.lines[0]


def test_holm_adjusts_over_every_test_of_the_report():
    groups = [group(f, layout, acc, macs=m) for f, acc in (("conv", 0.8), ("attn", 0.79), ("mlp", 0.75))
              for layout, m, acc in (("ss", 5e6, acc), ("ms", 1e6, acc + 0.01))]
    tests = [t for f in evaluate_findings(groups, Settings()) for t in f.tests if t.tested]
    ps = np.array([t.result.p for t in tests] + [t.result.p_equivalence for t in tests if t.result.p_equivalence])
    adjusted = np.array([t.p_adj for t in tests])
    assert np.all(adjusted >= np.array([t.result.p for t in tests]) - 1e-12)
    k = len(ps)  # the smallest p is multiplied by the number of tests in the family
    smallest = min(range(len(tests)), key=lambda i: tests[i].result.p)
    if ps.min() == tests[smallest].result.p:
        assert adjusted[smallest] == pytest.approx(min(1.0, k * tests[smallest].result.p))


def test_one_seed_on_a_side_is_no_test():
    f = findings([group("conv", "ss", 0.7, seeds=1, macs=5e6), group("conv", "ms", 0.85, macs=1e6)])[1]
    assert f.verdict == "underpowered" and "no test, at least 2 seeds per side" in f.lines[0]


def test_without_per_example_evidence_the_test_is_across_seeds_and_says_so():
    f = findings([group("conv", "ss", 0.70, macs=5e6, evidence=False), group("conv", "ms", 0.85, macs=1e6)])[1]
    assert "across seeds only (no per-example evidence" in f.lines[0]


def test_uncovered_findings_say_so():
    v = findings([group("conv", "ss", 0.7), group("conv", "ms", 0.8)])
    assert v[2].verdict == v[5].verdict == v[4].verdict == "not covered by this study"


def test_gap_and_train_loss_are_tested_across_seeds():
    conv = group("conv", "ss", 0.8, seeds=4, gap=(0.05, 0.01), train=(0.60, 0.01))
    attn = group("attn", "ss", 0.8, seeds=4, gap=(0.30, 0.01), train=(0.30, 0.01))
    f = findings([conv, attn])[4]
    assert f.verdict == "supported" and all("across seeds only" in line for line in f.lines)


def test_newcomers_use_the_recorded_mixer_facts_not_the_registry():
    attn = group("attn", "ms", 0.80, seeds=6)
    pool = group("pool", "ms", 0.80, seeds=6, weight_free=True)
    f = findings([attn, pool], margin=5.0)[6]
    assert any("a weight-free mixer plus CPE matches attention; top-1 pool - attn" in line and "=> supported" in line
               for line in f.lines), f.lines
    unknown = findings([attn, group("pool", "ms", 0.80, seeds=6, weight_free=None)])[6]
    assert any("was not recorded in the database" in line for line in unknown.lines)
    assert not any("matches attention" in line for line in unknown.lines)


def test_a_hybrid_is_compared_with_conv_and_with_the_attention_model_of_its_own_cpe_setting():
    conv, attn = group("conv", "ms", 0.80), group("attn", "ms", 0.80)
    attn_off = group("attn", "ms", 0.60, cpe=False)
    hybrid, hybrid_off = group("hybrid", "ms", 0.90), group("hybrid", "ms", 0.62, cpe=False)
    f = findings([conv, attn, attn_off, hybrid, hybrid_off])[5]
    assert [(t.a.name, t.b.name) for t in f.tests] == [(hybrid.name, conv.name), (hybrid.name, attn.name),
                                                       (hybrid_off.name, conv.name), (hybrid_off.name, attn_off.name)]
    assert [t.verdict for t in f.tests][:3] == ["supported", "supported", "contradicted"]
    # without its no-CPE attention parent, a no-CPE hybrid is compared with conv only
    only = findings([conv, attn, hybrid_off])[5].tests
    assert [(t.a.name, t.b.name) for t in only] == [(hybrid_off.name, conv.name)]


def test_pareto_fronts_against_macs_and_throughput():
    from spach.battle.findings import macs_of, pareto_front, speed_of

    a = group("conv", "ms", 0.90, macs=1e6)
    b = group("attn", "ms", 0.95, macs=2e6)
    c = group("mlp", "ms", 0.93, macs=3e6)
    d = group("pool", "ms", 0.95, macs=2e6, size="x")
    d.top1, b.top1 = Stat.of([95.0, 95.0]), Stat.of([95.0, 95.0])  # an exact tie on both axes keeps both
    a.top1, c.top1 = Stat.of([90.0, 90.0]), Stat.of([93.0, 93.0])
    assert pareto_front([a, b, c, d], macs_of) == {a.name, b.name, d.name}
    a.images_per_s, b.images_per_s, c.images_per_s, d.images_per_s = (Stat.of([v]) for v in (100, 50, 200, 10))
    assert pareto_front([a, b, c, d], speed_of, lower_is_better=False) == {b.name, c.name}
