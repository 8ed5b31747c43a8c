"""The battle's console (issue 24, defects 6 and 8): a closed stdout (`spach battle ... | head`) does not stop
the study, earlier versions' runs in the output directory are mentioned, and a failed run's line says why."""
from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import yaml

from spach.battle import db, load_study, run_study
from spach.battle.progress import Progress, error_line
from spach.battle.runner import run_dir

ROOT = Path(__file__).resolve().parents[1]
RECIPE = {"epochs": 1, "batch_size": 32, "lr": 3e-3, "warmup_epochs": 0, "cooldown_epochs": 0,
          "max_train_samples": 64, "max_val_samples": 32, "smoothing": 0.0, "mixup": 0.0, "cutmix": 0.0,
          "augment": False, "repeated_aug": False, "model_ema": False, "drop_path": 0.0, "workers": 0,
          "tensorboard": False}
NANO = {"ms": {"hidden_dim": 8, "num_heads": 1, "depths": [1, 1, 1, 1], "patch_size": 2}}
# builds (the study accepts it), but 16px is not divisible by its total stride 32: the run fails when it starts
BROKEN = {"name": "broken", "layout": "ms", "hidden_dim": 8, "num_heads": 1, "patch_size": 4,
          "net_arch": [[["conv", 1]], [["conv", 1]], [["conv", 1]], [["conv", 1]]]}


def study(**changes) -> dict:
    d = {"name": "tiny", "data": "mnist5k", "img_size": 16, "threads": 1, "recipe": dict(RECIPE),
         "measure": {"batch_size": 4, "warmup": 0, "repeats": 1},
         "grid": {"family": ["conv"], "layout": ["ms"], "size": ["nano"], "seed": [0]}, "sizes": {"nano": NANO}}
    d.update(changes)
    return d


def test_a_closed_stdout_does_not_stop_the_study_before_its_report(tmp_path):
    (tmp_path / "study.yaml").write_text(yaml.safe_dump(study()))
    out = tmp_path / "out"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen([sys.executable, "-m", "spach.cli.main", "battle", str(tmp_path / "study.yaml"),
                             "--out", str(out), "--workers", "1", "--threads", "1"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=tmp_path, env=env)
    first = proc.stdout.readline()  # what `| head -1` reads before it exits
    proc.stdout.close()
    _, err = proc.communicate(timeout=600)
    assert first.startswith(b"study tiny: 1 runs")
    assert proc.returncode == 0, err.decode()
    assert b"Traceback" not in err and b"BrokenPipe" not in err
    assert (out / "report.md").is_file()
    log = (out / "progress.log").read_text()
    assert "the console was closed" in log and "conv-ms-nano-s0: done" in log and "study tiny: 1 done, 0 failed" in log
    assert db.get_run(db.connect(out), load_study(study()).runs[0].key)["status"] == "done"


class ClosedPipe(io.StringIO):
    """A console whose reader has exited: every write fails with EPIPE."""

    def write(self, text):
        raise BrokenPipeError(32, "Broken pipe")


def test_progress_keeps_count_when_the_console_goes_away(tmp_path):
    progress = Progress(total=2, stream=ClosedPipe(), log_path=tmp_path / "progress.log")
    progress.run_started("a", 1, 1)
    progress.run_finished("a", True, "top-1 50.00%")
    assert progress.stream_closed and progress.finished == 1
    lines = (tmp_path / "progress.log").read_text().splitlines()
    assert "the console was closed" in lines[0]
    assert lines[1].startswith("[1/2] a: started (1 epochs)") and lines[2].startswith("    a: done — top-1 50.00%")


def test_the_console_names_earlier_versions_and_why_a_worker_run_failed(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    earlier = load_study(study(recipe=dict(RECIPE, lr=1e-3)))  # the same grid, another recipe
    conn = db.connect(out, create=True)
    db.register_study(conn, earlier, lambda r: run_dir(out, r))
    db.mark_done(conn, earlier.runs[0].key, {"final_top1": 50.0, "best_top1": 50.0})
    before = db.runs(conn)
    conn.close()
    now = load_study(study(grid=None, extra=[BROKEN]))
    result = run_study(now, out, workers=2, threads=2, report=False)  # worker processes, as `--workers 2`
    console = capsys.readouterr().out
    assert result["failed"] == 1
    assert (f"note: {out} also holds 1 done run(s) of an earlier version of the study (another recipe or grid); "
            "they are kept in the database, not rerun and not in this report") in console
    conn = db.connect(out)
    failed = db.get_run(conn, now.runs[0].key)
    line = next(x for x in console.splitlines() if "broken-s0: FAILED" in x)
    assert error_line(failed["error"]) in line and "not divisible by the network's total stride 32" in line
    assert f"(see {failed['output_dir']}/worker.log)" in line
    assert [r for r in db.runs(conn) if r["key"] == earlier.runs[0].key] == before  # left as it was
