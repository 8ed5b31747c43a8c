"""The slurm launcher on a real Slurm cluster (`make slurm-up`): results equal to the local launcher, a killed
coordinator re-attaches, scancel / requeue continue from checkpoints, failures are recorded, DDP in one job,
a tuned study whose coordinator is killed mid-trial.
Without Slurm the `slurm` tests skip (and fail with SPACH_REQUIRE_SLURM=1); the others need no cluster."""
from __future__ import annotations

import os
import re
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

from spach.battle import db, load_study, run_study
from spach.cli.main import main
from spach.battle.progress import Progress
from spach.battle import jobfiles
from spach.battle.launchers import slurm
from spach.battle.launchers.slurm import JobInfo, job_comment, make_executor, submit_run, submitted_pickle, sync_run
from spach.battle.launchers.status import cancel_runs, study_status
from spach.io import write_json
from test_tune import assert_nothing_repeated, assert_tuned, hooked_pythonpath, kill_mid_trial, tuned_on
from test_tune_pruner import assert_pruned_on

ROOT = Path(__file__).resolve().parents[1]
RECIPE = {"epochs": 2, "batch_size": 32, "lr": 3e-3, "warmup_epochs": 0, "cooldown_epochs": 0,
          "max_train_samples": 192, "max_val_samples": 64, "smoothing": 0.0, "mixup": 0.0, "cutmix": 0.0,
          "augment": False, "repeated_aug": False, "model_ema": False, "drop_path": 0.0, "workers": 0,
          "tensorboard": False}
NANO = {"nano": {"ms": {"hidden_dim": 8, "num_heads": 1, "depths": [1, 1, 1, 1], "patch_size": 2}}}
SLURM = {"kind": "slurm", "cpus_per_task": 1, "time_min": 10, "poll_s": 0.3}


def study(name: str = "tiny", seeds=(0, 1), launcher: dict | None = None, **recipe) -> dict:
    return {"name": name, "data": "mnist5k", "img_size": 16, "threads": 1, "recipe": dict(RECIPE, **recipe),
            "measure": {"batch_size": 8, "warmup": 1, "repeats": 2},
            "grid": {"family": ["conv"], "layout": ["ms"], "size": ["nano"], "seed": list(seeds)},
            "sizes": NANO, "launcher": dict(SLURM, **(launcher or {}))}


# interrupted after its first step checkpoint (2 epochs of 62 steps, a checkpoint every 5), where the tests
# that stop it hold its job (the `hold` fixture): it trains in ~2 s, so it could otherwise end before the signal
SLOW = study("slow", seeds=(0,), epochs=2, max_train_samples=2000, checkpoint_every_steps=5)


def rows(out: Path) -> dict[str, dict]:
    """The runs table by name ({} while the coordinator has not created it yet)."""
    if not (out / "battle.db").exists():
        return {}
    conn = sqlite3.connect(out / "battle.db")
    conn.row_factory = sqlite3.Row
    try:
        found = {r["name"]: dict(r) for r in conn.execute("SELECT * FROM runs")}
    except sqlite3.OperationalError:  # no table yet
        found = {}
    conn.close()
    return found


def submitted(out: Path, n: int) -> dict[str, str] | None:
    """{run name: job id} once `n` runs have a Slurm job, else None."""
    jobs = {name: r["job_id"] for name, r in rows(out).items() if r["job_id"]}
    return jobs if len(jobs) == n else None


def curves(out: Path, key: str) -> list[float]:
    """The run's per-epoch curves, flat: [epoch, train loss, val loss, val top-1, epoch, ...]."""
    conn = sqlite3.connect(out / "battle.db")
    found = list(conn.execute("SELECT epoch, train_loss, val_loss, val_top1 FROM epochs WHERE key = ? "
                              "ORDER BY epoch", (key,)))
    conn.close()
    return [float(x) for record in found for x in record]


def cluster_jobs(out: Path) -> dict[str, str]:
    """`scontrol show job`: the jobs (id -> state) whose comment names a run directory under `out`."""
    text = subprocess.run(["scontrol", "-o", "show", "job"], capture_output=True, text=True).stdout
    prefix = job_comment(out)
    found = {}
    for line in text.splitlines():
        fields = dict(f.split("=", 1) for f in line.split() if "=" in f)
        if fields.get("Comment", "") == prefix or fields.get("Comment", "").startswith(prefix + "/"):
            found[fields["JobId"]] = fields["JobState"]
    return found


