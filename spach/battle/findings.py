"""Test the paper's findings (docs/battle.md, "The report") against a study's results — with numbers, never by assumption.

Results are aggregated per *group* (one architecture: family × layout × size ×
ablation) over its seeds. Two groups differ **decisively** when both have at
least two seeds and the difference of their means exceeds the combined seed
spread, sqrt(std_a² + std_b²); otherwise the comparison is *inconclusive*. A
finding gets a verdict only from decisive comparisons; one the grid cannot
address is "not covered by this study". Mixers after the paper (the arena's
newcomers and plugins) are placed on each side of the paper's findings with
the same rule (finding 6); :func:`pareto_front` ranks families by top-1
against MACs and against throughput.

The generalisation gap of a run is `final val loss - final train loss` (the
train loss is measured under the study's augmentation, identical for every run
of a study, so gaps compare across architectures of one study).
"""
from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field, replace
from typing import Callable

from spach.battle.schema import Arch, HasArch

COST_TOLERANCE = 1.10   # "no more costly": params and MACs within 10%


@dataclass
class Stat:
    mean: float
    std: float | None      # sample std over seeds; None with one seed
    n: int

    @staticmethod
    def of(values: list[float]) -> "Stat | None":
        values = [v for v in values if v is not None and math.isfinite(v)]
        if not values:
            return None
        return Stat(statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None, len(values))

    def text(self, fmt: str = ".2f", unit: str = "") -> str:
        if self.std is None:
            return f"{self.mean:{fmt}}{unit} (1 seed)"
        return f"{self.mean:{fmt}} ± {self.std:{fmt}}{unit}"


@dataclass
class Group(HasArch):
    """One architecture of the study, over its finished seeds."""

    name: str
    arch: Arch                   # family, layout, size, cpe, shared (also readable as group.family, ...)
    seeds: list[int]
    params: float | None
    macs: float | None
    images_per_s: Stat | None
    top1: Stat | None            # final top-1 (%)
    best_top1: Stat | None
    train_loss: Stat | None      # final-epoch train loss
    val_loss: Stat | None
    gap: Stat | None             # val loss - train loss
    runs: list[dict] = field(default_factory=list)

    @property
    def baseline(self) -> bool:
        return self.cpe and not self.shared


@dataclass
class Comparison:
    label: str
    diff: float
    spread: float | None
    decisive: bool
    text: str

    @property
    def outcome(self) -> str:
        """'holds' when decisively positive (a - b > spread), 'does not hold' when decisively negative."""
        if not self.decisive:
            return "inconclusive"
        return "holds" if self.diff > 0 else "does not hold"


@dataclass
class Finding:
    number: int
    claim: str
    verdict: str
    lines: list[str]


def compare(a: Stat | None, b: Stat | None, label: str, unit: str = "") -> Comparison | None:
    """a - b with its seed spread; decisive if |a - b| > sqrt(std_a² + std_b²) with >= 2 seeds each."""
    if a is None or b is None:
        return None
    diff = a.mean - b.mean
    if a.std is None or b.std is None:
        return Comparison(label, diff, None, False,
                          f"{label}: {diff:+.3f}{unit} (one seed on a side: no spread, inconclusive)")
    spread = math.hypot(a.std, b.std)
    decisive = abs(diff) > spread
    return Comparison(label, diff, spread, decisive,
                      f"{label}: {diff:+.3f}{unit} vs seed spread {spread:.3f}{unit} -> "
                      + ("decisive" if decisive else "within noise"))


def _verdict(outcomes: list[str]) -> str:
    """Combine per-comparison outcomes ('holds' | 'does not hold' | 'inconclusive') into one verdict."""
    if not outcomes:
        return "not covered by this study"
    holds, fails = outcomes.count("holds"), outcomes.count("does not hold")
    n = len(outcomes)
    if holds == n:
        return "holds"
    if fails == n:
        return "does not hold"
    if holds == 0 and fails == 0:
        return "inconclusive"
    if holds and fails:
        return f"mixed: holds in {holds}, does not hold in {fails}, inconclusive in {n - holds - fails} of {n} comparisons"
    if holds:
        return f"holds in {holds} of {n} comparisons, inconclusive in the others"
    return f"does not hold in {fails} of {n} comparisons, inconclusive in the others"


