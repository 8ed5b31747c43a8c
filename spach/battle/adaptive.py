"""``spach battle STUDY --until-decisive [--max-seeds N]``: seeds where they resolve something.

After the study's own runs (look 1), every architecture in a comparison that is still unresolved — and
that N seeds per side could resolve, by its seeds-needed figure — gets its next seed (the next integer after its largest), the study runs again, and the comparisons are
re-tested — until each one is resolved or its architectures have N seeds. The looks and their levels
are those of `spach.battle.looks` (alpha spent equally over the looks, so the report's family-wise
error stays at most alpha). Resumable like every battle: each round's decisions depend only on the
database, so a restarted coordinator replays them and continues where the last one stopped; it runs
with whatever launcher the study uses.

A study with `tune:` is tuned once (the trials are done at the first look and never repeated); every seed
a round adds is trained with its architecture's best configuration, like the study's own final runs
(`spach.battle.tune.final_runs`), so the looks compare the tuned architectures throughout.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import replace
from pathlib import Path
from typing import Any

from spach.battle import db
from spach.battle.findings import Settings
from spach.battle.looks import design, replay, unresolved_groups
from spach.battle.report import aggregate, load_results, write_report
from spach.battle.runner import run_study
from spach.battle.spec import Study, with_seed


def run_until_decisive(study: Study, out_dir: str | Path, max_seeds: int | None = None,
                       **run_kwargs: Any) -> dict[str, Any]:
    """Run `study`, then add seeds round by round (see the module doc), up to `max_seeds` per architecture
    (default: the study's largest seed count + 3); returns the last round's status counts and "rounds": the run names each
    round added."""
    out_dir = Path(out_dir)
    by_group: dict[str, list] = defaultdict(list)
    for r in study.runs:
        by_group[r.group].append(r)
    base = min(len(rs) for rs in by_group.values())
    max_seeds = max_seeds if max_seeds is not None else max(len(rs) for rs in by_group.values()) + 3
    plan = design(study.statistics.get("alpha", 0.05), base, max_seeds)
    settings = Settings.of(study.statistics)
    added_names: list[list[str]] = []
    while True:
        result = run_study(study, out_dir, report=False, **run_kwargs)
        _record(out_dir, plan)
        data = load_results(out_dir)
        findings = replay(data["runs"], lambda rs: aggregate(rs, data["evidence"], data["mixer_facts"]),
                          settings, plan)
        grow = sorted(g for g in unresolved_groups(findings, max_seeds) if len(by_group[g]) < max_seeds)
        if not grow or len(plan["rounds"]) + 1 >= plan["looks"]:
            break
        new = [with_seed(by_group[g][0], max(r.seed for r in by_group[g]) + 1) for g in grow]
        for run in new:
            by_group[run.group].append(run)
        study.runs.extend(new)
        plan["rounds"].append([r.key for r in _as_trained(study, new, out_dir)])
        added_names.append([r.name for r in new])
        _record(out_dir, plan)
    write_report(out_dir)
    return dict(result, rounds=added_names)


def _as_trained(study: Study, runs: list, out_dir: Path) -> list:
    """The runs as the study trains them: with their architecture's tuned recipe when it has `tune:`."""
    if not study.tune:
        return runs
    from spach.battle.tune import final_runs
    return final_runs(replace(study, runs=runs), out_dir).runs


def _record(out_dir: Path, plan: dict[str, Any]) -> None:
    conn = db.connect(out_dir)
    try:
        db.set_meta(conn, "sequential", plan)
    finally:
        conn.close()
