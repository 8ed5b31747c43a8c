"""Tuning at an equal budget per architecture (`tune:`): the selection split, the section's checks, the
budget-curve statistic, a tiny tuned study end to end, and its resume after SIGKILL mid-trial; the helpers
with which the launcher tests run a tuned study on torchrun, Slurm and Ray (`tuned_on`, `assert_tuned`)."""
from __future__ import annotations

import copy
import hashlib
import itertools
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

import spach
import spach.data
from spach.battle import load_study, run_study
from spach.battle.stats import expected_max
from spach.cli.main import main
from spach.data import build_dataset, selection_split

ROOT = Path(__file__).resolve().parents[1]

TINY = {
    "name": "tiny-tune", "data": "mnist5k", "img_size": 16, "threads": 1,
    "recipe": {"epochs": 1, "batch_size": 32, "lr": 2e-3, "warmup_epochs": 0, "cooldown_epochs": 0,
               "max_train_samples": 160, "smoothing": 0.0, "mixup": 0.0, "cutmix": 0.0, "augment": False,
               "repeated_aug": False, "model_ema": False, "drop_path": 0.0, "workers": 0, "tensorboard": False},
    "measure": {"batch_size": 8, "warmup": 1, "repeats": 1},
    "grid": {"family": ["conv", "attn"], "layout": ["ms"], "size": ["t"], "seed": [0, 1]},
    "sizes": {"t": {"ms": {"hidden_dim": 8, "num_heads": 1, "channel_ratio": 1.0, "depths": [1, 1, 1, 1],
                           "patch_size": 2}}},
    "tune": {"trials": 3, "space": {"lr": {"low": 1.0e-4, "high": 1.0e-2, "log": True},
                                    "weight_decay": {"choices": [0.0, 0.05]}}},
}


def tiny(**tune) -> dict:
    spec = copy.deepcopy(TINY)
    spec["tune"].update(tune)
    return spec


def db_rows(out: Path, sql: str) -> list[dict]:
    conn = sqlite3.connect(out / "battle.db")
    conn.row_factory = sqlite3.Row
    try:
        return [dict(r) for r in conn.execute(sql)]
    finally:
        conn.close()


# --------------------------------------------------------------------------- a tuned study on any launcher
# (used by the torchrun test in tests/test_launchers.py, the slurm and ray ones in tests/test_slurm.py and
# tests/test_ray.py)

GROUPS = ("attn-ms-t", "conv-ms-t")
SPLIT_HOOK = ROOT / "tests" / "split_hook"  # records the splits each run opens (tests/split_hook/sitecustomize.py)


def tuned_on(launcher: dict, seeds=(0, 1)) -> dict:
    """TINY on `launcher`: 2 architectures x 2 trials of 1 epoch, each best retrained with `seeds`."""
    spec = tiny(trials=2)
    spec["grid"]["seed"] = list(seeds)
    spec["launcher"] = launcher
    return spec


def hooked_pythonpath() -> str:
    """A PYTHONPATH that puts the split hook into every process the launchers start (and this tree first)."""
    return os.pathsep.join([str(SPLIT_HOOK), str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])


