"""The analyses of a study (`analysis:` in the study file), run after training, stored in the database.

Per-run measurements (erf, corruption, fourier, attn-distance) are computed for every finished run
and kept in the `analysis` table under the run's key, with a JSON copy in RUN_DIR/analysis/. CKA
compares the models with each other: it is computed once for the study ("study" subject) on the
first seed of every architecture. A measurement already stored with the same settings is not
computed again, so rerunning a study only measures what is new.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

from spach.battle import db
from spach.battle.spec import stable_json
from spach.io import write_json
from spach.runtime import num_threads

PER_RUN = ("erf", "corruption", "fourier", "attn-distance")


def _settings_text(settings: dict, **extra) -> str:
    return stable_json(dict(settings, **extra))


def representatives(runs: list[dict]) -> list[dict]:
    """The lowest-seed finished run of every group, in the study's order."""
    best: dict[str, dict] = {}
    for r in runs:
        if r["status"] == "done" and (r["grp"] not in best or r["seed"] < best[r["grp"]]["seed"]):
            best[r["grp"]] = r
    return [r for r in runs if best.get(r["grp"]) is r]


def _write_json(run_dir: str, kind: str, result: dict) -> None:
    from spach.analysis.suite import finite_json

    folder = Path(run_dir) / "analysis"
    folder.mkdir(parents=True, exist_ok=True)
    write_json(folder / f"{kind.replace('-', '_')}.json", finite_json(result), indent=1)


def analyze_runs(conn, runs: list[dict], analysis: dict[str, dict], say: Callable[[str], None]) -> int:
    """Per-run measurements that are missing or were computed with other settings; returns how many ran."""
    from spach.analysis.common import ImageSet, load_subject
    from spach.analysis.suite import measure

    stored = {(a["subject"], a["kind"]): a["settings"] for a in db.analysis_rows(conn)}
    done = 0
    for run in runs:
        todo = [k for k in PER_RUN if k in analysis and run["status"] == "done"
                and stored.get((run["key"], k)) != _settings_text(analysis[k])]
        if not todo:
            continue
        try:
            subject = load_subject(run_dir=run["output_dir"], label=run["name"])
        except (ValueError, FileNotFoundError, RuntimeError) as e:
            say(f"analysis: cannot load {run['name']}: {e}")
            continue
        images: dict[int, ImageSet] = {}
        for kind in todo:
            t0 = time.time()
            n = analysis[kind]["images"]
            try:
                if n not in images:
                    images[n] = ImageSet.for_subject(subject, n)
                result = measure(kind, subject, analysis[kind], images[n])
            except (ValueError, RuntimeError) as e:  # e.g. an input size a model cannot take
                say(f"analysis {kind} of {run['name']} failed: {e}")
                continue
            db.record_analysis(conn, run["key"], kind, _settings_text(analysis[kind]), result)
            _write_json(run["output_dir"], kind, result)
            done += 1
            say(f"analysis {kind} of {run['name']}: {time.time() - t0:.1f}s")
    return done


def analyze_cka(conn, runs: list[dict], settings: dict, say: Callable[[str], None]) -> bool:
    """Linear CKA between all blocks of the representative models (one per group); True if computed."""
    from spach.analysis.cka import cka_joint
    from spach.analysis.common import load_subject

    reps = representatives(runs)
    if not reps:
        return False
    text = _settings_text(settings, runs=[r["key"] for r in reps])
    stored = {(a["subject"], a["kind"]): a["settings"] for a in db.analysis_rows(conn)}
    if stored.get(("study", "cka")) == text:
        return False
    by_size: dict[int, list] = {}
    t0 = time.time()
    for r in reps:
        try:
            s = load_subject(run_dir=r["output_dir"], label=r["grp"])
        except (ValueError, FileNotFoundError, RuntimeError) as e:
            say(f"analysis: cannot load {r['name']}: {e}")
            continue
        by_size.setdefault(s.img_size, []).append(s)
    size, subjects = max(by_size.items(), key=lambda kv: len(kv[1]), default=(None, []))
    if not subjects:
        return False
    result = cka_joint(subjects, n_images=settings["images"], batch_size=settings["batch_size"])
    result["families"] = {s.label: s.family for s in subjects}
    db.record_analysis(conn, "study", "cka", text, result)
    say(f"analysis cka of {len(subjects)} models at {size}px: {time.time() - t0:.1f}s")
    return True


def analyze_study(out_dir: str | Path, analysis: dict[str, dict], say: Callable[[str], None] = print,
                  threads: int | None = None) -> int:
    """Run the study's analyses on its finished runs (see the module docstring); returns how many ran."""
    if not analysis:
        return 0
    conn = db.connect(out_dir)
    try:
        with num_threads(threads):  # the caller's share (spach.battle.threads), restored afterwards
            runs = db.runs(conn, db.study_keys(conn))
            count = analyze_runs(conn, runs, analysis, say)
            if "cka" in analysis:
                count += int(analyze_cka(conn, runs, analysis["cka"], say))
    finally:
        conn.close()
    return count
