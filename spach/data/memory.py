"""Small image-file datasets decoded once per process and kept as uint8 arrays (`InMemoryImages`).

    base = open_source("~/data/cifar10", "train")            # an ImageFolder of 32x32 JPEGs
    images = load_in_memory(base, indices, limit=1 << 30)     # None when the decoded images exceed the limit
    ds = SafeDataset(images, transform, seed=0)               # the same items as SafeDataset(base, transform, indices)

A study over 10,000 small images would otherwise open and decode every file once per epoch
(per item, in the loader). Here each image is decoded once, converted to 3-channel RGB exactly
as `SafeDataset` converts it (16-bit and greyscale through `to_8bit`), and stored; an item is
then a PIL image made from the stored pixels, so every transform — RandAugment included — sees
the same pixels as on the per-item path and, for the same seed, gives the same augmented
tensor. Images of one shape are stacked into one N x H x W x 3 uint8 tensor (worker processes
forked from the training process share its pages); mixed shapes are kept one array each.
An image that cannot be read is remembered with its error and raises it again when its item is
asked for, so `SafeDataset` skips it with the same warning as before.
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from spach.data.datasets import to_8bit


def rgb_array(img) -> np.ndarray:
    """H x W x 3 uint8 pixels of a PIL image, converted as `SafeDataset` converts items (RGB kept as is)."""
    if img.mode != "RGB":
        img = to_8bit(img).convert("RGB")
    return np.asarray(img, dtype=np.uint8)


class InMemoryImages(Dataset):
    """Items (PIL 'RGB', label) of decoded images; `targets`, `classes` and `samples` like the base dataset's."""

    def __init__(self, images: list, targets: list[int], classes: list[str], samples: Optional[list] = None,
                 errors: Optional[dict[int, Exception]] = None):
        shapes = {a.shape for a in images if a is not None}
        if len(shapes) == 1 and not errors:
            self.images = torch.from_numpy(np.stack(images))  # N x H x W x 3 uint8
        else:
            self.images = images
        self.targets, self.classes, self.errors = list(targets), list(classes), dict(errors or {})
        if samples is not None:
            self.samples = samples

    @property
    def nbytes(self) -> int:
        if isinstance(self.images, torch.Tensor):
            return self.images.numel()
        return sum(a.nbytes for a in self.images if a is not None)

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int):
        if i in self.errors:
            raise self.errors[i]
        pixels = self.images[i]
        pixels = pixels.numpy() if isinstance(pixels, torch.Tensor) else pixels
        return Image.fromarray(pixels, mode="RGB"), self.targets[i]


def load_in_memory(base, indices: Sequence[int], limit: int) -> Optional[InMemoryImages]:
    """`base`'s items at `indices`, decoded once, or None when they would take more than `limit` bytes
    (estimated from the first image before reading the others, then checked as they are read)."""
    indices = list(indices)
    images: list = []
    errors: dict[int, Exception] = {}
    total = 0
    for pos, j in enumerate(indices):
        try:
            img, _ = base[j]
            pixels = rgb_array(img)
        except Exception as e:  # noqa: BLE001 — raised again when the item is read (SafeDataset skips it)
            errors[pos] = e
            images.append(None)
            continue
        total += pixels.nbytes
        if total > limit or (not images and pixels.nbytes * len(indices) > limit):
            return None
        images.append(pixels)
    samples = getattr(base, "samples", None)
    return InMemoryImages(images, [int(base.targets[j]) for j in indices], list(base.classes),
                          samples=[samples[j] for j in indices] if samples is not None else None, errors=errors)
