"""The study report: `report.md` and PNG figures in the output directory, from the database alone.

- Table (like the paper's Table 3): one row per family × layout × size ×
  ablation with params, MACs, inference images/s and top-1 as mean with its 95% confidence interval
  (seed and validation-sample noise, `spach.battle.stats.accuracy_interval`),
  and its place on the Pareto fronts of top-1 against MACs and against throughput;
  a ranking of the architectures by top-1.
- Figures: top-1 vs params, vs MACs and vs throughput, one line per family and
  layout (the paper's Figure 3), the Pareto fronts drawn on the MACs and throughput
  figures; validation top-1 vs training loss during
  training (the overfitting analysis); the training curves of every run.
- Analysis (when the study asks for it): ERF maps, CKA, corruption and Fourier robustness, attention
  distance (see `spach.battle.analysis_section`); the findings cite these measurements.
- Findings: each of the paper's claims (docs/battle.md, "The report") tested on the data, every test with
  its effect, interval, raw and Holm-adjusted p-value and seeds (see `spach.battle.findings`), and a
  forest plot of every test's effect and interval.
- Tuning (a study with `tune:`): budget, selection split, cost and budget curves (`spach.battle.tune_report`).
- Failed runs with their errors, and the skipped grid combinations with reasons.

Every file is written to a temporary name and moved into place, so a reader
never sees a half-written report. `write_report(out_dir)` only reads the
database: it can run while a study is still going.
"""
from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from spach.battle import db, stats
from spach.io import atomic_savefig, atomic_write
from spach.battle.findings import Group, Settings, Stat, evaluate_findings, macs_of, pareto_front, speed_of
from spach.battle.looks import replay
from spach.battle.palette import family_color, family_rank
from spach.battle.schema import Arch
from spach.battle.tune_report import tune_section

SIZE_ORDER = {"xxs": 0, "xs": 1, "s": 2, "s_plus": 3}

# --------------------------------------------------------------------------- atomic files

def _atomic_write_text(path: Path, text: str) -> None:
    with atomic_write(path, "w") as f:
        f.write(text)


def _atomic_savefig(fig, path: Path) -> None:
    atomic_savefig(fig, path)


# --------------------------------------------------------------------------- data

def load_results(out_dir: str | Path) -> dict[str, Any]:
    """The study's runs (those of the study as last launched), their curves, skipped combinations."""
    conn = db.connect_readonly(out_dir)  # reading only: also in a read-only directory
    keys = db.study_keys(conn)
    runs = db.runs(conn, keys)
    for run in runs:
        run["epochs"] = db.epochs(conn, run["key"])
    study = db.get_meta(conn, "study") or {}
    trial_keys = {t["key"] for t in db.trials(conn)}  # tuning trials: reported in their own section
    result = {"name": db.study_name(conn), "runs": runs, "skipped": db.skipped(conn),
              "stale": len({r["key"] for r in db.runs(conn)} - set(keys) - trial_keys),
              "evidence": db.evidence(conn, [r["key"] for r in runs]), "mixer_facts": db.mixer_facts_of(conn),
              "sequential": db.get_meta(conn, "sequential"), "statistics": study.get("statistics") or {},
              "data_change_accepted": db.data_change_accepted(conn)}
    conn.close()
    return result


