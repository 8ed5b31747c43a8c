"""Test the paper's findings (docs/battle.md, "The report") against a study's results — each with a stated error rate.

Results are aggregated per *group* (one architecture: family × layout × size ×
ablation) over its seeds. Every claim of the paper becomes one or more *tests*
between two groups (:class:`Comparison`): top-1 comparisons use the per-example
evidence of the runs (`spach.battle.stats.compare`: paired over the shared
validation images, both seed-to-seed and example-sampling noise in the
interval); the generalisation gap and the train loss are per-seed numbers
(`spach.battle.stats.compare_seeds`, across seeds only). A report's tests form
one family: their p-values (and the equivalence tests' p-values) are adjusted by
Holm's step-down method, so the probability that *any* verdict of the report
is a false difference (or a false equivalence) is at most ``alpha``.

A test's verdict: **supported** (Holm-adjusted p < alpha in the claimed
direction), **contradicted** (in the other direction), **equivalent** (the
TOST equivalence test within ±margin rejects at the adjusted level), or
**underpowered** (none of these; the report says how many seeds per side would
resolve it at the stated power). A finding's verdict is its tests' common
verdict, "mixed: …" otherwise, and "not covered by this study" when the grid
cannot address it. Mixers after the paper (the arena's newcomers and plugins)
are placed on each side of the paper's findings with the same tests (finding
6); :func:`pareto_front` ranks families by top-1 against MACs and against
throughput.

The generalisation gap of a run is `final val loss - final train loss` (the
train loss is measured under the study's augmentation, identical for every run
of a study, so gaps compare across architectures of one study).
"""
from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field, replace
from typing import Any, Callable

import numpy as np

from spach.battle import stats
from spach.battle.schema import Arch, HasArch, Statistics, defaults

COST_TOLERANCE = 1.10   # "no more costly": params and MACs within 10%


@dataclass
class Stat:
    mean: float
    std: float | None      # sample std over seeds; None with one seed
    n: int
    values: tuple[float, ...] = ()   # the per-seed values themselves

    @staticmethod
    def of(values: list[float]) -> "Stat | None":
        values = [float(v) for v in values if v is not None and math.isfinite(v)]
        if not values:
            return None
        return Stat(statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None, len(values),
                    tuple(values))

    def text(self, fmt: str = ".2f", unit: str = "") -> str:
        if self.std is None:
            return f"{self.mean:{fmt}}{unit} (1 seed)"
        return f"{self.mean:{fmt}} ± {self.std:{fmt}}{unit} (sd, {self.n} seeds)"


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
    correct: np.ndarray | None = None   # (seeds, examples) bool: per-example evidence of every seed, or None
    targets_sha: str | None = None      # which validation images, in which order (runs pair only when equal)
    weight_free: bool | None = None     # the mixer has no weights (pool, shift); None: not known
    top1_ci: tuple[float, float, float] | None = None   # (mean, low, high) 95% of top-1 (the report's aggregate)

    @property
    def baseline(self) -> bool:
        return self.cpe and not self.shared


@dataclass
class Settings:
    """How the report tests (the study's ``statistics:`` section, `spach.battle.schema.Statistics`)."""

    alpha: float = 0.05
    margin: float | None = 1.0         # top-1 equivalence margin, points
    loss_margin: float | None = None   # equivalence margin of train loss and gap
    power: float = 0.8
    min_effect: float | None = None    # top-1 effect the seeds-needed figures aim at (None: the observed one)

    @staticmethod
    def of(section: dict[str, Any] | None) -> "Settings":
        return Settings(**dict(defaults(Statistics), **(section or {})))


