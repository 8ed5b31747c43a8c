"""What the project withstands (issue 11): hostile and careless study files, output directories and databases."""
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

from spach.battle import db, load_study, run_study
from spach.battle.runner import run_dir
from spach.cli.main import main as cli

ROOT = Path(__file__).resolve().parents[1]
NANO = {"ms": {"hidden_dim": 8, "num_heads": 1, "depths": [1, 1, 1, 1], "patch_size": 2}}
ARCH = [[["conv", 1]], [["attn", 1]], [["attn", 1]], [["attn", 1]]]


def spec(**changes) -> dict:
    d = {"name": "tiny", "data": "mnist5k", "img_size": 16,
         "recipe": {"epochs": 1, "batch_size": 32, "lr": 3e-3, "warmup_epochs": 0, "cooldown_epochs": 0,
                    "max_train_samples": 64, "max_val_samples": 32, "smoothing": 0.0, "mixup": 0.0, "cutmix": 0.0,
                    "augment": False, "repeated_aug": False, "model_ema": False, "drop_path": 0.0, "workers": 0,
                    "tensorboard": False},
         "measure": {"batch_size": 4, "warmup": 0, "repeats": 1},
         "grid": {"family": ["conv"], "layout": ["ms"], "size": ["nano"], "seed": [0]},
         "sizes": {"nano": NANO}}
    d.update(changes)
    return d


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


# ---- item 1: a run's owner is its run lock, not a PID ---------------------------------------

def start_run_and_die(out: Path, key: str) -> None:
    """A process takes the run (as a battle does) and is killed by SIGKILL, as in a container restart."""
    pid = os.fork()
    if pid == 0:  # child: mark the run running (taking its lock), then die without cleaning up
        db.mark_running(db.connect(out), key, os.getpid())
        os.kill(os.getpid(), signal.SIGKILL)
    os.waitpid(pid, 0)


def registered_study(tmp_path):
    """The tiny study registered in a fresh OUT database: (study, out, connection, first run's key)."""
    study, out = load_study(spec()), tmp_path / "out"
    out.mkdir()
    conn = db.connect(out, create=True)
    db.register_study(conn, study, lambda r: run_dir(out, r))
    return study, out, conn, study.runs[0].key


def test_a_battle_resumes_when_the_dead_owner_pid_now_belongs_to_another_live_spach_process(tmp_path):
    study, out, conn, key = registered_study(tmp_path)
    start_run_and_die(out, key)
    # its PID is reused by another live spach process (in a fresh PID namespace every battle is pid 1)
    decoy = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", "spach"])
    try:
        conn.execute("UPDATE runs SET owner_pid = ? WHERE key = ?", (decoy.pid, key))
        deadline = time.time() + 30
        while not db.pid_alive(decoy.pid) and time.time() < deadline:  # until it has exec'ed
            time.sleep(0.05)
        assert db.pid_alive(decoy.pid)  # what the PID alone would say
        result = run_study(study, out, quiet=True, report=False, threads=1)
    finally:
        decoy.kill()
        decoy.wait()
    row = db.get_run(conn, key)
    assert result["done"] == 1 and row["status"] == "done" and row["attempts"] == 2


def test_a_run_whose_owner_is_alive_is_still_left_alone(tmp_path):
    study, out, conn, key = registered_study(tmp_path)
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: owns the run and keeps running
        db.mark_running(db.connect(out), key, os.getpid())
        os.write(write, b"x")
        time.sleep(60)
        os._exit(0)
    try:
        os.read(read, 1)
        with pytest.raises(RuntimeError, match=rf"still executing in another process.*conv-ms-nano-s0 \(pid {pid}\)"):
            run_study(study, out, quiet=True, report=False, threads=1)
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    assert db.get_run(conn, key)["status"] == "running"


# ---- item 2: names are safe path components -------------------------------------------------

@pytest.mark.parametrize("changes, what", [
    ({"extra": [{"name": "../../../x", "layout": "ms", "net_arch": ARCH, "hidden_dim": 8, "num_heads": 1}]},
     "name '../../../x'"),
    ({"extra": [{"name": "/abs/x", "layout": "ms", "net_arch": ARCH, "hidden_dim": 8, "num_heads": 1}]},
     "name '/abs/x'"),
    ({"name": ".."}, "the study name '..'"),
    ({"name": "."}, "the study name '.'"),
    ({"sizes": {"../up": NANO}, "grid": {"family": ["conv"], "layout": ["ms"], "size": ["../up"]}},
     "size name '../up'"),
    ({"extra": [{"model": "spach_ms_xxs_patch4_224_conv", "name": "a/b"}]}, "name 'a/b'"),
])
def test_a_name_that_would_escape_the_output_directory_is_refused_with_the_rule(tmp_path, monkeypatch, capsys,
                                                                                changes, what):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(spec(**changes)))
    assert cli(["battle", str(path), "--out", str(tmp_path / "out")]) == 2
    err = one_line_error(capsys)
    assert what in err and "is not a safe name" in err and "letter or digit" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["study.yaml"]  # nothing written, here or anywhere


# ---- item 5: bounded expansion and run count ------------------------------------------------

def test_nested_yaml_aliases_are_refused_before_they_expand(tmp_path, capsys):
    # ten levels of ten aliases: 10^10 values once expanded (the run key used to expand them: MemoryError)
    anchors = ["description:", "  - &a0 [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]"]
    anchors += [f"  - &a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]" for i in range(1, 10)]
    body = yaml.safe_dump(spec(extra=[{"model": "spach_ms_xxs_patch4_224_conv", "model_kwargs": {"x": "BOMB"}}]))
    (tmp_path / "bomb.yaml").write_text("\n".join(anchors) + "\n" + body.replace("x: BOMB", "x: *a9"))
    t0 = time.perf_counter()
    assert cli(["battle", str(tmp_path / "bomb.yaml"), "--dry-run"]) == 2
    assert time.perf_counter() - t0 < 10
    assert "expands to more than 1,000,000 values" in one_line_error(capsys)


