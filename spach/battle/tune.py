"""The tuning phase of a study with `tune:`: the same number of Optuna trials for every architecture, scored
on a selection split of the training data, then each architecture's best configuration as its final runs.

`run_study` calls `tune_study` first (holding the study lock). For each architecture (a group of the
grid or an extra entry) it keeps one Optuna study, named after the group, in ``OUT/tune.db`` (Optuna's
SQLite storage, beside ``battle.db``), and runs rounds until every architecture has spent its budget:

- a round asks each architecture that has trials left for one trial (Optuna's TPE sampler, seeded by
  `tune.seed` and the trial's number, so a resumed study draws what an uninterrupted one would), and
  executes the round's trials as battle runs on the study's launcher, `--workers` at a time;
- a trial is a run of the architecture's model with the recipe updated by the trial's parameters,
  trained with seed `tune.seed` on the training data minus the selection split and scored (final top-1)
  on the selection split (`TrainConfig.selection_fraction`; `spach.data.selection_split`: class-
  stratified, fixed by `tune.seed`, carved from the training split, so it cannot share an image with
  the validation split, which a trial never opens); the split is recorded in battle.db (meta
  ``selection``), each trial in its ``trials`` table (architecture, number, run key, parameters, state,
  score, budget);
- with `tune.pruner` (the same Optuna pruner for every architecture, built in `optuna_study`), the trial's
  run reports its selection top-1 after each epoch to its Optuna trial in OUT/tune.db and stops when the
  pruner says so (`spach.battle.pruning`, in whichever process trains it); its run is then done with
  `pruned_after` = the epochs it trained, and Optuna is told PRUNED;
- crash safety: a trial is registered as a run before it trains, and told to Optuna after its run is
  done; a study killed at any moment continues the trial Optuna still holds as running from its run's
  checkpoint (the same parameters, so the same run key), and a trial whose run is done is told, never
  trained again.

The final runs are the study's own runs, each with its architecture's best parameters (highest score of
its complete trials; the first on ties; a pruned trial is never chosen) and the study's seeds, trained
on the full training split and reported on the validation split like any battle run. An architecture
none of whose trials completed is skipped, with the reason.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from spach.battle import db
from spach.battle.progress import Progress, pruned_phrase
from spach.battle.launchers.drive import execute_pending
from spach.battle.spec import run_dir
from spach.battle.threads import threads_per_run
from spach.battle.tracking import open_tracking
from spach.battle.spec import Run, Study
from spach.battle.tune_space import describe_pruner, distributions, optuna_pruner
from spach.errors import SpachError

TUNE_DB = "tune.db"
SEED_STRIDE = 100_003  # sampler seed of trial n: tune.seed * SEED_STRIDE + n


@dataclass(frozen=True)
class Trial:
    """One trial of an architecture: Optuna's number (from 0), its parameters and its battle run."""

    group: str
    number: int
    params: dict[str, Any]
    run: Run


def architectures(study: Study) -> dict[str, list[Run]]:
    """The study's runs by architecture (group), in the study's order."""
    out: dict[str, list[Run]] = {}
    for r in study.runs:
        out.setdefault(r.group, []).append(r)
    return out


def trial_run(study: Study, base: Run, number: int, params: dict[str, Any], out_dir: str | Path | None = None) -> Run:
    """The battle run of trial `number` of `base`'s architecture: the recipe with `params`, seed
    `tune.seed`, trained without the selection split and scored on it. With `tune.pruner` it also names its
    Optuna trial (`Run.prune`, see `spach.battle.pruning`), which needs the study's output directory."""
    tune = study.tune
    train = dict(base.train, **params, seed=tune["seed"], selection_fraction=tune["selection"],
                 selection_seed=tune["seed"])
    prune = None
    if tune.get("pruner") is not None:
        if out_dir is None:
            raise ValueError("trial_run: a study with tune.pruner needs out_dir (its trials report to OUT/tune.db)")
        prune = {"storage": storage_from_run_dir(out_dir, study, base), "study": base.group, "trial": number,
                 "pruner": tune["pruner"]}
    return replace(base, name=f"{base.group}-trial{number + 1}", seed=tune["seed"], train=train, prune=prune)


def storage_from_run_dir(out_dir: str | Path, study: Study, run: Run) -> str:
    """OUT/tune.db as a path relative to a run's directory (OUT/RUNS_DIR/NAME-KEY8, any run: only their common
    folder counts), so that a trial's run key does not depend on where OUT lies (with an absolute
    `runs_dir`, on both places)."""
    runs_folder = run_dir(out_dir, run, study.runs_dir).parent.resolve()
    return os.path.join(os.pardir, os.path.relpath((Path(out_dir) / TUNE_DB).resolve(), runs_folder))


def storage_url(out_dir: str | Path) -> str:
    """Optuna's SQLite storage of the study: OUT/tune.db."""
    return f"sqlite:///{(Path(out_dir) / TUNE_DB).resolve()}"