def opened_splits(run: dict) -> list[dict]:
    """What the split hook recorded for a run: one {split, spach, pid} per `open_source` while it trained."""
    path = Path(run["output_dir"]) / "opened-splits.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def assert_tuned(out: Path, seeds=(0, 1), trials: int = 2) -> dict[str, dict]:
    """What a study of `tuned_on`, run with the split hook, ends with on any launcher: every architecture has
    exactly `trials` complete trials in battle.db and in OUT/tune.db, each scored by its run, whose
    processes (importing this test's `spach`) opened only the train split; each best configuration retrained
    with the study's seeds (opening the validation split) and reported. Returns the runs by key."""
    import optuna

    trials_rows = db_rows(out, "SELECT * FROM trials ORDER BY grp, number")
    assert [(t["grp"], t["number"], t["state"]) for t in trials_rows] == \
        [(g, n, "complete") for g in GROUPS for n in range(trials)]
    for group in GROUPS:  # Optuna's own storage holds the same trials and scores
        told = optuna.load_study(study_name=group, storage=f"sqlite:///{out / 'tune.db'}").get_trials()
        assert [(t.number, t.state.name) for t in told] == [(n, "COMPLETE") for n in range(trials)]
        assert [t.value for t in told] == [t["value"] for t in trials_rows if t["grp"] == group]
    runs = {r["key"]: r for r in db_rows(out, "SELECT * FROM runs")}
    here = str(Path(spach.__file__).resolve().parent)
    tune_seed = json.loads(db_rows(out, "SELECT v FROM meta WHERE k = 'tune'")[0]["v"])["seed"]
    for t in trials_rows:
        run = runs[t["key"]]
        assert run["status"] == "done" and t["value"] == run["final_top1"], run["error"]
        train = json.loads(run["config"])["train"]
        assert train["selection_fraction"] == 0.2 and train["seed"] == tune_seed
        opened = opened_splits(run)
        assert opened and {o["split"] for o in opened} == {"train"}, opened  # never the validation split
        assert {o["spach"] for o in opened} == {here}  # the job imported the coordinator's spach
    trial_runs = [r for r in runs.values() if "-trial" in r["name"]]
    assert len(trial_runs) == len(GROUPS) * trials == len({t["key"] for t in trials_rows})  # none asked twice
    keys = json.loads(db_rows(out, "SELECT v FROM meta WHERE k = 'keys'")[0]["v"])
    for group in GROUPS:
        mine = [t for t in trials_rows if t["grp"] == group]
        best = json.loads(max(mine, key=lambda t: (t["value"], -t["number"]))["params"])
        final = [runs[k] for k in keys if runs[k]["grp"] == group]
        assert sorted(r["seed"] for r in final) == sorted(seeds)  # the study's seeds
        for r in final:
            train = json.loads(r["config"])["train"]
            assert r["status"] == "done" and {k: train[k] for k in best} == best, r["error"]
            assert train["seed"] == r["seed"] and "selection_fraction" not in train and r["images_per_s"] > 0
            assert "val" in {o["split"] for o in opened_splits(r)}  # the hook sees a validation split opened
    report = (out / "report.md").read_text()
    assert "## Tuning (equal budget per architecture)" in report and "figures/tuning_budget.png" in report
    return runs


def kill_mid_trial(proc: subprocess.Popen, out: Path, timeout: float = 240) -> tuple[list[dict], dict[str, dict]]:
    """SIGKILL the coordinator `proc` of a tuned study on a cluster launcher once a trial is complete and
    another trial's job is in flight; (the complete trials, the runs by key) as battle.db held them then."""
    deadline = time.time() + timeout
    done, flying = [], []
    try:
        while time.time() < deadline and proc.poll() is None:
            try:
                done = db_rows(out, "SELECT * FROM trials WHERE state = 'complete'") \
                    if (out / "battle.db").exists() else []
                flying = db_rows(out, "SELECT key FROM runs WHERE status = 'running' AND job_id IS NOT NULL "
                                      "AND name LIKE '%-trial%'") if done else []
            except sqlite3.OperationalError:  # tables still being created
                pass
            if done and flying:
                break
            time.sleep(0.05)
        else:
            stream = proc.stderr or proc.stdout
            said = stream.read() if stream else ""
            said = said.decode(errors="replace") if isinstance(said, bytes) else said
            pytest.fail(f"the study ended or stalled before the kill: {said}")
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    return done, {r["key"]: r for r in db_rows(out, "SELECT * FROM runs")}


