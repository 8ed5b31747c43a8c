"""The local launcher (`launcher: {kind: local}`, the default): the runs on this machine, `--workers` at a time.

With one worker each run executes in the coordinator's own process, one after another; with several,
each worker slot is a long-lived `python -m spach.battle.worker OUT --serve` process
(`spach.battle.launchers.processes`), the machine's threads split between them.
"""
from __future__ import annotations

from spach.battle.execute import execute_run
from spach.battle.launchers.processes import SlotLauncher
from spach.battle.progress import Progress


class LocalLauncher(SlotLauncher):
    """Runs in this process (one worker) or in `--workers` serving worker processes."""

    kind = "local"
    uses_workers = True

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.in_process = self.workers == 1
        self.ended: set[str] = set()

    def submit(self, conn, row: dict, index: int, progress: Progress) -> None:
        if not self.in_process:
            return super().submit(conn, row, index, progress)
        # here, now: execute_run records the outcome and reports the progress itself
        execute_run(self.out_dir, row["key"], threads=self.threads, progress=progress, index=index)
        self.ended.add(row["key"])

    def poll(self, conn, rows: list[dict], progress: Progress) -> set[str]:
        if not self.in_process:
            return super().poll(conn, rows, progress)
        ended, self.ended = self.ended, set()
        return ended