def _by(groups: list[Group], **fixed) -> list[Group]:
    return [g for g in groups if all(getattr(g, k) == v for k, v in fixed.items())]


def _one(groups: list[Group], **fixed) -> Group | None:
    found = [g for g in _by(groups, **fixed) if g.top1 is not None]
    return found[0] if len(found) == 1 else None


def _costs(a: Group, b: Group) -> str:
    def ratio(x, y):
        return f"{x / y:.2f}x" if x and y else "?"
    return f"params {ratio(a.params, b.params)}, MACs {ratio(a.macs, b.macs)}"


def _no_costlier(a: Group, b: Group) -> bool:
    return bool(a.params and b.params and a.macs and b.macs and a.params <= COST_TOLERANCE * b.params
                and a.macs <= COST_TOLERANCE * b.macs)


def _pairs(groups: list[Group], vary: str, values: tuple, families: tuple) -> list[tuple[Group, Group]]:
    """Pairs of groups whose architectures differ only in `vary` (values[0] first)."""
    pairs = []
    for a in groups:
        if a.family not in families or getattr(a, vary) != values[0] or a.top1 is None:
            continue
        b = _one(groups, arch=replace(a.arch, **{vary: values[1]}))
        if b is not None:
            pairs.append((a, b))
    return pairs


# --------------------------------------------------------------------------- the findings

def multistage_beats_singlestage(groups: list[Group]) -> Finding:
    lines, outcomes = [], []
    for ms, ss in _pairs(groups, "layout", ("ms", "ss"), ("conv", "attn", "mlp", "hybrid")):
        c = compare(ms.top1, ss.top1, "top-1 MS - SS", " pt")
        cheap_ms, cheap_ss = _no_costlier(ms, ss), _no_costlier(ss, ms)
        if c.decisive and c.diff > 0 and cheap_ms:
            outcome = "holds"
        elif c.decisive and c.diff < 0 and cheap_ss:
            outcome = "does not hold"
        else:
            outcome = "inconclusive"
        why = "" if outcome != "inconclusive" or not c.decisive else \
            " (the more accurate layout is also the more costly one: no trade-off verdict)"
        outcomes.append(outcome)
        lines.append(f"{ms.family} {ms.size}{_abl(ms)}: MS {ms.top1.text(unit='%')} vs SS {ss.top1.text(unit='%')} "
                     f"(MS/SS {_costs(ms, ss)}); {c.text} => {outcome}{why}")
    return Finding(1, "Multi-stage beats single-stage for every family and size (accuracy/complexity trade-off).",
                   _verdict(outcomes), lines)


def local_modelling(groups: list[Group]) -> Finding:
    lines, outcomes = [], []
    for on, off in _pairs(groups, "cpe", (True, False), ("attn", "mlp")):
        c = compare(on.top1, off.top1, "top-1 with - without CPE", " pt")
        outcomes.append(c.outcome)
        share = ""
        if on.params and off.params and on.macs and off.macs:
            share = (f"; the conv is {100 * (on.params - off.params) / on.params:.2f}% of params, "
                     f"{100 * (on.macs - off.macs) / on.macs:.2f}% of MACs")
        lines.append(f"{on.family} {on.layout} {on.size}{' shared' if on.shared else ''}: with CPE "
                     f"{on.top1.text(unit='%')} vs without {off.top1.text(unit='%')}{share}; {c.text} => {c.outcome}")
    return Finding(2, "Local modelling is crucial: removing the depthwise-conv branch (CPE) from attention and "
                      "MLP blocks costs accuracy for almost no compute.", _verdict(outcomes), lines)