def assert_nothing_repeated(out: Path, done: list[dict], before: dict[str, dict]) -> None:
    """After a coordinator killed by `kill_mid_trial` was started again: every trial complete at the kill is
    unchanged (same run row and score, trained by one process), every trial in flight was followed to its
    end by its first job (re-attached, not submitted again)."""
    after = {r["key"]: r for r in db_rows(out, "SELECT * FROM runs")}
    trials_now = {(t["grp"], t["number"]): t for t in db_rows(out, "SELECT * FROM trials")}
    for t in done:
        assert after[t["key"]] == before[t["key"]]
        assert trials_now[(t["grp"], t["number"])]["value"] == t["value"]
    flying = [k for k, r in before.items() if "-trial" in r["name"] and r["status"] == "running"]
    assert flying
    for key in flying:
        assert after[key]["status"] == "done" and after[key]["job_id"] == before[key]["job_id"]
        assert after[key]["attempts"] == 1
    for run in after.values():  # each run trained by one process
        assert len({o["pid"] for o in opened_splits(run)}) == 1, run["name"]


# --------------------------------------------------------------------------- the selection split

def test_selection_split_is_stratified_disjoint_complete_and_fixed_by_its_seed():
    targets = [c for c in range(4) for _ in range(50)] + [4] * 10
    fit, held = selection_split(targets, 0.2, seed=3)
    assert set(fit).isdisjoint(held) and sorted(fit + held) == list(range(len(targets)))
    per_class = np.bincount([targets[i] for i in held])
    assert per_class.tolist() == [10, 10, 10, 10, 2]  # 20% of every class
    assert selection_split(targets, 0.2, seed=3) == (fit, held)
    assert selection_split(targets, 0.2, seed=4)[1] != held
    pool = list(range(0, len(targets), 2))
    fit_p, held_p = selection_split(targets, 0.2, seed=3, pool=pool)
    assert sorted(fit_p + held_p) == pool
    with pytest.raises(ValueError, match="selection fraction"):
        selection_split(targets, 1.0, seed=0)


def image_digest(ds, i: int) -> str:
    return hashlib.sha256(np.asarray(ds.base[ds.indices[i]][0]).tobytes()).hexdigest()


def test_selection_split_and_validation_set_never_share_an_image(tmp_path):
    held = build_dataset("mnist5k", "train", 16, selection=(0.2, 0, "selection"))
    fit = build_dataset("mnist5k", "train", 16, selection=(0.2, 0, "fit"))
    val = build_dataset("mnist5k", "val", 16)
    held_images = {image_digest(held, i) for i in range(len(held))}
    assert len(held) == 800 and len(fit) == 3200
    assert held_images.isdisjoint(image_digest(val, i) for i in range(len(val)))
    assert held_images.isdisjoint(image_digest(fit, i) for i in range(len(fit)))
    # an ImageFolder: the held-out files all lie under train/
    from PIL import Image
    for split, n in (("train", 6), ("val", 3)):
        for c in ("a", "b"):
            (tmp_path / split / c).mkdir(parents=True)
            for k in range(n):
                Image.new("RGB", (8, 8), (k * 20, 0, 0)).save(tmp_path / split / c / f"{k}.png")
    folder = build_dataset(str(tmp_path), "train", 8, selection=(0.34, 0, "selection"))
    paths = [folder.base.samples[j][0] for j in folder.indices]
    assert len(paths) == 4 and all(Path(p).parent.parent == tmp_path / "train" for p in paths)


def test_a_trial_trains_and_scores_without_opening_the_validation_split(tmp_path, monkeypatch):
    opened = []
    real = spach.data.open_source

    def recording(source, split):
        opened.append(split)
        return real(source, split)

    monkeypatch.setattr(spach.data, "open_source", recording)
    study = load_study(tiny())
    from spach.battle.execute import train_and_measure
    from spach.battle.tune import trial_run
    trial = trial_run(study, study.runs[0], 0, {"lr": 1e-3, "weight_decay": 0.0})
    metrics, history = train_and_measure(trial.resolved(), tmp_path / "trial", threads=1, speed_now=False)
    assert opened and set(opened) == {"train"}
    assert history and metrics["final_top1"] is not None


# --------------------------------------------------------------------------- the `tune:` section

