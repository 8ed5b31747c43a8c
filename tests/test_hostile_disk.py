"""A full disk (issue 24, defect 10): "no space left on device at PATH", nothing earlier replaced, and a study
database whose creation the full disk cut short is made anew, not called "not a study database"."""
from __future__ import annotations

import errno
import sqlite3
from collections import namedtuple
from pathlib import Path

import pytest
import torch
import yaml

import spach.errors
from spach.battle import db, load_study
from spach.battle.runner import run_dir
from spach.cli.main import main as cli
from spach.engine import TrainConfig
from spach.engine import checkpoint as ckpt
from spach.errors import NoSpaceError

TORCH_FULL = "[enforce fail at inline_container.cc:672] . unexpected pos 64 vs 0"
Usage = namedtuple("Usage", "total used free")


def good_checkpoint(out: Path) -> bytes:
    """Two good checkpoints in `out` (last.pt and last.prev.pt); returns last.pt's bytes."""
    ckpt.save_checkpoint({"model": {"w": torch.zeros(2)}, "position": {"epoch": 1, "step": 0}}, out)
    ckpt.save_checkpoint({"model": {"w": torch.ones(2)}, "position": {"epoch": 2, "step": 0}}, out)
    return (out / ckpt.LAST).read_bytes()


def failing_save(error: Exception):
    def save(state, f):
        f.write(b"partial")  # what a full disk leaves in the temporary file
        raise error
    return save


@pytest.mark.parametrize("error", [OSError(errno.ENOSPC, "No space left on device"), RuntimeError(TORCH_FULL)],
                         ids=["ENOSPC", "torch-zip-writer"])
def test_a_checkpoint_write_on_a_full_disk_says_so_and_keeps_both_checkpoints(tmp_path, monkeypatch, error):
    last, prev = good_checkpoint(tmp_path), (tmp_path / ckpt.PREV).read_bytes()
    monkeypatch.setattr(ckpt.torch, "save", failing_save(error))
    monkeypatch.setattr(spach.errors.shutil, "disk_usage", lambda p: Usage(10 * 2**30, 10 * 2**30 - 4096, 4096))
    with pytest.raises(NoSpaceError) as e:
        ckpt.save_checkpoint({"model": {"w": torch.full((2,), 3.0)}, "position": {"epoch": 3, "step": 0}}, tmp_path)
    msg = str(e.value)
    assert msg.startswith(f"no space left on device at {tmp_path / ckpt.LAST} (0.0 MiB free)")
    assert "free some space, then resume: last.pt / last.prev.pt were kept as they were" in msg
    if isinstance(error, RuntimeError):
        assert f'writing it failed with "{TORCH_FULL}"' in msg
    assert (tmp_path / ckpt.LAST).read_bytes() == last and (tmp_path / ckpt.PREV).read_bytes() == prev
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([ckpt.LAST, ckpt.PREV])  # no temporary file left


def test_torchs_write_failure_with_free_space_is_not_called_a_full_disk(tmp_path, monkeypatch):
    good_checkpoint(tmp_path)
    monkeypatch.setattr(ckpt.torch, "save", failing_save(RuntimeError(TORCH_FULL)))
    monkeypatch.setattr(spach.errors.shutil, "disk_usage", lambda p: Usage(10 * 2**30, 2**30, 9 * 2**30))
    with pytest.raises(RuntimeError, match="unexpected pos") as e:
        ckpt.save_checkpoint({"model": {}, "position": {"epoch": 3, "step": 0}}, tmp_path)
    assert not isinstance(e.value, NoSpaceError)