def mlp_overfitting(groups: list[Group]) -> Finding:
    lines, outcomes = [], []
    # (a) scaling up an MLP widens its generalisation gap
    for layout in ("ss", "ms"):
        mlps = sorted([g for g in _by(groups, family="mlp", layout=layout, cpe=True, shared=False)
                       if g.gap is not None and g.params], key=lambda g: g.params)
        for small, big in zip(mlps, mlps[1:]):
            c = compare(big.gap, small.gap, "gap larger - smaller")
            outcomes.append(c.outcome)
            lines.append(f"scaling mlp {layout} {small.size} -> {big.size} ({_costs(big, small)}): gap "
                         f"{small.gap.text('.3f')} -> {big.gap.text('.3f')}, top-1 {small.top1.text(unit='%')} -> "
                         f"{big.top1.text(unit='%')}; {c.text} => {c.outcome}")
    # (b) weight sharing and (c) the multi-stage layout reduce it
    for shared, plain in _pairs(groups, "shared", (True, False), ("mlp",)):
        if shared.gap is None or plain.gap is None:
            continue
        c = compare(plain.gap, shared.gap, "gap unshared - shared")
        outcomes.append(c.outcome)
        lines.append(f"weight sharing, mlp {plain.layout} {plain.size}{_abl(plain)}: gap {plain.gap.text('.3f')} -> "
                     f"{shared.gap.text('.3f')}, top-1 {plain.top1.text(unit='%')} -> {shared.top1.text(unit='%')}; "
                     f"{c.text} => {c.outcome}")
    for ms, ss in _pairs(groups, "layout", ("ms", "ss"), ("mlp",)):
        if ms.gap is None or ss.gap is None:
            continue
        c = compare(ss.gap, ms.gap, "gap SS - MS")
        outcomes.append(c.outcome)
        lines.append(f"multi-stage, mlp {ms.size}{_abl(ms)}: gap SS {ss.gap.text('.3f')} vs MS "
                     f"{ms.gap.text('.3f')}; {c.text} => {c.outcome}")
    return Finding(3, "MLPs overfit when scaled; the multi-stage layout and weight sharing of the spatial MLP "
                      "reduce it (gap = final val loss - final train loss).", _verdict(outcomes), lines)


def conv_vs_attention(groups: list[Group]) -> Finding:
    lines, outcomes = [], []
    for conv in _by(groups, family="conv", cpe=True, shared=False):
        attn = _one(groups, family="attn", layout=conv.layout, size=conv.size, cpe=True, shared=False)
        if attn is None or conv.gap is None or attn.gap is None:
            continue
        cap = compare(conv.train_loss, attn.train_loss, "train loss conv - attn")
        gen = compare(attn.gap, conv.gap, "gap attn - conv")
        for c, what in ((cap, "attention fits the training data better (capacity)"),
                        (gen, "conv generalises better (smaller gap)")):
            outcomes.append(c.outcome)
            lines.append(f"{conv.layout} {conv.size}: {what}: train loss conv {conv.train_loss.text('.3f')} vs "
                         f"attn {attn.train_loss.text('.3f')}, gap conv {conv.gap.text('.3f')} vs attn "
                         f"{attn.gap.text('.3f')}; {c.text} => {c.outcome}")
    return Finding(4, "Conv generalises best, attention has the most capacity (complementary).",
                   _verdict(outcomes), lines)


def hybrids_win(groups: list[Group]) -> Finding:
    lines, outcomes = [], []
    for hyb in _by(groups, family="hybrid"):
        if hyb.top1 is None:
            continue
        rivals = [g for f in ("conv", "attn") if (g := _one(groups, family=f, layout=hyb.layout, size=hyb.size,
                                                             cpe=True, shared=False)) is not None]
        if not rivals:
            continue
        best = max(rivals, key=lambda g: g.top1.mean)
        c = compare(hyb.top1, best.top1, f"top-1 hybrid - {best.family}", " pt")
        outcomes.append(c.outcome)
        lines.append(f"{hyb.layout} {hyb.size}: hybrid {hyb.top1.text(unit='%')} vs best single family {best.family} "
                     f"{best.top1.text(unit='%')} ({_costs(hyb, best)}); {c.text} => {c.outcome}")
    return Finding(5, "Hybrids win: a multi-stage conv model whose late blocks are attention beats both parents.",
                   _verdict(outcomes), lines)


