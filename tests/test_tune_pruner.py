"""The optional Optuna pruner of `tune:` (the same for every architecture): its checks, the trial runs' key,
the per-epoch report to Optuna, the engine's stop, tiny pruned studies end to end, and a pruned study
SIGKILLed right after a trial reported an epoch."""
from __future__ import annotations

import copy
import json
import os
import signal
import subprocess
import sys
import textwrap
import warnings

import numpy as np
import pytest
import yaml

from spach.battle import load_study, run_study
from spach.battle.pruning import TrialPruning
from spach.battle.tune import trial_run
from spach.cli.main import main
from spach.engine import TrainConfig, train
from test_engine import PLAIN
from test_tune import ROOT, TINY, db_rows

PARAMS = {"lr": 1e-3, "weight_decay": 0.0}


def pruned(pruner, epochs: int = 3, trials: int = 2, families=("conv", "attn")) -> dict:
    """TINY with `pruner`, `epochs` per run, `trials` per architecture, one seed."""
    spec = copy.deepcopy(TINY)
    spec["recipe"]["epochs"] = epochs
    spec["grid"].update(family=list(families), seed=[0])
    spec["tune"].update(trials=trials, pruner=pruner)
    return spec


MUST_PRUNE = {"kind": "threshold", "lower": 101.0, "warmup_epochs": 1}  # stops every trial after epoch 2


def optuna_trials(out, group: str):
    import optuna

    return optuna.load_study(study_name=group, storage=f"sqlite:///{out / 'tune.db'}").get_trials()


def curve(out, key: str) -> dict[int, float]:
    """The run's selection top-1 by epoch, as battle.db holds it."""
    return {e["epoch"]: e["val_top1"] for e in db_rows(out, f"SELECT * FROM epochs WHERE key = '{key}'")}


def assert_every_trial_pruned(out, groups, trials: int = 2, after: int = 2) -> list[dict]:
    """Each of `groups` has `trials` trials pruned after epoch `after` in battle.db (its run done, with
    pruned_after and that many epochs) and in OUT/tune.db (PRUNED, each epoch's selection top-1 reported once,
    as battle.db holds it); the trials are returned."""
    rows = db_rows(out, "SELECT * FROM trials ORDER BY grp, number")
    assert [(t["grp"], t["number"], t["state"], t["epochs"]) for t in rows] == \
        [(g, n, "pruned", after) for g in groups for n in range(trials)]
    runs = {r["key"]: r for r in db_rows(out, "SELECT * FROM runs")}
    for t in rows:
        run, top1 = runs[t["key"]], curve(out, t["key"])
        assert run["status"] == "done" and run["pruned_after"] == after and sorted(top1) == list(range(1, after + 1))
        assert t["value"] == run["final_top1"] == top1[after]  # Optuna keeps the last reported value
    for g in groups:
        told = optuna_trials(out, g)
        assert [t.state.name for t in told] == ["PRUNED"] * trials
        assert [t.intermediate_values for t in told] == [curve(out, t["key"]) for t in rows if t["grp"] == g]
    return rows


def assert_pruned_on(launcher: dict, out) -> None:
    """A study whose pruner stops every trial, on `launcher`: each trial's job stopped itself after epoch 2,
    reported to tune.db as it trained, ran once; no trial completed, so no final run is trained."""
    spec = pruned(MUST_PRUNE, epochs=3, trials=2, families=("conv",))
    spec["launcher"] = launcher
    result = run_study(load_study(spec), out, quiet=True)
    assert result["done"] == 0 and result["skipped"] == 1
    runs = {r["key"]: r for r in db_rows(out, "SELECT * FROM runs")}
    assert all(runs[t["key"]]["job_id"] and runs[t["key"]]["attempts"] == 1
               for t in assert_every_trial_pruned(out, ("conv-ms-t",)))


# --------------------------------------------------------------------------- the section

