"""Changed data never reuses stale results (issue 24, defect 9): fingerprints of the data, recorded with every run."""
from __future__ import annotations

import json
import os
import sqlite3
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from spach.battle import run_study
from spach.cli.main import main
from spach.data import describe_change, fingerprint, source_fingerprint
from spach.errors import SpachError

RECIPE = {"epochs": 1, "batch_size": 4, "warmup_epochs": 0, "cooldown_epochs": 0, "augment": False, "mixup": 0.0,
          "cutmix": 0.0, "repeated_aug": False, "model_ema": False, "workers": 0, "tensorboard": False}


def add_class(root: Path, name: str, per_class: int = 3) -> None:
    rng = np.random.RandomState(len(name))
    for split in ("train", "val"):
        (root / split / name).mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(rng.randint(0, 255, (8, 8, 3), dtype=np.uint8)).save(root / split / name / f"{i}.png")


def image_folder(root: Path, classes=("a", "b")) -> Path:
    for c in classes:
        add_class(root, c)
    return root


def study(data: str) -> dict:
    return {"name": "fp", "data": data, "img_size": 16, "threads": 1, "recipe": RECIPE,
            "measure": {"batch_size": 2, "warmup": 1, "repeats": 1},
            "grid": {"family": ["conv"], "layout": ["ss"], "size": ["nano"], "seed": [0]},
            "sizes": {"nano": {"ss": {"hidden_dim": 8, "num_heads": 1, "depth": 1, "patch_size": 4}}}}


def test_a_folder_fingerprint_follows_classes_files_sizes_and_mtimes_without_decoding(tmp_path):
    root = image_folder(tmp_path / "d")
    first = fingerprint(str(root), "train")
    assert first.startswith("classes=2 files=6 bytes=") and first == fingerprint(str(root), "train")
    (root / "train" / ".hidden.png").write_bytes(b"x")
    (root / "train" / "a" / "empty.png").write_bytes(b"")
    assert fingerprint(str(root), "train") == first  # neither is an image of the dataset
    (root / "train" / "a" / "0.png").write_bytes(b"not decoded, only its size and time are read")
    second = fingerprint(str(root), "train")
    assert second != first and second.startswith("classes=2 files=6 ")
    os.utime(root / "train" / "b" / "1.png", ns=(1, 1))
    assert fingerprint(str(root), "train") != second
    assert fingerprint(str(root), "val") != fingerprint(str(root), "train")


def test_bundled_sources_have_a_constant_fingerprint_and_changes_are_described():
    a, b = source_fingerprint("mnist5k"), source_fingerprint("mnist5k")
    assert a == b and a["train"] == a["val"] and "hash=" in a["train"]
    assert source_fingerprint("fashion-mnist") != a
    old = {"train": "classes=10 files=500 bytes=9 hash=1", "val": "classes=10 files=100 bytes=2 hash=2"}
    new = {"train": "classes=11 files=560 bytes=10 hash=3", "val": "classes=10 files=100 bytes=3 hash=4"}
    assert describe_change(old, new) == ("train: 10 → 11 classes, 500 → 560 files; "
                                          "val: 2 → 3 bytes in the same number of files")
    assert describe_change(old, old) == "no change"


def rows(out: Path) -> list[dict]:
    conn = sqlite3.connect(out / "battle.db")
    conn.row_factory = sqlite3.Row
    found = [dict(r) for r in conn.execute("SELECT * FROM runs")]
    conn.close()
    return found


def test_changed_data_refuses_the_done_runs_unless_accepted_and_then_the_report_says_so(tmp_path, capsys):
    root = image_folder(tmp_path / "d")
    out = tmp_path / "out"
    assert run_study(study(str(root)), out, quiet=True, report=False)["done"] == 1
    (run,) = rows(out)
    assert json.loads(run["data_fingerprint"]) == source_fingerprint(str(root))
    assert run_study(study(str(root)), out, quiet=True, report=False)["done"] == 1  # same data: reused
    add_class(root, "c")
    with pytest.raises(SpachError) as e:
        run_study(study(str(root)), out, quiet=True)
    assert (f"1 done run(s) were trained on data {root} as it was before (train: 2 → 3 classes, 6 → 9 files; "
            "val: 2 → 3 classes, 6 → 9 files); their results would not describe the data") in str(e.value)
    assert "--accept-changed-data to keep them" in str(e.value)
    assert rows(out) == [run]  # nothing stored was changed
    spec = tmp_path / "fp.yaml"
    spec.write_text(json.dumps(study(str(root))))
    assert main(["battle", str(spec), "--out", str(out), "--quiet"]) == 1
    assert "trained on data" in capsys.readouterr().err
    assert main(["battle", str(spec), "--out", str(out), "--quiet", "--accept-changed-data"]) == 0
    (kept,) = rows(out)
    assert kept["started_at"] == run["started_at"] and kept["final_top1"] == run["final_top1"]  # not retrained
    report = (out / "report.md").read_text()
    assert ("**Changed data kept** (`--accept-changed-data`): 1 done run(s) were trained on data "
            f"{root} as it was before (train: 2 → 3 classes, 6 → 9 files") in report
    assert run_study(study(str(root)), out, quiet=True, report=False)["done"] == 1  # accepted once: goes on


def test_battle_data_flag_replaces_the_studys_data(tmp_path, capsys):
    root = image_folder(tmp_path / "d")
    spec = tmp_path / "fp.yaml"
    spec.write_text(json.dumps(study("/no/such/folder")))
    assert main(["battle", str(spec), "--data", str(root), "--dry-run"]) == 0
    assert f"data {root} @ 16px" in capsys.readouterr().out