def cli(*args: str) -> subprocess.Popen:
    # this tree's spach first; the test's own PYTHONPATH (a hook of tests/) after it, for the jobs too
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]))
    return subprocess.Popen([sys.executable, "-m", "spach.cli.main", "battle", *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


class Coordinator(threading.Thread):
    """`spach battle STUDY --out OUT` in a thread of this process (its exit code in `.code`)."""

    def __init__(self, *args: str):
        super().__init__(daemon=True)
        self.args, self.code = args, None

    def run(self) -> None:
        self.code = main(["battle", *self.args, "--quiet"])

    def result(self, timeout: float = 300) -> int:
        self.join(timeout)
        assert not self.is_alive(), f"spach battle {' '.join(self.args)} did not finish in {timeout}s"
        return self.code


def wait_for(condition, timeout: float = 240.0, what: str = "condition"):
    t0 = time.time()
    while time.time() - t0 < timeout:
        value = condition()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


def write_study(path: Path, spec: dict) -> Path:
    path.write_text(yaml.safe_dump(spec))
    return path


def same_results(a: dict, b: dict) -> None:
    for m in ("final_top1", "best_top1", "final_top5", "final_val_loss", "final_train_loss", "params", "macs"):
        assert a[m] == pytest.approx(b[m], rel=1e-6, abs=1e-7), m


@pytest.fixture(scope="module")
def slow_reference(tmp_path_factory):
    """SLOW trained without interruption, by the local launcher in this process."""
    out = tmp_path_factory.mktemp("slow-local")
    run_study(dict(SLOW, launcher={"kind": "local"}), out, quiet=True, report=False)
    (row,) = rows(out).values()
    return row, curves(out, row["key"])


@pytest.fixture
def hold(tmp_path, monkeypatch) -> Path:
    """A file that holds the jobs submitted from now on after their first checkpoint while it exists
    (tests/slurm_hold/sitecustomize.py): the run cannot finish before the test has stopped it."""
    path = tmp_path / "hold"
    path.touch()
    monkeypatch.setenv("SPACH_TEST_HOLD", str(path))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(ROOT / "tests" / "slurm_hold"), str(ROOT),
                                                      *filter(None, [os.environ.get("PYTHONPATH")])]))
    return path


def wait_held(hold: Path, job_id: str) -> None:
    """Until the job has written its first checkpoint and waits on `hold`."""
    reached = hold.parent / (hold.name + ".reached")
    wait_for(lambda: reached.exists() and reached.read_text() == job_id, what=f"job {job_id} held at its checkpoint")


# --------------------------------------------------------------------------- without a cluster

def test_old_database_gains_the_job_columns(tmp_path):
    # a database as the first release wrote it: the runs table without the job columns
    old_schema = re.sub(r",\n    job_id .*?\n\);", "\n);", db.SCHEMA, count=1, flags=re.S)
    conn = sqlite3.connect(tmp_path / "battle.db")
    conn.executescript(old_schema)
    conn.execute("INSERT INTO runs (key, name, grp, family, layout, size, cpe, shared, seed, model, config, "
                 "output_dir, status, created_at) VALUES ('k', 'n', 'g', 'conv', 'ms', 'xxs', 1, 0, 0, 'm', '{}', "
                 "'o', 'done', 0)")
    conn.commit()
    assert "job_id" not in {r[1] for r in conn.execute("PRAGMA table_info(runs)")}
    conn.close()
    conn = db.connect(tmp_path, create=True)  # what `spach battle` does first
    columns = {r["name"] for r in conn.execute("PRAGMA table_info(runs)")}
    assert {name for name, _ in db.ADDED_COLUMNS} <= columns
    assert db.get_run(conn, "k")["status"] == "done" and db.migrate(conn) == []  # kept; migrating twice is a no-op
    conn.close()


