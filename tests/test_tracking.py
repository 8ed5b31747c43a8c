"""Tracking: a 2-run study logged to an MLflow SQLite store and read back with mlflow.search_runs (params,
per-epoch metrics, tags, artifacts, the parent run with the report); a coordinator killed mid-run and run
again continues the same MLflow runs (no duplicates); TensorBoard's HParams summary per run; bad settings."""
from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from spach.battle.spec import parse_study
from spach.cli.main import main

ROOT = Path(__file__).resolve().parents[1]
RECIPE = {"epochs": 3, "batch_size": 32, "lr": 3e-3, "warmup_epochs": 0, "cooldown_epochs": 0,
          "max_train_samples": 96, "max_val_samples": 32, "smoothing": 0.0, "mixup": 0.0, "cutmix": 0.0,
          "augment": False, "repeated_aug": False, "model_ema": False, "drop_path": 0.0, "workers": 0,
          "tensorboard": True}


def study(tracking: dict | None = None) -> dict:
    spec = {"name": "tracked", "data": "mnist5k", "img_size": 16, "threads": 1, "recipe": dict(RECIPE),
            "measure": {"batch_size": 8, "warmup": 1, "repeats": 1},
            "grid": {"family": ["conv"], "layout": ["ms"], "size": ["nano"], "seed": [0, 1]},
            "sizes": {"nano": {"ms": {"hidden_dim": 8, "num_heads": 1, "depths": [1, 1, 1, 1], "patch_size": 2}}}}
    if tracking is not None:
        spec["tracking"] = tracking
    return spec


def db_state(out: Path) -> dict[str, tuple[str, int]]:
    """{run name: (status, epochs recorded)} ({} while the database is being created)."""
    try:
        conn = sqlite3.connect(out / "battle.db")
        found = {name: (status, n) for name, status, n in conn.execute(
            "SELECT name, status, (SELECT COUNT(*) FROM epochs e WHERE e.key = runs.key) FROM runs")}
        conn.close()
    except sqlite3.OperationalError:
        return {}
    return found


def kill_during_second_run(study_file: Path, out: Path) -> None:
    """`spach battle` in a subprocess (one run at a time, in its own process), SIGKILLed right after the
    second run's first epoch (tests/kill_hook/sitecustomize.py)."""
    cmd = [sys.executable, "-m", "spach.cli.main", "battle", str(study_file), "--out", str(out), "--quiet",
           "--workers", "1"]
    env = dict(os.environ, SPACH_TEST_KILL_AT="conv-ms-nano-s1:1",
               PYTHONPATH=os.pathsep.join([str(ROOT / "tests" / "kill_hook"), str(ROOT)]))
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == -signal.SIGKILL, proc.stderr


@pytest.mark.slow
def test_mlflow_logs_the_study_and_a_killed_study_continues_the_same_runs(tmp_path):
    import mlflow

    store = tmp_path / "store" / "mlflow.db"
    store.parent.mkdir()
    uri = f"sqlite:///{store}"
    study_file = tmp_path / "study.yaml"
    study_file.write_text(yaml.safe_dump(study({"mlflow": {"uri": uri, "experiment": "lab"}})))
    out = tmp_path / "out"
    kill_during_second_run(study_file, out)
    assert db_state(out) == {"conv-ms-nano-s0": ("done", 3), "conv-ms-nano-s1": ("running", 1)}  # killed mid-run
    client = mlflow.MlflowClient(tracking_uri=uri)
    killed = {r.info.run_name: r for r in client.search_runs([client.get_experiment_by_name("lab").experiment_id])}
    assert set(killed) == {"tracked", "conv-ms-nano-s0", "conv-ms-nano-s1"}
    assert killed["conv-ms-nano-s1"].info.status == "RUNNING"

    again = ["battle", str(study_file), "--out", str(out), "--quiet", "--workers", "1"]
    assert main(again) == 0  # resumes the second run from its checkpoint
    assert main(again) == 0  # all done: logs nothing new
    mlflow.set_tracking_uri(uri)
    runs = mlflow.search_runs(experiment_names=["lab"])
    assert len(runs) == 3  # the parent and the two runs: resuming and rerunning made no new MLflow run
    by_name = {row["tags.mlflow.runName"]: row for _, row in runs.iterrows()}
    assert {r.info.run_id for r in killed.values()} == set(runs["run_id"])
    parent = by_name["tracked"]
    assert parent["status"] == "FINISHED" and parent["metrics.runs_done"] == 2
    for name in ("conv-ms-nano-s0", "conv-ms-nano-s1"):
        row = by_name[name]
        assert row["status"] == "FINISHED" and row["tags.mlflow.parentRunId"] == parent["run_id"]
        assert (row["params.family"], row["params.layout"], row["params.size"]) == ("conv", "ms", "nano")
        assert row["params.recipe.lr"] == "0.003" and row["params.model_kwargs.hidden_dim"] == "8"
        assert row["tags.spach.study"] == "tracked" and row["tags.spach.launcher"] == "local"
        assert row["tags.spach.role"] == "run" and "tags.spach.pruned_after" not in row.dropna()
        assert row["tags.spach.seed"] == name[-1] and row["tags.spach.group"] == "conv-ms-nano"
        assert len(row["tags.spach.commit"]) in (40, len("unknown"))
        assert 0 <= row["metrics.final_top1"] <= 100 and row["metrics.images_per_s"] > 0 and row["metrics.params"] > 0
        for metric in ("train_loss", "val_loss", "top1", "train_images_per_s"):  # one point per epoch, no repeats
            assert [m.step for m in client.get_metric_history(row["run_id"], metric)] == [1, 2, 3], (name, metric)
        artifacts = {a.path for a in client.list_artifacts(row["run_id"])}
        assert {"config.json", "metrics.json", "train.log"} <= artifacts
        config = mlflow.artifacts.load_dict(f"{row['artifact_uri']}/config.json")
        assert config["train"]["seed"] == int(name[-1])
    parent_artifacts = {a.path for a in client.list_artifacts(parent["run_id"])}
    assert {"report.md", "figures", "study.json"} <= parent_artifacts
    assert "figures/top1_vs_params.png" in {a.path for a in client.list_artifacts(parent["run_id"], "figures")}
    assert (store.parent / "mlartifacts").is_dir()  # beside the store, not in the working directory