def optuna_study(storage: Any, tune: dict[str, Any], group: str, draw: int = 0):
    """The architecture's Optuna study (created on first use), its sampler seeded for draw number `draw`, with
    the study's pruner (the same for every architecture; none without `tune.pruner`)."""
    import optuna

    sampler = optuna.samplers.TPESampler(seed=tune["seed"] * SEED_STRIDE + draw,
                                         n_startup_trials=tune["startup_trials"])
    return optuna.create_study(storage=storage, study_name=group, direction="maximize", sampler=sampler,
                               pruner=optuna_pruner(tune.get("pruner")), load_if_exists=True)


def next_trial(storage: Any, study: Study, group: str, base: Run, out_dir: Path) -> Trial | None:
    """The architecture's trial to execute now: the one Optuna holds as running (an interrupted study),
    else a new one; None when its budget is spent."""
    from optuna.trial import TrialState

    tune = study.tune
    trials = optuna_study(storage, tune, group).get_trials(deepcopy=False)
    running = [t for t in trials if t.state == TrialState.RUNNING]
    if running:
        t = running[0]
        return Trial(group, t.number, dict(t.params), trial_run(study, base, t.number, dict(t.params), out_dir))
    if len(trials) >= tune["trials"]:
        return None
    t = optuna_study(storage, tune, group, draw=len(trials)).ask(distributions(tune["space"]))
    return Trial(group, t.number, dict(t.params), trial_run(study, base, t.number, dict(t.params), out_dir))


def outcome(row: dict[str, Any]) -> str:
    """What a trial's ended run means to Optuna: "complete", "pruned" (done, stopped by the pruner) or "fail"."""
    if row["status"] == "failed":
        return "fail"
    return "pruned" if row.get("pruned_after") is not None else "complete"


def tell(storage: Any, study: Study, trial: Trial, row: dict[str, Any]) -> None:
    """Give Optuna the outcome of a trial whose run ended: its score (complete), pruned (Optuna keeps its last
    reported value) or failed."""
    from optuna.trial import TrialState

    st = optuna_study(storage, study.tune, trial.group)
    state = outcome(row)
    if state == "complete":
        st.tell(trial.number, float(row["final_top1"]))
    else:
        st.tell(trial.number, state=TrialState.PRUNED if state == "pruned" else TrialState.FAIL)


def outcome_line(study: Study, trial: Trial, row: dict[str, Any]) -> str:
    """The progress line of a trial that was told: its outcome and selection top-1."""
    head = f"{trial.group} trial {trial.number + 1}/{study.tune['trials']}"
    state = outcome(row)
    if state == "fail":
        return f"{head}: failed"
    if state == "pruned":
        pruned = pruned_phrase(row["pruned_after"], db.epochs_of(row))
        return f"{head}: {pruned} (selection top-1 {row['final_top1']:.2f}%)"
    return f"{head}: complete, selection top-1 {row['final_top1']:.2f}%"


def sync_trials(conn, storage: Any, study: Study, groups: dict[str, list[Run]], out_dir: Path) -> None:
    """Copy every architecture's Optuna trials into battle.db's `trials` table (the report reads it), with the
    epochs each trial's run trained."""
    for group, runs in groups.items():
        for t in optuna_study(storage, study.tune, group).get_trials(deepcopy=False):
            params = dict(t.params)
            key = trial_run(study, runs[0], t.number, params, out_dir).key
            db.record_trial(conn, group, t.number, key, params, t.state.name.lower(),
                            t.value if t.value is not None else None, study.tune["trials"],
                            epochs=len(db.epochs(conn, key)))


def record_selection(conn, study: Study) -> dict[str, Any]:
    """Compute the selection split as the trials' engine will (same function, same arguments) and store it
    in battle.db (meta ``selection``): fraction, seed, sizes, images per class and the held-out indices
    into the training split."""
    from spach.data import class_balanced_indices, open_source, selection_split

    tune = study.tune
    targets = open_source(study.data, "train").targets
    pool = class_balanced_indices(targets, study.recipe.get("max_train_samples"))
    fit, held = selection_split(targets, tune["selection"], tune["seed"], pool=pool)
    per_class: dict[str, int] = {}
    for i in held:
        per_class[str(targets[i])] = per_class.get(str(targets[i]), 0) + 1
    record = {"data": study.data, "split": "train", "fraction": tune["selection"], "seed": tune["seed"],
              "fit_images": len(fit), "selection_images": len(held), "per_class": per_class, "indices": held}
    db.set_meta(conn, "selection", record)
    return record


def prepare(out_dir: Path, study: Study) -> None:
    """battle.db ready for the trials: created, the selection split recorded, interrupted runs requeued."""
    conn = db.connect(out_dir, create=True)
    try:
        record_selection(conn, study)
        db.set_meta(conn, "tune", study.tune)
        _, alive = db.reset_interrupted(conn)
    finally:
        conn.close()
    if alive:
        raise SpachError("run(s) still executing in another process (a worker of an earlier, killed "
                         f"`spach battle`?): {', '.join(f'{n} (pid {p})' for n, p in alive)}; "
                         "wait for them to finish or stop them, then run again")