def test_a_self_referencing_study_is_refused_not_looped_over():
    raw = spec()
    raw["recipe"]["loop"] = [raw["recipe"]]
    with pytest.raises(ValueError, match="expands to more than"):
        load_study(raw)


def test_a_study_declaring_too_many_runs_is_refused_quickly_with_the_override_named(tmp_path, capsys):
    huge = spec(grid={"family": ["conv"], "layout": ["ms"], "size": ["nano"], "seed": list(range(100_000))})
    t0 = time.perf_counter()
    with pytest.raises(ValueError, match=r"declares 100,000 runs, more than the limit of 10,000.*--max-runs 100000"):
        load_study(huge)
    assert time.perf_counter() - t0 < 5
    some = spec(grid={"family": ["conv"], "layout": ["ms"], "size": ["nano"], "seed": list(range(30))})
    with pytest.raises(ValueError, match="declares 30 runs, more than the limit of 20"):
        load_study(some, max_runs=20)
    assert len(load_study(some, max_runs=30).runs) == 30
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(some))
    assert cli(["battle", str(tmp_path / "s.yaml"), "--dry-run", "--max-runs", "29"]) == 2
    assert "--max-runs 30" in one_line_error(capsys)
    assert cli(["battle", str(tmp_path / "s.yaml"), "--dry-run", "--max-runs", "30"]) == 0


# ---- item 7: measure device, output directory, database -------------------------------------

def test_measuring_on_cuda_without_cuda_is_refused_before_any_training(tmp_path, monkeypatch):
    import torch
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    study = load_study(spec(measure={"device": "cuda"}))  # still loadable and listable (e.g. a GPU cluster's)
    with pytest.raises(ValueError, match="measure.device is cuda but this machine has no CUDA device"):
        run_study(study, tmp_path / "out", quiet=True)
    assert not (tmp_path / "out").exists()


def test_battle_out_pointing_at_a_file_is_a_usage_error(tmp_path, capsys):
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(spec()))
    (tmp_path / "file").write_text("mine")
    assert cli(["battle", str(tmp_path / "s.yaml"), "--out", str(tmp_path / "file")]) == 2
    assert "is a file, not a directory" in one_line_error(capsys)
    assert (tmp_path / "file").read_text() == "mine"


@pytest.mark.parametrize("command", ["report", "battle"])
def test_a_garbage_battle_db_is_one_clear_line_and_left_as_it_is(tmp_path, capsys, command):
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(spec()))
    garbage = os.urandom(4096)
    (tmp_path / "battle.db").write_bytes(garbage)
    args = ["report", str(tmp_path)] if command == "report" else ["battle", str(tmp_path / "s.yaml"), "--out",
                                                                    str(tmp_path)]
    assert cli(args) == 1
    err = one_line_error(capsys)
    assert "battle.db" in err and "study database" in err
    assert (tmp_path / "battle.db").read_bytes() == garbage


def finished_database(out: Path) -> None:
    """A study database with one done run (metrics as a finished run records them)."""
    study = load_study(spec())
    conn = db.connect(out, create=True)
    db.register_study(conn, study, lambda r: run_dir(out, r))
    db.record_epoch(conn, study.runs[0].key, {"epoch": 1, "train_loss": 2.0, "val_loss": 2.1, "val_top1": 30.0})
    db.mark_done(conn, study.runs[0].key, {"params": 1000, "macs": 2000, "images_per_s": 50.0, "best_top1": 30.0,
                                           "final_top1": 30.0, "final_top5": 70.0, "final_val_loss": 2.1,
                                           "final_train_loss": 2.0, "train_time_s": 3.0})
    conn.close()


def run_unprivileged(args: list[str]) -> subprocess.CompletedProcess:
    """The CLI in a process that file permissions bind (as root: every capability dropped, through setpriv)."""
    drop = ["setpriv", "--bounding-set=-all", "--inh-caps=-all"] if os.geteuid() == 0 else []
    return subprocess.run([*drop, sys.executable, "-m", "spach.cli.main", *args], capture_output=True, text=True,
                          env=dict(os.environ, PYTHONPATH=str(ROOT)))


@pytest.mark.slow
def test_report_of_a_read_only_directory_reads_the_database_and_writes_where_told(tmp_path):
    out, dest = tmp_path / "out", tmp_path / "elsewhere"
    out.mkdir()
    finished_database(out)
    before = sorted(p.name for p in out.iterdir())
    data = (out / "battle.db").read_bytes()
    os.chmod(out, 0o555)
    try:
        refused = run_unprivileged(["report", str(out)])
        written = run_unprivileged(["report", str(out), "--to", str(dest)])
    finally:
        os.chmod(out, 0o755)
    assert refused.returncode == 1 and "Traceback" not in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1 and "--to DEST" in refused.stderr
    assert written.returncode == 0, written.stderr
    assert "| conv | MS | nano |" in (dest / "report.md").read_text() and (dest / "figures").is_dir()
    assert sorted(p.name for p in out.iterdir()) == before and (out / "battle.db").read_bytes() == data


@pytest.mark.slow
def test_battle_into_a_read_only_directory_is_one_clear_line_and_exit_1(tmp_path):
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(spec()))
    out = tmp_path / "out"
    out.mkdir()
    os.chmod(out, 0o555)
    try:
        proc = run_unprivileged(["battle", str(tmp_path / "s.yaml"), "--out", str(out / "study")])
    finally:
        os.chmod(out, 0o755)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "read-only" in proc.stderr