@dataclass
class Comparison:
    """One test a finding makes: quantity of group ``a`` minus that of ``b``, and what the claim expects
    (``expect`` ">": a - b > 0; "=": a and b equivalent). Filled in by :func:`settle`."""

    label: str
    quantity: str                 # "top-1" | "gap" | "train loss"
    unit: str
    a: Group
    b: Group
    expect: str
    result: stats.Result | None   # None: a side has fewer than two seeds
    evidence: str                 # "per-example" or why the test is across seeds only
    blocked: dict[int, str] = field(default_factory=dict)   # sign of diff -> why that direction gets no verdict
    p_adj: float = math.nan
    p_equivalence_adj: float | None = None
    verdict: str = ""
    note: str = ""                # why the verdict is what it is (cost), or the seeds that would resolve it
    needed: int | None = None     # seeds per side that would resolve an underpowered test (None: none feasible)

    @property
    def tested(self) -> bool:
        return self.result is not None

    def text(self) -> str:
        if self.result is None:
            return (f"{self.label}: one seed on a side ({len(self.a.seeds)}+{len(self.b.seeds)}): no test, at least "
                    f"2 seeds per side are needed => {self.verdict}")
        r, u = self.result, self.unit
        fmt = ".2f" if self.quantity == "top-1" else ".3f"
        out = (f"{self.label}: {r.diff:+{fmt}}{u}, {100 * (1 - r.alpha):g}% CI [{r.ci[0]:+{fmt}}, {r.ci[1]:+{fmt}}]{u}, "
               f"p = {r.p:.2g} (Holm {self.p_adj:.2g})")
        if self.p_equivalence_adj is not None:
            out += f", equivalence within ±{r.delta:g}{u}: p = {r.p_equivalence:.2g} (Holm {self.p_equivalence_adj:.2g})"
        out += f"; seeds {r.n_seeds[0]}+{r.n_seeds[1]}, {self.evidence} => {self.verdict}"
        return out + (f" ({self.note})" if self.note else "")


@dataclass
class Finding:
    number: int
    claim: str
    verdict: str = ""
    items: list[tuple[str, Comparison]] = field(default_factory=list)   # (context, test)
    notes: list[str] = field(default_factory=list)   # what the finding could not test, and why
    lines: list[str] = field(default_factory=list)   # the report's lines (`conclude`)

    def add(self, context: str, t: Comparison | None) -> None:
        if t is not None:
            self.items.append((context, t))

    @property
    def tests(self) -> list[Comparison]:
        return [t for _, t in self.items]

    def conclude(self) -> None:
        """The verdict and the report's lines, from the settled tests (`settle`) and the notes."""
        self.verdict = combine(self.tests)
        self.lines = [f"{context}; {t.text()}" for context, t in self.items] + self.notes


# --------------------------------------------------------------------------- the tests

def _values(s: Stat | None) -> np.ndarray:
    return np.asarray(s.values if s is not None else (), dtype=float)


def compare_groups(a: Group, b: Group, quantity: str, label: str, expect: str, settings: Settings) -> Comparison | None:
    """The test of `quantity` ("top-1", "gap" or "train loss") of a minus b; None when a side has no value.

    Top-1 is tested on the per-example evidence when every seed of both sides has it on the same
    validation images, across seeds otherwise (an older database; the test then says so)."""
    attr = {"top-1": "top1", "gap": "gap", "train loss": "train_loss"}[quantity]
    sa, sb = getattr(a, attr), getattr(b, attr)
    if sa is None or sb is None:
        return None
    unit = " pt" if quantity == "top-1" else ""
    if sa.n < 2 or sb.n < 2:
        return Comparison(label, quantity, unit, a, b, expect, None, "")
    if quantity == "top-1" and a.correct is not None and b.correct is not None and a.targets_sha == b.targets_sha:
        result = stats.compare(a.correct, b.correct, alpha=settings.alpha, delta=settings.margin)
        evidence = f"per-example on {a.correct.shape[1]} validation images"
    else:
        delta = settings.margin if quantity == "top-1" else settings.loss_margin
        result = stats.compare_seeds(_values(sa), _values(sb), alpha=settings.alpha, delta=delta)
        evidence = "across seeds only" + (" (no per-example evidence for both sides: a database of an older "
                                          "spach, or unreadable validation images)" if quantity == "top-1" else "")
    return Comparison(label, quantity, unit, a, b, expect, result, evidence)