def test_executor_carries_the_launcher_settings(tmp_path):
    spec = load_study(study(launcher={"partition": "gpu", "account": "vision", "nodes": 2, "gpus_per_node": 8,
                                      "cpus_per_task": 10, "mem_gb": 480, "time_min": 2880,
                                      "setup": ["module load cuda/12.1"], "sbatch": {"exclusive": True}}))
    p = make_executor(spec.launcher, tmp_path, "spach-x", "spach:/runs/x", threads=10).parameters
    assert (p["partition"], p["account"], p["nodes"], p["ntasks_per_node"], p["gpus_per_node"]) == \
        ("gpu", "vision", 2, 8, 8)
    assert p["cpus_per_task"] == 10 and p["mem"] == f"{480 * 1024}M" and p["time"] == 2880
    assert p["comment"] == "spach:/runs/x" and p["additional_parameters"] == {"exclusive": True}
    assert p["setup"][0] == "module load cuda/12.1" and any("PYTHONPATH" in line for line in p["setup"])


def submitted_run(tmp_path, job_id: str):
    """A one-run study's database with the run submitted as `job_id`: (connection, run key, row)."""
    out = tmp_path / "out"
    out.mkdir()
    spec = load_study(study(seeds=(0,)))
    conn = db.connect(out, create=True)
    db.register_study(conn, spec, lambda r: out / "runs" / r.name)
    key = spec.runs[0].key
    db.mark_submitted(conn, key, job_id)
    return conn, key, db.get_run(conn, key)


def test_a_job_that_vanished_without_a_result_is_failed_with_its_stderr(tmp_path, monkeypatch):
    conn, key, row = submitted_run(tmp_path, "4242")
    (Path(row["output_dir"]) / "slurm").mkdir(parents=True)
    (Path(row["output_dir"]) / "slurm" / "4242_0_log.err").write_text("torch.OutOfMemoryError: CUDA out of memory\n")
    # still queued: nothing changes; Slurm not answering: nothing is decided
    assert sync_run(conn, row, {"4242": JobInfo("4242", "PENDING", "(Priority)", "")}, None) == "running"
    assert sync_run(conn, row, None, None) == "running"
    ended = {"4242": JobInfo("4242", "OUT_OF_MEMORY", "node1", "")}
    monkeypatch.setattr(slurm, "slurm_jobs", lambda: ended)  # still ended at every look of the settle window
    monkeypatch.setattr(slurm, "REQUEUE_SETTLE_S", 0.03)
    assert sync_run(conn, row, ended, None) == "failed"
    failed = db.get_run(conn, key)
    assert "4242 ended OUT_OF_MEMORY" in failed["error"] and "CUDA out of memory" in failed["error"]
    conn.close()


def test_a_job_seen_failed_for_a_moment_while_being_requeued_is_not_failed(tmp_path, monkeypatch):
    conn, key, row = submitted_run(tmp_path, "4243")
    # submitit requeues: the attempt ends FAILED, and Slurm shows the job PENDING again a moment later
    monkeypatch.setattr(slurm, "slurm_jobs", lambda: {"4243": JobInfo("4243", "PENDING", "(BeginTime)", "")})
    monkeypatch.setattr(slurm, "REQUEUE_SETTLE_S", 0.03)
    assert sync_run(conn, row, {"4243": JobInfo("4243", "FAILED", "node1", "")}, None) == "running"
    assert db.get_run(conn, key)["status"] == "running"
    conn.close()


SILENT_SQUEUE = {"fails": "echo 'slurm_load_jobs error: Unable to contact slurm controller' >&2\nexit 1\n",
                 "hangs": "sleep 30\n"}


@pytest.mark.parametrize("how", sorted(SILENT_SQUEUE))
def test_slurm_falling_silent_in_the_settle_window_decides_nothing(tmp_path, monkeypatch, how):
    # one squeue snapshot showed the job ended; then squeue stops answering (fails, or hangs): the run stays
    conn, key, row = submitted_run(tmp_path, "4245")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "squeue").write_text("#!/bin/sh\n" + SILENT_SQUEUE[how])
    (bin_dir / "squeue").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setattr(slurm, "REQUEUE_SETTLE_S", 0.03)
    monkeypatch.setattr(slurm, "SQUEUE_TIMEOUT_S", 0.5)
    assert slurm.slurm_jobs() is None  # the fake squeue is the one asked, and it does not answer
    before = db.get_run(conn, key)
    assert sync_run(conn, row, {"4245": JobInfo("4245", "FAILED", "node1", "")}, None) == "running"
    assert db.get_run(conn, key) == before  # nothing recorded: neither failed nor changed
    conn.close()


