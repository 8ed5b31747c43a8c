"""The report's Tuning section: budget, selection split, cost per architecture, and budget curves.

Budget curves follow Dodge et al., "Show Your Work: Improved Reporting of Experimental Results"
(EMNLP 2019): the expected best selection score of an architecture after n of its trials is the
expected maximum of n draws (with replacement) from the empirical distribution of its N trial scores,
with that maximum's variance (`spach.battle.stats.expected_max`). At each budget n = 1..N the
architectures are ranked by it; the section says where the ranking differs from the one at the budget
used (N), and gives the pairwise differences there with the standard deviation of the expected maxima —
descriptive numbers: the verdicts at the budget used are the Findings' tests on the retrained runs
(scored on the validation set, never on the selection split). Scores are final top-1 on the selection
split of the complete trials. Failed and pruned trials have no final score: they count toward the budget
(N, the cost) but not among the scores — a pruned trial is never the one retrained — so with a pruner
the curve describes the trials that survived it (see `PRUNED_CURVE`).
Cost per architecture: trials, epochs trained (a pruned trial's: those before it was stopped), images
seen (epochs x training images), wall time (the engine's training time; for failed runs the sum of
their epochs) and CPU time (every thread of the training process, per finished epoch).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from spach.battle import db
from spach.battle.stats import expected_max
from spach.battle.tune_space import describe_pruner
from spach.io import atomic_savefig

STATES = ("complete", "pruned", "fail")  # the ended states of a trial, as the cost table counts them
PRUNED_CURVE = ("Pruned trials count toward the budget (they are among the N trials and their epochs are in the "
                "cost table) but have no final score: each curve is the expected best of n draws from the "
                "complete trials' scores, as the configuration retrained is the best complete trial. Pruning "
                "stops the trials that start slowly, so the curve describes the trials that survived it, and "
                "favours architectures and settings that learn fast in the first epochs.")


def load_tuning(source: Path) -> dict[str, Any] | None:
    """Trials, their runs and epochs, the selection split and the `tune:` settings; None without tuning."""
    conn = db.connect_readonly(source)
    try:
        trials = db.trials(conn)
        if not trials:
            return None
        runs = {}
        for t in trials:
            if t["key"] not in runs:
                run = db.get_run(conn, t["key"])
                runs[t["key"]] = dict(run, epochs=db.epochs(conn, t["key"]))
        return {"trials": trials, "runs": runs, "selection": db.get_meta(conn, "selection") or {},
                "tune": db.get_meta(conn, "tune") or {}}
    finally:
        conn.close()


def by_architecture(trials: list[dict]) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for t in trials:
        out.setdefault(t["grp"], []).append(t)
    return out


def cost(trials: list[dict], runs: dict[str, dict], fit_images: int) -> dict[str, float]:
    """What an architecture's trials spent (each distinct run once: equal parameters are one run)."""
    keys = list(dict.fromkeys(t["key"] for t in trials))
    epochs = sum(len(runs[k]["epochs"]) for k in keys)
    wall = 0.0
    for k in keys:
        r = runs[k]
        wall += r["train_time_s"] if r["train_time_s"] is not None else sum(e["epoch_time_s"] or 0 for e in r["epochs"])
    return {"epochs": epochs, "images": epochs * fit_images, "wall_s": wall,
            "cpu_s": sum(runs[k].get("cpu_time_s") or 0.0 for k in keys)}


def scores(trials: list[dict]) -> list[float]:
    return [t["value"] for t in trials if t["state"] == "complete" and t["value"] is not None]


def curves(arch: dict[str, list[dict]], budget: int) -> dict[str, list[tuple[float, float]]]:
    """Per architecture: [(mean, var)] of the expected best score at n = 1..budget trials."""
    return {g: [expected_max(scores(ts), n) for n in range(1, budget + 1)] for g, ts in arch.items() if scores(ts)}


def ranking_lines(curve: dict[str, list[tuple[float, float]]], budget: int) -> list[str]:
    """The ranking at every budget, where it differs from the final one, and the pairwise differences at the end."""
    def order(n: int) -> list[str]:
        return sorted(curve, key=lambda g: -curve[g][n - 1][0])

    final = order(budget)
    lines = []
    for n in range(1, budget + 1):
        flip = "" if order(n) == final else " — differs from the ranking at the budget used"
        lines.append(f"- {n} trial(s): " + " > ".join(f"`{g}` {curve[g][n - 1][0]:.2f}" for g in order(n)) + flip)
    flips = [n for n in range(1, budget) if order(n) != final]
    lines.append("")
    lines.append(f"The ranking flips with the budget: at {', '.join(map(str, flips))} trial(s) it is not the one at "
                 f"{budget}." if flips else f"The ranking is the same at every budget from 1 to {budget} trials.")
    pairs = []
    for i, a in enumerate(final):
        for b in final[i + 1:]:
            (ma, va), (mb, vb) = curve[a][budget - 1], curve[b][budget - 1]
            pairs.append(f"`{a}` vs `{b}`: {ma - mb:+.2f} points (sd {(va + vb) ** 0.5:.2f})")
    if pairs:
        lines += ["", f"At the budget used ({budget} trials), expected best selection top-1: " + "; ".join(pairs)
                  + ". These describe the trials; the verdicts at this budget are the Findings' tests on the "
                  "retrained runs."]
    return lines