def settle(tests: list[Comparison], settings: Settings) -> None:
    """Holm-adjust every p-value of the report's tests (differences and equivalences, one family) and give
    each test its verdict; for unresolved ones, the seeds per side that would resolve them."""
    tested = [t for t in tests if t.tested]
    ps = [t.result.p for t in tested] + [t.result.p_equivalence for t in tested if t.result.p_equivalence is not None]
    adjusted = list(stats.holm(np.asarray(ps, dtype=float))) if ps else []
    equivalence = iter(adjusted[len(tested):])
    for t, p_adj in zip(tested, adjusted):
        t.p_adj = float(p_adj)
        if t.result.p_equivalence is not None:
            t.p_equivalence_adj = float(next(equivalence))
    for t in tests:
        t.verdict, t.note = _verdict_of(t, settings.alpha)
        if t.verdict == "underpowered":
            t.note, t.needed = _seeds_needed(t, settings, max(1, len(ps)))


def _verdict_of(t: Comparison, alpha: float) -> tuple[str, str]:
    if not t.tested:
        return "underpowered", ""
    different = t.p_adj < alpha
    equivalent = t.p_equivalence_adj is not None and t.p_equivalence_adj < alpha
    sign = 1 if t.result.diff > 0 else -1
    if different and sign in t.blocked:
        return "not comparable", t.blocked[sign]
    if t.expect == "=":
        return ("contradicted" if different else "supported" if equivalent else "underpowered"), ""
    if different:
        return ("supported" if sign > 0 else "contradicted"), ""
    return ("equivalent" if equivalent else "underpowered"), ""


def _seeds_needed(t: Comparison, settings: Settings, n_tests: int) -> tuple[str, int | None]:
    """('N seeds per side would resolve ...', N): at level alpha / n_tests (the strictest level Holm may demand),
    at the study's power, from the measured variances; N is None when no feasible number would."""
    if not t.tested:
        return "at least 2 seeds per side are needed for any test", 2
    level = settings.alpha / n_tests
    if t.expect == "=":
        effect, what = (settings.margin if t.quantity == "top-1" else settings.loss_margin), "a difference of"
    elif t.quantity == "top-1" and settings.min_effect is not None:
        effect, what = settings.min_effect, "the stated minimum effect,"
    else:
        effect, what = abs(t.result.diff), "the observed effect,"
    if not effect:
        return "no equivalence margin is set for this quantity (statistics.loss_margin)", None
    if t.quantity == "top-1" and t.a.correct is not None and t.b.correct is not None and t.evidence.startswith("per"):
        n = stats.seeds_needed(t.a.correct, t.b.correct, effect=effect, alpha=level, power=settings.power)
    else:
        attr = {"top-1": "top1", "gap": "gap", "train loss": "train_loss"}[t.quantity]
        n = stats.seeds_needed_seeds(_values(getattr(t.a, attr)), _values(getattr(t.b, attr)), effect=effect,
                                     alpha=level, power=settings.power)
    size = f"{what} {effect:.3g}{t.unit}"
    if n is None:
        return f"no feasible number of seeds resolves {size} at {settings.power:.0%} power (level {level:.2g})", None
    return (f"~{n} seeds per side would resolve {size} at {settings.power:.0%} power (level alpha/{n_tests} = "
            f"{level:.2g})", n)


def combine(tests: list[Comparison]) -> str:
    """A finding's verdict from its tests' verdicts."""
    if not tests:
        return "not covered by this study"
    counts = {v: sum(t.verdict == v for t in tests) for v in
              ("supported", "contradicted", "equivalent", "underpowered", "not comparable")}
    present = {v: c for v, c in counts.items() if c}
    if len(present) == 1:
        return next(iter(present))
    return "mixed: " + ", ".join(f"{v} in {c}" for v, c in present.items()) + f" of {len(tests)} comparisons"


# --------------------------------------------------------------------------- pairing groups

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


def _abl(g: Group) -> str:
    return ("" if g.cpe else " no-CPE") + (" shared" if g.shared else "")


# --------------------------------------------------------------------------- the findings

