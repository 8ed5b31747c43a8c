"""The launcher seam: a launcher registered by a test runs a study end to end through the runner, status and
cancel; a tuned study on the torchrun launcher (2 CPU processes per run); the threads-per-run rule; the one
atomic JSON writer; the runner names no launcher kind."""
from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest

from spach.battle import db, jobfiles, run_study
from spach.battle.launchers import LAUNCHERS, Launcher, job_kind
from spach.battle.launchers.status import cancel_runs, format_status, study_status
from spach.battle.threads import available_threads, threads_per_run
from spach.io import write_json
from test_tune import assert_tuned, hooked_pythonpath, opened_splits, tuned_on

ROOT = Path(__file__).resolve().parents[1]
RECIPE = {"epochs": 1, "batch_size": 32, "lr": 3e-3, "warmup_epochs": 0, "cooldown_epochs": 0,
          "max_train_samples": 64, "max_val_samples": 32, "smoothing": 0.0, "mixup": 0.0, "cutmix": 0.0,
          "augment": False, "repeated_aug": False, "model_ema": False, "drop_path": 0.0, "workers": 0,
          "tensorboard": False}


def tiny(launcher: dict, seeds=(0, 1)) -> dict:
    return {"name": "tiny", "data": "mnist5k", "img_size": 16, "threads": 1, "recipe": dict(RECIPE),
            "measure": {"batch_size": 8, "warmup": 1, "repeats": 1},
            "grid": {"family": ["conv"], "layout": ["ms"], "size": ["nano"], "seed": list(seeds)},
            "sizes": {"nano": {"ms": {"hidden_dim": 8, "num_heads": 1, "depths": [1, 1, 1, 1], "patch_size": 2}}},
            "launcher": launcher}


class FakeLauncher(Launcher):
    """A launcher of the test's own: each run a 'job' in a thread of this process that reports through the
    job files, as a cluster job would; every call is logged in `calls`."""

    kind = "fake"
    can_detach = True
    calls: list[tuple[str, str]] = []
    cancelled: list[str] = []

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.threads_of: dict[str, threading.Thread] = {}

    def describe(self) -> str:
        return "fake jobs in threads"

    def capacity(self) -> int:
        return 1

    def poll_s(self) -> float:
        return 0.05

    def submit(self, conn, row, index, progress) -> None:
        job_id = f"fake:{index}"
        payload = {"config": json.loads(row["config"]), "output_dir": row["output_dir"], "max_attempts": 1}
        job = threading.Thread(target=self.job, args=(payload, job_id), daemon=True)
        db.mark_submitted(conn, row["key"], job_id)
        self.calls.append(("submit", row["name"]))
        job.start()
        self.threads_of[job_id] = job

    @staticmethod
    def job(payload, job_id) -> None:
        try:
            jobfiles.run_attempt(payload, job_id=job_id, attempt=1, node="thread", threads=1)
        except Exception:  # recorded in its result file
            pass

    def poll(self, conn, rows, progress) -> set[str]:
        self.calls.append(("poll", ",".join(r["name"] for r in rows)))
        ended = set()
        for row in rows:
            jobfiles.import_epochs(conn, row, progress)
            if jobfiles.settle_from_files(conn, row, progress) is not None:
                self.threads_of[row["job_id"]].join()
                ended.add(row["key"])
        return ended

    @classmethod
    def job_states(cls, job_ids):
        return {j: ("RUNNING", "thread") for j in job_ids}

    @classmethod
    def cancel_jobs(cls, job_ids) -> None:
        cls.cancelled.extend(job_ids)


@pytest.fixture
def fake(monkeypatch):
    monkeypatch.setitem(LAUNCHERS, "fake", FakeLauncher)
    FakeLauncher.calls, FakeLauncher.cancelled = [], []
    return FakeLauncher


def test_a_launcher_registered_by_a_test_runs_a_study_end_to_end(tmp_path, fake, one_thread):
    out = tmp_path / "out"
    result = run_study(tiny({"kind": "fake"}), out, quiet=True)
    assert result["done"] == 2 and result["failed"] == 0 and result["launcher"] == "fake"
    # one run in flight at a time (its capacity), each submitted once and followed until its result came
    assert [c for c in fake.calls if c[0] == "submit"] == [("submit", "conv-ms-nano-s0"), ("submit", "conv-ms-nano-s1")]
    assert all("," not in names for kind, names in fake.calls if kind == "poll")
    conn = db.connect(out)
    rows = {r["name"]: r for r in db.runs(conn)}
    assert {r["job_id"] for r in rows.values()} == {"fake:1", "fake:2"}
    for row in rows.values():  # recorded through db.mark_done: metrics, curve, throughput of the quiet phase
        assert row["status"] == "done" and row["final_top1"] is not None and row["images_per_s"] > 0
        assert [e["epoch"] for e in db.epochs(conn, row["key"])] == [1]
    conn.close()
    assert (out / "report.md").is_file()
    # a second invocation finds everything done: nothing is submitted again
    fake.calls.clear()
    assert run_study(tiny({"kind": "fake"}), out, quiet=True, report=False)["done"] == 2
    assert fake.calls == []


