"""`spach battle status OUT` and `spach battle cancel OUT [RUN ...]`, for every launcher.

The status reads the database and the run directories (it writes nothing) and asks each run's launcher,
found by its job id (`spach.battle.launchers.job_kind`), for the live state of the job; cancel asks it to
stop the jobs. The coordinator records cancelled runs as failed at its next poll.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from spach.battle import db
from spach.battle.jobfiles import JOB_FILE, epochs_on_disk, read_json
from spach.battle.launchers import job_kind, launcher_class
from spach.battle.progress import format_duration


def job_states(job_ids: list[str]) -> dict[str, tuple[str, str]]:
    """job id -> (state, node) for the jobs their launchers still know (none where a launcher is silent)."""
    by_kind: dict[str, list[str]] = {}
    for job_id in job_ids:
        by_kind.setdefault(job_kind(job_id), []).append(job_id)
    states: dict[str, tuple[str, str]] = {}
    for kind, ids in by_kind.items():
        states.update(launcher_class(kind).job_states(ids) or {})
    return states


def study_status(out_dir: str | Path) -> list[dict[str, Any]]:
    """One entry per run of the study: name, status, job id, job state, node, epoch, epochs, elapsed (s).

    Reads the database and the run directories; writes nothing."""
    conn = db.connect_readonly(out_dir)
    try:
        rows = db.runs(conn, db.study_keys(conn))
        done_epochs = {r["key"]: len(db.epochs(conn, r["key"])) for r in rows}
    finally:
        conn.close()
    jobs = job_states([r["job_id"] for r in rows if r.get("job_id")])
    now, entries = time.time(), []
    for row in rows:
        job_id = row.get("job_id")
        info = read_json(Path(row["output_dir"]) / JOB_FILE) or {}
        current = job_id is not None and str(info.get("job_id")) == job_id
        state, node = jobs.get(job_id, (None, None)) if job_id else (None, None)
        epoch = max(done_epochs[row["key"]], epochs_on_disk(row["output_dir"]) if row["status"] == "running" else 0)
        started = info.get("started_at") if current else row["started_at"]
        if row["status"] == "running":
            elapsed = now - started if started and state == "RUNNING" else None
        else:
            elapsed = row["train_time_s"]
        entries.append({"name": row["name"], "status": row["status"], "job_id": job_id,
                        "job_state": state,
                        "node": node or (info.get("node") if current else row.get("node")),
                        "epoch": epoch, "epochs": db.epochs_of(row),
                        "elapsed_s": elapsed,
                        # attempts recorded, plus starts of the current job the coordinator has not seen yet
                        "attempts": row["attempts"] + (max(0, int(info["attempt"]) - (row.get("job_attempt") or 0))
                                                       if current and row["status"] == "running" else 0),
                        "error": (row["error"] or "").splitlines()[0] if row["error"] else None})
    return entries


def cancel_runs(out_dir: str | Path, names: list[str] | None = None) -> list[tuple[str, str]]:
    """Cancel the jobs of the study's submitted runs (all, or those named); returns [(name, job id)].

    The coordinator records them as failed (cancelled) at its next poll, or at the next `spach battle`."""
    conn = db.connect_readonly(out_dir)
    try:
        rows = db.runs(conn, db.study_keys(conn))
    finally:
        conn.close()
    if names:
        unknown = sorted(set(names) - {r["name"] for r in rows})
        if unknown:
            raise ValueError(f"no run(s) named {unknown} in {out_dir} (see `spach battle status {out_dir}`)")
    chosen = [(r["name"], r["job_id"]) for r in rows
              if r["status"] == "running" and r.get("job_id") and (not names or r["name"] in names)]
    by_kind: dict[str, list[str]] = {}
    for _, job_id in chosen:
        by_kind.setdefault(job_kind(job_id), []).append(job_id)
    for kind, ids in by_kind.items():
        launcher_class(kind).cancel_jobs(ids)
    return chosen


def format_status(entries: list[dict[str, Any]]) -> str:
    """The table of `spach battle status`: one line per run."""
    lines = [f"{'run':32s} {'state':10s} {'job':>8s} {'node':12s} {'epoch':>7s} {'elapsed':>9s} attempts"]
    for e in entries:
        state = e["job_state"].lower() if e["status"] == "running" and e["job_state"] else e["status"]
        epoch = f"{e['epoch']}/{e['epochs'] or '?'}"
        elapsed = format_duration(e["elapsed_s"]) if e["elapsed_s"] is not None else "-"
        line = (f"{e['name']:32s} {state:10s} {e['job_id'] or '-':>8s} {(e['node'] or '-')[:12]:12s} {epoch:>7s} "
                f"{elapsed:>9s} {e['attempts'] or 0}")
        if e["status"] == "failed" and e["error"]:
            line += f"  {e['error'][:100]}"
        lines.append(line)
    return "\n".join(lines)
