"""The battle end to end on a micro study (real trainings through the engine, 16px, a slice of mnist5k):
the database, the report, a failing run, resume after SIGKILL, the lock, workers, the CLI."""
from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from spach.battle import load_study, run_study, write_report
from spach.battle.runner import StudyLock
from spach.cli.main import main

ROOT = Path(__file__).resolve().parents[1]

MICRO = {
    "name": "micro",
    "data": "mnist5k",
    "img_size": 16,
    "recipe": {"epochs": 2, "batch_size": 32, "lr": 3e-3, "warmup_epochs": 0, "cooldown_epochs": 0,
               "max_train_samples": 192, "max_val_samples": 64, "smoothing": 0.0, "mixup": 0.0, "cutmix": 0.0,
               "augment": False, "repeated_aug": False, "model_ema": False, "drop_path": 0.0, "workers": 0,
               "tensorboard": False},
    "measure": {"batch_size": 8, "warmup": 1, "repeats": 2},
    "grid": {"family": ["conv", "attn"], "layout": ["ss", "ms"], "size": ["nano"], "seed": [0, 1]},
    "sizes": {"nano": {"ss": {"hidden_dim": 16, "num_heads": 2, "depth": 1, "patch_size": 4},
                       "ms": {"hidden_dim": 8, "num_heads": 1, "depths": [1, 1, 1, 1], "patch_size": 2}}},
    # the model builds (the study accepts it), but a 16px input is not divisible by its total stride 32:
    # it refuses the data when the run starts, and the run fails
    "extra": [{"name": "broken", "layout": "ms", "hidden_dim": 8, "num_heads": 1, "patch_size": 4,
               "net_arch": [[["conv", 1]], [["attn", 1]], [["attn", 1]], [["attn", 1]]]}],
}


def micro(**changes) -> dict:
    d = yaml.safe_load(yaml.safe_dump(MICRO))
    d.update(changes)
    return d


def rows(out: Path) -> dict[str, dict]:
    conn = sqlite3.connect(out / "battle.db")
    conn.row_factory = sqlite3.Row
    found = {r["name"]: dict(r) for r in conn.execute("SELECT * FROM runs")}
    conn.close()
    return found


def epochs(out: Path, key: str) -> list[dict]:
    conn = sqlite3.connect(out / "battle.db")
    conn.row_factory = sqlite3.Row
    found = [dict(r) for r in conn.execute("SELECT * FROM epochs WHERE key = ? ORDER BY epoch", (key,))]
    conn.close()
    return found


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """The micro study (8 runs + 1 broken), run once for the tests that read its results."""
    out = tmp_path_factory.mktemp("micro")
    result = run_study(micro(), out, quiet=True, threads=1)  # 1 thread: robust on a busy machine
    return out, result


def test_database_contents(finished):
    out, result = finished
    assert result["done"] == 8 and result["failed"] == 1 and result["queued"] == result["running"] == 0
    study = load_study(micro())
    by_name = rows(out)
    assert set(by_name) == {r.name for r in study.runs}
    for run in study.runs:
        row = by_name[run.name]
        assert row["key"] == run.key  # keyed by the hash of the resolved configuration
        if run.name.startswith("broken"):
            continue
        assert row["status"] == "done" and row["attempts"] == 1 and row["error"] is None
        assert row["params"] > 0 and row["macs"] > 0 and row["images_per_s"] > 0
        assert 0 <= row["final_top1"] <= 100 and row["best_top1"] >= row["final_top1"]
        assert row["final_train_loss"] > 0 and row["final_val_loss"] > 0
        assert row["started_at"] <= row["finished_at"]
        curve = epochs(out, run.key)
        assert [e["epoch"] for e in curve] == [1, 2]
        assert all(e["train_loss"] > 0 and e["val_top1"] is not None for e in curve)
        assert Path(row["output_dir"], "model.safetensors").is_file()
    # seeds of one architecture share params, differ in training
    assert by_name["attn-ms-nano-s0"]["params"] == by_name["attn-ms-nano-s1"]["params"]
    conn = sqlite3.connect(out / "battle.db")
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    conn.close()


def test_failed_run_recorded_while_others_complete(finished):
    out, _ = finished
    broken = rows(out)["broken-s0"]
    assert broken["status"] == "failed" and broken["attempts"] == 1
    assert "num_heads" in broken["error"] or "divisible" in broken["error"], broken["error"]