def _abl(g: Group) -> str:
    return ("" if g.cpe else " no-CPE") + (" shared" if g.shared else "")


# --------------------------------------------------------------------------- the newcomers

PAPER_FAMILIES = ("conv", "attn", "mlp", "hybrid")
AXIAL_MLPS = ("smlp",)   # token MLPs restricted to one axis at a time (sMLPNet)


def weight_free(family: str) -> bool | None:
    """Does the registered mixer ``family`` have no weights (pool, shift)? None if it is not registered here
    (a plugin the reporting process has not imported)."""
    import torch

    from spach.models.registry import get_mixer

    try:
        info = get_mixer(family)
        with torch.device("meta"):
            module = info.build(16, dict(num_heads=1, grid_size=(8, 8), token_ratio=0.5, qkv_bias=True, qk_scale=None,
                                         attn_drop=0.0, drop=0.0, block_index=0, stage_index=1, stage_depth=1,
                                         shared=False))
    except Exception:  # noqa: BLE001 — unknown here, or not buildable at this probe size
        return None
    return module is not None and not any(True for _ in module.parameters())


def _newcomer_lines(new: Group, groups: list[Group]) -> list[tuple[str, Comparison]]:
    """(finding, comparison, side) of one newcomer against the paper families of its layout and size."""
    peer = {f: _one(groups, family=f, layout=new.layout, size=new.size, cpe=True, shared=False)
            for f in ("conv", "attn", "mlp")}
    out = []
    attn, conv, mlp = peer["attn"], peer["conv"], peer["mlp"]
    if attn is not None and weight_free(new.family):
        out.append(("a weight-free mixer plus CPE matches attention",
                    compare(new.top1, attn.top1, f"top-1 {new.family} - attn", " pt")))
    if mlp is not None and new.family in AXIAL_MLPS and new.gap is not None and mlp.gap is not None:
        out.append(("the axial MLP overfits less than the full token MLP",
                    compare(mlp.gap, new.gap, f"gap mlp - {new.family}")))
    if conv is not None and new.gap is not None and conv.gap is not None:
        out.append(("conv generalises best (its gap is smaller)",
                    compare(new.gap, conv.gap, f"gap {new.family} - conv")))
    if attn is not None and new.train_loss is not None and attn.train_loss is not None:
        out.append(("attention has the most capacity (lower train loss)",
                    compare(new.train_loss, attn.train_loss, f"train loss {new.family} - attn")))
    return [(claim, c) for claim, c in out if c is not None]


def newcomers_vs_findings(groups: list[Group]) -> Finding:
    lines, outcomes = [], []
    for new in _by(groups, cpe=True, shared=False):
        if new.family in PAPER_FAMILIES or new.top1 is None:
            continue
        for claim, c in _newcomer_lines(new, groups):
            outcomes.append(c.outcome)
            lines.append(f"{new.family} {new.layout} {new.size} — {claim}: {c.text} => {c.outcome}")
    return Finding(6, "The newcomers (mixers after the paper) fall on the paper's side of its findings: a "
                      "weight-free mixer plus CPE matches attention, the axial MLP overfits less than the full "
                      "token MLP, conv still generalises best and attention still has the most capacity.",
                   _verdict(outcomes), lines)


# --------------------------------------------------------------------------- the ranking

def pareto_front(groups: list[Group], cost: Callable[[Group], float | None], lower_is_better: bool = True) -> set[str]:
    """Names of the groups no other group beats on both mean top-1 and ``cost`` (ties on both keep both)."""
    pts = [(g.name, g.top1.mean, cost(g)) for g in groups if g.top1 is not None and cost(g) is not None]
    sign = 1.0 if lower_is_better else -1.0
    front = set()
    for name, acc, c in pts:
        dominated = any(a >= acc and sign * x <= sign * c and (a > acc or sign * x < sign * c)
                        for other, a, x in pts if other != name)
        if not dominated:
            front.add(name)
    return front


def macs_of(g: Group) -> float | None:
    return g.macs


def speed_of(g: Group) -> float | None:
    return g.images_per_s.mean if g.images_per_s is not None else None


