"""Fashion-MNIST: the bundled class-balanced subset (`fashion-mnist`) and the full idx files (`fashion-mnist:ROOT`).

    FashionMnist("train")                    # bundled: 10,000 train (1,000 per class)
    FashionMnist("val")                      #          2,000 val (200 per class, from the test set)
    FashionMnist("train", root="/usr/share/datasets/fashion-mnist")   # all 60,000 / 10,000

The bundled subset (`fashion_mnist.npz`) is made by `tools/make_fashion_mnist.py` from the
original files: within each class, a fixed random draw (numpy `default_rng(0)`) of 1,000
training images from the 60,000 and 200 validation images from the 10,000 test images, kept
in file order. Items are 28x28 greyscale PIL images, like `mnist5k`.

The idx format (LeCun et al., "The MNIST database", yann.lecun.com/exdb/mnist): a big-endian
header — two zero bytes, a type byte (0x08: unsigned byte), the number of dimensions — then one
big-endian uint32 per dimension, then the data. Files may be gzip-compressed (`.gz`).

Credit: Fashion-MNIST by Zalando Research (H. Xiao, K. Rasul, R. Vollgraf, arXiv:1708.07747),
MIT licence.
"""
from __future__ import annotations

import gzip
from pathlib import Path
from typing import Optional

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

NPZ = Path(__file__).with_name("fashion_mnist.npz")
# Zalando's label names ("T-shirt/top" without the slash, so that a name is also a safe file name)
CLASSES = ["T-shirt-top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
           "Ankle-boot"]
# the original files of each split (train: the 60,000 training images; val: the 10,000 test images)
FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
         "val": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
IDX_UBYTE = 0x08


def read_idx(path: str | Path) -> np.ndarray:
    """The uint8 array of an idx file (plain or gzip-compressed), shaped by its header."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise ValueError(f"{path}: not an idx file (it must start with two zero bytes)")
    if data[2] != IDX_UBYTE:
        raise ValueError(f"{path}: idx data type 0x{data[2]:02x}, expected 0x08 (unsigned byte)")
    ndim = data[3]
    header = 4 + 4 * ndim
    shape = tuple(int(d) for d in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    size = int(np.prod(shape))
    if len(data) - header != size:
        raise ValueError(f"{path}: the header says {'x'.join(map(str, shape))} = {size:,} bytes of data, "
                         f"the file holds {len(data) - header:,}")
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(shape)


def idx_path(root: str | Path, name: str) -> Path:
    """`ROOT/NAME` or `ROOT/NAME.gz`, whichever exists; FileNotFoundError naming both otherwise."""
    root = Path(root)
    for candidate in (root / name, root / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"fashion-mnist:{root}: missing {name} (or {name}.gz); the directory must hold "
                            f"the four original idx files ({', '.join(n for pair in FILES.values() for n in pair)}), "
                            "e.g. from `apt-get install dataset-fashion-mnist` (/usr/share/datasets/fashion-mnist)")


def read_split(root: str | Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """(images N x 28 x 28 uint8, labels N int64) of the original files of a split under ROOT."""
    image_file, label_file = (idx_path(root, name) for name in FILES[split])
    images, labels = read_idx(image_file), read_idx(label_file)
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise ValueError(f"fashion-mnist:{root}: {image_file.name} holds {images.shape}, {label_file.name} "
                         f"{labels.shape}; expected N images of H x W and N labels")
    if labels.max(initial=0) >= len(CLASSES):
        raise ValueError(f"fashion-mnist:{root}: {label_file.name} has label {labels.max()}, expected 0-9")
    return images, labels.astype(np.int64)


class FashionMnist(Dataset):
    """Items (PIL 'L' 28x28, label) of the bundled subset (`root=None`) or of the idx files under `root`."""

    classes = CLASSES

    def __init__(self, split: str = "train", root: Optional[str | Path] = None):
        if split not in ("train", "val"):
            raise ValueError(f"fashion-mnist: split must be 'train' or 'val', got {split!r}")
        if root is None:
            with np.load(NPZ) as f:
                self.images, labels = f[f"{split}_images"], f[f"{split}_labels"]
        else:
            self.images, labels = read_split(root, split)
        self.targets = [int(t) for t in labels]
        self.split, self.root = split, root

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int):
        return Image.fromarray(self.images[i], mode="L"), self.targets[i]
