"""The files through which a job on another machine reports to the coordinator (Slurm and Ray launchers).

A job never opens battle.db: in its run directory it writes

- `job.json` at the start of each attempt: {job_id, attempt, started_at, node, tasks, pid};
- `metrics.jsonl`, one line per epoch (the engine writes it);
- `result.json` at the end: {job_id, status: done, metrics, history} or {job_id, status: failed, error}.

The coordinator reads them (`settle_from_files`, `import_epochs`) and records what they say in the
database: a result through `db.mark_done` / `db.mark_failed`, the attempt through `db.mark_job_attempt`.
Each file is written atomically (`spach.io.write_json`), so a reader never sees half of one.
"""
from __future__ import annotations

import json
import os
import time
import traceback
from pathlib import Path
from typing import Any

from spach.battle import db
from spach.battle.execute import train_and_measure
from spach.battle.progress import Progress, done_detail
from spach.io import write_json

JOB_FILE = "job.json"          # in the run directory: the job's current attempt (written at its start)
RESULT_FILE = "result.json"    # in the run directory: the job's outcome (done + metrics, or failed + error)


def read_json(path: Path) -> dict | None:
    """The JSON object in `path`, or None if it is missing or not (yet) readable."""
    try:
        obj = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    return obj if isinstance(obj, dict) else None


def run_attempt(payload: dict[str, Any], job_id: str, attempt: int, node: str, tasks: int = 1,
                rank: int = 0, world_size: int = 1, threads: int | None = None) -> dict[str, Any] | None:
    """One attempt of a run's job: (rank 0) write job.json, refuse past `payload["max_attempts"]`, train and
    measure (continuing from the run's checkpoint), write result.json. Returns the metrics (None when
    refused); re-raises a training error after recording it, so the job itself ends failed."""
    out = Path(payload["output_dir"])
    out.mkdir(parents=True, exist_ok=True)
    if rank == 0:
        write_json(out / JOB_FILE, {"job_id": job_id, "attempt": attempt, "started_at": time.time(),
                                    "node": node, "tasks": tasks, "pid": os.getpid()})
    if attempt > payload["max_attempts"]:
        error = (f"job {job_id} was interrupted (pre-empted, time limit, lost worker) {attempt - 1} time(s); "
                 f"max_attempts is {payload['max_attempts']} (raise launcher.max_attempts or the time limit)")
        if rank == 0:
            write_json(out / RESULT_FILE, {"job_id": job_id, "status": "failed", "error": error})
        return None
    try:
        metrics, history = train_and_measure(payload["config"], out, threads)
    except Exception as e:
        if rank == 0:
            error = f"{type(e).__name__}: {e}\n" + "".join(traceback.format_exc(limit=8))
            write_json(out / RESULT_FILE, {"job_id": job_id, "status": "failed", "error": error})
        raise
    if rank == 0:
        write_json(out / RESULT_FILE, {"job_id": job_id, "status": "done", "metrics": metrics, "history": history,
                                       "world_size": world_size})
    return metrics


def import_epochs(conn, row: dict[str, Any], progress: Progress | None = None) -> None:
    """Copy the epochs the job has written to its metrics.jsonl into the database."""
    path = Path(row["output_dir"]) / "metrics.jsonl"
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return
    have = {e["epoch"] for e in db.epochs(conn, row["key"])}
    epochs = db.epochs_of(row)
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:  # a line being written
            continue
        if isinstance(record, dict) and "epoch" in record and int(record["epoch"]) not in have:
            db.record_epoch(conn, row["key"], record)
            if progress:
                progress.epoch_done(row["name"], record, epochs)


def settle_from_files(conn, row: dict[str, Any], progress: Progress | None) -> str | None:
    """Record what the run's job wrote: its current attempt, and its result ("done"/"failed", returned;
    None while there is none)."""
    out, key, job_id = Path(row["output_dir"]), row["key"], row["job_id"]
    # the result before the job file: a job writes its job file, then (maybe at once) its result, so a
    # result read first comes with the job file of the same attempt or a newer one, never an older one
    result = read_json(out / RESULT_FILE)
    info = read_json(out / JOB_FILE)
    if info and str(info.get("job_id")) == job_id:
        db.mark_job_attempt(conn, key, job_id, int(info["attempt"]), info.get("node"), info.get("started_at"))
    if not (result and str(result.get("job_id")) == job_id):
        return None
    if result.get("status") == "done":
        for record in result.get("history") or []:
            db.record_epoch(conn, key, record)
        metrics = result["metrics"]
        db.mark_done(conn, key, metrics)
        if progress:
            epochs = db.epochs_of(row)
            progress.run_finished(row["name"], True, done_detail(metrics, epochs, f" (job {job_id})"))
        return "done"
    error = str(result.get("error") or "the job reported a failure without a message")
    db.mark_failed(conn, key, error)
    if progress:
        progress.run_finished(row["name"], False, error.splitlines()[0])
    return "failed"


def epochs_on_disk(output_dir: str) -> int:
    """How many epoch lines the run's metrics.jsonl holds (0 without one)."""
    try:
        return sum(1 for line in (Path(output_dir) / "metrics.jsonl").read_text().splitlines() if line.strip())
    except OSError:
        return 0
