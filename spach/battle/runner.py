"""Execute a study: every run is one training through the engine plus its measurements.

`run_study(spec, out_dir)` takes the output directory's lock, records the study
in the database, and executes the runs that are not done through the study's
launcher (`spach.battle.launchers`: the registry picks it by `launcher.kind`, and
`launchers.drive` keeps it busy; this module names no kind):

- the launcher submits each pending run (in this process, in worker processes,
  as a cluster job, ...) and records those that end; runs a killed coordinator
  left executing elsewhere (a job id in the database) are attached to, not run again;
- a run left 'running' by an interrupted invocation continues from its
  checkpoint (the engine's `resume="auto"`); done runs are never run again;
  failed runs are retried only with `retry_failed=True`;
- a failing run is recorded with its error and the study goes on;
- inference throughput is measured in a quiet phase, after all training, one
  run at a time (`measure_speeds`), so no figure is taken while other runs
  train on the same cores; an interrupted study measures on its next invocation.

`--workers` defaults to what the cores allow at the study's threads per run
(`default_workers`); the threads per run follow `spach.battle.threads`. Then the study's `analysis:` measurements run on the finished runs
(`spach.battle.analysis_runs`), and the report is written at the end.
"""
from __future__ import annotations

import fcntl
import json
import os
import time
from pathlib import Path
from typing import Any, Callable

from spach.battle import db
from spach.battle.execute import measure_speed
from spach.battle.launchers import LAUNCHERS, Launcher, launcher_class, make_launcher
from spach.battle.launchers.drive import execute_pending
from spach.battle.progress import Progress
from spach.battle.spec import Run, Study, check_runnable_here, load_study, run_dir, summary
from spach.battle.threads import available_threads, threads_per_run
from spach.battle.tracking import open_tracking
from spach.errors import SpachError
from spach.io import check_writable_dir

LOCK_NAME = "battle.lock"


# --------------------------------------------------------------------------- the output directory's lock

class StudyLock:
    """An exclusive `flock` on OUT/battle.lock holding the owner's PID; released when the process dies."""

    def __init__(self, out_dir: str | Path):
        self.path = Path(out_dir) / LOCK_NAME
        self.fd: int | None = None

    def __enter__(self) -> "StudyLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise SpachError(f"{self.path.parent} is in use by another `spach battle` (pid {holder}); "
                             "wait for it to finish or stop it, or use another --out") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self.fd = fd
        return self

    def __exit__(self, *_) -> None:
        if self.fd is not None:
            os.ftruncate(self.fd, 0)
            os.close(self.fd)  # closing releases the flock
            self.fd = None


# --------------------------------------------------------------------------- one run

def measure_speeds(out_dir: str | Path, keys: list[str], threads: int | None, progress: Progress) -> int:
    """The quiet phase: inference throughput of every done run that lacks it, one at a time. Returns the count."""
    conn = db.connect(out_dir)
    try:
        todo = [r for r in db.runs(conn, keys) if r["status"] == "done" and r["images_per_s"] is None]
        if todo:
            progress.message(f"measuring inference throughput of {len(todo)} run(s), one at a time")
        for row in todo:
            images_per_s = measure_speed(json.loads(row["config"]), threads)
            db.record_speed(conn, row["key"], images_per_s)
            progress.message(f"{row['name']}: {images_per_s:.0f} img/s")
        return len(todo)
    finally:
        conn.close()


# --------------------------------------------------------------------------- the study

