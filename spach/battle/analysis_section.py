"""The report's **Analysis** section: figures and tables from the measurements stored in the study database.

`analysis_section(out_dir, groups)` returns (markdown lines, summary); the summary holds per-group
statistics over seeds (ERF area ratios, mCE, Fourier errors, attention distance) and the cross-group
CKA of the final blocks, for the findings to cite (`spach.battle.findings.analysis_evidence`).
"""
from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from spach.analysis import figures
from spach.analysis.corruptions import mce
from spach.battle import db
from spach.battle.findings import Group, Stat


def _stat(s: Stat | None, fmt: str = ".1f", scale: float = 1.0) -> str:
    if s is None:
        return "—"
    return f"{s.mean * scale:{fmt}}" + (f" ± {s.std * scale:{fmt}}" if s.std is not None else "")


def _mean_dicts(results: list[dict], keys: tuple[str, ...]) -> dict:
    """Element-wise mean over seeds of the numeric fields `keys` (nested lists / dicts of numbers)."""
    def avg(values):
        first = values[0]
        if isinstance(first, dict):
            return {k: avg([v[k] for v in values]) for k in first}
        if isinstance(first, list):
            return [avg(list(v)) for v in zip(*values)]
        vals = [v for v in values if v is not None]
        return float(np.mean(vals)) if vals else None
    out = dict(results[0])
    for k in keys:
        out[k] = avg([r[k] for r in results])
    return out


def load_measurements(out_dir: str | Path, groups: list[Group]) -> dict[str, Any]:
    """{kind: {group name: [per-run results, by seed]}}, plus "cka" (the study's joint result) and settings."""
    conn = db.connect_readonly(out_dir)
    rows = db.analysis_rows(conn)
    conn.close()
    by_key = {r["key"]: g.name for g in groups for r in g.runs}
    out: dict[str, Any] = defaultdict(lambda: defaultdict(list))
    settings: dict[str, dict] = {}
    for row in rows:
        if row["subject"] == "study":
            out[row["kind"]] = row["result"]
        elif row["subject"] in by_key:
            out[row["kind"]][by_key[row["subject"]]].append(row["result"])
        settings[row["kind"]] = json.loads(row["settings"])
    out["settings"] = settings
    return out


def _corruption_baseline(groups: list[Group], results: dict, wanted: str | None) -> str | None:
    if wanted in results:
        return wanted
    for g in groups:
        if g.family == "conv" and g.baseline and g.name in results:
            return g.name
    return next((g.name for g in groups if g.name in results), None)


def summarize(groups: list[Group], m: dict) -> dict[str, Any]:
    """Per group: Stats over seeds of the numbers the findings cite (erf50: the 50% ERF area in % per stage,
    erf_strides, mce, rel_mce, clean, fourier_low/high, attn_dist); cross-group final-block CKA."""
    summary: dict[str, Any] = {"groups": {}, "cka_final": {}, "baseline": None}
    corr = m.get("corruption") or {}
    baseline = _corruption_baseline(groups, corr, (m["settings"].get("corruption") or {}).get("baseline"))
    summary["baseline"] = baseline
    base_mean = _mean_dicts(corr[baseline], ("clean", "top1")) if baseline else None
    for g in groups:
        s: dict[str, Stat | None] = {}
        erf = (m.get("erf") or {}).get(g.name) or []
        if erf:  # per stage: 50% area ratio in %, and the strides
            s["erf50"] = [Stat.of([100 * r["stages"][k]["area"]["50"] for r in erf])
                          for k in range(len(erf[0]["stages"]))]
            s["erf_strides"] = [st["stride"] for st in erf[0]["stages"]]
        if g.name in corr and base_mean:
            rel = [mce(r, base_mean) for r in corr[g.name]]
            s["mce"] = Stat.of([x["mce"] for x in rel])
            s["rel_mce"] = Stat.of([x["relative_mce"] for x in rel])
            s["clean"] = Stat.of([r["clean"] for r in corr[g.name]])
        four = (m.get("fourier") or {}).get(g.name) or []
        if four:
            s["fourier_low"] = Stat.of([r["low_freq_error"] for r in four])
            s["fourier_high"] = Stat.of([r["high_freq_error"] for r in four])
        att = [r for r in (m.get("attn-distance") or {}).get(g.name) or [] if r["layers"]]
        if att:
            s["attn_dist"] = Stat.of([float(np.mean([layer["mean"] for layer in r["layers"]])) for r in att])
        summary["groups"][g.name] = s
    cka = m.get("cka")
    if isinstance(cka, dict) and cka.get("labels"):
        mat = np.asarray(cka["matrix"])
        last = {lab: cka["offsets"][lab] + len(cka["blocks"][lab]) - 1 for lab in cka["labels"]}
        for a in cka["labels"]:
            for b in cka["labels"]:
                summary["cka_final"][(a, b)] = float(mat[last[a], last[b]])
    return summary