def figure_budget(curve: dict[str, list[tuple[float, float]]], families: dict[str, str], path: Path) -> Path | None:
    """Expected best selection top-1 (± one std) against the number of trials, one line per architecture."""
    if not curve:
        return None
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from spach.battle.palette import family_color

    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for g, points in curve.items():
        n = list(range(1, len(points) + 1))
        mean = [m for m, _ in points]
        std = [v ** 0.5 for _, v in points]
        ax.plot(n, mean, marker="o", color=family_color(families[g]), label=g)
        ax.fill_between(n, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)],
                        color=family_color(families[g]), alpha=0.15)
    ax.set_xlabel("trials (tuning budget per architecture)")
    ax.set_ylabel("expected best selection top-1 (%)")
    ax.set_title("budget curves (Dodge et al. 2019): mean ± std of the best of n trials", fontsize=9)
    ax.set_xticks(range(1, max(len(p) for p in curve.values()) + 1))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_savefig(fig, path)
    plt.close(fig)
    return path


def _params(params: dict) -> str:
    return ", ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in sorted(params.items()))


def cost_table(arch: dict[str, list[dict]], runs: dict[str, dict], budget: int, fit_images: int) -> list[str]:
    """One row per architecture: trials by state, best score and parameters, and what the trials cost."""
    lines = ["| architecture | trials (budget) | complete / pruned / failed | best selection top-1 (%) | best "
             "parameters | epochs | images | wall (s) | CPU (s) |", "|---|---|---|---|---|---|---|---|---|"]
    for g, ts in arch.items():
        states = [sum(t["state"] == s for t in ts) for s in STATES]
        done = [t for t in ts if t["state"] == "complete"]
        best = max(done, key=lambda t: (t["value"], -t["number"])) if done else None
        c = cost(ts, runs, fit_images)
        found = f"{best['value']:.2f} | {_params(best['params'])}" if best else "— | —"
        lines.append(f"| `{g}` | {len(ts)} ({budget}) | {' / '.join(map(str, states))} | {found} | "
                     f"{c['epochs']} | {c['images']:,} | {c['wall_s']:.0f} | {c['cpu_s']:.0f} |")
    return lines


def tune_section(source: Path, out_dir: Path) -> list[str]:
    """The Tuning section (markdown lines, [] for a study without `tune:`); its figure under OUT_DIR/figures."""
    data = load_tuning(Path(source))
    if data is None:
        return []
    tune, sel = data["tune"], data["selection"]
    budget = tune.get("trials") or max(t["budget"] for t in data["trials"])
    arch = by_architecture(data["trials"])
    families = {g: data["runs"][ts[0]["key"]]["family"] for g, ts in arch.items()}
    curve = curves(arch, budget)
    space = "; ".join(f"`{k}` " + (f"in {v['choices']}" if "choices" in v else
                                   f"in [{v['low']}, {v['high']}]{' (log)' if v['log'] else ''}")
                      for k, v in (tune.get("space") or {}).items())
    pruner = tune.get("pruner")
    md = ["## Tuning (equal budget per architecture)", "",
          f"Every architecture had the same budget: {budget} trial(s) of Optuna's TPE sampler (seed "
          f"{tune.get('seed')}, {tune.get('startup_trials')} random start-up trial(s)) over {space}; "
          f"{describe_pruner(pruner)}{' (the same pruner for every architecture)' if pruner else ''}. "
          f"Each trial trained on {sel.get('fit_images', '?'):,} training "
          f"images and was scored (final top-1) on a selection split of {sel.get('selection_images', '?'):,} "
          f"images held out of the training split ({sel.get('fraction', 0):.0%} of each class, seed "
          f"{sel.get('seed')}; its indices are in battle.db, meta `selection`): the validation split was never "
          "read by a trial. Each architecture's best configuration was then retrained with the study's seeds on "
          "the full training data; those runs are the Results above, on the validation split.", ""]
    md += cost_table(arch, data["runs"], budget, sel.get("fit_images", 0)) + [""]
    if not curve:
        md += ["No architecture has a complete trial: there is no budget curve, and nothing was retrained.", ""]
    else:
        fig = figure_budget(curve, families, Path(out_dir) / "figures" / "tuning_budget.png")
        md += ["### Budget curves", "", "Expected best selection top-1 after n trials (Dodge et al. 2019), "
               "mean ± std, and the ranking at each budget" + (f". {PRUNED_CURVE}" if pruner else "") + ":", ""]
        md += ["| trials | " + " | ".join(f"`{g}`" for g in curve) + " |", "|---|" + "---|" * len(curve)]
        for n in range(1, budget + 1):
            md.append(f"| {n} | " + " | ".join(f"{curve[g][n - 1][0]:.2f} ± {curve[g][n - 1][1] ** 0.5:.2f}"
                                               for g in curve) + " |")
        md += [""] + ranking_lines(curve, budget) + [""]
        if fig is not None:
            md += [f"![tuning budget curves]({fig.relative_to(out_dir).as_posix()})", ""]
    return md
