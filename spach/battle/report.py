"""The study report: `report.md` and PNG figures in the output directory, from the database alone.

- Table (like the paper's Table 3): one row per family × layout × size ×
  ablation with params, MACs, inference images/s and top-1 as mean ± std over seeds,
  and its place on the Pareto fronts of top-1 against MACs and against throughput;
  a ranking of the architectures by top-1.
- Figures: top-1 vs params, vs MACs and vs throughput, one line per family and
  layout (the paper's Figure 3), the Pareto fronts drawn on the MACs and throughput
  figures; validation top-1 vs training loss during
  training (the overfitting analysis); the training curves of every run.
- Analysis (when the study asks for it): ERF maps, CKA, corruption and Fourier robustness, attention
  distance (see `spach.battle.analysis_section`); the findings cite these measurements.
- Findings: each of the paper's claims (docs/battle.md, "The report") tested on the data (see `spach.battle.findings`).
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

from spach.battle import db
from spach.io import atomic_savefig, atomic_write
from spach.battle.findings import Group, Stat, evaluate_findings, macs_of, pareto_front, speed_of
from spach.battle.schema import Arch

SIZE_ORDER = {"xxs": 0, "xs": 1, "s": 2, "s_plus": 3}
FAMILY_COLOR = {"conv": "tab:blue", "attn": "tab:red", "mlp": "tab:green", "hybrid": "tab:purple",
                "smlp-net": "tab:olive", "shift-vit": "tab:orange", "pool": "gold", "shift": "tab:brown",
                "smlp": "yellowgreen", "gfilter": "tab:cyan", "window": "tab:pink"}
_PLUGIN_COLORS = ("black", "navy", "lime", "teal", "maroon", "gray")


def family_rank(family: str) -> int:
    """Table order: the paper's families, the release's sMLPNet/ShiftViT, then the registry's other mixers
    (newcomers, then plugins)."""
    from spach.models.registry import mixer_names

    order = ["conv", "attn", "mlp", "hybrid", "smlp-net", "shift-vit"]
    order += [m for m in mixer_names() if m not in order]
    return order.index(family) if family in order else len(order)


def family_color(family: str) -> str:
    """A fixed colour per family; plugin families get one of a spare palette (stable per name)."""
    if family in FAMILY_COLOR:
        return FAMILY_COLOR[family]
    return _PLUGIN_COLORS[sum(map(ord, family)) % len(_PLUGIN_COLORS)]


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
    result = {"name": db.study_name(conn), "runs": runs, "skipped": db.skipped(conn),
              "stale": len(db.runs(conn)) - len(runs), "data_change_accepted": db.data_change_accepted(conn)}
    conn.close()
    return result


def aggregate(runs: list[dict]) -> list[Group]:
    """Done runs -> one Group per architecture (same group name), ordered like the paper's table."""
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
            val_loss=Stat.of([r["final_val_loss"] for r in rs]), gap=Stat.of(gaps), runs=rs))
    groups.sort(key=lambda g: (family_rank(g.family), g.layout != "ss", SIZE_ORDER.get(g.size, 5),
                               g.params or 0, not g.cpe, g.shared, g.name))
    return groups


# --------------------------------------------------------------------------- the table

def _fmt(x: float | None, fmt: str) -> str:
    return "—" if x is None else format(x, fmt)


def _stat(s: Stat | None, fmt: str = ".2f") -> str:
    if s is None:
        return "—"
    return f"{s.mean:{fmt}} ± {s.std:{fmt}}" if s.std is not None else f"{s.mean:{fmt}}"


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
            f"{_stat(g.top1)} | {_stat(g.best_top1)} | {_stat(g.train_loss, '.3f')} | {_stat(g.val_loss, '.3f')} | "
            f"{pareto} |")
    return "\n".join(lines)


def ranking(groups: list[Group]) -> str:
    """The architectures ranked by mean top-1, with the fronts they are on (markdown list)."""
    ranked = sorted((g for g in groups if g.top1 is not None), key=lambda g: -g.top1.mean)
    fronts = {"MACs": pareto_front(groups, macs_of), "speed": pareto_front(groups, speed_of, lower_is_better=False)}
    lines = []
    for i, g in enumerate(ranked, 1):
        on = [k for k, names in fronts.items() if g.name in names]
        lines.append(f"{i}. `{g.name}` — top-1 {_stat(g.top1)}%, {_fmt(g.macs and g.macs / 1e6, '.1f')} MMACs, "
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

    lines: dict[tuple[str, str], list[Group]] = defaultdict(list)
    for g in points:
        if g.baseline:
            lines[(g.family, g.layout)].append(g)
    for (family, layout), gs in sorted(lines.items(), key=lambda kv: (family_rank(kv[0][0]), kv[0][1])):
        gs.sort(key=xval)
        ax.errorbar([xval(g) for g in gs], [g.top1.mean for g in gs], yerr=[g.top1.std or 0 for g in gs],
                    color=family_color(family), linestyle="-" if layout == "ms" else "--",
                    marker="o" if layout == "ms" else "s", capsize=3, label=f"{family}-{layout.upper()}")
        for g in gs:
            ax.annotate(g.size, (xval(g), g.top1.mean), textcoords="offset points", xytext=(4, 4), fontsize=7)
    for g in points:
        if not g.baseline:
            ax.errorbar([xval(g)], [g.top1.mean], yerr=[g.top1.std or 0], color=family_color(g.family),
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
    ax.set_ylabel("top-1 (%)  (mean ± std over seeds)")
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


def write_report(out_dir: str | Path, to: str | Path | None = None) -> Path:
    """(Re)write OUT/report.md and OUT/figures/*.png from OUT/battle.db; returns the report's path.

    `to`: write report.md and figures/ into that directory instead (e.g. when OUT is read-only).
    """
    data = load_results(out_dir)
    source = Path(out_dir)
    out_dir = Path(to if to is not None else out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    runs = data["runs"]
    groups = aggregate(runs)
    figures, curves = write_figures(groups, runs, out_dir / "figures")
    findings = evaluate_findings(groups)
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
                  "Top-1 is the final epoch's validation accuracy, mean ± std over seeds.")
    if data.get("data_change_accepted"):
        md += ["", f"**Changed data kept** (`--accept-changed-data`): {data['data_change_accepted']}."]
    md += ["", "## Results", "", table(groups) if groups else "No finished runs yet.", ""]
    if groups:
        md += ["Pareto: on the front of top-1 against MACs (no other architecture is at least as accurate for "
               "fewer MACs) and/or against inference images/s.", "", "## Ranking", "", ranking(groups), ""]
    md += ["## Figures", ""]
    for title, path in figures.items():
        if path is not None:
            md.append(f"![{title}]({path.relative_to(out_dir).as_posix()})")
            md.append("")
    md += analysis_md
    md += ["## Findings (the paper's claims, tested on this study's data)", "",
           "A comparison is *decisive* when both sides have ≥ 2 seeds and the difference of means exceeds the "
           "combined seed spread sqrt(std_a² + std_b²); verdicts come only from decisive comparisons. They are "
           "about this study's data, recipe and sizes, not about ImageNet.", ""]
    for f in findings:
        md.append(f"{f.number}. **{f.claim}** — verdict: **{f.verdict}**")
        for line in f.lines:
            md.append(f"   - {line}")
        md.append("")
    md += runs_sections(runs, data["skipped"], curves, out_dir)
    report = out_dir / "report.md"
    _atomic_write_text(report, "\n".join(md))
    return report