def _erf_part(groups, m, fig_dir, rel) -> list[str]:
    erf = m.get("erf") or {}
    if not erf:
        return []
    md = ["### Effective receptive fields", "",
          "Gradient of the central output position of each stage w.r.t. the input (absolute, summed over "
          "channels, averaged over images); area ratio = the smallest centred square holding 20% / 50% / 99% "
          "of the total, over the image area (RepLKNet). Mean ± std over seeds.", ""]
    reps = {g.name: erf[g.name][0] for g in groups if g.name in erf}
    path = figures.figure_erf(reps, fig_dir / "erf.png")
    if path:
        md += [f"![effective receptive fields]({rel(path)})", ""]
    md += ["| architecture | stage (stride) | 20% area | 50% area | 99% area |", "|---|---|---|---|---|"]
    for g in groups:
        runs = erf.get(g.name) or []
        if not runs:
            continue
        for k, st in enumerate(runs[0]["stages"]):
            cells = [_stat(Stat.of([r["stages"][k]["area"][t] for r in runs]), ".1f", 100) + "%"
                     for t in ("20", "50", "99")]
            md.append(f"| {g.name} | {st['module']} (/{st['stride']}) | " + " | ".join(cells) + " |")
    return md + [""]


def _cka_part(groups, m, summary, fig_dir, rel) -> list[str]:
    from spach.analysis.suite import cka_slice

    cka = m.get("cka")
    if not isinstance(cka, dict) or not cka.get("labels"):
        return []
    labels = cka["labels"]
    md = ["### Representation similarity (linear CKA)", "",
          f"Linear CKA with the unbiased minibatch HSIC estimator over {cka['n_images']} val images, between the "
          "blocks of the first seed of every architecture. The matrix compares the final blocks; the maps "
          "compare every block of one model with every block of another.", ""]
    matrix = [[summary["cka_final"][(a, b)] for b in labels] for a in labels]
    path = figures.figure_matrix(labels, matrix, fig_dir / "cka_final.png", "CKA of the final blocks")
    if path:
        md += [f"![CKA between architectures]({rel(path)})", ""]
    by_name = {g.name: g for g in groups}
    pairs = [(a, b) for i, a in enumerate(labels) for b in labels[i + 1:]
             if a in by_name and b in by_name and by_name[a].family != by_name[b].family
             and by_name[a].baseline and by_name[b].baseline
             and (by_name[a].layout, by_name[a].size) == (by_name[b].layout, by_name[b].size)]
    for k, (a, b) in enumerate(pairs[:6]):
        p = figures.figure_cka(cka_slice(cka, a, b), fig_dir / f"cka_{k}.png", title=f"CKA {a} vs {b}")
        if p:
            md += [f"![CKA {a} vs {b}]({rel(p)})", ""]
    return md


def _corruption_part(groups, m, summary, fig_dir, rel) -> list[str]:
    corr = m.get("corruption") or {}
    base = summary["baseline"]
    if not corr or base is None:
        return []
    names = list(next(iter(corr.values()))[0]["top1"])
    md = ["### Corruption robustness", "",
          f"Top-1 (%) under common corruptions (mean over severities 1-5), mCE and relative mCE (%) against "
          f"`{base}` (Hendrycks & Dietterich; 100 = as robust as the baseline, lower is better). Mean ± std "
          "over seeds.", ""]
    md += ["| architecture | clean | " + " | ".join(names) + " | mCE | relative mCE |",
           "|---" * (len(names) + 4) + "|"]
    means = {}
    for g in groups:
        runs = corr.get(g.name)
        if not runs:
            continue
        means[g.name] = _mean_dicts(runs, ("clean", "top1"))
        s = summary["groups"][g.name]
        cells = [_stat(Stat.of([float(np.mean(r["top1"][c])) for r in runs])) for c in names]
        md.append(f"| {g.name} | {_stat(s.get('clean'))} | " + " | ".join(cells)
                  + f" | {_stat(s.get('mce'))} | {_stat(s.get('rel_mce'))} |")
    path = figures.figure_corruptions(means, fig_dir / "corruptions.png")
    if path:
        md += ["", f"![corruption robustness]({rel(path)})"]
    return md + [""]


