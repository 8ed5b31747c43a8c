"""Make spach/data/fashion_mnist.npz: the class-balanced Fashion-MNIST subset shipped in the package.

    apt-get install dataset-fashion-mnist        # the original idx files (Zalando Research, MIT)
    PYTHONPATH=. python tools/make_fashion_mnist.py [--root /usr/share/datasets/fashion-mnist] [--out spach/data/fashion_mnist.npz]

Within each of the 10 classes: 1,000 training images drawn from the 60,000 of the training
files and 200 validation images drawn from the 10,000 of the test files, by one
`numpy.random.default_rng(0)` (classes in label order, train then val), each draw kept in
file order. 10,000 / 2,000 images: small enough for 2-core CPU studies, large enough that
the families separate. Stored compressed (uint8 images, int64 labels).
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from spach.data.fashion_mnist import CLASSES, NPZ, read_split

PER_CLASS = {"train": 1000, "val": 200}
SEED = 0


def balanced_subset(labels: np.ndarray, per_class: int, rng: np.random.Generator) -> np.ndarray:
    """Indices of `per_class` items of every class, drawn without replacement by `rng`, in file order."""
    keep = []
    for c in range(len(CLASSES)):
        idx = np.flatnonzero(labels == c)
        if len(idx) < per_class:
            raise ValueError(f"class {c} has {len(idx)} items, fewer than {per_class}")
        keep.append(np.sort(rng.choice(idx, per_class, replace=False)))
    return np.sort(np.concatenate(keep))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--root", default="/usr/share/datasets/fashion-mnist")
    p.add_argument("--out", default=str(NPZ))
    args = p.parse_args()
    rng = np.random.default_rng(SEED)
    arrays = {}
    for split in ("train", "val"):
        images, labels = read_split(args.root, split)
        keep = balanced_subset(labels, PER_CLASS[split], rng)
        arrays[f"{split}_images"], arrays[f"{split}_labels"] = images[keep], labels[keep]
    np.savez_compressed(args.out, **arrays)
    print(f"{args.out}: {len(arrays['train_labels'])} train / {len(arrays['val_labels'])} val, "
          f"{Path(args.out).stat().st_size / 1e6:.1f} MB")


if __name__ == "__main__":
    main()
