"""Drive a launcher through a study's runs: attach to those in flight, keep its capacity busy, poll.

The one scheduling loop every launcher shares (see `spach.battle.launchers` for the protocol): runs are
submitted in the study's order, at most `launcher.capacity()` in flight; every `launcher.poll_s()`
seconds the launcher records the runs that ended. With `detach` (launchers that `can_detach`) the loop
submits what fits and returns; a later invocation attaches to the jobs by the ids in the database.
"""
from __future__ import annotations

import time

from spach.battle import db
from spach.battle.launchers import Launcher
from spach.battle.progress import Progress


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