def test_report_table_findings_and_figures(finished):
    out, _ = finished
    (out / "report.md").unlink()
    report = write_report(out)
    text = report.read_text()
    assert "| family | layout | size | CPE | shared | seeds | params (M) | MMACs | images/s | top-1 (%)" in text
    for group in ("| conv | SS | nano |", "| conv | MS | nano |", "| attn | SS | nano |", "| attn | MS | nano |"):
        assert group in text
    assert " ± " in text  # mean ± std over the two seeds
    assert "## Findings" in text and "Multi-stage beats single-stage" in text
    assert "not covered by this study" in text  # e.g. the CPE ablation is not in this grid
    assert "## Failed runs" in text and "broken-s0" in text
    for png in ("top1_vs_params.png", "top1_vs_throughput.png", "overfitting.png", "curves/attn-ms-nano-s1.png"):
        path = out / "figures" / png
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", png
        assert f"figures/{png}" in text
    assert not list(out.glob(".*.tmp")) and not list((out / "figures").glob(".*"))  # atomic writes left nothing


def test_rerun_skips_done_and_retries_failed_only_on_request(finished):
    out, _ = finished
    before = rows(out)
    result = run_study(micro(), out, quiet=True, report=False, threads=1)
    assert result["done"] == 8 and result["failed"] == 1
    assert rows(out) == before  # nothing was run again, not even the failed run
    run_study(micro(), out, quiet=True, report=False, retry_failed=True, threads=1)
    after = rows(out)
    assert after["broken-s0"]["attempts"] == 2 and after["broken-s0"]["status"] == "failed"
    assert {k: v for k, v in after.items() if k != "broken-s0"} == \
        {k: v for k, v in before.items() if k != "broken-s0"}


def test_second_invocation_refused(tmp_path, capsys):
    with StudyLock(tmp_path):
        with pytest.raises(RuntimeError, match=rf"in use by another `spach battle` \(pid {os.getpid()}\)"):
            run_study(micro(), tmp_path, quiet=True)
        study = tmp_path / "micro.yaml"
        study.write_text(yaml.safe_dump(micro()))
        assert main(["battle", str(study), "--out", str(tmp_path)]) == 1  # busy: a failure, not a usage error
        assert f"(pid {os.getpid()})" in capsys.readouterr().err
    assert not (tmp_path / "battle.db").exists()  # the refused invocations touched nothing


@pytest.mark.slow
def test_killed_study_resumes_without_retraining(tmp_path):
    spec = micro(grid={"family": ["conv", "attn"], "layout": ["ms"], "size": ["nano"], "seed": [0]}, extra=[])
    spec["recipe"].update(epochs=4, max_train_samples=320)
    study = tmp_path / "micro.yaml"
    study.write_text(yaml.safe_dump(spec))
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "spach.cli.main", "battle", str(study), "--out", str(out), "--quiet", "--threads", "1"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    first, second = load_study(spec).runs
    deadline = time.time() + 120
    try:
        while time.time() < deadline and proc.poll() is None:
            try:
                state = rows(out) if (out / "battle.db").exists() else {}
                if state.get(first.name, {}).get("status") == "done" and epochs(out, second.key):
                    break
            except sqlite3.OperationalError:  # the battle is still creating its tables
                pass
            time.sleep(0.05)
        else:
            pytest.fail(f"the study ended or stalled before the kill: {proc.stderr.read().decode()}")
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    killed = rows(out)
    assert killed[first.name]["status"] == "done" and killed[second.name]["status"] == "running"
    ckpts = sorted(Path(killed[first.name]["output_dir"]).glob("*"))
    mtimes = {p: p.stat().st_mtime_ns for p in ckpts}

    assert main(["battle", str(study), "--out", str(out), "--quiet", "--threads", "1"]) == 0
    resumed = rows(out)
    # throughput is measured after all training: the killed study had not got there yet
    assert killed[first.name]["images_per_s"] is None and resumed[first.name]["images_per_s"] > 0
    same = {k: v for k, v in resumed[first.name].items() if k != "images_per_s"}
    assert same == {k: v for k, v in killed[first.name].items() if k != "images_per_s"}  # not trained again
    assert {p: p.stat().st_mtime_ns for p in ckpts} == mtimes  # nor its files touched
    assert resumed[second.name]["status"] == "done" and resumed[second.name]["attempts"] == 2
    log = Path(resumed[second.name]["output_dir"], "train.log").read_text()
    assert "resumed from" in log  # continued from its checkpoint, not from scratch
    assert [e["epoch"] for e in epochs(out, second.key)] == [1, 2, 3, 4]
    assert (out / "report.md").is_file()


@pytest.mark.slow
def test_workers_run_in_subprocesses_and_report_cli(tmp_path, capsys):
    spec = micro(grid={"family": ["attn"], "layout": ["ss", "ms"], "size": ["nano"], "seed": [0]})
    study = tmp_path / "micro.yaml"
    study.write_text(yaml.safe_dump(spec))
    out = tmp_path / "out"
    assert main(["battle", str(study), "--out", str(out), "--workers", "2", "--threads", "2", "--quiet"]) == 1
    state = rows(out)
    assert {n: r["status"] for n, r in state.items()} == {"attn-ss-nano-s0": "done", "attn-ms-nano-s0": "done",
                                                          "broken-s0": "failed"}
    assert all(r["owner_pid"] is None for r in state.values())
    assert all(Path(r["output_dir"], "worker.log").is_file() for r in state.values())
    (out / "report.md").unlink()
    assert main(["report", str(out)]) == 0
    assert (out / "report.md").is_file() and str(out / "report.md") in capsys.readouterr().out


