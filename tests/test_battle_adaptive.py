"""`--until-decisive`: seeds added only where a comparison is unresolved, error controlled over the looks,
resumable, and reported."""
from __future__ import annotations

import json
import sqlite3

import numpy as np
import pytest

from spach.battle import load_study
from spach.battle.adaptive import run_until_decisive
from spach.battle.looks import design
from spach.battle.stats import compare, spending
from test_battle_run import micro


def test_the_adaptive_rule_keeps_its_error_rate_over_the_looks():
    """A/A studies run by the rule of `spach.battle.looks` (start at 2 seeds, one more per look while
    unresolved, up to 5, each look at alpha/K): the rate of any false difference stays <= alpha."""
    rng = np.random.default_rng(2024)
    alpha, base, top, m, trials = 0.05, 2, 5, 400, 1500
    levels = design(alpha, base, top)["alpha_per_look"]
    difficulty = rng.normal(1.0, 1.5, m)
    false = 0
    for _ in range(trials):
        def seed_runs(n):
            shift = rng.normal(0.0, 0.05, (n, 1))
            return rng.random((n, m)) < 1 / (1 + np.exp(-(difficulty + shift)))
        a, b = seed_runs(base), seed_runs(base)
        for level in levels:
            if compare(a, b, alpha=level).p < level:
                false += 1
                break
            a, b = np.vstack([a, seed_runs(1)]), np.vstack([b, seed_runs(1)])
    bound = alpha + 3.1 * np.sqrt(alpha * (1 - alpha) / trials)  # one-sided 99.9% binomial tolerance
    assert false / trials <= bound, (false / trials, bound)


def test_the_design_spends_alpha_over_the_looks_and_needs_room_for_a_seed():
    plan = design(0.05, 2, 5)
    assert plan["looks"] == 4 and sum(plan["alpha_per_look"]) == pytest.approx(0.05)
    assert plan["alpha_per_look"] == spending(0.05, 4)
    with pytest.raises(ValueError, match="--max-seeds 2 must exceed the study's seeds per architecture \\(2\\)"):
        design(0.05, 2, 2)


@pytest.mark.slow
def test_until_decisive_adds_seeds_only_where_unresolved_and_resumes(tmp_path):
    spec = micro(grid={"family": ["conv", "attn"], "layout": ["ss"], "size": ["nano"], "seed": [0, 1]},
                 extra=[], threads=1)
    spec["recipe"]["epochs"] = 1
    out = tmp_path / "out"
    result = run_until_decisive(load_study(spec), out, max_seeds=3, workers=2, quiet=True)
    conn = sqlite3.connect(out / "battle.db")
    conn.row_factory = sqlite3.Row
    runs = {r["name"]: dict(r) for r in conn.execute("SELECT * FROM runs")}
    plan = json.loads(conn.execute("SELECT v FROM meta WHERE k = 'sequential'").fetchone()[0])
    conn.close()
    added = [n for names in result["rounds"] for n in names]
    assert plan["looks"] == 2 and len(plan["rounds"]) == len(result["rounds"]) <= 1
    assert all(name.endswith("-s2") for name in added)  # the next integer after the study's seeds
    assert {n for n, r in runs.items() if r["seed"] == 2} == set(added)
    assert all(r["status"] == "done" for r in runs.values())
    report = (out / "report.md").read_text()
    assert "Seeds were added adaptively (`--until-decisive --max-seeds 3`)" in report
    assert "look 1 of at most 2" in report or "look 2 of at most 2" in report
    attempts = {n: r["attempts"] for n, r in runs.items()}
    again = run_until_decisive(load_study(spec), out, max_seeds=3, workers=2, quiet=True)  # resume: nothing re-run
    assert again["rounds"] == result["rounds"]
    conn = sqlite3.connect(out / "battle.db")
    assert {n: a for n, a in conn.execute("SELECT name, attempts FROM runs")} == attempts
    conn.close()


@pytest.mark.slow
def test_until_decisive_tunes_once_and_trains_every_added_seed_with_the_tuned_recipe(tmp_path, monkeypatch):
    """With `tune:` the trials run at the first look only; the seeds a round adds (here: every architecture,
    the seeds-needed gate is tested above) are trained with their architecture's best parameters, and the
    design records the keys of those tuned runs."""
    import spach.battle.adaptive as adaptive
    from test_tune import db_rows, tiny

    monkeypatch.setattr(adaptive, "unresolved_groups", lambda findings, max_seeds: ["attn-ms-t", "conv-ms-t"])
    out = tmp_path / "out"
    result = run_until_decisive(load_study(tiny(trials=2)), out, max_seeds=3, workers=2, quiet=True)
    trials = db_rows(out, "SELECT grp, number, state, params, value FROM trials")
    assert sorted((t["grp"], t["number"], t["state"]) for t in trials) == [
        (g, n, "complete") for g in ("attn-ms-t", "conv-ms-t") for n in (0, 1)]
    best = {}
    for t in trials:
        if t["grp"] not in best or t["value"] > best[t["grp"]]["value"]:
            best[t["grp"]] = t
    assert result["rounds"] == [["attn-ms-t-s2", "conv-ms-t-s2"]]
    runs = {r["name"]: r for r in db_rows(out, "SELECT name, key, grp, status, config FROM runs")}
    plan = json.loads(db_rows(out, "SELECT v FROM meta WHERE k = 'sequential'")[0]["v"])
    assert sorted(plan["rounds"][0]) == sorted(runs[n]["key"] for n in result["rounds"][0])
    for name in ("attn-ms-t-s0", "attn-ms-t-s1", "attn-ms-t-s2", "conv-ms-t-s0", "conv-ms-t-s1", "conv-ms-t-s2"):
        train = json.loads(runs[name]["config"])["train"]
        params = json.loads(best[runs[name]["grp"]]["params"])
        assert runs[name]["status"] == "done"
        assert {k: train[k] for k in params} == params, name
        assert "selection_fraction" not in train or not train["selection_fraction"]
    assert "Seeds were added adaptively" in (out / "report.md").read_text()
