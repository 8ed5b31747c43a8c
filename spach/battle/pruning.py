"""A tuning trial's pruning, in the process that trains it: after each epoch, report the trial's selection
top-1 to its Optuna trial and ask the study's pruner whether to stop.

A trial run of a study whose `tune:` has a `pruner` carries, in its configuration (`Run.prune`, part of
its key), ``{"storage", "study", "trial", "pruner"}``: Optuna's SQLite storage (OUT/tune.db) as a path
relative to the run's directory (so that the key does not depend on where OUT lies), the Optuna study
(the architecture's group), the trial's number and the checked pruner (`tune_space.check_pruner`).
`execute.train_and_measure` gives the engine a `TrialPruning` as its `should_stop` hook, so the same
code reports whatever launcher executes the run (this process, a worker, rank 0 of a torchrun launch,
a Slurm or Ray job: the storage is on the file system they share with the coordinator).

Steps are epochs counted from 1 (the record's ``epoch``); the value is the record's ``val_top1``, which
for a trial is the selection split (its run sets `selection_fraction`, and the engine then evaluates on
the held-out training images). A step already reported (a run resumed at the end of that epoch asks
again) is not reported twice: the pruner is asked on what the storage holds. Optuna is told the
trial's outcome (complete, pruned or failed) by the coordinator once the run has ended
(`spach.battle.tune.tell`), never here.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any


class TrialPruning:
    """The engine's `should_stop` hook of one trial run (see the module doc). Optuna's storage is opened at the
    first call, so that ranks other than 0 (which never call it) never touch it."""

    def __init__(self, prune: dict[str, Any], output_dir: str | Path):
        self.prune = prune
        self.storage_path = (Path(output_dir).resolve() / prune["storage"]).resolve()
        self.storage = self.trial_id = self.trial = None

    def open(self) -> None:
        """Open the storage and this run's Optuna trial (`optuna.trial.Trial` on the trial's study, loaded with
        the study's pruner)."""
        import optuna

        from spach.battle.tune_space import optuna_pruner

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        self.storage = optuna.storages.RDBStorage(f"sqlite:///{self.storage_path}")
        study_id = self.storage.get_study_id_from_name(self.prune["study"])
        self.trial_id = self.storage.get_trial_id_from_study_id_trial_number(study_id, self.prune["trial"])
        study = optuna.load_study(study_name=self.prune["study"], storage=self.storage,
                                  pruner=optuna_pruner(self.prune["pruner"]))
        self.trial = optuna.trial.Trial(study, self.trial_id)

    def __call__(self, record: dict[str, Any]) -> bool:
        """Report the epoch's selection top-1 (unless that epoch is reported already) and return the pruner's
        answer: True stops the training after this epoch."""
        if self.trial is None:
            self.open()
        step = int(record["epoch"])
        if step not in self.storage.get_trial(self.trial_id).intermediate_values:
            self.trial.report(float(record["val_top1"]), step)
        return bool(self.trial.should_prune())
