"""What the project withstands (issue 11): image folders that would silently give wrong training data."""
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from spach.data import build_dataset, open_source


def image_folder(root: Path, classes=("a", "b"), per_class=3) -> Path:
    for split in ("train", "val"):
        for c in classes:
            (root / split / c).mkdir(parents=True)
            for i in range(per_class):
                Image.fromarray(np.full((8, 8, 3), 40 * i, np.uint8)).save(root / split / c / f"{i}.png")
    return root


def test_16_bit_greyscale_pngs_keep_their_values_instead_of_turning_white(tmp_path):
    root = image_folder(tmp_path / "d")
    ramp = (np.arange(64, dtype=np.uint16).reshape(8, 8) * 1000)  # 0 .. 63000
    Image.fromarray(ramp).save(root / "train" / "a" / "deep.png")  # a true 16-bit PNG
    assert Image.open(root / "train" / "a" / "deep.png").mode.startswith("I")
    base = open_source(str(root), "train")
    i = [Path(p).name for p, _ in base.samples].index("deep.png")
    ds = build_dataset(str(root), "train", img_size=8, mean=(0, 0, 0), std=(1, 1, 1), crop_pct=1.0)
    image, _ = ds[i]
    expected = np.round(ramp / 257.0) / 255.0  # the same picture in 8 bits
    assert np.allclose(image[0].numpy(), expected, atol=1 / 255 + 1e-6)
    assert (image < 0.99).float().mean() > 0.9  # not the all-white tensor of convert("RGB")


def test_a_symlink_loop_in_a_class_folder_does_not_multiply_its_images(tmp_path):
    root = image_folder(tmp_path / "d")
    os.symlink("..", root / "train" / "a" / "loop")  # train/a/loop -> train/ (holds a/ and b/ again)
    os.symlink(".", root / "train" / "b" / "again")  # train/b/again -> train/b
    os.symlink(".", root / "train" / "b" / "and-again")  # two loops: os.walk would take ~2^40 steps
    with pytest.warns(UserWarning, match=r"skipped 3 entries: 3 folder\(s\) already visited through a symlink"):
        base = open_source(str(root), "train")
    assert len(base) == 6 and base.targets == [0, 0, 0, 1, 1, 1]
    assert base.skipped == {"folder(s) already visited through a symlink (a loop?)": 3}


def test_a_symlinked_folder_outside_the_root_is_read_once(tmp_path):
    root = image_folder(tmp_path / "d")
    extra = tmp_path / "elsewhere"
    extra.mkdir()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(extra / "x.png")
    os.symlink(extra, root / "train" / "a" / "more")
    os.symlink(extra, root / "train" / "a" / "more-again")
    with pytest.warns(UserWarning, match="1 folder"):
        base = open_source(str(root), "train")
    assert len(base) == 7 and sum(Path(p).name == "x.png" for p, _ in base.samples) == 1


def test_hidden_folders_and_files_are_neither_classes_nor_images(tmp_path):
    root = image_folder(tmp_path / "d")
    for split in ("train", "val"):
        (root / split / ".ipynb_checkpoints").mkdir()
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(root / split / ".ipynb_checkpoints" / "0.png")
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(root / "train" / "a" / "._0.png")  # macOS metadata
    (root / "train" / "b" / "notes.txt").write_text("not an image")
    with pytest.warns(UserWarning, match=r"skipped 3 entries: 2 hidden \(\._0\.png, \.ipynb_checkpoints\); "
                                         r"1 not image file\(s\) \(notes\.txt\)"):
        base = open_source(str(root), "train")
    assert base.classes == ["a", "b"] and len(base) == 6
    val = open_source(str(root), "val")  # the same classes: hidden folders do not make them differ
    assert val.classes == ["a", "b"]


def test_a_clean_folder_reads_exactly_as_torchvision_does(tmp_path):
    from torchvision.datasets import ImageFolder

    root = image_folder(tmp_path / "d", classes=("x", "y", "z"))
    (root / "train" / "y" / "deeper").mkdir()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(root / "train" / "y" / "deeper" / "5.jpg")
    ours, theirs = open_source(str(root), "train"), ImageFolder(str(root / "train"))
    assert ours.samples == theirs.samples and ours.classes == theirs.classes and ours.skipped == {}