def default_workers(study: Study, threads: int | None = None) -> int:
    """Runs at a time that the cores allow at the study's threads per run (1 for launchers whose runs do not
    share this machine's cores, `Launcher.uses_workers`)."""
    if not launcher_class(study.launcher["kind"]).uses_workers or not study.threads:
        return 1
    return max(1, (threads or available_threads()) // study.threads)


def queue_study(out_dir: Path, study: Study, retry_failed: bool,
                accept_changed_data: bool = False) -> tuple[list[dict], list[str]]:
    """Register the study's runs in OUT/battle.db and requeue interrupted (and, if asked, failed) ones.

    Returns (the runs' rows, names of the interrupted runs); refuses while a run still executes elsewhere,
    and when done runs were trained on data that has changed since (`check_data_unchanged`).
    """
    conn = db.connect(out_dir, create=True)
    try:
        fingerprint, accepted = check_data_unchanged(conn, out_dir, study, accept_changed_data)
    except SpachError:
        conn.close()
        raise
    db.register_study(conn, study, lambda r: run_dir(out_dir, r, study.runs_dir))
    db.record_data_fingerprint(conn, [r.key for r in study.runs], fingerprint, accepted=accepted)
    interrupted, alive = db.reset_interrupted(conn)
    if alive:
        conn.close()
        raise SpachError("run(s) still executing in another process (a worker of an earlier, killed "
                         f"`spach battle`?): {', '.join(f'{n} (pid {p})' for n, p in alive)}; "
                         "wait for them to finish or stop them, then run again")
    keys = [r.key for r in study.runs]
    if retry_failed:
        db.requeue_failed(conn, keys)
    rows = db.runs(conn, keys)
    conn.close()
    return rows, interrupted


def check_data_unchanged(conn, out_dir: Path, study: Study, accept: bool) -> tuple[str, str | None]:
    """Done runs are reused only on the data they were trained on (its `spach.data.fingerprint`): refuse
    (SpachError, saying what changed) when the study's data differs now, unless `accept` (then the runs are
    kept, and the report says so). Returns (the data's fingerprint now, what changed for kept runs or None)."""
    from spach.battle.spec import stable_json
    from spach.data import describe_change, source_fingerprint

    now = source_fingerprint(study.data)
    keys = [r.key for r in study.runs]
    changed = db.runs_on_other_data(conn, keys, stable_json(now))
    what = None
    if changed:
        what = (f"{len(changed)} done run(s) were trained on data {study.data} as it was before "
                f"({describe_change(json.loads(changed[0]['data_fingerprint']), now)})")
        if not accept:
            raise SpachError(f"{out_dir}: {what}; their results would not describe the data as it is now. "
                             "Use another --out (or move this one aside) to train on the current data, or pass "
                             "--accept-changed-data to keep them (the report will say so)")
    return stable_json(now), what


def finish_study(out_dir: Path, study: Study, progress: Progress, threads: int, report: bool) -> dict[str, Any]:
    """After the runs: the status counts, the study's analyses (if asked) and the report."""
    conn = db.connect(out_dir)
    final = db.runs(conn, [r.key for r in study.runs])
    conn.close()
    result = {s: sum(r["status"] == s for r in final) for s in ("done", "failed", "queued", "running")}
    result["launcher"] = study.launcher["kind"]
    result["skipped"] = len(study.skipped)
    if study.analysis:  # measurements after training (spach.analysis), on the finished runs
        from spach.battle.analysis_runs import analyze_study
        result["analyses"] = analyze_study(out_dir, study.analysis, say=progress.message, threads=threads)
    if report:
        from spach.battle.report import write_report
        result["report"] = str(write_report(out_dir))
        progress.message(f"report: {result['report']}")
    return result


def earlier_versions_note(out_dir: str | Path, keys: list[str]) -> str | None:
    """A console line when OUT/battle.db holds done runs that are not this study's (an earlier version of it,
    before a change of recipe or grid): the report leaves them out too."""
    conn = db.connect(out_dir)
    try:
        mine = set(keys)
        trials = {t["key"] for t in db.trials(conn)}
        others = [r for r in db.runs(conn) if r["key"] not in mine | trials and r["status"] == "done"]
    finally:
        conn.close()
    if not others:
        return None
    return (f"note: {out_dir} also holds {len(others)} done run(s) of an earlier version of the study (another "
            "recipe or grid); they are kept in the database, not rerun and not in this report")


def run_study(spec: Study | str | Path | dict, out_dir: str | Path, workers: int | None = None,
              retry_failed: bool = False,
              threads: int | None = None, quiet: bool = False,
              report: bool = True, on_progress: Callable[[Progress], None] | None = None,
              launcher: str | None = None, detach: bool = False, mlflow: str | None = None,
              accept_changed_data: bool = False) -> dict[str, Any]:
    """Run every run of the study that is not done yet; write the report. Returns the status counts.

    `launcher` overrides the study's launcher kind (a kind of the launcher registry); with a launcher that
    `can_detach`, `detach` submits the missing runs' jobs and returns without waiting for them. `mlflow`
    (a tracking URI) also logs the runs to MLflow (spach.battle.tracking). `accept_changed_data` keeps
    done runs whose data changed since they were trained (the report says so).
    """
    study = spec if isinstance(spec, Study) else load_study(spec)
    if launcher:
        from spach.battle.spec import with_launcher
        study = with_launcher(study, launcher)
    if mlflow:
        from spach.battle.spec import with_tracking
        study = with_tracking(study, mlflow)
    kind = launcher_class(study.launcher["kind"])
    if detach and not kind.can_detach:
        raise ValueError(f"--detach needs a launcher whose jobs run on without a coordinator "
                         f"({[k for k in LAUNCHERS if launcher_class(k).can_detach]}); this study uses {kind.kind}")
    if detach and study.tune:
        raise ValueError("--detach cannot run a study with tune: (each trial waits for the previous ones' scores)")
    if workers is None:
        workers = default_workers(study, threads)
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    out_dir = Path(out_dir)
    check_runnable_here(study)
    check_writable_dir(out_dir, "--out")
    with StudyLock(out_dir):
        if study.tune:  # the trials first; the study's runs become each architecture's best configuration
            from spach.battle.tune import tune_study
            study = tune_study(study, out_dir, workers, threads, quiet)
        rows, interrupted = queue_study(out_dir, study, retry_failed, accept_changed_data)
        per_run = threads_per_run(study.threads, total=threads, workers=workers)
        chosen = make_launcher(study, out_dir, workers=workers, threads=per_run)
        progress = Progress(total=sum(r["status"] == "queued" for r in rows),
                            already_done=sum(r["status"] == "done" for r in rows), quiet=quiet,
                            log_path=out_dir / "progress.log")  # where lines go if the console is closed
        if on_progress:
            on_progress(progress)
        hub = open_tracking(study, out_dir, say=progress.message)  # None: the study logs nowhere else
        if hub:
            progress.listeners.append(hub)
        try:
            progress.message(summary(study))
            progress.message(status_line(out_dir, rows, interrupted, retry_failed, chosen.describe()))
            earlier = earlier_versions_note(out_dir, [r.key for r in study.runs])
            if earlier:
                progress.message(earlier)
            execute_pending(out_dir, study, [r for r in rows if r["status"] == "queued"], workers, per_run,
                            progress, detach, launcher=chosen)
            measure_speeds(out_dir, [r.key for r in study.runs], per_run, progress)
            # the analyses run one at a time: the whole --threads, else the study's threads, else every core
            result = finish_study(out_dir, study, progress, threads=threads_per_run(study.threads, total=threads),
                                  report=report)
            if hub:
                hub.study_finished(result.get("report"))
        finally:
            if hub:
                hub.close()
        progress.message(f"study {study.name}: {result['done']} done, {result['failed']} failed, "
                         + (f"{result['running']} running, " if result["running"] else "")
                         + f"{result['skipped']} skipped combination(s), {progress.t0 and _elapsed(progress.t0)}")
    return result


def status_line(out_dir: Path, rows: list[dict], interrupted: list[str], retry_failed: bool, how: str) -> str:
    """The console line before the runs: what is done, failed, to run, resumed, and how the runs execute."""
    counts = {s: sum(r["status"] == s for r in rows) for s in ("done", "failed", "queued")}
    return (f"output {out_dir}: {counts['done']} run(s) already done, {counts['failed']} failed"
            f"{' (not retried; use --retry-failed)' if counts['failed'] and not retry_failed else ''}, "
            f"{counts['queued']} to run"
            + (f"; resuming interrupted: {', '.join(interrupted)}" if interrupted else "")
            + f"; {how}")


def _elapsed(t0: float) -> str:
    from spach.battle.progress import format_duration
    return f"took {format_duration(time.time() - t0)}"