FINDINGS: list[Callable[[list[Group]], Finding]] = [
    multistage_beats_singlestage, local_modelling, mlp_overfitting, conv_vs_attention, hybrids_win,
    newcomers_vs_findings]


def evaluate_findings(groups: list[Group]) -> list[Finding]:
    return [f(groups) for f in FINDINGS]


# --------------------------------------------------------------------------- what the analyses add

def _pct(s: Stat | None) -> str:
    return "—" if s is None else s.text(".1f", "%")


def analysis_evidence(groups: list[Group], summary: dict) -> dict[int, list[str]]:
    """Lines citing the Analysis section's measurements, per finding number (verdicts stay accuracy-based).

    `summary` is `spach.battle.analysis_section.summarize`'s: per group Stats (erf50 = the 50% ERF area in % per stage,
    with erf_strides; mce, fourier_high, attn_dist) and the cross-group CKA of the final blocks.
    """
    per, cka = summary.get("groups", {}), summary.get("cka_final", {})
    out: dict[int, list[str]] = {}
    for on, off in _pairs(groups, "cpe", (True, False), ("attn", "mlp")):
        a, b = per.get(on.name, {}), per.get(off.name, {})
        if a.get("erf50") and b.get("erf50") and len(a["erf50"]) == len(b["erf50"]):
            cs = [compare(x, y, "") for x, y in zip(a["erf50"], b["erf50"])]
            larger = sum(c is not None and c.decisive and c.diff > 0 for c in cs)
            smaller = sum(c is not None and c.decisive and c.diff < 0 for c in cs)
            out.setdefault(2, []).append(
                f"analysis: 50% ERF area by stage (stride {', '.join(f'/{st}' for st in a.get('erf_strides', []))}), "
                f"{on.name} {_series(a['erf50'])} vs {off.name} {_series(b['erf50'])}: with CPE decisively larger at "
                f"{larger}, smaller at {smaller} of {len(cs)} stages")
        if a.get("attn_dist") and b.get("attn_dist"):
            c = compare(a["attn_dist"], b["attn_dist"], "distance with - without CPE", " px")
            out.setdefault(2, []).append(
                f"analysis: mean attention distance {on.name} {a['attn_dist'].text('.2f', ' px')} vs without CPE "
                f"{b['attn_dist'].text('.2f', ' px')}; {c.text}")
    for conv in _by(groups, family="conv", cpe=True, shared=False):
        for other in _by(groups, layout=conv.layout, size=conv.size, cpe=True, shared=False):
            if other.family not in ("attn", "mlp"):
                continue
            a, b = per.get(conv.name, {}), per.get(other.name, {})
            bits = []
            if a.get("mce") and b.get("mce"):
                c = compare(b["mce"], a["mce"], f"mCE {other.family} - conv")
                bits.append(f"mCE conv {_pct(a['mce'])} vs {other.family} {_pct(b['mce'])} ({c.text})")
            if a.get("fourier_high") and b.get("fourier_high"):
                bits.append(f"high-frequency Fourier error conv {_pct(a['fourier_high'])} vs {other.family} "
                            f"{_pct(b['fourier_high'])}")
            if (conv.name, other.name) in cka:
                bits.append(f"CKA of the final blocks {cka[(conv.name, other.name)]:.2f}")
            if bits:  # conv vs attention bears on finding 4, conv vs MLP on the MLPs' generalisation (3)
                out.setdefault(4 if other.family == "attn" else 3, []).append(
                    f"analysis ({conv.layout} {conv.size}, conv vs {other.family}): " + "; ".join(bits))
    for hyb in _by(groups, family="hybrid"):
        sims = [f"{g.family} {cka[(hyb.name, g.name)]:.2f}" for g in groups
                if g.family in ("conv", "attn") and (hyb.name, g.name) in cka]
        if sims:
            out.setdefault(5, []).append(f"analysis: CKA of {hyb.name}'s final block with " + ", ".join(sims))
    return out


def _series(stats: list[Stat | None]) -> str:
    return "[" + ", ".join("—" if s is None else f"{s.mean:.1f}" for s in stats) + "]%"