@pytest.mark.slow
def test_mlflow_logs_the_tuning_trials_and_tags_a_pruned_one_with_the_epoch_it_stopped_after(tmp_path):
    import mlflow

    from spach.battle import load_study, run_study
    from test_tune import tiny

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    spec = tiny(trials=2, pruner={"kind": "threshold", "lower": 101.0, "warmup_epochs": 1})  # prunes every trial
    spec["recipe"]["epochs"] = 3
    spec["grid"].update(family=["conv"], seed=[0])
    spec["tracking"] = {"mlflow": {"uri": uri, "experiment": "pruned"}}
    run_study(load_study(spec), tmp_path / "out", workers=1, threads=1, quiet=True)
    client = mlflow.MlflowClient(tracking_uri=uri)
    runs = {r.info.run_name: r for r in client.search_runs([client.get_experiment_by_name("pruned").experiment_id])}
    assert set(runs) == {"tiny-tune", "conv-ms-t-trial1", "conv-ms-t-trial2"}  # no trial completed: no final run
    for name in ("conv-ms-t-trial1", "conv-ms-t-trial2"):
        run = runs[name]
        assert run.info.status == "FINISHED" and run.data.tags["spach.pruned_after"] == "2"
        assert run.data.tags["spach.role"] == "trial" and run.data.params["recipe.selection_fraction"] == "0.2"
        assert [m.step for m in client.get_metric_history(run.info.run_id, "top1")] == [1, 2]  # the epochs trained
    assert "spach.pruned_after" not in runs["tiny-tune"].data.tags


@pytest.mark.slow
def test_each_done_run_gets_a_tensorboard_hparams_summary(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "out"
    spec = study()
    spec["grid"]["seed"] = [0]
    spec["recipe"].update(epochs=1, max_train_samples=64)
    assert main(["battle", str(_write(tmp_path, spec)), "--out", str(out), "--quiet", "--workers", "1"]) == 0
    (run_dir,) = (out / "runs").iterdir()
    (events,) = (run_dir / "tb").glob("*.hparams")
    acc = EventAccumulator(str(events))
    acc.Reload()
    assert "hparams" in acc.PluginTagToContent("hparams") or acc.PluginTagToContent("hparams")
    assert {"hparams/final_top1", "hparams/images_per_s", "hparams/params"} <= set(acc.Tags()["scalars"])
    # a second invocation finds the summary there and writes none again
    assert main(["battle", str(_write(tmp_path, spec)), "--out", str(out), "--quiet", "--workers", "1"]) == 0
    assert len(list((run_dir / "tb").glob("*.hparams"))) == 1


def _write(tmp_path: Path, spec: dict) -> Path:
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def test_tracking_settings_are_checked_with_the_study():
    with pytest.raises(ValueError, match=r"tracking.mlflow: missing required key\(s\) \['uri'\]"):
        parse_study(study({"mlflow": {"experiment": "x"}}))
    with pytest.raises(ValueError, match=r"unknown key.*wandb"):
        parse_study(study({"wandb": {}}))
    tracked = parse_study(study({"mlflow": {"uri": "sqlite:///m.db"}}))
    assert tracked.tracking == {"mlflow": {"uri": "sqlite:///m.db", "experiment": None}, "tensorboard": True}
    assert parse_study(study()).tracking == {"mlflow": None, "tensorboard": True}


def test_a_failing_tracker_is_reported_once_and_the_study_goes_on(tmp_path, capsys):
    from spach.battle.tracking import Tracker, TrackingHub

    class Broken(Tracker):
        name = "broken"

        def run_started(self, row):
            raise ConnectionError("the store is down")

    spec = parse_study(study())
    from spach.battle import db
    conn = db.connect(tmp_path, create=True)
    db.register_study(conn, spec, lambda r: tmp_path / "runs" / r.name)
    conn.close()
    said = []
    hub = TrackingHub(spec, tmp_path, [Broken(None, spec, tmp_path)], say=said.append)
    hub.run_started("conv-ms-nano-s0")
    hub.run_started("conv-ms-nano-s1")
    hub.close()
    assert len(said) == 1 and "broken failed (ConnectionError: the store is down)" in said[0]
