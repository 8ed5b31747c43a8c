"""spach.data: the built-in split, class-balanced slices, SOURCE errors, unreadable images, seeded augmentation."""
import random
from pathlib import Path
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from spach.data import Mnist5k, build_dataset, class_balanced_indices, collate_skip, open_source
from spach.data.mnist5k import NPZ
from spach.data.transforms import train_transform


def test_mnist5k_fixed_balanced_split():
    tr, va = Mnist5k("train"), Mnist5k("val")
    assert (len(tr), len(va)) == (4000, 1000)
    assert np.bincount(tr.targets).tolist() == [400] * 10
    assert np.bincount(va.targets).tolist() == [100] * 10
    # disjoint and together the whole file
    with np.load(NPZ) as f:
        n_total = len(f["labels"])
    assert len(tr) + len(va) == n_total
    flat = {img.tobytes() for img in tr.images} & {img.tobytes() for img in va.images}
    assert len(flat) < 5  # (a handful of identical digits may exist in MNIST itself)
    img, t = tr[0]
    assert img.size == (28, 28) and img.mode == "L" and t == 0
    assert Mnist5k("val").targets == va.targets  # deterministic


def test_class_balanced_slice():
    targets = [i % 10 for i in range(1000)]
    idx = class_balanced_indices(targets, 95)
    assert len(idx) == 95 and idx == sorted(set(idx))
    counts = np.bincount([targets[i] for i in idx])
    assert counts.max() - counts.min() <= 1
    assert idx == class_balanced_indices(targets, 95)
    assert class_balanced_indices(targets, None) == list(range(1000))


def test_build_dataset_makes_3_channel_model_size_tensors():
    ds = build_dataset("mnist5k", "val", img_size=32, max_samples=20)
    x, y = ds[0]
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    raw = x * std[:, None, None] + mean[:, None, None]  # undo the (ImageNet) normalisation
    assert torch.allclose(raw[0], raw[1], atol=1e-5) and torch.allclose(raw[1], raw[2], atol=1e-5)  # grey x3
    assert len(ds) == 20 and sorted(set(ds.targets)) == list(range(10))


def test_augmentation_is_a_function_of_seed_epoch_index_and_leaves_global_rng_alone():
    ds = build_dataset("mnist5k", "train", img_size=32, train=True, seed=3, max_samples=50)
    before = (torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate())
    a = ds[7][0]
    assert torch.equal(torch.get_rng_state(), before[0])
    assert np.array_equal(np.random.get_state()[1], before[1]) and random.getstate() == before[2]
    torch.manual_seed(123)  # a different global state must not matter
    assert torch.equal(ds[7][0], a)
    ds.set_epoch(1)
    assert not torch.equal(ds[7][0], a)


def test_posterize_full_magnitude_does_not_crash():
    # 'PosterizeIncreasing' at magnitude 10 asks Pillow for 0 bits, which recent Pillow rejects
    t = train_transform(32, auto_augment="rand-m10-n4-inc1")
    img = Image.fromarray(np.random.RandomState(0).randint(0, 255, (28, 28, 3), dtype=np.uint8))
    for _ in range(100):
        t(img)


def _image_folder(root, n_per_class=3, classes=("a", "b")):
    rng = np.random.RandomState(0)
    for split in ("train", "val"):
        for c in classes:
            (root / split / c).mkdir(parents=True)
            for i in range(n_per_class):
                Image.fromarray(rng.randint(0, 255, (20, 20, 3), dtype=np.uint8)).save(root / split / c / f"{i}.png")
    return root


def test_unreadable_image_is_skipped_with_a_warning_and_counted(tmp_path):
    root = _image_folder(tmp_path)
    (root / "train" / "a" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    ds = build_dataset(str(root), "train", img_size=16)
    bad = [i for i in range(len(ds)) if ds.base.samples[ds.indices[i]][0].endswith("broken.png")][0]
    with pytest.warns(UserWarning, match="skipping unreadable image .*broken.png"):
        assert ds[bad] is None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        images, targets, skipped = collate_skip([ds[i] for i in range(len(ds))])
    assert skipped == 1 and images.shape == (6, 3, 16, 16) and len(targets) == 6
    assert collate_skip([None, None]) == (None, None, 2)


def test_source_errors_are_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="data not found"):
        open_source(str(tmp_path / "nope"), "train")
    (tmp_path / "only_train" / "train" / "a").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="missing val/"):
        open_source(str(tmp_path / "only_train"), "train")
    with pytest.raises(FileNotFoundError, match="CIFAR10 not found .*downloads are off"):
        open_source(f"cifar10:{tmp_path}", "train")
    root = _image_folder(tmp_path / "mismatch")
    (root / "val" / "c").mkdir()
    Image.new("RGB", (8, 8)).save(root / "val" / "c" / "0.png")
    with pytest.raises(ValueError, match="different class folders"):
        open_source(str(root), "train")