def multistage_beats_singlestage(groups: list[Group], s: Settings) -> Finding:
    f = Finding(1, "Multi-stage beats single-stage for every family and size (accuracy/complexity trade-off).")
    for ms, ss in _pairs(groups, "layout", ("ms", "ss"), ("conv", "attn", "mlp", "hybrid")):
        t = compare_groups(ms, ss, "top-1", "top-1 MS - SS", ">", s)
        if not _no_costlier(ms, ss):
            t.blocked[1] = "MS is the more accurate but also the costlier layout: no trade-off verdict"
        if not _no_costlier(ss, ms):
            t.blocked[-1] = "SS is the more accurate but also the costlier layout: no trade-off verdict"
        f.add(f"{ms.family} {ms.size}{_abl(ms)}: MS {ms.top1.text(unit='%')} vs SS {ss.top1.text(unit='%')} "
              f"(MS/SS {_costs(ms, ss)})", t)
    return f


def local_modelling(groups: list[Group], s: Settings) -> Finding:
    f = Finding(2, "Local modelling is crucial: removing the depthwise-conv branch (CPE) from attention and MLP "
                   "blocks costs accuracy for almost no compute.")
    for on, off in _pairs(groups, "cpe", (True, False), ("attn", "mlp")):
        share = ""
        if on.params and off.params and on.macs and off.macs:
            share = (f"; the conv is {100 * (on.params - off.params) / on.params:.2f}% of params, "
                     f"{100 * (on.macs - off.macs) / on.macs:.2f}% of MACs")
        f.add(f"{on.family} {on.layout} {on.size}{' shared' if on.shared else ''}: with CPE {on.top1.text(unit='%')} "
              f"vs without {off.top1.text(unit='%')}{share}",
              compare_groups(on, off, "top-1", "top-1 with - without CPE", ">", s))
    return f


def mlp_overfitting(groups: list[Group], s: Settings) -> Finding:
    f = Finding(3, "MLPs overfit when scaled; the multi-stage layout and weight sharing of the spatial MLP reduce it "
                   "(gap = final val loss - final train loss).")
    for layout in ("ss", "ms"):  # (a) scaling up an MLP widens its generalisation gap
        mlps = sorted([g for g in _by(groups, family="mlp", layout=layout, cpe=True, shared=False)
                       if g.gap is not None and g.params], key=lambda g: g.params)
        for small, big in zip(mlps, mlps[1:]):
            f.add(f"scaling mlp {layout} {small.size} -> {big.size} ({_costs(big, small)}): gap "
                  f"{small.gap.text('.3f')} -> {big.gap.text('.3f')}",
                  compare_groups(big, small, "gap", "gap larger - smaller", ">", s))
    for shared, plain in _pairs(groups, "shared", (True, False), ("mlp",)):  # (b) weight sharing reduces it
        if shared.gap is not None and plain.gap is not None:
            f.add(f"weight sharing, mlp {plain.layout} {plain.size}{_abl(plain)}: gap {plain.gap.text('.3f')} -> "
                  f"{shared.gap.text('.3f')}", compare_groups(plain, shared, "gap", "gap unshared - shared", ">", s))
    for ms, ss in _pairs(groups, "layout", ("ms", "ss"), ("mlp",)):  # (c) so does the multi-stage layout
        if ms.gap is not None and ss.gap is not None:
            f.add(f"multi-stage, mlp {ms.size}{_abl(ms)}: gap SS {ss.gap.text('.3f')} vs MS {ms.gap.text('.3f')}",
                  compare_groups(ss, ms, "gap", "gap SS - MS", ">", s))
    return f


def conv_vs_attention(groups: list[Group], s: Settings) -> Finding:
    f = Finding(4, "Conv generalises best, attention has the most capacity (complementary).")
    for conv in _by(groups, family="conv", cpe=True, shared=False):
        attn = _one(groups, family="attn", layout=conv.layout, size=conv.size, cpe=True, shared=False)
        if attn is None or conv.gap is None or attn.gap is None:
            continue
        where = (f"{conv.layout} {conv.size}: train loss conv {conv.train_loss.text('.3f')} vs attn "
                 f"{attn.train_loss.text('.3f')}, gap conv {conv.gap.text('.3f')} vs attn {attn.gap.text('.3f')}")
        f.add(f"{where} — attention fits the training data better (capacity)",
              compare_groups(conv, attn, "train loss", "train loss conv - attn", ">", s))
        f.add(f"{where} — conv generalises better (smaller gap)",
              compare_groups(attn, conv, "gap", "gap attn - conv", ">", s))
    return f