def run_round(out_dir: Path, study: Study, storage: Any, batch: list[Trial], workers: int, per_run: int,
              progress: Progress) -> None:
    """Register, execute and tell one trial per architecture."""
    conn = db.connect(out_dir)
    try:
        db.insert_runs(conn, [t.run for t in batch], lambda r: run_dir(out_dir, r, study.runs_dir))
        rows = {t.run.key: db.get_run(conn, t.run.key) for t in batch}
        for t in batch:
            shown = ", ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in t.params.items())
            state = "already done" if rows[t.run.key]["status"] == "done" else "to run"
            progress.message(f"{t.group} trial {t.number + 1}/{study.tune['trials']}: {shown} ({state})")
        pending = [rows[t.run.key] for t in batch if rows[t.run.key]["status"] == "queued"]
        execute_pending(out_dir, replace(study, runs=[t.run for t in batch]), pending, workers, per_run, progress,
                        first=progress.finished + 1)
        for t in batch:
            row = db.get_run(conn, t.run.key)
            if row["status"] not in ("done", "failed"):  # e.g. an interrupted launcher: never loop on it
                raise SpachError(f"{t.group} trial {t.number + 1}: its run {row['name']} is still {row['status']}; "
                                 "run the study again to continue it")
            tell(storage, study, t, row)
            progress.message(outcome_line(study, t, row))
    finally:
        conn.close()


def best_params(storage: Any, study: Study, group: str) -> dict[str, Any] | None:
    """The parameters of the architecture's highest-scoring complete trial (the first on ties; pruned and failed
    trials are never chosen), or None."""
    from optuna.trial import TrialState

    done = [t for t in optuna_study(storage, study.tune, group).get_trials(deepcopy=False)
            if t.state == TrialState.COMPLETE]
    if not done:
        return None
    return dict(max(done, key=lambda t: (t.value, -t.number)).params)


def retrained(study: Study, storage: Any, groups: dict[str, list[Run]]) -> Study:
    """The study whose runs are each architecture's runs with its best parameters (skipped: none finished)."""
    runs, skipped = [], list(study.skipped)
    for group, group_runs in groups.items():
        params = best_params(storage, study, group)
        if params is None:
            skipped.append((group, f"tuning: none of its {study.tune['trials']} trials completed "
                                   f"({ended_states(storage, study, group)})"))
            continue
        runs += [replace(r, train=dict(r.train, **params)) for r in group_runs]
    return replace(study, runs=runs, skipped=skipped)


def final_runs(study: Study, out_dir: str | Path) -> Study:
    """`study` with each run given its architecture's tuned recipe, read from OUT/tune.db (after the trials:
    what `tune_study` returns for the same runs); e.g. the seeds `--until-decisive` adds."""
    import optuna

    storage = optuna.storages.RDBStorage(storage_url(out_dir))
    return retrained(study, storage, architectures(study))


def ended_states(storage: Any, study: Study, group: str) -> str:
    """The architecture's trials by state in words, e.g. "2 pruned, 1 failed"."""
    states = [t.state.name.lower() for t in optuna_study(storage, study.tune, group).get_trials(deepcopy=False)]
    words = {"complete": "complete", "pruned": "pruned", "fail": "failed", "running": "running"}
    return ", ".join(f"{states.count(s)} {word}" for s, word in words.items() if s in states) or "none asked"


def tune_study(study: Study, out_dir: str | Path, workers: int, threads: int | None, quiet: bool = False) -> Study:
    """Run the trials that are missing (see the module doc); the study with its tuned final runs."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    out_dir = Path(out_dir)
    groups = architectures(study)
    prepare(out_dir, study)
    storage = optuna.storages.RDBStorage(storage_url(out_dir))
    per_run = threads_per_run(study.threads, total=threads, workers=workers)
    left = sum(max(0, study.tune["trials"] - len(optuna_study(storage, study.tune, g).get_trials(deepcopy=False)))
               for g in groups)
    progress = Progress(total=left, quiet=quiet, log_path=out_dir / "progress.log",  # if the console is closed
                        scored_on="selection")
    progress.message(f"tuning {len(groups)} architecture(s) x {study.tune['trials']} trial(s) on a selection "
                     f"split of {study.tune['selection']:.0%} of the training data (seed {study.tune['seed']}); "
                     f"{describe_pruner(study.tune.get('pruner'))}")
    hub = open_tracking(study, out_dir, say=progress.message)  # the trials are logged as the study's runs are
    if hub:
        progress.listeners.append(hub)
    try:
        while True:
            batch = [t for g, runs in groups.items()
                     if (t := next_trial(storage, study, g, runs[0], out_dir)) is not None]
            if not batch:
                break
            if hub:
                hub.follow([t.run for t in batch])
            run_round(out_dir, study, storage, batch, workers, per_run, progress)
            conn = db.connect(out_dir)
            sync_trials(conn, storage, study, groups, out_dir)
            conn.close()
    finally:
        if hub:
            hub.close()
    conn = db.connect(out_dir)
    sync_trials(conn, storage, study, groups, out_dir)
    conn.close()
    final = retrained(study, storage, groups)
    progress.message(f"tuning done: the best configuration of each architecture is retrained with seeds "
                     f"{sorted({r.seed for r in final.runs})} on the full training data")
    return final