def test_deterministic_small_splits_are_read_once_and_equal_a_fresh_read(monkeypatch):
    import spach.data as data

    cached = build_dataset("mnist5k", "val", img_size=32, max_samples=50, uint8=True)
    fresh = build_dataset("mnist5k", "val", img_size=32, max_samples=50, uint8=True)
    fresh.cache = None
    assert cached.cache is not None
    first = [cached[i] for i in range(len(cached))]
    assert len(cached.cache) == len(cached)
    calls = []
    monkeypatch.setattr(cached, "_read", lambda *a: calls.append(a))
    again = [cached[(3, i)] for i in range(len(cached))]  # another epoch: served from memory
    assert calls == []
    for (a, ta), (b, tb), (c, tc) in zip(first, again, (fresh[i] for i in range(len(fresh)))):
        assert ta == tb == tc and torch.equal(a, b) and torch.equal(a, c)
    # augmented training data is never cached (each epoch draws new crops); nor a split over the limit
    assert build_dataset("mnist5k", "train", img_size=32, train=True, max_samples=20, seed=0).cache is None
    monkeypatch.setattr(data, "CACHE_LIMIT_BYTES", 3 * 32 * 32 * 49)
    assert build_dataset("mnist5k", "val", img_size=32, max_samples=50, uint8=True).cache is None


def test_bundled_fashion_mnist_is_a_balanced_10000_2000_subset_of_28px_grey_images():
    from spach.data import FashionMnist

    tr, va = open_source("fashion-mnist", "train"), open_source("fashion-mnist", "val")
    assert isinstance(tr, FashionMnist) and (len(tr), len(va)) == (10000, 2000)
    assert np.bincount(tr.targets).tolist() == [1000] * 10 and np.bincount(va.targets).tolist() == [200] * 10
    assert min(tr.targets) == 0 and max(va.targets) == 9 and len(tr.classes) == 10
    assert tr.images.shape == (10000, 28, 28) and tr.images.dtype == np.uint8
    img, t = va[5]
    assert img.size == (28, 28) and img.mode == "L" and t == va.targets[5]
    assert tr.images.std() > 50  # real pictures, not a blank array


def _write_idx(path, array, gz):
    import gzip

    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    (gzip.open if gz else open)(path, "wb").write(header + array.astype(np.uint8).tobytes())


@pytest.mark.parametrize("gz", [False, True], ids=["plain", "gzip"])
def test_fashion_mnist_root_reads_the_original_idx_files(tmp_path, gz):
    rng = np.random.RandomState(0)
    ext = ".gz" if gz else ""
    for split, n in (("train", 7), ("t10k", 3)):
        _write_idx(tmp_path / f"{split}-images-idx3-ubyte{ext}", rng.randint(0, 256, (n, 28, 28)), gz)
        _write_idx(tmp_path / f"{split}-labels-idx1-ubyte{ext}", np.arange(n) % 10, gz)
    tr, va = open_source(f"fashion-mnist:{tmp_path}", "train"), open_source(f"fashion-mnist:{tmp_path}", "val")
    assert (len(tr), len(va)) == (7, 3) and tr.targets == [0, 1, 2, 3, 4, 5, 6] and va.targets == [0, 1, 2]
    img, _ = tr[2]
    assert img.size == (28, 28) and np.asarray(img).tolist() == tr.images[2].tolist()
    x, y = build_dataset(f"fashion-mnist:{tmp_path}", "val", img_size=32)[1]
    assert x.shape == (3, 32, 32) and y == 1


