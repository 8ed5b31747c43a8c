"""The launcher seam: how the runs of a study get executed, behind one small protocol and one registry.

    launcher = make_launcher(study, out_dir, workers=2, threads=1)   # by study.launcher["kind"]
    drive(launcher, conn, pending, attached, progress)                 # spach.battle.launchers.drive

A launcher (a subclass of `Launcher`) knows how to

- `submit` a run (start executing it: in this process, in a worker process, as a Slurm job, as a Ray task),
- `attach` to runs that an earlier, interrupted coordinator left executing elsewhere (their job ids are
  in the database) and `poll` the runs in flight, recording what ended through `db.mark_done` /
  `db.mark_failed` (directly, or by importing the job's result file, `spach.battle.jobfiles`),
- report the live state of its jobs and `cancel` them (`spach battle status/cancel`),
- `describe` itself in one line.

The runner asks the registry for the study's launcher and drives it; it never names a kind. Adding an
engine is one new module here with its class and one line in `LAUNCHERS` (and its settings keys in
`spach.battle.schema.Launcher`). Modules are imported only when their kind is used, so an optional
engine's package (submitit, ray) is needed only by studies that use it.
"""
from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

from spach.battle.progress import Progress

# kind -> "module:Class" (imported when used) or the class itself, one line per launcher
LAUNCHERS: dict[str, Any] = {
    "local": "spach.battle.launchers.local:LocalLauncher",
    "torchrun": "spach.battle.launchers.torchrun:TorchrunLauncher",
    "slurm": "spach.battle.launchers.slurm:SlurmLauncher",
    "ray": "spach.battle.launchers.ray:RayLauncher",
}
KINDS = tuple(LAUNCHERS)  # the built-in kinds (a test or plugin may register more in LAUNCHERS)
BARE_JOB_IDS = "slurm"  # the kind whose job ids the database holds bare; every other kind's are "KIND:ID"


class Launcher:
    """The protocol every launcher implements (the defaults suit a launcher without jobs of its own).

    `study` is the parsed study (its `launcher` settings are this launcher's), `out_dir` the study's
    output directory, `workers` the runs at a time on this machine (`--workers`; only launchers with
    `uses_workers` use it), `threads` the torch threads per run that `spach.battle.threads` decided
    (None where the run's own machine decides)."""

    kind = ""
    uses_workers = False   # `--workers N` runs N at a time on this machine
    runs_here = False      # the runs execute on this machine (so a CUDA measurement needs CUDA here)
    can_detach = False     # `--detach`: submit and return; the jobs run on without a coordinator

    def __init__(self, study, out_dir: str | Path, workers: int = 1, threads: int | None = None):
        self.study, self.out_dir, self.workers, self.threads = study, Path(out_dir), workers, threads
        self.settings: dict[str, Any] = study.launcher

    # ---- set-up and description
    def check(self) -> None:
        """Raise (a clear error naming what is missing) if this launcher cannot run here."""

    def describe(self) -> str:
        """One line for the console: how the runs execute."""
        return f"{self.workers} worker(s) x {self.threads} thread(s)"

    def capacity(self) -> int | None:
        """How many runs may be in flight at once (None: no limit)."""
        return self.workers

    def poll_s(self) -> float:
        """Seconds between two polls of the runs in flight."""
        return 0.5

    # ---- the runs
    def attach(self, conn, rows: list[dict], progress: Progress) -> None:
        """Follow runs left executing by an earlier coordinator (status 'running', a job id recorded)."""

    def submit(self, conn, row: dict, index: int, progress: Progress) -> None:
        """Start executing the run `row` (the `index`-th started by this invocation)."""
        raise NotImplementedError(f"the {self.kind} launcher does not implement submit")

    def poll(self, conn, rows: list[dict], progress: Progress) -> set[str]:
        """Look at the runs in flight; record those that ended; return their keys."""
        raise NotImplementedError(f"the {self.kind} launcher does not implement poll")

    def stop(self, interrupted: bool) -> None:
        """End what this launcher started on this machine (`interrupted`: the study was stopped)."""

    # ---- its jobs, for `spach battle status/cancel` (launchers whose runs outlive the coordinator)
    @classmethod
    def job_states(cls, job_ids: list[str]) -> dict[str, tuple[str, str]] | None:
        """job id -> (state, node) of the jobs still known; None when the engine does not answer."""
        return None

    @classmethod
    def cancel_jobs(cls, job_ids: list[str]) -> None:
        """Stop these jobs; the coordinator records their runs as failed at its next poll."""
        raise NotImplementedError(f"the {cls.kind} launcher has no jobs to cancel")


def source_root() -> Path:
    """The directory holding the `spach` package that this process imports (workers and jobs import the
    same one, installed or not, through PYTHONPATH)."""
    return Path(__file__).resolve().parents[3]


def launcher_class(kind: str) -> type[Launcher]:
    """The registered class of a launcher kind (its module imported now)."""
    if kind not in LAUNCHERS:
        raise ValueError(f"unknown launcher kind {kind!r}; choose from {list(LAUNCHERS)}")
    entry = LAUNCHERS[kind]
    if isinstance(entry, type):
        return entry
    module, name = entry.split(":")
    return getattr(importlib.import_module(module), name)


def make_launcher(study, out_dir: str | Path, workers: int = 1, threads: int | None = None) -> Launcher:
    """The launcher of `study` (its `launcher.kind`), ready to drive."""
    return launcher_class(study.launcher["kind"])(study, out_dir, workers=workers, threads=threads)


def job_kind(job_id: str) -> str:
    """The launcher kind that owns a job id recorded in the database: KIND of "KIND:ID", else BARE_JOB_IDS."""
    kind = job_id.split(":", 1)[0] if ":" in job_id else BARE_JOB_IDS
    return kind if kind in LAUNCHERS else BARE_JOB_IDS


__all__ = ["LAUNCHERS", "KINDS", "Launcher", "launcher_class", "make_launcher", "job_kind", "source_root"]
