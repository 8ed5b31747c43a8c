"""Data for training and evaluation: SOURCEs, robust datasets, the recipe's transforms.

    from spach.data import build_dataset
    ds = build_dataset("mnist5k", "train", img_size=32, train=True, seed=0)
    ds = build_dataset("path/to/imagefolder", "val", img_size=224)

SOURCE is `mnist5k` (built in: 4,000/1,000 fixed class-balanced split), `fashion-mnist`
(built in: 10,000/2,000 class-balanced Fashion-MNIST subset), `fashion-mnist:ROOT` (the four
original idx files in ROOT, plain or .gz), an ImageFolder root with `train/` and `val/`, or
`NAME:ROOT` for a torchvision dataset on disk (cifar10, cifar100, mnist, fashionmnist, kmnist,
svhn, stl10; never downloaded).
"""
from __future__ import annotations

from typing import Optional

from spach.data.checks import check_source
from spach.data.datasets import SafeDataset, class_balanced_indices, collate_skip, open_source, selection_split
from spach.data.loader import DeviceLoader, EpochSampler, make_loader
from spach.data.memory import InMemoryImages, load_in_memory
from spach.data.fashion_mnist import FashionMnist
from spach.data.fingerprint import describe_change, fingerprint, source_fingerprint
from spach.data.mnist5k import Mnist5k
from spach.data.transforms import eval_transform, train_transform

__all__ = ["build_dataset", "open_source", "SafeDataset", "class_balanced_indices", "collate_skip", "selection_split",
           "Mnist5k", "FashionMnist", "train_transform", "eval_transform", "DeviceLoader", "EpochSampler", "make_loader",
           "InMemoryImages", "load_in_memory", "check_source", "fingerprint", "source_fingerprint",
           "describe_change"]


# items of a deterministic transform are kept in memory when the whole split fits in this many bytes
CACHE_LIMIT_BYTES = 1 << 30
# the decoded images of an image-file split (ImageFolder) are kept in memory when they fit in this many bytes
MEMORY_LIMIT_BYTES = 1 << 30


def build_dataset(source: str, split: str, img_size: int, *, train: bool = False, max_samples: Optional[int] = None,
                  seed: Optional[int] = None, crop_pct: float = 0.875, interpolation: str = "bicubic",
                  mean=None, std=None, uint8: bool = False, selection: Optional[tuple[float, int, str]] = None,
                  **train_aug) -> SafeDataset:
    """A SafeDataset of SOURCE's split with the recipe's train (`train=True`) or eval transform.

    `train_aug` are `train_transform` keywords (auto_augment, reprob, hflip, scale, ...).
    `uint8=True`: items are uint8 tensors, to be normalised (and random-erased) on the device by
    `DeviceLoader` (see `spach.data.loader`). `selection=(fraction, seed, part)` splits the `train` split
    (after `max_samples`) by `selection_split` and keeps `part`: "fit" (the rest) or "selection" (the
    held-out images, for model selection without reading `val`). With the eval transform (deterministic) a split whose
    items fit in `CACHE_LIMIT_BYTES` is read once and kept (mnist5k: 12 MB at 32px). Otherwise the
    images of an image-file split (ImageFolder) whose decoded pixels fit in `MEMORY_LIMIT_BYTES` are
    decoded once and kept (`spach.data.memory`: 10,000 CIFAR images are 31 MB); each epoch's
    augmentation starts from them and gives the same tensors as reading the files.
    """
    norm = {k: v for k, v in (("mean", mean), ("std", std)) if v is not None}
    if train:
        transform = train_transform(img_size, interpolation=interpolation, uint8=uint8, **norm, **train_aug)
    else:
        transform = eval_transform(img_size, crop_pct=crop_pct, interpolation=interpolation, uint8=uint8, **norm)
    base = open_source(source, split)
    indices = class_balanced_indices(base.targets, max_samples)
    if selection is not None:
        fraction, selection_seed, part = selection
        if split != "train" or part not in ("fit", "selection"):
            raise ValueError(f"a selection split is carved from 'train' as part 'fit' or 'selection', "
                             f"got split {split!r}, part {part!r}")
        fit, held = selection_split(base.targets, fraction, selection_seed, pool=indices)
        indices = fit if part == "fit" else held
    item_bytes = 3 * img_size * img_size * (1 if uint8 else 4)
    cache = not train and len(indices) * item_bytes <= CACHE_LIMIT_BYTES
    if not cache and hasattr(base, "samples"):  # files on disk: decode them once if they fit
        in_memory = load_in_memory(base, indices, MEMORY_LIMIT_BYTES)
        if in_memory is not None:
            return SafeDataset(in_memory, transform, seed=seed)
    return SafeDataset(base, transform, indices, seed=seed, cache=cache)