@pytest.mark.slow
def test_a_tuned_study_on_the_torchrun_launcher_trains_trials_and_final_runs_with_ddp(tmp_path, monkeypatch):
    # tune seed 0, study seed 1: the final runs' seed is the study's, not the trials'; a round's two trials
    # run as two torchrun launches at once (--workers 2)
    monkeypatch.setenv("PYTHONPATH", hooked_pythonpath())  # the split hook in every torchrun process
    out = tmp_path / "out"
    result = run_study(tuned_on({"kind": "torchrun", "nproc_per_node": 2}, seeds=(1,)), out, workers=2, quiet=True)
    assert result["done"] == 2 and result["failed"] == 0 and result["launcher"] == "torchrun"
    runs = assert_tuned(out, seeds=(1,))
    assert len(runs) == 2 * 2 + 2
    for run in runs.values():  # every trial and final run: one launch of 2 gloo processes, both ranks reading
        assert "2 process(es) on cpu" in (Path(run["output_dir"]) / "train.log").read_text()
        assert len({o["pid"] for o in opened_splits(run)}) == 2


def test_status_and_cancel_ask_the_launcher_that_owns_the_job(tmp_path, fake):
    out = tmp_path / "out"
    out.mkdir()
    from spach.battle import load_study

    study = load_study(tiny({"kind": "fake"}))
    conn = db.connect(out, create=True)
    db.register_study(conn, study, lambda r: out / "runs" / r.name)
    db.mark_submitted(conn, study.runs[0].key, "fake:7")
    conn.close()
    entries = {e["name"]: e for e in study_status(out)}
    assert entries["conv-ms-nano-s0"]["job_state"] == "RUNNING" and entries["conv-ms-nano-s0"]["node"] == "thread"
    assert entries["conv-ms-nano-s1"]["status"] == "queued" and entries["conv-ms-nano-s1"]["job_state"] is None
    assert "running" in format_status(list(entries.values()))
    assert cancel_runs(out) == [("conv-ms-nano-s0", "fake:7")] and fake.cancelled == ["fake:7"]
    assert job_kind("fake:7") == "fake" and job_kind("4242") == "slurm"  # Slurm's ids are bare


def test_detach_is_refused_by_a_launcher_that_needs_its_coordinator(tmp_path):
    with pytest.raises(ValueError, match=r"--detach needs a launcher whose jobs run on.*this study uses local"):
        run_study(tiny({"kind": "local"}), tmp_path / "out", quiet=True, detach=True)


def test_an_unknown_launcher_kind_names_the_registered_ones():
    from spach.battle.spec import parse_study

    with pytest.raises(ValueError, match=r"launcher.kind.*'local', 'torchrun', 'slurm'"):
        parse_study(tiny({"kind": "kubernetes"}))


def test_threads_per_run_one_rule_first_match_wins(monkeypatch):
    from spach.battle import threads

    monkeypatch.setattr(threads, "available_threads", lambda: 8)
    assert threads_per_run(None) == 8 and threads_per_run(None, workers=3) == 2   # the machine's share
    assert threads_per_run(None, allotted=4, workers=3) == 4                      # the launcher's allotment
    assert threads_per_run(2, allotted=4) == 2                                    # the study's threads
    assert threads_per_run(2, total=6, workers=2, allotted=4) == 3                # --threads, split
    assert threads_per_run(2, total=6, measure=1) == 1                            # measure.threads, measuring
    assert threads_per_run(None, machine=False) is None                           # the job's node decides
    assert threads_per_run(None, total=1, workers=4) == 1
    with pytest.raises(ValueError, match="workers must be >= 1"):
        threads_per_run(None, workers=0)
    assert available_threads() >= 1


def test_the_one_json_writer_is_atomic_and_ends_with_a_newline(tmp_path, monkeypatch):
    path = write_json(tmp_path / "r.json", {"a": [1, 2]}, indent=1)
    assert json.loads(path.read_text()) == {"a": [1, 2]} and path.read_text().endswith("}\n")

    def fail(*a, **k):
        raise OSError("disk full")
    monkeypatch.setattr(json, "dump", fail)
    with pytest.raises(OSError, match="disk full"):
        write_json(path, {"b": 1})
    assert json.loads(path.read_text()) == {"a": [1, 2]}  # the old file, whole
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]  # no temporary file left


KIND_WORDS = ("\"local\"", "'local'", "\"torchrun\"", "'torchrun'", "\"slurm\"", "'slurm'", "\"ray\"", "'ray'")


def test_the_runner_and_the_execution_modules_name_no_launcher_kind():
    for name in ("runner.py", "execute.py", "jobfiles.py", "worker.py", "launchers/drive.py", "launchers/status.py"):
        text = (ROOT / "spach" / "battle" / name).read_text()
        assert not [w for w in KIND_WORDS if w in text], name


def test_no_launcher_imports_the_runner():
    for path in (ROOT / "spach" / "battle" / "launchers").glob("*.py"):
        assert "battle.runner" not in path.read_text() and "battle import runner" not in path.read_text(), path
