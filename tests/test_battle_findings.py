"""The verdict rules of the findings, on hand-made per-seed numbers (no training)."""
from __future__ import annotations

from spach.battle.findings import Group, Stat, compare, evaluate_findings
from spach.battle.schema import Arch


def group(family, layout, top1, params=100e3, macs=1e6, cpe=True, shared=False, size="tiny",
          train_loss=(0.1, 0.1), val_loss=(0.2, 0.2)):
    gaps = [v - t for v, t in zip(val_loss, train_loss)]
    name = f"{family}-{layout}-{size}" + ("" if cpe else "-nocpe") + ("-shared" if shared else "")
    return Group(name=name, arch=Arch(family, layout, size, cpe, shared),
                 seeds=list(range(len(top1))), params=params, macs=macs, images_per_s=Stat.of([1000.0]),
                 top1=Stat.of(list(top1)), best_top1=Stat.of(list(top1)), train_loss=Stat.of(list(train_loss)),
                 val_loss=Stat.of(list(val_loss)), gap=Stat.of(gaps))


def verdicts(groups):
    return {f.number: f.verdict for f in evaluate_findings(groups)}


def test_compare_needs_two_seeds_and_a_difference_beyond_the_spread():
    assert compare(Stat.of([90, 92]), Stat.of([80, 82]), "x").decisive
    assert not compare(Stat.of([90, 92]), Stat.of([89, 93]), "x").decisive
    one = compare(Stat.of([90]), Stat.of([80, 81]), "x")
    assert not one.decisive and "one seed" in one.text


def test_multistage_verdicts():
    ss = group("conv", "ss", (80, 81), params=100e3, macs=5e6)
    assert verdicts([ss, group("conv", "ms", (90, 91), params=90e3, macs=1e6)])[1] == "holds"
    assert verdicts([ss, group("conv", "ms", (70, 71), params=90e3, macs=1e6)])[1] == "inconclusive"  # SS costlier
    assert verdicts([group("conv", "ss", (80, 81), params=50e3, macs=1e6),
                     group("conv", "ms", (70, 71), params=90e3, macs=2e6)])[1] == "does not hold"
    assert verdicts([ss, group("conv", "ms", (80, 82), params=90e3, macs=1e6)])[1] == "inconclusive"  # noise
    costly = verdicts([ss, group("conv", "ms", (90, 91), params=300e3, macs=1e6)])[1]
    assert costly == "inconclusive"  # more accurate but 3x the params: no trade-off verdict
    mixed = [ss, group("conv", "ms", (90, 91), params=90e3, macs=1e6),
             group("attn", "ss", (80, 81), params=50e3, macs=1e6), group("attn", "ms", (70, 71), params=50e3, macs=1e6)]
    assert verdicts(mixed)[1].startswith("mixed: holds in 1, does not hold in 1")


def test_uncovered_findings_say_so():
    v = verdicts([group("conv", "ss", (80, 81)), group("conv", "ms", (90, 91))])
    assert v[2] == v[5] == "not covered by this study"  # no CPE ablation, no hybrid
    assert v[4] == "not covered by this study"          # no attention to compare conv with


def test_cpe_sharing_and_generalisation():
    groups = [group("mlp", "ms", (95, 96), params=100e3, macs=1e6),
              group("mlp", "ms", (85, 86), params=99.5e3, macs=0.99e6, cpe=False),
              group("mlp", "ms", (95, 96), shared=True, train_loss=(0.1, 0.1), val_loss=(0.12, 0.13)),
              group("conv", "ss", (90, 91), train_loss=(0.3, 0.31), val_loss=(0.32, 0.33)),
              group("attn", "ss", (90, 91), train_loss=(0.1, 0.11), val_loss=(0.4, 0.41))]
    findings = {f.number: f for f in evaluate_findings(groups)}
    assert findings[2].verdict == "holds" and "0.50% of params" in findings[2].lines[0]
    assert findings[3].verdict == "holds"  # sharing shrinks the MLP's gap
    assert findings[4].verdict == "holds"  # attn: lower train loss; conv: smaller gap


def test_newcomers_are_placed_on_each_side_of_the_findings():
    conv = group("conv", "ms", (95, 95.2), train_loss=(0.10, 0.11), val_loss=(0.20, 0.21))
    attn = group("attn", "ms", (96, 96.2), train_loss=(0.05, 0.06), val_loss=(0.25, 0.26))
    mlp = group("mlp", "ms", (94, 94.2), train_loss=(0.05, 0.05), val_loss=(0.45, 0.46))
    pool = group("pool", "ms", (97, 97.1), train_loss=(0.10, 0.11), val_loss=(0.30, 0.31))
    smlp = group("smlp", "ms", (95, 95.1), train_loss=(0.05, 0.05), val_loss=(0.15, 0.16))
    finding = evaluate_findings([conv, attn, mlp, pool, smlp])[5]
    assert finding.number == 6
    text = "\n".join(finding.lines)
    # pool is weight-free: it is compared with attention (and wins decisively here); smlp is not
    assert "pool ms tiny — a weight-free mixer plus CPE matches attention: top-1 pool - attn: +0.950" in text
    assert "smlp ms tiny — a weight-free" not in text
    # the axial MLP overfits less than the full token MLP: gap 0.105 vs 0.405
    assert "smlp ms tiny — the axial MLP overfits less than the full token MLP: gap mlp - smlp: +0.300" in text
    assert "pool ms tiny — conv generalises best (its gap is smaller): gap pool - conv: +0.100" in text
    assert all(line.endswith(("holds", "does not hold", "inconclusive")) for line in finding.lines)
    assert verdicts([conv, attn, mlp])[6] == "not covered by this study"


def test_pareto_fronts_against_macs_and_throughput():
    from spach.battle.findings import macs_of, pareto_front, speed_of

    a = group("conv", "ms", (90, 90), macs=1e6)        # cheapest
    b = group("attn", "ms", (95, 95), macs=2e6)        # more accurate, costlier: on the front
    c = group("mlp", "ms", (93, 93), macs=3e6)         # dominated by b
    d = group("pool", "ms", (95, 95), macs=2e6, size="x")  # ties b on both: both stay
    assert pareto_front([a, b, c, d], macs_of) == {a.name, b.name, d.name}
    a.images_per_s, b.images_per_s, c.images_per_s, d.images_per_s = (Stat.of([v]) for v in (100, 50, 200, 10))
    assert pareto_front([a, b, c, d], speed_of, lower_is_better=False) == {b.name, c.name}