def _fourier_part(groups, m, summary, fig_dir, rel) -> list[str]:
    four = m.get("fourier") or {}
    if not four:
        return []
    first = next(iter(four.values()))[0]
    md = ["### Fourier sensitivity", "",
          f"Error (%) under additive Fourier basis noise of L2 norm {first['eps']} per channel at each frequency "
          "(Yin et al.; centre = low frequencies), and top-1 under low-/high-pass filtering. Low/high = mean "
          "error inside/outside the central half-band. Mean ± std over seeds.", ""]
    means = {g.name: _mean_dicts(four[g.name], ("error", "lowpass", "highpass", "mean_error"))
             for g in groups if g.name in four}
    for title, path in (("Fourier heat maps", figures.figure_fourier(means, fig_dir / "fourier.png")),
                        ("low/high-pass", figures.figure_bandpass(means, fig_dir / "fourier_bandpass.png"))):
        if path:
            md += [f"![{title}]({rel(path)})", ""]
    bw = min(first["lowpass"], key=int)
    md += [f"| architecture | mean error | low-frequency error | high-frequency error | low-pass {bw} top-1 "
           f"| high-pass {bw} top-1 |", "|---|---|---|---|---|---|"]
    for g in groups:
        runs = four.get(g.name)
        if runs:
            s = summary["groups"][g.name]
            md.append(f"| {g.name} | {_stat(Stat.of([r['mean_error'] for r in runs]))} | {_stat(s.get('fourier_low'))}"
                      f" | {_stat(s.get('fourier_high'))} | {_stat(Stat.of([r['lowpass'][bw] for r in runs]))} | "
                      f"{_stat(Stat.of([r['highpass'][bw] for r in runs]))} |")
    return md + [""]


def _attention_part(groups, m, fig_dir, rel) -> list[str]:
    att = {g.name: runs for g in groups if (runs := (m.get("attn-distance") or {}).get(g.name))
           and runs[0]["layers"]}
    if not att:
        return []
    md = ["### Mean attention distance", "",
          "Attention-weighted distance between query and key tokens, in input pixels, per head (ViT paper), "
          "for every mixer that exposes its attention weights. Mean over the layers of each stride, ± std over seeds.",
          ""]
    path = figures.figure_attention({k: v[0] for k, v in att.items()}, fig_dir / "attn_distance.png")
    if path:
        md += [f"![attention distance]({rel(path)})", ""]
    md += ["| architecture | stride | layers | mean distance (px) |", "|---|---|---|---|"]
    for name, runs in att.items():
        strides = sorted({layer["stride"] for layer in runs[0]["layers"]})
        for st in strides:
            vals = [float(np.mean([layer["mean"] for layer in r["layers"] if layer["stride"] == st])) for r in runs]
            n = sum(layer["stride"] == st for layer in runs[0]["layers"])
            md.append(f"| {name} | {st:g} | {n} | {_stat(Stat.of(vals))} |")
    return md + [""]


def analysis_section(out_dir: str | Path, groups: list[Group],
                     to: str | Path | None = None) -> tuple[list[str], dict[str, Any]]:
    """Markdown lines of the Analysis section (empty when nothing was measured) and the summary.

    Measurements are read from OUT/battle.db (read-only); figures go to TO/figures/analysis (default OUT).
    """
    m = load_measurements(out_dir, groups)
    out_dir = Path(to if to is not None else out_dir)
    if not m["settings"]:
        return [], {"groups": {}, "cka_final": {}, "baseline": None}
    summary = summarize(groups, m)
    fig_dir = out_dir / "figures" / "analysis"
    fig_dir.mkdir(parents=True, exist_ok=True)

    def rel(p: Path) -> str:
        return p.relative_to(out_dir).as_posix()

    md = ["## Analysis", "", "Why the architectures differ, measured on this study's data after training "
          "(`analysis:` in the study file; `spach analyze` runs the same measurements on any model).", ""]
    md += _erf_part(groups, m, fig_dir, rel)
    md += _cka_part(groups, m, summary, fig_dir, rel)
    md += _corruption_part(groups, m, summary, fig_dir, rel)
    md += _fourier_part(groups, m, summary, fig_dir, rel)
    md += _attention_part(groups, m, fig_dir, rel)
    return md, summary
