"""The study's data checked once, before any run (issue 24, defect 11): classes, batch size, empty and huge images."""
from __future__ import annotations

import struct
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from spach.battle import load_study, run_study
from spach.battle.spec import check_runnable_here
from spach.cli.main import main
from spach.data import build_dataset, open_source
from spach.data.checks import check_source

TINY = {"epochs": 1, "batch_size": 4, "warmup_epochs": 0, "cooldown_epochs": 0, "augment": False, "mixup": 0.0,
        "cutmix": 0.0, "repeated_aug": False, "model_ema": False, "workers": 0, "tensorboard": False}


def image_folder(root: Path, classes=("a", "b"), per_class=3, val_classes=None) -> Path:
    for split, names in (("train", classes), ("val", val_classes or classes)):
        for c in names:
            (root / split / c).mkdir(parents=True)
            for i in range(per_class):
                Image.fromarray(np.full((8, 8, 3), 30 * i, np.uint8)).save(root / split / c / f"{i}.png")
    return root


def study(data: str, **recipe) -> dict:
    return {"name": "checks", "data": data, "img_size": 16, "recipe": dict(TINY, **recipe),
            "grid": {"family": ["conv"], "layout": ["ss"], "size": ["nano"], "seed": [0]},
            "sizes": {"nano": {"ss": {"hidden_dim": 8, "num_heads": 1, "depth": 1, "patch_size": 4}}}}


def refused(data: str, tmp_path: Path, **recipe) -> str:
    """The error of `spach battle` on the study, checked to come before anything was written."""
    out = tmp_path / "out"
    with pytest.raises(ValueError) as e:
        run_study(study(data, **recipe), out, quiet=True)
    assert not out.exists()  # refused before the output directory, the database or any run
    return str(e.value)


def test_a_one_class_dataset_is_refused_before_any_run(tmp_path):
    root = image_folder(tmp_path / "d", classes=("cats",))
    msg = refused(str(root), tmp_path)
    assert msg == (f"study checks: data {root}: 1 class (cats); a classifier needs at least 2 classes "
                   "(one class gives 100% top-1 that means nothing)")


def test_train_and_val_with_different_classes_are_refused_naming_the_classes(tmp_path):
    root = image_folder(tmp_path / "d", classes=("a", "b", "c"), val_classes=("a", "b", "d", "e"))
    msg = refused(str(root), tmp_path)
    assert msg == f"study checks: {root}: train/ and val/ have different class folders: only in train/: c; only in val/: d, e"


def test_a_batch_larger_than_the_training_set_is_refused_in_the_language_of_the_study_file(tmp_path, capsys):
    root = image_folder(tmp_path / "d")  # 6 training images
    msg = refused(str(root), tmp_path, batch_size=8)
    assert msg == (f"study checks: data {root}: 6 training image(s), fewer than one optimizer step of "
                   "recipe.batch_size 8; lower recipe.batch_size or use more data")
    msg = refused(str(root), tmp_path, batch_size=4, max_train_samples=3)
    assert "3 training image(s) (max_train_samples 3), fewer than one optimizer step of recipe.batch_size 4" in msg
    assert "recipe.batch_size 2 x accum_steps 4" in refused(str(root), tmp_path, batch_size=2, accum_steps=4)
    spec = tmp_path / "study.yaml"
    spec.write_text(__import__("yaml").safe_dump(study(str(root), batch_size=8)))
    assert main(["battle", str(spec), "--out", str(tmp_path / "cli"), "--quiet"]) == 2
    assert "fewer than one optimizer step of recipe.batch_size 8" in capsys.readouterr().err
    assert check_runnable_here(load_study(study(str(root), batch_size=6))) is None  # exactly one step: accepted


def test_check_source_summarises_what_the_runs_will_use():
    assert check_source("mnist5k", batch_size=64, max_val_samples=100) == {
        "train": {"classes": 10, "images": 4000}, "val": {"classes": 10, "images": 100}}


def test_empty_files_are_skipped_and_not_counted_as_images(tmp_path):
    root = image_folder(tmp_path / "d")
    (root / "train" / "a" / "empty.png").write_bytes(b"")
    (root / "train" / "b" / "empty.jpg").write_bytes(b"")
    with pytest.warns(UserWarning, match=r"skipped 2 entries: 2 empty \(0-byte\) file\(s\) \(empty.jpg, empty.png\)"):
        base = open_source(str(root), "train")
    assert len(base) == 6 and base.skipped == {"empty (0-byte) file(s)": 2}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert check_source(str(root), batch_size=6)["train"]["images"] == 6


def png_header_only(path: Path, width: int, height: int) -> None:
    """A PNG that declares width x height (its pixels are never written: opening it reads only the header)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b""))


@pytest.mark.parametrize("side", [12000, 20000], ids=["144MP", "400MP-over-PILs-own-limit"])
def test_a_huge_image_is_refused_before_decoding_with_a_message_saying_what_was_refused(tmp_path, side):
    root = image_folder(tmp_path / "d")
    png_header_only(root / "train" / "a" / "huge.png", side, side)
    ds = build_dataset(str(root), "train", img_size=8)
    i = [Path(p).name for p, _ in ds.base.samples].index("huge.png")
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        assert ds[i] is None
    messages = [str(w.message) for w in seen]
    assert len(messages) == 1, messages  # ours only: PIL's decompression-bomb warning is not shown as well
    expected = f"{side}x{side} = {side * side / 1e6:.0f} MP, over" if side == 12000 else "more than 179 MP, over"
    assert "skipping unreadable image" in messages[0] and "huge.png" in messages[0]
    assert expected in messages[0] and "the limit of 50 MP per image" in messages[0] and "not decoded" in messages[0]


def test_the_fashion_and_cifar_presets_pass_the_checks_with_comparable_ss_and_ms_models(tmp_path):
    from spach.battle.spec import check_study_data
    from spach.engine.build import build_model
    from spach.models import count_macs, count_params

    fashion = load_study("cpu-fashion")
    assert fashion.data == "fashion-mnist" and len(fashion.runs) == 18 and len({r.seed for r in fashion.runs}) == 3
    assert check_study_data(fashion) == {"train": {"classes": 10, "images": 5000}, "val": {"classes": 10, "images": 1000}}
    root = image_folder(tmp_path / "c10", classes=tuple("abcdefghij"), per_class=6)
    cifar = load_study("cpu-cifar", data=str(root))
    assert cifar.data == str(root) and all(r.train["data"] == str(root) for r in cifar.runs)
    assert {r.group for r in cifar.runs} >= {"hybrid-ms-small", "attn-ss-small-nocpe", "mlp-ms-small-nocpe"}
    with pytest.raises(ValueError, match="fewer than one optimizer step of recipe.batch_size 64"):
        check_runnable_here(cifar)  # 60 images
    for study in (fashion, cifar):
        cost = {}
        for r in study.runs:
            if r.seed == 0 and r.cpe:
                m = build_model(r.model, num_classes=10, model_kwargs=r.model_kwargs)
                cost[(r.family, r.layout)] = (count_params(m), count_macs(m, study.img_size))
        for family in ("conv", "attn", "mlp"):
            (p_ss, m_ss), (p_ms, m_ms) = cost[(family, "ss")], cost[(family, "ms")]
            assert 1 / 1.7 < p_ms / p_ss < 1.7 and 1 / 1.7 < m_ms / m_ss < 1.7, (study.name, family, cost)