@pytest.mark.parametrize("pruner, message", [
    ("median", r"tune.pruner must be a mapping with a kind, one of \['asha', 'median', 'threshold'\]"),
    ({"kind": "hyperband"}, r"tune.pruner.kind must be one of \['asha', 'median', 'threshold'\], got 'hyperband'"),
    ({"kind": "median", "patience": 2}, r"tune.pruner: unknown key\(s\) \['patience'\]"),
    ({"kind": "median", "warmup_epochs": -1}, r"tune.pruner.warmup_epochs must be a non-negative integer"),
    ({"kind": "median", "startup_trials": 1.5}, r"tune.pruner.startup_trials must be a non-negative integer"),
    ({"kind": "threshold"}, r"tune.pruner: missing required key\(s\) \['lower'\]"),
    ({"kind": "threshold", "lower": -5}, r"tune.pruner.lower must be a non-negative number"),
    ({"kind": "asha", "reduction_factor": 1}, r"tune.pruner.reduction_factor must be an integer >= 2"),
    ({"kind": "asha", "min_epochs": 0}, r"tune.pruner.min_epochs must be a positive integer"),
    ({"kind": "median", "warmup_epochs": 2}, r"tune.pruner.warmup_epochs: 2 leaves no epoch at which to prune: the "
                                             r"first decision comes after epoch 3 and the recipe trains 3 epoch"),
    ({"kind": "asha", "min_epochs": 3}, r"tune.pruner.min_epochs: 3 leaves no epoch at which to prune"),
])
def test_the_pruner_is_checked_naming_the_key(pruner, message):
    with pytest.raises(ValueError, match=message):
        load_study(pruned(pruner, epochs=3))


def test_the_pruner_is_completed_by_its_defaults_and_absent_it_leaves_the_trials_keys_alone(tmp_path):
    study = load_study(pruned({"kind": "median"}))
    assert study.tune["pruner"] == {"kind": "median", "startup_trials": 5, "warmup_epochs": 0}
    assert load_study(pruned({"kind": "asha"})).tune["pruner"] == {"kind": "asha", "min_epochs": 1,
                                                                   "reduction_factor": 4}
    plain = load_study(pruned(None))
    assert plain.tune["pruner"] is None
    without = trial_run(plain, plain.runs[0], 1, PARAMS)
    assert "prune" not in without.resolved()  # no pruner: the trial run is what it was before pruners existed
    with_pruner = trial_run(study, study.runs[0], 1, PARAMS, tmp_path / "out")
    assert with_pruner.train == without.train and with_pruner.key != without.key
    assert with_pruner.resolved()["prune"] == {"storage": os.path.join("..", "..", "tune.db"), "study": "conv-ms-t",
                                               "trial": 1, "pruner": study.tune["pruner"]}
    # the key does not depend on where OUT lies
    assert trial_run(study, study.runs[0], 1, PARAMS, tmp_path / "elsewhere" / "out").key == with_pruner.key
    with pytest.raises(ValueError, match="needs out_dir"):
        trial_run(study, study.runs[0], 1, PARAMS)


# --------------------------------------------------------------------------- the report to Optuna

def hook_for(tmp_path, pruner: dict, number: int) -> TrialPruning:
    """The pruning hook of trial `number` of study "g" in tmp_path/tune.db, for a run in tmp_path/runs/."""
    return TrialPruning({"storage": os.path.join("..", "..", "tune.db"), "study": "g", "trial": number,
                         "pruner": pruner}, tmp_path / "runs" / f"g-trial{number + 1}-0123abcd")


def test_a_trial_reports_each_epoch_once_and_its_pruner_counts_epochs_from_1(tmp_path):
    import optuna

    storage = f"sqlite:///{tmp_path / 'tune.db'}"
    study = optuna.create_study(storage=storage, study_name="g", direction="maximize")
    number = study.ask().number
    hook = hook_for(tmp_path, {"kind": "threshold", "lower": 50.0, "warmup_epochs": 1}, number)
    assert hook({"epoch": 1, "val_top1": 10.0}) is False  # the warm-up epoch: never followed by pruning
    assert hook({"epoch": 2, "val_top1": 60.0}) is False  # above the threshold
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # Optuna warns when a step is reported twice
        assert hook({"epoch": 2, "val_top1": 60.0}) is False  # asked again (a resume): not reported twice
        resumed = hook_for(tmp_path, {"kind": "threshold", "lower": 50.0, "warmup_epochs": 1}, number)
        assert resumed({"epoch": 2, "val_top1": 60.0}) is False  # another process: the same
    assert hook({"epoch": 3, "val_top1": 40.0}) is True
    assert optuna.load_study(study_name="g", storage=storage).trials[0].intermediate_values == \
        {1: 10.0, 2: 60.0, 3: 40.0}