def test_a_short_last_attempt_that_ends_between_two_looks_is_judged_by_its_result(tmp_path, monkeypatch):
    conn, key, row = submitted_run(tmp_path, "4244")
    out = Path(row["output_dir"])
    out.mkdir(parents=True)
    write_json(out / jobfiles.JOB_FILE, {"job_id": "4244", "attempt": 1})
    assert sync_run(conn, row, {"4244": JobInfo("4244", "RUNNING", "node1", "")}, None) == "running"

    def second_attempt_fails_at_once():  # while the coordinator waits for a requeue to show
        write_json(out / jobfiles.JOB_FILE, {"job_id": "4244", "attempt": 2})
        write_json(out / jobfiles.RESULT_FILE, {"job_id": "4244", "status": "failed", "error": "max_attempts is 1"})
        return {"4244": JobInfo("4244", "COMPLETED", "node1", "")}

    monkeypatch.setattr(slurm, "slurm_jobs", second_attempt_fails_at_once)
    monkeypatch.setattr(slurm, "REQUEUE_SETTLE_S", 0.03)
    # the first look found no result; Slurm then shows the job ended: its result, written meanwhile, counts
    assert sync_run(conn, row, {"4244": JobInfo("4244", "COMPLETED", "node1", "")}, None) == "failed"
    failed = db.get_run(conn, key)
    assert failed["error"] == "max_attempts is 1" and failed["attempts"] == 2
    conn.close()


def one_queued_run(out: Path):
    """A registered one-run study in `out`: (its open database, the study, the run's row)."""
    out.mkdir()
    spec = load_study(study(seeds=(0,)))
    conn = db.connect(out, create=True)
    db.register_study(conn, spec, lambda r: out / "runs" / r.name)
    return conn, spec, db.get_run(conn, spec.runs[0].key)


def test_a_job_submitted_but_not_recorded_is_adopted_not_submitted_again(tmp_path):
    conn, spec, row = one_queued_run(tmp_path / "out")
    comment = job_comment(row["output_dir"])
    # the coordinator was killed between sbatch and recording job 77 (submitit had written its pickle);
    # job 12 is another run's
    pickle = submitted_pickle(Path(row["output_dir"]), "77")
    pickle.parent.mkdir(parents=True)
    pickle.write_bytes(b"the pickled call")
    jobs = {"77": JobInfo("77", "RUNNING", "node1", comment), "12": JobInfo("12", "RUNNING", "node1", "spach:/x")}
    assert submit_run(conn, row, spec, jobs, Progress(1, quiet=True), 1) == "77"
    assert db.get_run(conn, row["key"])["job_id"] == "77"
    assert [p.name for p in pickle.parent.iterdir()] == ["77_submitted.pkl"]  # nothing submitted again
    conn.close()


def test_a_job_submitted_without_its_pickle_is_cancelled_and_the_run_submitted_again(tmp_path, monkeypatch):
    """A coordinator killed between sbatch and submitit's writing of the job's pickle leaves a job that can
    never start its run (it waits 60 s for the pickle, then fails): it is cancelled, not adopted."""
    conn, spec, row = one_queued_run(tmp_path / "out")
    cancelled, submitted = [], []

    class Executor:
        def submit(self, fn, payload):
            submitted.append(payload["key"])
            return type("Job", (), {"job_id": "78"})()

    monkeypatch.setattr(slurm.SlurmLauncher, "cancel_jobs", classmethod(lambda cls, ids: cancelled.extend(ids)))
    monkeypatch.setattr(slurm, "make_executor", lambda *args: Executor())
    jobs = {"77": JobInfo("77", "PENDING", "(None)", job_comment(row["output_dir"]))}
    assert submit_run(conn, row, spec, jobs, Progress(1, quiet=True), 1) == "78"
    assert cancelled == ["77"] and submitted == [row["key"]]
    assert db.get_run(conn, row["key"])["job_id"] == "78"
    conn.close()