def hybrids_win(groups: list[Group], s: Settings) -> Finding:
    f = Finding(5, "Hybrids win: a multi-stage conv model whose late blocks are attention beats both parents.")
    for hyb in _by(groups, family="hybrid"):
        if hyb.top1 is None:
            continue
        for parent in ("conv", "attn"):  # both parents, each its own test (no choice of rival by the data)
            # the attention parent has the hybrid's attention blocks, CPE on or off as the hybrid's (else the
            # test would mix the hybrid's effect with CPE's, finding 2); a conv model is always its own conv
            cpe = True if parent == "conv" else hyb.cpe
            rival = _one(groups, family=parent, layout=hyb.layout, size=hyb.size, cpe=cpe, shared=False)
            if rival is not None:
                f.add(f"{hyb.layout} {hyb.size}: hybrid {hyb.top1.text(unit='%')} vs {parent} "
                      f"{rival.top1.text(unit='%')} ({_costs(hyb, rival)})",
                      compare_groups(hyb, rival, "top-1", f"top-1 hybrid - {parent}", ">", s))
    return f


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


def mixer_facts(families: list[str]) -> dict[str, dict]:
    """{family: {"weight_free": ...}}: the facts about each mixer the findings use, probed from the registry
    of this process (stored in the study database, so that reports never depend on what is registered)."""
    return {f: {"weight_free": weight_free(f)} for f in families}


def _newcomer_tests(new: Group, groups: list[Group], s: Settings) -> list[tuple[str, Comparison]]:
    """(claim, test) of one newcomer against the paper families of its layout and size. Whether the newcomer is
    weight-free is read from the study database (`Group.weight_free`), never from this process's registry."""
    peer = {f: _one(groups, family=f, layout=new.layout, size=new.size, cpe=True, shared=False)
            for f in ("conv", "attn", "mlp")}
    out = []
    attn, conv, mlp = peer["attn"], peer["conv"], peer["mlp"]
    if attn is not None and new.weight_free:
        out.append(("a weight-free mixer plus CPE matches attention",
                    compare_groups(new, attn, "top-1", f"top-1 {new.family} - attn", "=", s)))
    if mlp is not None and new.family in AXIAL_MLPS and new.gap is not None and mlp.gap is not None:
        out.append(("the axial MLP overfits less than the full token MLP",
                    compare_groups(mlp, new, "gap", f"gap mlp - {new.family}", ">", s)))
    if conv is not None and new.gap is not None and conv.gap is not None:
        out.append(("conv generalises best (its gap is smaller)",
                    compare_groups(new, conv, "gap", f"gap {new.family} - conv", ">", s)))
    if attn is not None and new.train_loss is not None and attn.train_loss is not None:
        out.append(("attention has the most capacity (lower train loss)",
                    compare_groups(new, attn, "train loss", f"train loss {new.family} - attn", ">", s)))
    return [(claim, t) for claim, t in out if t is not None]


def newcomers_vs_findings(groups: list[Group], s: Settings) -> Finding:
    f = Finding(6, "The newcomers (mixers after the paper) fall on the paper's side of its findings: a weight-free "
                   "mixer plus CPE matches attention, the axial MLP overfits less than the full token MLP, conv still "
                   "generalises best and attention still has the most capacity.")
    for new in _by(groups, cpe=True, shared=False):
        if new.family in PAPER_FAMILIES or new.top1 is None:
            continue
        if new.weight_free is None and _one(groups, family="attn", layout=new.layout, size=new.size, cpe=True,
                                            shared=False) is not None:
            f.notes.append(f"{new.family}: whether it is weight-free was not recorded in the database (written by an "
                           "older spach): its comparison with attention is not made")
        for claim, t in _newcomer_tests(new, groups, s):
            f.add(f"{new.family} {new.layout} {new.size} — {claim}", t)
    return f


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


