"""Data SOURCEs -> datasets that never crash on a bad image.

    base = open_source("mnist5k", "train")             # built-in digits
    base = open_source("~/data/imagenet", "val")       # ImageFolder: ROOT/train/CLASS/*.jpg, ROOT/val/...
    base = open_source("cifar10:~/data", "train")      # torchvision dataset already on disk
    ds = SafeDataset(base, transform, indices=class_balanced_indices(base.targets, 1000), seed=0)
    loader = DataLoader(ds, batch_size=64, collate_fn=collate_skip)   # -> (images, targets, n_skipped)

`SafeDataset` returns None for an image that cannot be read (with a warning);
`collate_skip` drops those and counts them. With a `seed`, the augmentation of item
`i` in epoch `e` is drawn from RNGs seeded by (seed, e, i) alone: independent of
worker processes, ranks and resumption (the caller's RNG state is left untouched).
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
from torch.utils.data import Dataset, default_collate

from spach.data.mnist5k import Mnist5k
from spach.rng import seeded

# torchvision datasets usable as NAME:ROOT (train/val flavour of their constructor)
TORCHVISION = {
    "mnist": ("MNIST", "train"), "fashionmnist": ("FashionMNIST", "train"), "kmnist": ("KMNIST", "train"),
    "cifar10": ("CIFAR10", "train"), "cifar100": ("CIFAR100", "train"),
    "svhn": ("SVHN", "split"), "stl10": ("STL10", "split"),
}


def open_source(source: str, split: str):
    """The raw dataset of a SOURCE split ('train' or 'val'): items (PIL image, int), `.targets`, `.classes`."""
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    if source == "mnist5k":
        return Mnist5k(split)
    name, sep, root = source.partition(":")
    if sep and name.lower() in TORCHVISION:
        return _torchvision(name.lower(), os.path.expanduser(root), split)
    return _image_folder(Path(source).expanduser(), split)


def _torchvision(name: str, root: str, split: str):
    import torchvision.datasets as tvd

    cls_name, style = TORCHVISION[name]
    kw = {"train": split == "train"} if style == "train" else {"split": "train" if split == "train" else "test"}
    if not os.path.isdir(root):
        raise FileNotFoundError(f"data root not found: {root} (for {name}:ROOT)")
    try:
        ds = getattr(tvd, cls_name)(root, download=False, **kw)
    except RuntimeError as e:  # torchvision: "Dataset not found or corrupted. You can use download=True ..."
        raise FileNotFoundError(f"{cls_name} not found under {root} (downloads are off; place the "
                                f"dataset files there first): {e}") from None
    targets = getattr(ds, "targets", None)
    if targets is None:
        targets = getattr(ds, "labels")
    ds.targets = [int(t) for t in targets]
    if not hasattr(ds, "classes"):
        ds.classes = [str(c) for c in sorted(set(ds.targets))]
    return ds


def _image_folder(root: Path, split: str):
    from torchvision.datasets import ImageFolder

    if not root.exists():
        raise FileNotFoundError(f"data not found: {root} (expected 'mnist5k', NAME:ROOT for a torchvision "
                                f"dataset, or an ImageFolder root with train/ and val/)")
    missing = [s for s in ("train", "val") if not (root / s).is_dir()]
    if missing:
        raise FileNotFoundError(f"{root}: missing {' and '.join(s + '/' for s in missing)} — an ImageFolder "
                                f"root must hold train/CLASS/*.jpg and val/CLASS/*.jpg")
    ds = ImageFolder(str(root / split), loader=open_image)
    other = sorted(p.name for p in (root / ("val" if split == "train" else "train")).iterdir() if p.is_dir())
    if other != ds.classes:
        raise ValueError(f"{root}: train/ and val/ have different class folders")
    return ds


def open_image(path: str):
    """A decoded PIL image in its own mode (`SafeDataset` converts non-RGB ones once; torchvision's
    default loader would convert every image, a copy, before that)."""
    from PIL import Image

    with open(path, "rb") as f:
        img = Image.open(f)
        img.load()
    return img


def class_balanced_indices(targets: Sequence[int], n: Optional[int]) -> list[int]:
    """A deterministic class-balanced slice of `n` items: round-robin over classes, in dataset order."""
    if n is None or n >= len(targets):
        return list(range(len(targets)))
    per_class: dict[int, list[int]] = {}
    for i, t in enumerate(targets):
        per_class.setdefault(int(t), []).append(i)
    queues = [per_class[c] for c in sorted(per_class)]
    out: list[int] = []
    depth = 0
    while len(out) < n:
        for q in queues:
            if depth < len(q) and len(out) < n:
                out.append(q[depth])
        depth += 1
    return sorted(out)


class SafeDataset(Dataset):
    """`base` items (PIL, label) -> (3-channel transformed tensor, label), or None when unreadable."""

    def __init__(self, base, transform: Callable, indices: Optional[Sequence[int]] = None,
                 seed: Optional[int] = None):
        self.base, self.transform, self.seed, self.epoch = base, transform, seed, 0
        self.indices = list(range(len(base))) if indices is None else list(indices)
        self.targets = [int(base.targets[i]) for i in self.indices]
        self.classes = list(base.classes)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, key: int | tuple[int, int]):
        """Item `i`, or `(epoch, i)`: item i as augmented in that epoch (how `EpochSampler` tells
        persistent worker processes the epoch)."""
        epoch, i = key if isinstance(key, tuple) else (self.epoch, key)
        j = self.indices[i]
        try:
            img, target = self.base[j]
            if img.mode != "RGB":  # greyscale (MNIST) and palette images -> 3 channels; RGB ones are not copied
                img = img.convert("RGB")
        except Exception as e:  # noqa: BLE001 — any unreadable file is skipped, never fatal
            warnings.warn(f"skipping unreadable image {self._name(j)}: {type(e).__name__}: {e}", stacklevel=2)
            return None
        if self.seed is None:
            return self.transform(img), int(target)
        with seeded(((self.seed * 1_000_003 + epoch) * 10_000_019 + i) % 2**62):
            return self.transform(img), int(target)

    def _name(self, j: int) -> str:
        samples = getattr(self.base, "samples", None)
        return str(samples[j][0]) if samples else f"#{j}"


def collate_skip(batch: list):
    """default_collate without the None items -> (images, targets, n_skipped); images is None if all failed."""
    good = [b for b in batch if b is not None]
    skipped = len(batch) - len(good)
    if not good:
        return None, None, skipped
    images, targets = default_collate(good)
    return images, targets, skipped
