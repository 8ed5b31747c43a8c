"""The ray launcher on a real local Ray cluster (`make ray-up`, 127.0.0.1:6390): a 2-run study done through
Ray with the coordinator SIGKILLed mid-study and restarted (no run started twice), a worker killed and its
run finishing from its checkpoint, status and cancel, a tuned study whose coordinator is killed mid-trial.
Without Ray the `ray` tests skip (and fail with SPACH_REQUIRE_RAY=1); the last two tests need no cluster."""
from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from spach.cli.main import main
from test_tune import assert_nothing_repeated, assert_tuned, hooked_pythonpath, kill_mid_trial, tuned_on
from test_tune_pruner import assert_pruned_on

ROOT = Path(__file__).resolve().parents[1]
ADDRESS = "127.0.0.1:" + os.environ.get("SPACH_RAY_PORT", "6390")
RECIPE = {"epochs": 2, "batch_size": 32, "lr": 3e-3, "warmup_epochs": 0, "cooldown_epochs": 0,
          "max_train_samples": 192, "max_val_samples": 32, "smoothing": 0.0, "mixup": 0.0, "cutmix": 0.0,
          "augment": False, "repeated_aug": False, "model_ema": False, "drop_path": 0.0, "workers": 0,
          "tensorboard": False}
RAY = {"kind": "ray", "address": ADDRESS, "cpus_per_run": 1, "poll_s": 0.3}


def study(seeds=(0, 1), launcher: dict | None = None, **recipe) -> dict:
    return {"name": "rayed", "data": "mnist5k", "img_size": 16, "threads": 1, "recipe": dict(RECIPE, **recipe),
            "measure": {"batch_size": 8, "warmup": 1, "repeats": 1},
            "grid": {"family": ["conv"], "layout": ["ms"], "size": ["nano"], "seed": list(seeds)},
            "sizes": {"nano": {"ms": {"hidden_dim": 8, "num_heads": 1, "depths": [1, 1, 1, 1], "patch_size": 2}}},
            "launcher": dict(RAY, **(launcher or {}))}


def rows(out: Path) -> dict[str, dict]:
    if not (out / "battle.db").exists():
        return {}
    conn = sqlite3.connect(out / "battle.db")
    conn.row_factory = sqlite3.Row
    try:
        found = {r["name"]: dict(r) for r in conn.execute("SELECT * FROM runs")}
    except sqlite3.OperationalError:
        found = {}
    conn.close()
    return found


def wait_for(condition, timeout: float = 240.0, what: str = "condition"):
    t0 = time.time()
    while time.time() - t0 < timeout:
        value = condition()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


def coordinator(study_file: Path, out: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "spach.cli.main", "battle", str(study_file), "--out", str(out), "--quiet"]
    # this tree's spach first; the test's own PYTHONPATH (a hook of tests/) after it, for the actors too
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]))
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def write(path: Path, spec: dict) -> Path:
    path.write_text(yaml.safe_dump(spec))
    return path


@pytest.mark.ray
@pytest.mark.slow
def test_a_killed_coordinator_reattaches_and_no_run_starts_twice(tmp_path, capsys):
    study_file = write(tmp_path / "s.yaml", study(launcher={"max_jobs": 1}))
    out = tmp_path / "out"
    first = coordinator(study_file, out)
    try:
        jobs = wait_for(lambda: {n: r["job_id"] for n, r in rows(out).items() if r["job_id"]} or None,
                        what="a Ray actor started")
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    (name, job_id), = jobs.items()
    assert job_id.startswith("ray:spach-")
    capsys.readouterr()
    assert main(["battle", str(study_file), "--out", str(out)]) == 0   # re-attaches, then runs the second
    said = capsys.readouterr().out
    assert f"re-attaching to 1 Ray actor(s): {name}" in said
    final = rows(out)
    assert {r["status"] for r in final.values()} == {"done"}
    assert final[name]["job_id"] == job_id  # followed, not started again
    for row in final.values():
        job = json.loads((Path(row["output_dir"]) / "job.json").read_text())
        assert job["attempt"] == 1 and row["attempts"] == 1  # each run trained by one attempt
        assert row["final_top1"] is not None and row["images_per_s"] > 0
    # both actors were ended once their runs were recorded (other tests' actors may be alive meanwhile)
    import ray
    stems = tuple(f"spach-{r['key'][:16]}-" for r in final.values())
    assert not [a for a in ray.util.list_named_actors() if str(a).startswith(stems)]