@pytest.mark.parametrize("pruner", [{"kind": "median", "startup_trials": 1, "warmup_epochs": 0},
                                    {"kind": "asha", "min_epochs": 1, "reduction_factor": 2}])
def test_median_and_asha_compare_a_trial_with_the_others_at_the_same_epoch(tmp_path, pruner):
    import optuna

    study = optuna.create_study(storage=f"sqlite:///{tmp_path / 'tune.db'}", study_name="g", direction="maximize")
    first = study.ask().number
    assert hook_for(tmp_path, pruner, first)({"epoch": 1, "val_top1": 50.0}) is False  # the first: nothing to beat
    assert hook_for(tmp_path, pruner, first)({"epoch": 2, "val_top1": 70.0}) is False
    study.tell(first, 70.0)
    better, worse = study.ask().number, study.ask().number
    assert hook_for(tmp_path, pruner, better)({"epoch": 1, "val_top1": 55.0}) is False
    assert hook_for(tmp_path, pruner, worse)({"epoch": 1, "val_top1": 45.0}) is True


# --------------------------------------------------------------------------- the engine's stop

def test_the_engine_stops_when_asked_and_a_run_resumed_at_that_epoch_asks_again(tmp_path):
    cfg = TrainConfig.from_dict({**PLAIN, "output": str(tmp_path / "run"), "epochs": 3})
    asked = []

    def ask(answer):
        return lambda record: asked.append(record["epoch"]) or answer(record["epoch"])

    first = train(cfg, should_stop=ask(lambda epoch: True))
    assert asked == [1] and [r["epoch"] for r in first["history"]] == [1] and first["stopped_after"] == 1
    again = train(cfg.replace(resume="auto"), should_stop=ask(lambda epoch: True))
    assert asked == [1, 1] and len(again["history"]) == 1 and again["stopped_after"] == 1  # nothing trained
    rest = train(cfg.replace(resume="auto"), should_stop=ask(lambda epoch: epoch == 3))
    assert asked == [1, 1, 1, 2, 3]  # asked after every epoch; a True after the last one stops nothing
    assert [r["epoch"] for r in rest["history"]] == [1, 2, 3] and rest["stopped_after"] is None
    assert train(cfg.replace(output=str(tmp_path / "free")))["stopped_after"] is None  # no hook: never stopped


STOP_DRIVER = textwrap.dedent("""
    import json, os, sys, yaml
    from spach.engine import TrainConfig, train

    def stop(record):  # the pruner's place: asked on rank 0 only; stop after epoch 1
        open(os.path.join(sys.argv[2], f"asked-rank{os.environ['RANK']}"), "a").write(f"{record['epoch']}\\n")
        return True

    result = train(TrainConfig.from_dict(yaml.safe_load(open(sys.argv[1]))), should_stop=stop)
    json.dump({"stopped_after": result["stopped_after"], "epochs": len(result["history"])},
              open(os.path.join(sys.argv[2], f"rank{os.environ['RANK']}.json"), "w"))
""")