def test_report_of_missing_directory_is_a_clear_error(tmp_path, capsys):
    assert main(["report", str(tmp_path / "nowhere")]) == 2
    assert "no study database" in capsys.readouterr().err


def test_workers_default_to_what_the_cores_allow_at_the_study_threads(monkeypatch):
    from spach.battle import runner

    monkeypatch.setattr(runner, "available_threads", lambda: 8)
    assert runner.default_workers(load_study(micro(threads=1))) == 8
    assert runner.default_workers(load_study(micro(threads=2))) == 4
    assert runner.default_workers(load_study(micro(threads=3)), threads=4) == 1
    assert runner.default_workers(load_study(micro())) == 1  # no threads per run given: one run, all cores


def test_throughput_is_measured_after_training_and_on_resume(finished, tmp_path):
    import shutil

    out, _ = finished
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    conn = sqlite3.connect(copy / "battle.db")
    with conn:
        conn.execute("UPDATE runs SET images_per_s = NULL WHERE name = 'conv-ss-nano-s0'")
    conn.close()
    before = rows(copy)
    result = run_study(micro(), copy, quiet=True, threads=1)  # nothing to train; the quiet phase measures
    after = rows(copy)
    assert result["done"] == 8
    assert after["conv-ss-nano-s0"]["images_per_s"] > 0
    for name, row in before.items():  # nothing trained again
        assert after[name]["finished_at"] == row["finished_at"]
        if name != "conv-ss-nano-s0":
            assert after[name]["images_per_s"] == row["images_per_s"]


DIES = '''
import os
import torch.nn as nn
import spach


@spach.register_mixer("dies")
class Dies(nn.Module):
    """A mixer whose training forward ends its process at once (a crash no Python handler sees)."""

    def __init__(self, dim):
        super().__init__()
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        if x.requires_grad:
            os._exit(7)
        return self.proj(x)
'''


@pytest.mark.slow
def test_worker_slots_reuse_their_process_and_replace_a_dead_one(tmp_path, monkeypatch):
    from spach.battle.launchers import processes
    from spach.models import registry

    (tmp_path / "dies.py").write_text(DIES)
    grid = {"family": ["conv", "dies", "attn"], "layout": ["ss"], "size": ["nano"], "seed": [0, 1]}
    spec = micro(grid=grid, extra=[], threads=1, plugins=["dies.py"])
    (tmp_path / "study.yaml").write_text(yaml.safe_dump(spec))
    spawned = []
    spawn = processes.WorkerSlot._spawn
    monkeypatch.setattr(processes.WorkerSlot, "_spawn",
                        lambda self, *a, **k: spawned.append(self.slot) or spawn(self, *a, **k))
    try:
        out = tmp_path / "out"
        run_study(load_study(tmp_path / "study.yaml"), out, workers=2, quiet=True)
        state = rows(out)
    finally:
        registry.unregister_mixer("dies")
    assert {n: r["status"] for n, r in state.items()} == {
        "conv-ss-nano-s0": "done", "conv-ss-nano-s1": "done", "dies-ss-nano-s0": "failed",
        "dies-ss-nano-s1": "failed", "attn-ss-nano-s0": "done", "attn-ss-nano-s1": "done"}
    for name in ("dies-ss-nano-s0", "dies-ss-nano-s1"):
        assert "worker exited with code 7" in state[name]["error"]
    # 6 runs, 4 processes: one per slot to begin with, and one more after each of the 2 crashes
    assert len(spawned) == 4 and set(spawned) == {0, 1}
    # a run's output goes to its own log, also in a reused process: the slots' own logs stay empty (removed)
    assert not list(out.glob("worker-*.log"))
    assert all("spach_xxs" in Path(r["output_dir"], "train.log").read_text() for r in state.values()
               if r["status"] == "done")


@pytest.mark.slow
def test_a_run_ends_the_same_in_a_reused_worker_as_in_this_process(tmp_path):
    grid = {"family": ["attn", "conv"], "layout": ["ss"], "size": ["nano"], "seed": [0, 1]}
    spec = micro(grid=grid, extra=[], threads=1)
    run_study(spec, tmp_path / "here", workers=1, quiet=True)   # all four in this process
    run_study(spec, tmp_path / "slots", workers=2, quiet=True)  # two slots, two runs each
    here, slots = rows(tmp_path / "here"), rows(tmp_path / "slots")
    assert len(here) == 4
    for name in here:
        assert slots[name]["status"] == here[name]["status"] == "done"
        assert slots[name]["final_train_loss"] == here[name]["final_train_loss"]
        assert slots[name]["final_top1"] == here[name]["final_top1"]