@pytest.mark.parametrize("tune, message", [
    ({"trials": 3, "space": {"lr": {"low": 1e-4, "high": 1e-2}}, "sampler": "grid"},
     r"tune: unknown key\(s\) \['sampler'\]"),
    ({"trials": 3, "space": {"lrr": {"low": 1e-4, "high": 1e-2}}}, r"tune.space: unknown key 'lrr'"),
    ({"trials": 3, "space": {"lr": {"low": 1e-2, "high": 1e-4}}}, r"tune.space.lr: empty range: low 0.01"),
    ({"trials": 3, "space": {"lr": {"low": 1e-3, "high": 1e-3}}}, r"tune.space.lr: empty range"),
    ({"trials": 3, "space": {"weight_decay": {"choices": []}}}, r"tune.space.weight_decay: empty choices"),
    ({"trials": 3, "space": {"lr": {"low": 0.0, "high": 1e-2, "log": True}}}, r"tune.space.lr: a log range"),
    ({"trials": 3, "space": {"lr": {"low": 1e-4, "high": 1e-2, "step": 1}}}, r"tune.space.lr: unknown key"),
    ({"trials": 3, "space": {"epochs": {"low": 1, "high": 3}}}, r"'epochs' cannot be tuned"),
    ({"trials": 3, "space": {"seed": {"choices": [0, 1]}}}, r"'seed' cannot be tuned"),
    ({"trials": 3, "space": {"smoothing": {"low": 0.0, "high": 1.5}}},
     r"tune.space.smoothing: high 1.5 is refused by the recipe"),
    ({"trials": 3, "space": {"aug_repeats": {"low": 1.5, "high": 3}}}, r"aug_repeats is an integer option"),
    ({"trials": 0, "space": {"lr": {"low": 1e-4, "high": 1e-2}}}, r"tune.trials must be a positive integer"),
    ({"trials": 3, "space": {}}, r"tune.space must map recipe keys"),
    ({"trials": 3, "space": {"lr": {"low": 1e-4, "high": 1e-2}}, "selection": 1.0}, r"tune.selection"),
])
def test_the_tune_section_rejects_mistakes_naming_the_key(tune, message):
    spec = copy.deepcopy(TINY)
    spec["tune"] = tune
    with pytest.raises(ValueError, match=message):
        load_study(spec)


def test_the_tune_section_is_completed_by_its_defaults():
    study = load_study(tiny())
    assert study.tune["seed"] == 0 and study.tune["selection"] == 0.2
    assert study.tune["space"]["lr"] == {"low": 1e-4, "high": 1e-2, "log": True, "int": False}
    assert study.tune["space"]["weight_decay"] == {"choices": [0.0, 0.05]}


# --------------------------------------------------------------------------- the budget curve

def test_expected_max_is_the_mean_and_variance_of_the_best_of_n_draws():
    values = [61.0, 55.5, 70.25, 55.5]
    for n in (1, 2, 3):
        best = [max(draw) for draw in itertools.product(values, repeat=n)]  # every equally likely draw
        mean, var = expected_max(values, n)
        assert mean == pytest.approx(np.mean(best)) and var == pytest.approx(np.var(best))
    assert expected_max(values, 1)[0] == pytest.approx(np.mean(values))
    assert expected_max(values, 200)[0] == pytest.approx(max(values), abs=1e-9)
    with pytest.raises(ValueError):
        expected_max([], 1)


# --------------------------------------------------------------------------- a tuned study end to end