def test_a_job_stops_at_once_on_sigterm_although_submitit_ignores_it():
    # scancel / requeue send SIGTERM, SIGKILL only after KillWait: a job that ignored SIGTERM could finish
    code = ("import os, signal, time, submitit\n"
            "signal.signal(signal.SIGTERM, lambda *a: print('bypassed'))  # what submitit's job set-up does\n"
            "from spach.battle.launchers.slurm import stop_on_sigterm\n"
            "stop_on_sigterm()\n"
            "os.kill(os.getpid(), signal.SIGTERM)\n"
            "time.sleep(30)\n"
            "print('still running')\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, PYTHONPATH=str(ROOT), SLURM_JOB_ID="55"))
    assert proc.returncode == 128 + signal.SIGTERM, proc.stderr
    assert "job 55 got SIGTERM" in proc.stderr and "still running" not in proc.stdout + proc.stderr


def test_cancel_names_an_unknown_run(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    conn = db.connect(out, create=True)
    db.register_study(conn, load_study(study()), lambda r: out / "runs" / r.name)
    conn.close()
    with pytest.raises(ValueError, match=r"no run\(s\) named \['conv-ms-nano-s7'\]"):
        cancel_runs(out, ["conv-ms-nano-s0", "conv-ms-nano-s7"])


# --------------------------------------------------------------------------- on the cluster

@pytest.mark.slurm
@pytest.mark.slow
def test_two_runs_through_slurm_equal_the_local_launcher(tmp_path):
    local = run_study(study(launcher={"kind": "local"}), tmp_path / "local", quiet=True, report=False)
    # the run directories on "the shared file system", the database in OUT
    result = run_study(dict(study(), runs_dir=str(tmp_path / "shared")), tmp_path / "slurm", quiet=True, report=False)
    assert local["done"] == result["done"] == 2 and result["launcher"] == "slurm"
    a, b = rows(tmp_path / "local"), rows(tmp_path / "slurm")
    for name in a:
        same_results(b[name], a[name])
        assert curves(tmp_path / "slurm", b[name]["key"]) == pytest.approx(curves(tmp_path / "local", a[name]["key"]))
        assert b[name]["job_id"] and b[name]["attempts"] == 1 and b[name]["node"]
        assert Path(b[name]["output_dir"]).parent == tmp_path / "shared"
        assert (Path(b[name]["output_dir"]) / "model.safetensors").is_file()
    jobs = {}
    for r in b.values():
        jobs.update(cluster_jobs(Path(r["output_dir"])))
    # no job besides the runs' own (Slurm forgets ended jobs after MinJobAge, so some may be gone)
    assert set(jobs) <= {r["job_id"] for r in b.values()}
    status = {e["name"]: e for e in study_status(tmp_path / "slurm")}
    assert {e["status"] for e in status.values()} == {"done"}
    assert all(e["epoch"] == 2 and e["job_id"] == b[n]["job_id"] for n, e in status.items())


@pytest.mark.slurm
@pytest.mark.slow
def test_a_killed_coordinator_reattaches_and_never_submits_twice(tmp_path, capsys):
    path = write_study(tmp_path / "s.yaml", study(epochs=3))
    out = tmp_path / "out"
    first = cli(str(path), "--out", str(out), "--quiet")
    jobs = wait_for(lambda: submitted(out, 2), what="two submitted jobs")
    first.send_signal(signal.SIGKILL)
    first.wait()
    assert set(cluster_jobs(out)) == set(jobs.values())
    capsys.readouterr()
    assert main(["battle", "status", str(out)]) == 0
    text = capsys.readouterr().out
    assert all(f" {job} " in text for job in jobs.values()), text
    second = Coordinator(str(path), "--out", str(out))
    second.start()
    assert second.result() == 0
    after = rows(out)
    assert {n: r["job_id"] for n, r in after.items()} == jobs            # the same jobs, followed to the end
    assert all(r["status"] == "done" and r["attempts"] == 1 for r in after.values())
    assert set(cluster_jobs(out)) <= set(jobs.values())                  # no second job for any run
    assert all(len(curves(out, r["key"])) == 3 * 4 for r in after.values())


def start_held_job(tmp_path, hold, spec: dict = SLOW):
    """A one-run study's coordinator started, its job held after the first step checkpoint."""
    path = write_study(tmp_path / "s.yaml", spec)
    out = tmp_path / "out"
    coordinator = Coordinator(str(path), "--out", str(out))
    coordinator.start()
    wait_for(lambda: submitted(out, 1), what="the job")
    (row,) = rows(out).values()
    wait_held(hold, row["job_id"])
    return coordinator, out, row, Path(row["output_dir"])


@pytest.mark.slurm
@pytest.mark.slow
def test_scancel_is_recorded_and_retry_failed_continues_from_the_checkpoint(tmp_path, slow_reference, capsys,
                                                                              hold):
    coordinator, out, row, run_dir = start_held_job(tmp_path, hold)
    assert (run_dir / "last.pt").exists()
    capsys.readouterr()
    assert main(["battle", "cancel", str(out), row["name"]]) == 0  # scancel, by run name
    assert f"cancelled {row['name']} (job {row['job_id']})" in capsys.readouterr().out
    assert coordinator.result() == 1  # a run failed
    (failed,) = rows(out).values()
    assert failed["status"] == "failed" and "CANCELLED" in failed["error"] and "stderr tail" in failed["error"]
    assert "got SIGTERM" in failed["error"]  # the job stopped at once, not after Slurm's KillWait
    assert not (run_dir / "result.json").exists()
    hold.unlink()
    result = run_study(load_study(SLOW), out, retry_failed=True, quiet=True, report=False)
    assert result["done"] == 1
    (done,) = rows(out).values()
    assert done["job_id"] != row["job_id"] and done["attempts"] == 2
    assert "resumed from" in (run_dir / "train.log").read_text()
    reference, reference_curves = slow_reference
    same_results(done, reference)
    assert curves(out, done["key"]) == pytest.approx(reference_curves)


@pytest.mark.slurm
@pytest.mark.slow
def test_a_requeued_job_continues_from_its_checkpoint_and_ends_equal(tmp_path, slow_reference, hold):
    coordinator, out, row, run_dir = start_held_job(tmp_path, hold)
    subprocess.run(["scontrol", "requeue", row["job_id"]], check=True)
    # Slurm holds a requeued batch job for two minutes (reason BeginTime); let it start again at once
    wait_for(lambda: cluster_jobs(out).get(row["job_id"]) == "PENDING", what="the requeued job pending")
    hold.unlink()  # the second attempt runs through
    subprocess.run(["scontrol", "update", f"JobId={row['job_id']}", "StartTime=now"], check=True)
    assert coordinator.result() == 0
    (done,) = rows(out).values()
    assert done["status"] == "done" and done["job_id"] == row["job_id"] and done["attempts"] == 2
    assert "resumed from" in (run_dir / "train.log").read_text()
    reference, reference_curves = slow_reference
    same_results(done, reference)
    assert curves(out, done["key"]) == pytest.approx(reference_curves)
    assert set(cluster_jobs(out)) <= {row["job_id"]}


@pytest.mark.slurm
@pytest.mark.slow
def test_preemption_requeues_and_past_max_attempts_the_run_fails_with_the_reason(tmp_path, hold):
    spec = dict(SLOW, launcher=dict(SLURM, max_attempts=1))
    coordinator, out, row, run_dir = start_held_job(tmp_path, hold, spec)
    # what Slurm sends before a pre-emption or the time limit: submitit checkpoints and requeues the job
    subprocess.run(["scancel", "--signal=USR2", row["job_id"]], check=True)
    wait_for(lambda: cluster_jobs(out).get(row["job_id"]) == "PENDING", what="the requeued job pending")
    hold.unlink()
    subprocess.run(["scontrol", "update", f"JobId={row['job_id']}", "StartTime=now"], check=True)
    assert coordinator.result() == 1
    (failed,) = rows(out).values()
    assert failed["status"] == "failed" and failed["attempts"] == 2 and failed["job_id"] == row["job_id"], failed
    assert "max_attempts is 1" in failed["error"], failed["error"]
    # a new job for the run starts counting again and continues from the checkpoint
    assert main(["battle", str(tmp_path / "s.yaml"), "--out", str(out), "--retry-failed", "--quiet"]) == 0
    (done,) = rows(out).values()
    assert done["status"] == "done" and done["attempts"] == 3
    assert "resumed from" in (run_dir / "train.log").read_text()


@pytest.mark.slurm
@pytest.mark.slow
def test_a_failing_run_is_recorded_with_its_message_and_the_study_goes_on(tmp_path):
    # a study written for the local launcher, switched on the command line; one job at a time
    spec = study(seeds=(0,), launcher={"kind": "local", "max_jobs": 1})
    # the model builds (the study accepts it), but the study's input is not divisible by its total stride
    # 32: the model refuses the data inside the job
    spec["extra"] = [{"name": "broken", "layout": "ms", "hidden_dim": 8, "num_heads": 1, "patch_size": 4,
                      "net_arch": [[["conv", 1]], [["attn", 1]], [["attn", 1]], [["attn", 1]]]}]
    path = write_study(tmp_path / "s.yaml", spec)
    out = tmp_path / "out"
    assert main(["battle", str(path), "--out", str(out), "--launcher", "slurm", "--detach", "--quiet"]) == 0
    # submitted, not waited for; max_jobs 1: the other run waits for a free slot
    assert sorted(r["status"] for r in rows(out).values()) == ["queued", "running"]
    assert main(["battle", str(path), "--out", str(out), "--launcher", "slurm", "--quiet"]) == 1  # one run failed
    found = rows(out)
    good, broken = found["conv-ms-nano-s0"], found["broken-s0"]
    assert good["status"] == "done" and good["job_id"]
    assert broken["status"] == "failed" and ("num_heads" in broken["error"] or "divisible" in broken["error"])
    first, second = sorted(found.values(), key=lambda r: r["submitted_at"])
    assert second["submitted_at"] >= first["finished_at"]  # never two jobs at once


@pytest.mark.slurm
@pytest.mark.slow
def test_a_two_task_job_trains_with_ddp_like_one_process_with_the_global_batch(tmp_path):
    arch = [[["conv", 1]], [["conv", 1]], [["attn", 1]], [["attn", 1]]]
    recipe = dict(RECIPE, epochs=1, lr=2e-3, smoothing=0.1, clip_grad=1.0, max_train_samples=64,
                  max_val_samples=45)

    def spec(batch: int, launcher: dict) -> dict:
        return {"name": "ddp", "data": "mnist5k", "img_size": 32, "threads": 1,
                "recipe": dict(recipe, batch_size=batch), "measure": {"batch_size": 8, "warmup": 1, "repeats": 2},
                "extra": [{"name": "net", "layout": "ms", "hidden_dim": 8, "num_heads": 1, "net_arch": arch}],
                "launcher": launcher}

    # one job, 2 tasks x 8 images (gloo on CPU) vs one local process with the global batch 16
    run_study(spec(8, dict(SLURM, tasks_per_node=2)), tmp_path / "ddp", quiet=True, report=False)
    run_study(spec(16, {"kind": "local"}), tmp_path / "one", quiet=True, report=False)
    (ddp,), (one,) = rows(tmp_path / "ddp").values(), rows(tmp_path / "one").values()
    assert ddp["status"] == "done", ddp["error"]
    log = (Path(ddp["output_dir"]) / "train.log").read_text()
    assert "2 process(es) on cpu, global batch 16" in log
    assert sorted(p.name for p in (Path(ddp["output_dir"]) / "slurm").glob("*_log.out")) == \
        [f"{ddp['job_id']}_0_log.out", f"{ddp['job_id']}_1_log.out"]
    assert ddp["final_val_loss"] == pytest.approx(one["final_val_loss"], abs=1e-5)
    assert ddp["final_train_loss"] == pytest.approx(one["final_train_loss"], abs=1e-5)
    assert ddp["final_top1"] == pytest.approx(one["final_top1"])


@pytest.mark.slurm
@pytest.mark.slow
def test_a_pruned_study_through_slurm_stops_each_trial_in_its_job(tmp_path):
    assert_pruned_on(SLURM, tmp_path / "out")


@pytest.mark.slurm
@pytest.mark.slow
def test_a_tuned_study_through_slurm_killed_mid_trial_repeats_no_finished_trial(tmp_path, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", hooked_pythonpath())  # the split hook in the coordinators and the jobs
    path = write_study(tmp_path / "s.yaml", tuned_on(SLURM))
    out = tmp_path / "out"
    done, before = kill_mid_trial(cli(str(path), "--out", str(out), "--quiet"), out)
    # the trials' jobs run on without a coordinator; the same command re-attaches to them
    assert main(["battle", str(path), "--out", str(out), "--quiet"]) == 0
    runs = assert_tuned(out)
    assert_nothing_repeated(out, done, before)
    assert all(r["job_id"] and r["attempts"] == 1 for r in runs.values())  # every run one Slurm job
    for r in runs.values():  # no job besides the run's own, except one the kill caught mid-submission:
        for job_id, state in cluster_jobs(Path(r["output_dir"])).items():  # cancelled, it never had a payload
            assert job_id == r["job_id"] or (
                state == "CANCELLED" and not submitted_pickle(Path(r["output_dir"]), job_id).exists()), \
                (r["name"], job_id, state)