def test_fashion_mnist_root_errors_name_the_missing_or_bad_file(tmp_path):
    from spach.data.fashion_mnist import read_idx

    with pytest.raises(FileNotFoundError, match=r"missing train-images-idx3-ubyte \(or train-images-idx3-ubyte.gz\)"):
        open_source(f"fashion-mnist:{tmp_path}", "train")
    _write_idx(tmp_path / "t10k-images-idx3-ubyte", np.zeros((2, 28, 28)), False)
    with pytest.raises(FileNotFoundError, match="missing t10k-labels-idx1-ubyte"):
        open_source(f"fashion-mnist:{tmp_path}", "val")
    (tmp_path / "short").write_bytes(bytes([0, 0, 8, 1]) + (5).to_bytes(4, "big") + b"\x00\x01")
    with pytest.raises(ValueError, match="the header says 5 = 5 bytes of data, the file holds 2"):
        read_idx(tmp_path / "short")
    (tmp_path / "text").write_bytes(b"hello world")
    with pytest.raises(ValueError, match="not an idx file"):
        read_idx(tmp_path / "text")


def test_small_image_folders_are_decoded_once_and_augment_to_the_same_pixels_as_the_files(tmp_path, monkeypatch):
    import spach.data as data
    from spach.data import InMemoryImages

    root = _image_folder(tmp_path, n_per_class=4)
    Image.fromarray(np.arange(400, dtype=np.uint16).reshape(20, 20) * 150).save(root / "train" / "a" / "g16.png")
    Image.new("L", (24, 18), 77).save(root / "train" / "b" / "grey.png")  # another shape: kept unstacked
    (root / "train" / "b" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    kw = dict(img_size=16, train=True, seed=5, uint8=True)
    in_memory = build_dataset(str(root), "train", **kw)
    monkeypatch.setattr(data, "MEMORY_LIMIT_BYTES", 0)
    from_files = build_dataset(str(root), "train", **kw)
    assert isinstance(in_memory.base, InMemoryImages) and not isinstance(from_files.base, InMemoryImages)
    assert in_memory.targets == from_files.targets and len(in_memory) == 11
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for epoch in (0, 3):
            for i in range(len(in_memory)):
                a, b = in_memory[(epoch, i)], from_files[(epoch, i)]
                assert (a is None) == (b is None)
                assert a is None or (torch.equal(a[0], b[0]) and a[1] == b[1])
    bad = [i for i in range(11) if in_memory.base.samples[i][0].endswith("broken.png")][0]
    with pytest.warns(UserWarning, match="skipping unreadable image .*broken.png"):
        assert in_memory[bad] is None


def test_image_folders_over_the_memory_limit_are_read_from_the_files(tmp_path, monkeypatch):
    import spach.data as data
    from spach.data import InMemoryImages, load_in_memory

    root = _image_folder(tmp_path, n_per_class=4)
    base = open_source(str(root), "train")
    kept = load_in_memory(base, range(8), limit=8 * 20 * 20 * 3)
    assert isinstance(kept, InMemoryImages) and kept.images.shape == (8, 20, 20, 3) and kept.nbytes == 9600
    assert load_in_memory(base, range(8), limit=8 * 20 * 20 * 3 - 1) is None
    monkeypatch.setattr(data, "MEMORY_LIMIT_BYTES", 7 * 20 * 20 * 3)
    assert not isinstance(build_dataset(str(root), "train", img_size=16, train=True).base, InMemoryImages)


SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.mark.skipif(not (SHARED_DATA / "cifar10_folder.py").is_file(), reason=f"no CIFAR-10 file at {SHARED_DATA}")
def test_a_cifar10_image_folder_from_the_shared_data_reads_as_32px_colour_in_memory(tmp_path):
    import subprocess
    import sys

    from spach.data import InMemoryImages

    subprocess.run([sys.executable, str(SHARED_DATA / "cifar10_folder.py"), str(tmp_path / "c10"),
                    "--per-class-train", "3", "--per-class-val", "2"], check=True, capture_output=True)
    train = build_dataset(str(tmp_path / "c10"), "train", img_size=32, train=True, seed=0, uint8=True)
    val = build_dataset(str(tmp_path / "c10"), "val", img_size=32, uint8=True)
    assert len(train.classes) == 10 and "airplane" in train.classes and train.classes == val.classes
    assert (len(train), len(val)) == (30, 20) and np.bincount(val.targets).tolist() == [2] * 10
    assert isinstance(train.base, InMemoryImages) and train.base.images.shape == (30, 32, 32, 3)
    x, _ = train[0]
    assert x.shape == (3, 32, 32) and x.dtype == torch.uint8 and x.float().std() > 10  # colour pictures