@pytest.mark.slow
def test_a_tiny_tuned_study_spends_equal_budgets_and_retrains_each_best(tmp_path, capsys):
    out = tmp_path / "out"
    result = run_study(load_study(tiny()), out, workers=1, threads=1)
    assert result["done"] == 4 and result["failed"] == 0
    printed = capsys.readouterr().out
    assert "conv-ms-t trial 2/3" in printed and "attn-ms-t trial 3/3" in printed
    trials = db_rows(out, "SELECT * FROM trials ORDER BY grp, number")
    assert [(t["grp"], t["number"], t["state"]) for t in trials] == \
        [(g, n, "complete") for g in ("attn-ms-t", "conv-ms-t") for n in range(3)]
    runs = {r["key"]: r for r in db_rows(out, "SELECT * FROM runs")}
    keys = json.loads(db_rows(out, "SELECT v FROM meta WHERE k = 'keys'")[0]["v"])
    for group in ("attn-ms-t", "conv-ms-t"):
        mine = [t for t in trials if t["grp"] == group]
        for t in mine:  # each trial is a run scored on the selection split, its score its final top-1
            run = runs[t["key"]]
            assert run["status"] == "done" and t["value"] == run["final_top1"]
            assert json.loads(run["config"])["train"]["selection_fraction"] == 0.2
        best = json.loads(max(mine, key=lambda t: (t["value"], -t["number"]))["params"])
        final = [runs[k] for k in keys if runs[k]["grp"] == group]
        assert sorted(r["seed"] for r in final) == [0, 1]  # retrained with the study's seeds
        for r in final:
            train = json.loads(r["config"])["train"]
            assert {k: train[k] for k in best} == best
            assert "selection_fraction" not in train and r["images_per_s"] > 0
    selection = json.loads(db_rows(out, "SELECT v FROM meta WHERE k = 'selection'")[0]["v"])
    assert selection["selection_images"] == 30 and selection["fit_images"] == 130  # 3 of each 16
    report = (out / "report.md").read_text()
    assert "## Tuning (equal budget per architecture)" in report and "### Budget curves" in report
    assert "figures/tuning_budget.png" in report and (out / "figures" / "tuning_budget.png").is_file()
    assert "belong to earlier versions" not in report  # trial runs are not stale runs


@pytest.mark.slow
def test_a_tuned_study_killed_mid_trial_repeats_no_finished_trial(tmp_path):
    spec = tiny()
    spec["recipe"].update(epochs=2, max_train_samples=240)
    spec["grid"]["seed"] = [0]
    study = tmp_path / "tune.yaml"
    study.write_text(yaml.safe_dump(spec))
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "spach.cli.main", "battle", str(study), "--out", str(out), "--quiet",
           "--threads", "1"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 240
    try:
        while time.time() < deadline and proc.poll() is None:
            try:
                done = db_rows(out, "SELECT * FROM trials WHERE state = 'complete'") if (out / "battle.db").exists() else []
                running = db_rows(out, "SELECT r.key FROM runs r JOIN epochs e ON e.key = r.key "
                                       "WHERE r.status = 'running'") if done else []
                if done and running:
                    break
            except sqlite3.OperationalError:  # tables still being created
                pass
            time.sleep(0.05)
        else:
            pytest.fail(f"the study ended or stalled before the kill: {proc.stderr.read().decode()}")
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    finished = {(t["grp"], t["number"]): t for t in done}
    killed_key = running[0]["key"]
    before = {r["key"]: r for r in db_rows(out, "SELECT * FROM runs")}

    assert main(["battle", str(study), "--out", str(out), "--quiet", "--threads", "1"]) == 0
    trials = db_rows(out, "SELECT * FROM trials ORDER BY grp, number")
    assert [(t["grp"], t["number"]) for t in trials] == [(g, n) for g in ("attn-ms-t", "conv-ms-t") for n in range(3)]
    assert all(t["state"] == "complete" for t in trials)
    after = {r["key"]: r for r in db_rows(out, "SELECT * FROM runs")}
    for (grp, number), t in finished.items():  # finished trials: same run, same score, not trained again
        assert after[t["key"]] == before[t["key"]]
        assert next(x for x in trials if (x["grp"], x["number"]) == (grp, number))["value"] == t["value"]
    assert after[killed_key]["attempts"] == 2 and after[killed_key]["status"] == "done"
    assert "resumed from" in Path(after[killed_key]["output_dir"], "train.log").read_text()
    trial_runs = [r for r in after.values() if "-trial" in r["name"]]
    assert len(trial_runs) == 6 == len({t["key"] for t in trials})  # no trial asked or trained twice