def aggregate(runs: list[dict], evidence: dict[str, dict] | None = None,
              mixer_facts: dict[str, dict] | None = None) -> list[Group]:
    """Done runs -> one Group per architecture (same group name), ordered like the paper's table.

    `evidence` (db.evidence): a group gets its (seeds, examples) correctness matrix when every one of its
    runs has evidence on the same validation images; `mixer_facts` (db.mixer_facts_of): what the
    findings need to know of each mixer, as recorded in the database."""
    evidence, mixer_facts = evidence or {}, mixer_facts or {}
    by_group: dict[str, list[dict]] = defaultdict(list)
    for r in runs:
        if r["status"] == "done":
            by_group[r["grp"]].append(r)
    groups = []
    for name, rs in by_group.items():
        first = rs[0]
        gaps = [r["final_val_loss"] - r["final_train_loss"] for r in rs
                if r["final_val_loss"] is not None and r["final_train_loss"] is not None]
        groups.append(Group(
            name=name, arch=Arch(first["family"], first["layout"], first["size"], bool(first["cpe"]),
                                 bool(first["shared"])), seeds=sorted(r["seed"] for r in rs),
            params=first["params"], macs=first["macs"],
            images_per_s=Stat.of([r["images_per_s"] for r in rs]),
            top1=Stat.of([r["final_top1"] for r in rs]), best_top1=Stat.of([r["best_top1"] for r in rs]),
            train_loss=Stat.of([r["final_train_loss"] for r in rs]),
            val_loss=Stat.of([r["final_val_loss"] for r in rs]), gap=Stat.of(gaps), runs=rs,
            weight_free=(mixer_facts.get(first["family"]) or {}).get("weight_free"),
            **_evidence_of(rs, evidence)))
    for g in groups:  # once per group: the table, the ranking and the figures show it
        g.top1_ci = top1_interval(g)
    groups.sort(key=lambda g: (family_rank(g.family), g.layout != "ss", SIZE_ORDER.get(g.size, 5),
                               g.params or 0, not g.cpe, g.shared, g.name))
    return groups


def _evidence_of(rs: list[dict], evidence: dict[str, dict]) -> dict[str, Any]:
    """{"correct": (seeds, examples) bool, "targets_sha"} when every run of the group has evidence on the
    same images; {} otherwise."""
    found = [evidence.get(r["key"]) for r in sorted(rs, key=lambda r: r["seed"])]
    if not found or any(e is None for e in found) or len({(e["targets_sha"], e["n"]) for e in found}) != 1:
        return {}
    return {"correct": np.stack([e["correct"] for e in found]), "targets_sha": found[0]["targets_sha"]}


# --------------------------------------------------------------------------- the table

def _fmt(x: float | None, fmt: str) -> str:
    return "—" if x is None else format(x, fmt)


def _stat(s: Stat | None, fmt: str = ".2f") -> str:
    """mean [95% CI] of a per-seed quantity (Student's t across seeds); the mean alone with one seed."""
    if s is None:
        return "—"
    if s.n < 2:
        return f"{s.mean:{fmt}}"
    mean, lo, hi = stats.mean_interval(s.values)
    return f"{mean:{fmt}} [{lo:{fmt}}, {hi:{fmt}}]"


def top1_interval(g: Group) -> tuple[float, float, float] | None:
    """(mean, low, high) of the group's top-1, 95%: from the per-example evidence when the group has it
    (seed and validation-sample noise), across seeds otherwise; None with fewer than two seeds."""
    if g.top1 is None or g.top1.n < 2:
        return None
    if g.correct is not None:
        return stats.accuracy_interval(g.correct)
    return stats.mean_interval(g.top1.values)


def _top1(g: Group) -> str:
    ci = g.top1_ci
    if ci is None:
        return _stat(g.top1)
    return f"{ci[0]:.2f} [{ci[1]:.2f}, {ci[2]:.2f}]" + ("" if g.correct is not None else "*")