@pytest.mark.slow
def test_under_torchrun_rank_0_is_asked_and_every_rank_stops(tmp_path):
    TrainConfig.from_dict({**PLAIN, "output": str(tmp_path / "ddp"), "epochs": 3, "batch_size": 8}) \
        .to_yaml(tmp_path / "ddp.yaml")
    (tmp_path / "driver.py").write_text(STOP_DRIVER)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(tmp_path / "driver.py"), str(tmp_path / "ddp.yaml"), str(tmp_path)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert (tmp_path / "asked-rank0").read_text() == "1\n" and not (tmp_path / "asked-rank1").exists()
    assert json.loads((tmp_path / "rank1.json").read_text())["stopped_after"] == 1  # told by rank 0
    assert json.loads((tmp_path / "rank0.json").read_text()) == {"stopped_after": 1, "epochs": 1}
    assert len((tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines()) == 1


# --------------------------------------------------------------------------- pruned studies end to end

def test_a_threshold_pruner_that_must_prune_stops_every_trial_after_the_same_epoch(tmp_path, capsys):
    study = load_study(pruned(MUST_PRUNE, epochs=3, trials=2))
    out = tmp_path / "out"
    result = run_study(study, out, workers=2, threads=2)  # the two architectures' trials in two worker processes
    printed = capsys.readouterr().out
    groups = ("attn-ms-t", "conv-ms-t")
    trials = assert_every_trial_pruned(out, groups)  # warm-up 1: each stopped after epoch 2 of 3
    runs = {r["key"]: r for r in db_rows(out, "SELECT * FROM runs")}
    for t in trials:  # the same pruner for every family
        assert json.loads(runs[t["key"]]["config"])["prune"]["pruner"] == study.tune["pruner"]
    assert "conv-ms-t trial 2/2: pruned after epoch 2 of 3" in printed
    for g in groups:  # each trial's own done line, written by the worker-slot launcher, says so too
        for n in (1, 2):
            assert f"{g}-trial{n}: done — pruned after epoch 2 of 3: top-1 " in printed
    # no trial completed: nothing is retrained, and each architecture says why
    assert result["done"] == 0 and result["skipped"] == 2
    report = (out / "report.md").read_text()
    for g in groups:
        assert f"`{g}`" in report and "none of its 2 trials completed (2 pruned)" in report
        row = next(line for line in report.splitlines() if line.startswith(f"| `{g}` | 2 (2) |"))
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert cells[2] == "0 / 2 / 0" and cells[3] == "—"  # complete / pruned / failed; no best
        assert cells[5] == "4" and cells[6] == f"{4 * 130:,}"  # the epochs the pruned trials trained
    assert "threshold pruner" in report


def test_a_median_pruner_keeps_its_start_up_trial_and_the_best_complete_one_is_retrained(tmp_path):
    study = load_study(pruned({"kind": "median", "startup_trials": 1, "warmup_epochs": 0}, epochs=2, trials=3,
                              families=("conv",)))
    out = tmp_path / "out"
    result = run_study(study, out, workers=1, threads=1)
    trials = db_rows(out, "SELECT * FROM trials ORDER BY number")
    told = optuna_trials(out, "conv-ms-t")
    runs = {r["key"]: r for r in db_rows(out, "SELECT * FROM runs")}
    assert trials[0]["state"] == "complete"  # no pruning before one trial is complete
    for t, o in zip(trials, told):
        run = runs[t["key"]]
        assert t["state"] == o.state.name.lower() and o.intermediate_values == curve(out, t["key"])
        assert (t["state"], t["epochs"], run["pruned_after"]) in {("complete", 2, None), ("pruned", 1, 1)}
        # Optuna's median rule, on the epochs' selection top-1: below the complete trials' median at epoch 1
        before = [x.intermediate_values[1] for x in told[:o.number] if x.state.name == "COMPLETE"]
        assert (t["state"] == "pruned") == (o.intermediate_values[1] < np.median(before) if before else False)
    # here the later trials' learning rates leave them far (over 30 points) below the first at epoch 1
    assert [t["state"] for t in trials] == ["complete", "pruned", "pruned"]
    complete = [t for t in trials if t["state"] == "complete"]
    best = json.loads(max(complete, key=lambda t: (t["value"], -t["number"]))["params"])
    keys = json.loads(db_rows(out, "SELECT v FROM meta WHERE k = 'keys'")[0]["v"])
    assert result["done"] == 1 and len(keys) == 1 and not set(keys) & {t["key"] for t in trials}
    final = json.loads(runs[keys[0]]["config"])
    assert {k: final["train"][k] for k in best} == best and "prune" not in final
    assert "selection_fraction" not in final["train"]
    report = (out / "report.md").read_text()
    assert "median pruner" in report and "Pruned trials count toward the budget" in report


def asha_promotes(value: float, rung: list[float], reduction_factor: int) -> bool:
    """Successive halving's rule at one rung (maximising): `value` is among the top 1/reduction_factor of the
    rung's values (its own included), and the best of them while the rung has fewer than reduction_factor."""
    keep = max(len(rung) // reduction_factor, 1)
    return value >= sorted(rung)[-keep]


def test_an_asha_study_halves_its_trials_at_each_rung_and_retrains_the_best_complete_one(tmp_path):
    study = load_study(pruned({"kind": "asha", "min_epochs": 1, "reduction_factor": 2}, epochs=2, trials=4,
                              families=("conv",)))
    out = tmp_path / "out"
    result = run_study(study, out, workers=1, threads=1)  # one trial after the other: each rung as it stood
    trials = db_rows(out, "SELECT * FROM trials ORDER BY number")
    told = optuna_trials(out, "conv-ms-t")
    runs = {r["key"]: r for r in db_rows(out, "SELECT * FROM runs")}
    rung: list[float] = []  # epoch 1 (= 1 x 2^0): the values of the trials that reached it
    for t, o in zip(trials, told):
        assert t["state"] == o.state.name.lower() and o.intermediate_values == curve(out, t["key"])
        rung.append(o.intermediate_values[1])
        # the next rung is the last epoch, after which nothing is left to stop: a trial kept at epoch 1 completes
        expected = ("complete", 2, None) if asha_promotes(rung[-1], rung, 2) else ("pruned", 1, 1)
        assert (t["state"], t["epochs"], runs[t["key"]]["pruned_after"]) == expected, (t["number"], rung)
    states = [t["state"] for t in trials]
    assert states[0] == "complete" and "pruned" in states  # the first is promoted at its rung
    assert result["done"] == 1 and "successive-halving pruner" in (out / "report.md").read_text()


KILL_AFTER_REPORT = textwrap.dedent("""
    # sitecustomize for the test: SIGKILL the process right after trial number 1 reported its epoch 1
    import os
    import signal

    from spach.battle import pruning

    ask = pruning.TrialPruning.__call__

    def ask_then_die(self, record):
        answer = ask(self, record)
        if self.prune["trial"] == 1 and int(record["epoch"]) == 1:
            os.kill(os.getpid(), signal.SIGKILL)
        return answer

    pruning.TrialPruning.__call__ = ask_then_die
""")


@pytest.mark.slow
def test_a_pruned_study_killed_after_a_report_resumes_without_repeating_a_trial(tmp_path):
    spec = pruned({"kind": "threshold", "lower": 101.0, "warmup_epochs": 0}, epochs=3, trials=2, families=("conv",))
    study_file = tmp_path / "tune.yaml"
    study_file.write_text(yaml.safe_dump(spec))
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(KILL_AFTER_REPORT)
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "spach.cli.main", "battle", str(study_file), "--out", str(out), "--quiet",
           "--threads", "1", "--workers", "1"]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(hook), str(ROOT)]))
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    before = {r["key"]: r for r in db_rows(out, "SELECT * FROM runs")}
    assert [t.state.name for t in optuna_trials(out, "conv-ms-t")] == ["PRUNED", "RUNNING"]
    reported = optuna_trials(out, "conv-ms-t")[1].intermediate_values
    assert list(reported) == [1]  # killed after reporting epoch 1, before its run could stop

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert main(["battle", str(study_file), "--out", str(out), "--quiet", "--threads", "1"]) == 0
    assert not [w for w in caught if "already reported" in str(w.message)]
    trials = db_rows(out, "SELECT * FROM trials ORDER BY number")
    assert [(t["number"], t["state"], t["epochs"]) for t in trials] == [(0, "pruned", 1), (1, "pruned", 1)]
    after = {r["key"]: r for r in db_rows(out, "SELECT * FROM runs")}
    assert after[trials[0]["key"]] == before[trials[0]["key"]]  # the finished trial: not trained again
    killed = after[trials[1]["key"]]
    assert killed["attempts"] == 2 and killed["pruned_after"] == 1 and sorted(curve(out, killed["key"])) == [1]
    told = optuna_trials(out, "conv-ms-t")
    assert [t.state.name for t in told] == ["PRUNED", "PRUNED"] and told[1].intermediate_values == reported
    assert len(after) == 2  # no trial asked or trained twice, nothing retrained
