"""Drive a launcher through a study's runs: attach to those in flight, keep its capacity busy, poll.

The one scheduling loop every launcher shares (see `spach.battle.launchers` for the protocol): runs are
submitted in the study's order, at most `launcher.capacity()` in flight; every `launcher.poll_s()`
seconds the launcher records the runs that ended. With `detach` (launchers that `can_detach`) the loop
submits what fits and returns; a later invocation attaches to the jobs by the ids in the database.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING

from spach.battle import db
from spach.battle.launchers import Launcher, make_launcher
from spach.battle.progress import Progress

if TYPE_CHECKING:
    from spach.battle.spec import Study


def drive(launcher: Launcher, conn, pending: list[dict], attached: list[dict], progress: Progress,
          detach: bool = False, first: int = 1) -> None:
    """Execute `pending` (queued rows, in order) and follow `attached` (rows in flight since an earlier
    coordinator) until none is left; the caller holds the study lock and `conn` (its database). `first`:
    the progress number of the first run submitted."""
    launcher.check()
    queue = list(pending)
    active = {row["key"]: row for row in attached}
    if attached:
        progress.total += len(attached)
        launcher.attach(conn, attached, progress)
    started = first - 1
    interrupted = True
    try:
        while queue or active:
            capacity = launcher.capacity()
            while queue and (capacity is None or len(active) < capacity):
                row = queue.pop(0)
                started += 1
                launcher.submit(conn, row, started, progress)
                active[row["key"]] = row
            if detach:
                progress.message(f"detached: {len(active)} job(s) queued or running; follow with "
                                 f"`spach battle status {launcher.out_dir}`, collect with the same command")
                break
            current = [db.get_run(conn, key) for key in active]  # as the launcher last recorded them
            for key in launcher.poll(conn, current, progress):
                active.pop(key, None)
            if active:
                time.sleep(launcher.poll_s())
        interrupted = False
    finally:
        launcher.stop(interrupted)


def execute_pending(out_dir: Path, study: Study, pending: list[dict], workers: int, per_run: int | None,
                    progress: Progress, detach: bool = False, first: int = 1,
                    launcher: Launcher | None = None) -> None:
    """Execute the queued rows `pending` of the study's runs on its launcher (`make_launcher`, or the one
    given), `workers` at a time, `per_run` threads each, and follow the runs of `study.runs` an earlier
    coordinator left executing elsewhere (status 'running': `queue_study` requeued every other);
    `first`: the progress number of the first run."""
    chosen = launcher or make_launcher(study, out_dir, workers=workers, threads=per_run)
    conn = db.connect(out_dir)
    try:
        attached = [r for r in db.runs(conn, [r.key for r in study.runs]) if r["status"] == "running"]
        if pending or attached:
            drive(chosen, conn, pending, attached, progress, detach=detach, first=first)
    finally:
        conn.close()