FINDINGS: list[Callable[[list[Group], Settings], Finding]] = [
    multistage_beats_singlestage, local_modelling, mlp_overfitting, conv_vs_attention, hybrids_win,
    newcomers_vs_findings]


def evaluate_findings(groups: list[Group], settings: Settings | None = None) -> list[Finding]:
    """Every finding with its tests settled as one Holm family, its verdict and its lines."""
    settings = settings or Settings()
    findings = [f(groups, settings) for f in FINDINGS]
    settle([t for f in findings for t in f.tests], settings)
    for f in findings:
        f.conclude()
    return findings


# --------------------------------------------------------------------------- what the analyses add

def _pct(s: Stat | None) -> str:
    return "—" if s is None else s.text(".1f", "%")


def _descriptive(a: Stat | None, b: Stat | None, label: str, unit: str = "") -> tuple[str, float, float] | None:
    """(text, diff, p) of a - b by Welch's t across seeds, NOT multiplicity-adjusted: the analyses' numbers are
    cited as descriptive evidence, outside the report's family of tests (None: a side has < 2 seeds)."""
    if a is None or b is None or a.n < 2 or b.n < 2:
        return None
    r = stats.compare_seeds(_values(a), _values(b))
    return f"{label}: {r.diff:+.3f}{unit}, Welch p = {r.p:.2g} (across seeds, unadjusted)", r.diff, r.p


def analysis_evidence(groups: list[Group], summary: dict) -> dict[int, list[str]]:
    """Lines citing the Analysis section's measurements, per finding number (verdicts stay those of the report's
    tests: these comparisons are descriptive, their p-values unadjusted).

    `summary` is `spach.battle.analysis_section.summarize`'s: per group Stats (erf50 = the 50% ERF area in % per stage,
    with erf_strides; mce, fourier_high, attn_dist) and the cross-group CKA of the final blocks.
    """
    per, cka = summary.get("groups", {}), summary.get("cka_final", {})
    out: dict[int, list[str]] = {}
    for on, off in _pairs(groups, "cpe", (True, False), ("attn", "mlp")):
        a, b = per.get(on.name, {}), per.get(off.name, {})
        if a.get("erf50") and b.get("erf50") and len(a["erf50"]) == len(b["erf50"]):
            cs = [_descriptive(x, y, "") for x, y in zip(a["erf50"], b["erf50"])]
            larger = sum(c is not None and c[2] < 0.05 and c[1] > 0 for c in cs)
            smaller = sum(c is not None and c[2] < 0.05 and c[1] < 0 for c in cs)
            out.setdefault(2, []).append(
                f"analysis: 50% ERF area by stage (stride {', '.join(f'/{st}' for st in a.get('erf_strides', []))}), "
                f"{on.name} {_series(a['erf50'])} vs {off.name} {_series(b['erf50'])}: with CPE larger at "
                f"{larger}, smaller at {smaller} of {len(cs)} stages (Welch p < 0.05 per stage, unadjusted)")
        if a.get("attn_dist") and b.get("attn_dist"):
            c = _descriptive(a["attn_dist"], b["attn_dist"], "distance with - without CPE", " px")
            out.setdefault(2, []).append(
                f"analysis: mean attention distance {on.name} {a['attn_dist'].text('.2f', ' px')} vs without CPE "
                f"{b['attn_dist'].text('.2f', ' px')}" + (f"; {c[0]}" if c else ""))
    for conv in _by(groups, family="conv", cpe=True, shared=False):
        for other in _by(groups, layout=conv.layout, size=conv.size, cpe=True, shared=False):
            if other.family not in ("attn", "mlp"):
                continue
            a, b = per.get(conv.name, {}), per.get(other.name, {})
            bits = []
            if a.get("mce") and b.get("mce"):
                c = _descriptive(b["mce"], a["mce"], f"mCE {other.family} - conv")
                bits.append(f"mCE conv {_pct(a['mce'])} vs {other.family} {_pct(b['mce'])}" + (f" ({c[0]})" if c else ""))
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