def table(groups: list[Group]) -> str:
    """The results table; ``Pareto`` marks the groups on the front of top-1 vs MACs and vs images/s."""
    fronts = {"MACs": pareto_front(groups, macs_of), "speed": pareto_front(groups, speed_of, lower_is_better=False)}
    head = ("| family | layout | size | CPE | shared | seeds | params (M) | MMACs | images/s | top-1 (%) "
            "| best top-1 (%) | train loss | val loss | Pareto |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for g in groups:
        pareto = ", ".join(k for k, names in fronts.items() if g.name in names) or "—"
        lines.append(
            f"| {g.family} | {g.layout.upper()} | {g.size} | {'on' if g.cpe else 'off'} | "
            f"{'yes' if g.shared else 'no'} | {len(g.seeds)} | {_fmt(g.params and g.params / 1e6, '.3f')} | "
            f"{_fmt(g.macs and g.macs / 1e6, '.1f')} | {_fmt(g.images_per_s and g.images_per_s.mean, '.0f')} | "
            f"{_top1(g)} | {_stat(g.best_top1)} | {_stat(g.train_loss, '.3f')} | {_stat(g.val_loss, '.3f')} | "
            f"{pareto} |")
    return "\n".join(lines)


def ranking(groups: list[Group]) -> str:
    """The architectures ranked by mean top-1, with the fronts they are on (markdown list)."""
    ranked = sorted((g for g in groups if g.top1 is not None), key=lambda g: -g.top1.mean)
    fronts = {"MACs": pareto_front(groups, macs_of), "speed": pareto_front(groups, speed_of, lower_is_better=False)}
    lines = []
    for i, g in enumerate(ranked, 1):
        on = [k for k, names in fronts.items() if g.name in names]
        lines.append(f"{i}. `{g.name}` — top-1 {_top1(g)}%, {_fmt(g.macs and g.macs / 1e6, '.1f')} MMACs, "
                     f"{_fmt(speed_of(g), '.0f')} images/s" + (f"; Pareto-optimal for {' and '.join(on)}" if on else ""))
    return "\n".join(lines)


# --------------------------------------------------------------------------- figures

def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def figure_tradeoff(groups: list[Group], x_of: str, xlabel: str, path: Path, front: set[str] | None = None,
                    ) -> Path | None:
    """Top-1 vs a cost, one line per family+layout (baselines), ablations as separate hollow markers;
    ``front`` (group names): the Pareto front, drawn as a black step line through circled points."""
    points = [g for g in groups if g.top1 is not None and getattr(g, x_of) is not None]
    if not points:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 4.4))

    def xval(g: Group) -> float:
        v = getattr(g, x_of)
        return (v.mean if isinstance(v, Stat) else v) / (1e6 if x_of in ("params", "macs") else 1.0)

    def yerr(gs: list[Group]) -> list[list[float]]:  # asymmetric 95% CI bars (none with one seed)
        cis = [g.top1_ci or (g.top1.mean,) * 3 for g in gs]
        return [[ci[0] - ci[1] for ci in cis], [ci[2] - ci[0] for ci in cis]]

    lines: dict[tuple[str, str], list[Group]] = defaultdict(list)
    for g in points:
        if g.baseline:
            lines[(g.family, g.layout)].append(g)
    for (family, layout), gs in sorted(lines.items(), key=lambda kv: (family_rank(kv[0][0]), kv[0][1])):
        gs.sort(key=xval)
        ax.errorbar([xval(g) for g in gs], [g.top1.mean for g in gs], yerr=yerr(gs),
                    color=family_color(family), linestyle="-" if layout == "ms" else "--",
                    marker="o" if layout == "ms" else "s", capsize=3, label=f"{family}-{layout.upper()}")
        for g in gs:
            ax.annotate(g.size, (xval(g), g.top1.mean), textcoords="offset points", xytext=(4, 4), fontsize=7)
    for g in points:
        if not g.baseline:
            ax.errorbar([xval(g)], [g.top1.mean], yerr=yerr([g]), color=family_color(g.family),
                        marker="^", mfc="none", linestyle="none", capsize=3, label=g.name)
    on_front = sorted((g for g in points if front and g.name in front), key=xval)
    if on_front:
        ax.plot([xval(g) for g in on_front], [g.top1.mean for g in on_front], color="black", linewidth=1,
                drawstyle="steps-post" if x_of != "images_per_s" else "steps-pre", alpha=0.6, zorder=1)
        ax.scatter([xval(g) for g in on_front], [g.top1.mean for g in on_front], s=160, facecolors="none",
                   edgecolors="black", linewidths=1.2, zorder=3, label="Pareto front")
    xs = [xval(g) for g in points]
    if min(xs) > 0 and max(xs) / min(xs) > 20:
        ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("top-1 (%)  (mean, 95% CI)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    _atomic_savefig(fig, path)
    plt.close(fig)
    return path


def figure_overfitting(groups: list[Group], path: Path) -> Path | None:
    """Validation top-1 vs training loss over training (per group, epochs averaged over seeds)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    drawn = 0
    for g in groups:
        per_epoch: dict[int, list[tuple[float, float]]] = defaultdict(list)
        for r in g.runs:
            for e in r["epochs"]:
                if e["train_loss"] is not None and e["val_top1"] is not None:
                    per_epoch[e["epoch"]].append((e["train_loss"], e["val_top1"]))
        if not per_epoch:
            continue
        pts = [(sum(p[0] for p in v) / len(v), sum(p[1] for p in v) / len(v)) for _, v in sorted(per_epoch.items())]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=".",
                color=family_color(g.family), linestyle="-" if g.layout == "ms" else "--",
                alpha=1.0 if g.baseline else 0.5, label=g.name)
        drawn += 1
    if not drawn:
        plt.close(fig)
        return None
    if all(line.get_xdata().min() > 0 for line in ax.get_lines()):
        ax.set_xscale("log")  # late epochs crowd near zero loss
    ax.invert_xaxis()  # training progresses to the right
    ax.set_xlabel("training loss (decreasing →)")
    ax.set_ylabel("validation top-1 (%)")
    ax.set_title("generalisation: higher curve at equal training loss = less overfitting", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    _atomic_savefig(fig, path)
    plt.close(fig)
    return path


def figure_forest(findings: list, path: Path) -> Path | None:
    """Per finding, every test's effect (a - b as the claim orders it) and its interval against zero — one
    panel per finding and unit — coloured by verdict."""
    rows = [(f.number, t) for f in findings for t in f.tests if t.tested]
    if not rows:
        return None
    plt = _plt()
    panels = sorted({(n, t.quantity == "top-1") for n, t in rows}, key=lambda k: (k[0], not k[1]))
    heights = [sum(1 for n, t in rows if (n, t.quantity == "top-1") == k) for k in panels]
    fig, axes = plt.subplots(len(panels), 1, figsize=(7.5, 1.0 + 0.32 * sum(heights) + 0.5 * len(panels)),
                             gridspec_kw={"height_ratios": heights}, squeeze=False)
    colour = {"supported": "tab:green", "contradicted": "tab:red", "equivalent": "tab:blue",
              "underpowered": "tab:gray", "not comparable": "tab:orange"}
    for ax, (number, accuracy) in zip(axes[:, 0], panels):
        ts = [t for n, t in rows if (n, t.quantity == "top-1") == (number, accuracy)]
        for y, t in enumerate(ts):
            r = t.result
            ax.plot(r.ci, [y, y], color=colour.get(t.verdict, "black"), linewidth=2)
            ax.plot([r.diff], [y], "o", color=colour.get(t.verdict, "black"))
        ax.axvline(0.0, color="black", linewidth=0.8)
        ax.set_yticks(range(len(ts)), [f"{t.a.name} vs {t.b.name}: {t.label}" for t in ts], fontsize=6)
        ax.invert_yaxis()
        ax.set_title(f"finding {number}", fontsize=8, loc="left")
        ax.set_xlabel("top-1 difference (points)" if accuracy else "difference (loss units)", fontsize=7)
        ax.grid(alpha=0.3, axis="x")
    handles = [plt.Line2D([], [], color=c, linewidth=2, label=v) for v, c in colour.items()]
    fig.suptitle("effects with their (1 - alpha) intervals (unadjusted; verdicts use Holm-adjusted p)", fontsize=8)
    fig.tight_layout(rect=(0, 0.06, 1, 0.96))
    fig.legend(handles=handles, fontsize=6, loc="lower center", ncol=len(colour), frameon=False)
    _atomic_savefig(fig, path)
    plt.close(fig)
    return path


def figure_run_curves(run: dict, path: Path) -> Path | None:
    eps = run["epochs"]
    if not eps:
        return None
    plt = _plt()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(8, 3.2))
    x = [e["epoch"] for e in eps]
    ax1.plot(x, [e["train_loss"] for e in eps], marker=".", label="train loss")
    ax1.plot(x, [e["val_loss"] for e in eps], marker=".", label="val loss")
    ax1.set_xlabel("epoch")
    ax1.legend(fontsize=8)
    ax1.grid(alpha=0.3)
    ax2.plot(x, [e["val_top1"] for e in eps], marker=".", color="tab:green", label="val top-1")
    ax2.set_xlabel("epoch")
    ax2.set_ylabel("val top-1 (%)")
    ax2.grid(alpha=0.3)
    fig.suptitle(f"{run['name']} ({run['status']})", fontsize=10)
    _atomic_savefig(fig, path)
    plt.close(fig)
    return path


# --------------------------------------------------------------------------- the report

def analysis_part(source: Path, out_dir: Path, groups: list[Group], findings: list) -> tuple[list[str], dict]:
    """The Analysis section (spach.analysis; measurements read from SOURCE/battle.db, figures written under
    OUT_DIR) and, added to `findings`, the lines citing its measurements."""
    from spach.battle.analysis_section import analysis_section
    from spach.battle.findings import analysis_evidence

    md, summary = analysis_section(source, groups, to=out_dir)
    evidence = analysis_evidence(groups, summary) if md else {}
    for f in findings:
        f.lines += evidence.get(f.number, [])
    return md, evidence


def write_figures(groups: list[Group], runs: list[dict], fig_dir: Path) -> tuple[dict, list[tuple]]:
    """Draw the report's figures into `fig_dir`: ({title: path or None}, [(run name, curves path or None)])."""
    (fig_dir / "curves").mkdir(parents=True, exist_ok=True)
    figures = {
        "top-1 vs params": figure_tradeoff(groups, "params", "params (M)", fig_dir / "top1_vs_params.png"),
        "top-1 vs MACs (Pareto front circled)": figure_tradeoff(
            groups, "macs", "MMACs per image", fig_dir / "top1_vs_macs.png", front=pareto_front(groups, macs_of)),
        "top-1 vs throughput (Pareto front circled)": figure_tradeoff(
            groups, "images_per_s", "inference images/s", fig_dir / "top1_vs_throughput.png",
            front=pareto_front(groups, speed_of, lower_is_better=False)),
        "validation top-1 vs training loss": figure_overfitting(groups, fig_dir / "overfitting.png"),
    }
    curves = [(r["name"], figure_run_curves(r, fig_dir / "curves" / f"{r['name']}.png")) for r in runs]
    return figures, curves


def runs_sections(runs: list[dict], skipped: list, curves: list[tuple], out_dir: Path) -> list[str]:
    """The report's closing sections: failed runs, skipped grid combinations, and the table of every run."""
    md = []
    failed = [r for r in runs if r["status"] == "failed"]
    if failed:
        md += ["## Failed runs", ""]
        for r in failed:
            first = (r["error"] or "").strip().splitlines()[0] if r["error"] else "unknown error"
            md.append(f"- `{r['name']}` (key {r['key']}): {first}")
        md.append("")
    if skipped:
        md += ["## Skipped grid combinations", ""]
        md += [f"- `{name}`: {reason}" for name, reason in skipped]
        md.append("")
    md += ["## Runs", "", "| run | key | status | epochs | final top-1 (%) | best top-1 (%) | train time (s) "
           "| curves |", "|---|---|---|---|---|---|---|---|"]
    for name, path in curves:
        r = next(r for r in runs if r["name"] == name)
        link = f"[png]({path.relative_to(out_dir).as_posix()})" if path else "—"
        md.append(f"| {name} | {r['key']} | {r['status']} | {len(r['epochs'])} | {_fmt(r['final_top1'], '.2f')} | "
                  f"{_fmt(r['best_top1'], '.2f')} | {_fmt(r['train_time_s'], '.0f')} | {link} |")
    md.append("")
    return md


def method_text(settings: Settings, findings: list, groups: list[Group]) -> list[str]:
    """The paragraph that says how the verdicts were reached, how many tests they resolve, and which groups lack
    per-example evidence."""
    tests = [t for f in findings for t in f.tests]
    resolved = sum(t.verdict in ("supported", "contradicted", "equivalent") for t in tests)
    lacking = [g.name for g in groups if g.correct is None]
    n_p = sum(1 + (t.result.p_equivalence is not None) for t in tests if t.tested)
    text = (f"Every claim is tested as one or more comparisons of two architectures (a - b). Top-1 is compared on "
            "the per-example evidence: the same validation images score both sides, and the interval counts both "
            "seed-to-seed variation and the sampling of the validation images (paired two-level t with Satterthwaite "
            "degrees of freedom); the train loss and the generalisation gap are compared across seeds only (Welch's "
            f"t), which needs larger effects. The {n_p} p-values of the report (differences"
            + (f", and equivalence within ±{settings.margin:g} pt top-1 by two one-sided tests" if settings.margin else "")
            + f") form one family, adjusted by Holm's method: the chance that any verdict below is a false difference "
            f"or a false equivalence is at most alpha = {settings.alpha:g}. Intervals are {100 * (1 - settings.alpha):g}% "
            "and unadjusted. *Supported* / *contradicted*: Holm-adjusted p < alpha in / against the claimed direction; "
            "*equivalent*: the equivalence test rejects at the adjusted level; *underpowered*: neither, with the seeds "
            f"per side that would resolve it at {settings.power:.0%} power. {resolved} of {len(tests)} comparisons are "
            "resolved. Verdicts are about this study's data, recipe and sizes, not about ImageNet "
            "(docs/battle.md, \"How verdicts are computed\").")
    out = [text, ""]
    if lacking:
        out += [f"These architectures lack per-example evidence for some seed (runs of an older spach, or unreadable "
                f"validation images): {', '.join(f'`{n}`' for n in lacking)}; their top-1 comparisons are tested across "
                "seeds only.", ""]
    return out


def sequential_plan(data: dict[str, Any]) -> dict[str, Any] | None:
    """The design of a sequential study (`spach.battle.looks`) when the runs shown are the ones it made."""
    plan = data.get("sequential")
    keys = {r["key"] for r in data["runs"]}
    if not plan or not all(k in keys for keys_ in plan["rounds"] for k in keys_):
        return None
    return plan


def sequential_text(plan: dict[str, Any], runs: list[dict]) -> list[str]:
    """What `--until-decisive` did: its looks and levels, the seeds it added, and what that saved."""
    names = {r["key"]: r["name"] for r in runs}
    added = [names[k] for keys in plan["rounds"] for k in keys]
    groups = {r["grp"] for r in runs}
    everywhere = len(groups) * plan["max_seeds"]
    out = [f"Seeds were added adaptively (`--until-decisive --max-seeds {plan['max_seeds']}`): after each look, one "
           "more seed for every architecture of an unresolved comparison that that many seeds could resolve (by its "
           "seeds-needed figure). Each of at most "
           f"{plan['looks']} looks tests at level {plan['alpha_per_look'][0]:.3g} (alpha {plan['alpha']:g} spent "
           f"equally over the looks: by the union bound the family-wise error stays at most {plan['alpha']:g}); a "
           f"comparison keeps the verdict of the first look that resolves it. {len(plan['rounds']) + 1} look(s) made, "
           f"{len(added)} run(s) added: {', '.join(f'`{n}`' for n in added) or 'none'}. "
           f"{len(runs)} runs in all, against {everywhere} for {plan['max_seeds']} seeds everywhere.", ""]
    return out


def write_report(out_dir: str | Path, to: str | Path | None = None) -> Path:
    """(Re)write OUT/report.md and OUT/figures/*.png from OUT/battle.db; returns the report's path.

    `to`: write report.md and figures/ into that directory instead (e.g. when OUT is read-only).
    Everything comes from the database: runs, per-example evidence, mixer facts and the study's
    `statistics:` settings — never from what this process has imported.
    """
    data = load_results(out_dir)
    source = Path(out_dir)
    out_dir = Path(to if to is not None else out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    runs = data["runs"]
    groups = aggregate(runs, data["evidence"], data["mixer_facts"])
    settings = Settings.of(data["statistics"])
    figures, curves = write_figures(groups, runs, out_dir / "figures")
    plan = sequential_plan(data)
    if plan is None:
        findings = evaluate_findings(groups, settings)
    else:
        findings = replay(runs, lambda rs: aggregate(rs, data["evidence"], data["mixer_facts"]), settings, plan)
    figures["findings: effects and intervals (forest plot)"] = figure_forest(findings, out_dir / "figures" / "forest.png")
    analysis_md, _ = analysis_part(source, out_dir, groups, findings)

    status = {s: sum(r["status"] == s for r in runs) for s in ("done", "failed", "running", "queued")}
    md = [f"# Study `{data['name']}`", ""]
    md.append(f"{len(runs)} runs: {status['done']} done, {status['failed']} failed, {status['running']} running, "
              f"{status['queued']} queued; {len(data['skipped'])} grid combination(s) skipped."
              + (f" ({data['stale']} run(s) in the database belong to earlier versions of the study and are not "
                 "shown.)" if data["stale"] else ""))
    if runs:
        cfg = json.loads(runs[0]["config"])
        t, m = cfg["train"], cfg["measure"]
        md.append("")
        md.append(f"Data `{t['data']}` at {t['img_size']}px, {t.get('epochs', '?')} epochs; images/s measured "
                  f"for inference, batch {m['batch_size']}, {m['dtype']}, {m.get('device', 'cpu')}"
                  f"{', ' + str(m['threads']) + ' threads' if m.get('threads') else ''}. "
                  "Top-1 is the final epoch's validation accuracy: mean and 95% confidence interval over seeds and "
                  "validation images (marked * where a group lacks per-example evidence: over seeds only); losses: "
                  "mean and 95% interval over seeds.")
    if data.get("data_change_accepted"):
        md += ["", f"**Changed data kept** (`--accept-changed-data`): {data['data_change_accepted']}."]
    md += ["", "## Results", "", table(groups) if groups else "No finished runs yet.", ""]
    if groups:
        md += ["Pareto: on the front of top-1 against MACs (no other architecture is at least as accurate for "
               "fewer MACs) and/or against inference images/s (by mean top-1).", "", "## Ranking", "",
               ranking(groups), ""]
    md += ["## Figures", ""]
    for title, path in figures.items():
        if path is not None:
            md.append(f"![{title}]({path.relative_to(out_dir).as_posix()})")
            md.append("")
    md += analysis_md
    md += tune_section(source, out_dir)  # with `tune:`: budget, selection split, cost, budget curves
    md += ["## Findings (the paper's claims, tested on this study's data)", ""] + method_text(settings, findings, groups)
    if plan is not None:
        md += sequential_text(plan, runs)
    for f in findings:
        md.append(f"{f.number}. **{f.claim}** — verdict: **{f.verdict}**")
        for line in f.lines:
            md.append(f"   - {line}")
        md.append("")
    md += runs_sections(runs, data["skipped"], curves, out_dir)
    report = out_dir / "report.md"
    _atomic_write_text(report, "\n".join(md))
    return report
