"""The looks of a sequential study (``spach battle --until-decisive``): its design, and its findings replayed
look by look from the database.

A sequential study starts from the study's seeds (look 1) and, after each look, adds one seed to every
architecture of a comparison that is still unresolved and that ``max_seeds`` seeds per side could resolve
by its seeds-needed figure (measured variances, the study's power), up to ``max_seeds`` per architecture: at most
``K = max_seeds - base + 1`` looks. Every look tests all the report's comparisons as one Holm family at
level ``alpha_k`` from :func:`spach.battle.stats.spending` (alpha / K each). A comparison's verdict is
the one of the first look that resolves it (supported, contradicted, equivalent); unresolved ones keep
the last look's numbers. A false verdict anywhere means a false rejection at some look, whose
probability is at most ``sum(alpha_k) = alpha`` (the union bound, whatever the dependence between the
looks), so the report's family-wise error stays at most alpha despite the repeated looks.

The design is stored in the study database (meta ``sequential``): the levels, and the run keys each
round added; the report replays the looks from it.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Any, Callable

from spach.battle.findings import Finding, Settings, evaluate_findings

RESOLVED = ("supported", "contradicted", "equivalent")


def design(alpha: float, base_seeds: int, max_seeds: int) -> dict[str, Any]:
    """A sequential design: {"alpha", "max_seeds", "looks", "alpha_per_look", "rounds": []}."""
    from spach.battle.stats import spending

    if max_seeds <= base_seeds:
        raise ValueError(f"--max-seeds {max_seeds} must exceed the study's seeds per architecture ({base_seeds}): "
                         "there would be no seed to add")
    looks = max_seeds - base_seeds + 1
    return {"alpha": alpha, "max_seeds": max_seeds, "looks": looks, "alpha_per_look": spending(alpha, looks),
            "rounds": []}


def identity(number: int, context: str, t) -> tuple:
    """What names one comparison across looks (its groups and label, not its numbers)."""
    return number, t.a.name, t.b.name, t.label, context.split(":")[0]


def replay(runs: list[dict], groups_of: Callable[[list[dict]], list], settings: Settings,
           plan: dict[str, Any]) -> list[Finding]:
    """The findings of a sequential study: look k sees the planned runs and those of rounds < k, tested at
    that look's level; each comparison keeps the first look that resolves it (noted on its line)."""
    added = {key: i + 1 for i, keys in enumerate(plan["rounds"]) for key in keys}
    final: list[Finding] | None = None
    first: dict[tuple, tuple[int, str, Any]] = {}
    n_looks = len(plan["rounds"]) + 1
    for k in range(n_looks):
        seen = [r for r in runs if added.get(r["key"], 0) <= k]
        level = plan["alpha_per_look"][min(k, len(plan["alpha_per_look"]) - 1)]
        findings = evaluate_findings(groups_of(seen), replace(settings, alpha=level))
        for f in findings:
            for context, t in f.items:
                key = identity(f.number, context, t)
                if key not in first and t.verdict in RESOLVED:
                    first[key] = (k, context, t)
        final = findings
    for f in final or []:
        items = []
        for context, t in f.items:
            k, context, t = first.get(identity(f.number, context, t), (n_looks - 1, context, t))
            t.note = (t.note + "; " if t.note else "") + (f"look {k + 1} of at most {plan['looks']}, level "
                                                          f"{plan['alpha_per_look'][k]:.3g}")
            items.append((context, t))
        f.items = items
        f.conclude()
    return final or []


def unresolved_groups(findings: list[Finding], max_seeds: int) -> set[str]:
    """Names of the architectures in a comparison that no look has resolved and that `max_seeds` seeds per side
    could resolve, by its seeds-needed figure (the ones that get a seed: none go where they resolve nothing)."""
    return {g.name for f in findings for t in f.tests if t.verdict == "underpowered"
            and t.needed is not None and t.needed <= max_seeds for g in (t.a, t.b)}