def test_spach_train_on_a_full_disk_is_one_line_and_exit_1(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(ckpt.torch, "save", failing_save(OSError(errno.ENOSPC, "No space left on device")))
    arch = [[["conv", 1]], [["conv", 1]], [["conv", 1]], [["conv", 1]]]
    TrainConfig(model="spach_ms_xxs_patch4_224_conv", data="mnist5k", output=str(tmp_path / "run"), img_size=16,
                model_kwargs={"hidden_dim": 8, "num_heads": 1, "patch_size": 2, "net_arch": arch}, epochs=1,
                warmup_epochs=0, cooldown_epochs=0, batch_size=32, max_train_samples=32, max_val_samples=16,
                workers=0, tensorboard=False, threads=1).to_yaml(tmp_path / "train.yaml")
    code = cli(["train", "--config", str(tmp_path / "train.yaml")])
    err = capsys.readouterr().err.strip()
    assert code == 1 and len(err.splitlines()) == 1, err
    assert err.startswith(f"spach train: error: no space left on device at {tmp_path / 'run' / ckpt.LAST}")
    assert not (tmp_path / "run" / ckpt.LAST).exists()


# ---- the study database ----------------------------------------------------------------------------

STUDY = {"name": "tiny", "data": "mnist5k", "img_size": 16,
         "recipe": {"epochs": 1, "warmup_epochs": 0, "cooldown_epochs": 0},
         "grid": {"family": ["conv"], "layout": ["ms"], "size": ["nano"]},
         "sizes": {"nano": {"ms": {"hidden_dim": 8, "num_heads": 1, "depths": [1, 1, 1, 1], "patch_size": 2}}}}


def full_disk_sqlite(monkeypatch) -> None:
    """SQLite connections that may not grow the file past one page: every write fails with SQLITE_FULL."""
    real = sqlite3.connect

    def connect(*args, **kwargs):
        conn = real(*args, **kwargs)
        conn.execute("PRAGMA max_page_count = 1")
        return conn
    monkeypatch.setattr(sqlite3, "connect", connect)


def test_a_battle_on_a_full_disk_says_so_and_leaves_no_half_made_database(tmp_path, monkeypatch, capsys):
    (tmp_path / "study.yaml").write_text(yaml.safe_dump(STUDY))
    out = tmp_path / "out"
    full_disk_sqlite(monkeypatch)
    code = cli(["battle", str(tmp_path / "study.yaml"), "--out", str(out), "--quiet"])
    err = capsys.readouterr().err.strip()
    assert code == 1
    assert err == (f"spach battle: error: no space left on device at {out / db.DB_NAME} (nothing was stored): "
                   "free some space and run again")
    assert not (out / db.DB_NAME).exists()


@pytest.mark.parametrize("leftover", ["empty", "nul-bytes", "no-tables"])
def test_a_database_whose_creation_was_cut_short_is_made_anew(tmp_path, leftover):
    out = tmp_path / "out"
    out.mkdir()
    path = out / db.DB_NAME
    if leftover == "no-tables":
        conn = sqlite3.connect(path)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.close()
    else:
        path.write_bytes(b"" if leftover == "empty" else b"\0" * 8192)
    with pytest.raises(FileNotFoundError, match=r"no study in .*battle.db yet: the file holds nothing"):
        db.connect(out)  # a reader (status, report) changes nothing
    with pytest.raises(FileNotFoundError, match="the file holds nothing"):
        db.connect_readonly(out)
    assert path.exists()
    conn = db.connect(out, create=True)  # what `spach battle` does first
    study = load_study(STUDY)
    db.register_study(conn, study, lambda r: run_dir(out, r))
    assert [r["name"] for r in db.runs(conn, [r.key for r in study.runs])] == ["conv-ms-nano-s0"]


def test_a_database_with_a_study_in_it_is_never_made_anew(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    conn = db.connect(out, create=True)
    study = load_study(STUDY)
    db.register_study(conn, study, lambda r: run_dir(out, r))
    conn.close()
    assert not db.holds_nothing(out / db.DB_NAME)
    (tmp_path / "other.db").write_bytes(b"not a database at all, but someone's file")
    assert not db.holds_nothing(tmp_path / "other.db")