@pytest.mark.ray
@pytest.mark.slow
def test_a_killed_worker_is_retried_and_its_run_finishes_from_its_checkpoint(tmp_path):
    spec = study(seeds=(0,), epochs=2, max_train_samples=1200, checkpoint_every_steps=5)
    study_file = write(tmp_path / "s.yaml", spec)
    out = tmp_path / "out"
    proc = coordinator(study_file, out)
    try:
        run_dir = wait_for(lambda: next((Path(r["output_dir"]) for r in rows(out).values() if r["job_id"]), None),
                           what="the run's actor")
        wait_for(lambda: (run_dir / "last.pt").exists() and (run_dir / "job.json").exists(),
                 what="the run's first checkpoint")
        pid = json.loads((run_dir / "job.json").read_text())["pid"]
        os.kill(pid, signal.SIGKILL)  # the worker process dies; Ray restarts the actor
        code = proc.wait(timeout=300)
        assert code == 0, proc.stderr.read().decode()
    finally:
        if proc.poll() is None:
            proc.kill()
    (row,) = rows(out).values()
    assert row["status"] == "done" and row["attempts"] == 2
    assert json.loads((run_dir / "job.json").read_text())["attempt"] == 2
    assert "resumed from" in (run_dir / "train.log").read_text()  # continued, not trained from scratch
    conn = sqlite3.connect(out / "battle.db")
    assert [e for (e,) in conn.execute("SELECT epoch FROM epochs ORDER BY epoch")] == [1, 2]
    conn.close()


@pytest.mark.ray
@pytest.mark.slow
def test_status_and_cancel_of_a_detached_ray_study(tmp_path, capsys, monkeypatch):
    study_file = write(tmp_path / "s.yaml", study(seeds=(0,), epochs=50, max_train_samples=1200))
    out = tmp_path / "out"
    assert main(["battle", str(study_file), "--out", str(out), "--detach", "--quiet"]) == 0
    (row,) = rows(out).values()
    assert row["status"] == "running" and row["job_id"].startswith("ray:")
    capsys.readouterr()
    monkeypatch.setenv("RAY_ADDRESS", ADDRESS)
    assert main(["battle", "status", str(out)]) == 0
    assert "running" in capsys.readouterr().out
    assert main(["battle", "cancel", str(out)]) == 0
    assert f"cancelled {row['name']}" in capsys.readouterr().out
    assert main(["battle", str(study_file), "--out", str(out), "--quiet"]) == 1  # recorded as failed
    failed = rows(out)[row["name"]]
    assert failed["status"] == "failed" and "is gone without a result" in failed["error"]


@pytest.mark.ray
@pytest.mark.slow
def test_a_pruned_study_through_ray_stops_each_trial_in_its_actor(tmp_path):
    assert_pruned_on(RAY, tmp_path / "out")


@pytest.mark.ray
@pytest.mark.slow
def test_a_tuned_study_through_ray_killed_mid_trial_repeats_no_finished_trial(tmp_path, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", hooked_pythonpath())  # the split hook in the coordinators and the actors
    study_file = write(tmp_path / "s.yaml", tuned_on(RAY))
    out = tmp_path / "out"
    done, before = kill_mid_trial(coordinator(study_file, out), out)
    # the trials' detached actors run on without a coordinator; the same command re-attaches to them
    second = coordinator(study_file, out)
    assert second.wait(timeout=300) == 0, second.stderr.read().decode()
    runs = assert_tuned(out)
    assert_nothing_repeated(out, done, before)
    assert all(r["job_id"].startswith("ray:spach-") and r["attempts"] == 1 for r in runs.values())


def test_without_ray_installed_the_launcher_says_how_to_get_it(monkeypatch):
    from spach.battle.launchers import ray as ray_launcher
    from spach.errors import SpachError

    monkeypatch.delenv("RAY_USAGE_STATS_ENABLED", raising=False)
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError
    with pytest.raises(SpachError, match=r"pip install 'spach\[ray\]'"):
        ray_launcher.import_ray()
    assert os.environ["RAY_USAGE_STATS_ENABLED"] == "0"


def test_the_actors_import_the_coordinators_spach_then_its_own_pythonpath(monkeypatch):
    # Ray's env_vars replace the worker's PYTHONPATH: a plugin module found through the coordinator's must
    # stay importable in the actors, as in the local, torchrun and Slurm workers
    from spach.battle.launchers import source_root
    from spach.battle.launchers.ray import worker_pythonpath

    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(["/shared/plugins", "/shared/lib"]))
    assert worker_pythonpath().split(os.pathsep) == [str(source_root()), "/shared/plugins", "/shared/lib"]
    monkeypatch.delenv("PYTHONPATH")
    assert worker_pythonpath() == str(source_root())
