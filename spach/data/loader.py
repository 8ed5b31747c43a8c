"""Loaders that keep the device busy: persistent workers told the epoch by the sampler, uint8 batches,
normalisation and random erasing on the device (as timm's `PrefetchLoader`).

    sampler = EpochSampler(DistributedSampler(ds, ...), length=steps * batch_size)
    loader = DeviceLoader(make_loader(ds, batch_size=64, sampler=sampler, workers=8, device=dev),
                          dev, reprob=0.25, channels_last=True)
    for epoch in range(epochs):
        sampler.set_epoch(epoch, skip=0)           # before each pass; the workers stay alive
        for images, targets, skipped in loader:    # float, normalised, on `dev`
            ...

A uint8 batch is a quarter of the float32 one through the worker processes' shared memory
and over PCIe; the arithmetic is the device's.
"""
from __future__ import annotations

import itertools
from typing import Iterable, Optional, Sequence

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch.utils.data import DataLoader, Sampler

from spach.data.datasets import collate_skip


class EpochSampler(Sampler):
    """Yields `(epoch, index)` keys from a base sampler: worker processes that live across epochs
    (persistent) learn the epoch from each key (`SafeDataset` seeds item i of epoch e from both).

    `set_epoch(epoch, skip, base_epoch)` before each pass: the base sampler's `set_epoch(base_epoch)`
    (default `epoch`) orders the pass, the first `skip` indices (those done before a resume) are left
    out, and at most `length` indices are given in all (None: the base sampler's length).
    """

    def __init__(self, base: Iterable[int], length: Optional[int] = None):
        self.base, self.length = base, length
        self.epoch, self.skip = 0, 0

    def set_epoch(self, epoch: int, skip: int = 0, base_epoch: Optional[int] = None) -> None:
        self.epoch, self.skip = epoch, skip
        if hasattr(self.base, "set_epoch"):
            self.base.set_epoch(epoch if base_epoch is None else base_epoch)

    def __iter__(self):
        for i in itertools.islice(iter(self.base), self.skip, self.length):
            yield self.epoch, i

    def __len__(self) -> int:
        total = len(self.base) if self.length is None else min(self.length, len(self.base))
        return max(0, total - self.skip)


def make_loader(dataset, *, batch_size: int, sampler, workers: int, device: torch.device | str,
                seed: int = 0, drop_last: bool = False) -> DataLoader:
    """A DataLoader of (images, targets, n_skipped) batches: persistent workers, memory pinned only
    for a CUDA device (pinning would open a CUDA context even for a CPU run)."""
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=workers,
                      collate_fn=collate_skip, pin_memory=torch.device(device).type == "cuda",
                      persistent_workers=workers > 0, drop_last=drop_last,
                      generator=torch.Generator().manual_seed(seed))  # leaves the global RNG alone


class DeviceLoader:
    """A loader's (images, targets, n_skipped) batches on `device`: uint8 images become float,
    normalised with mean/std (in 0-1 units), then random-erased with probability `reprob`
    (timm's RandomErasing, drawing from this process's RNGs); float images pass as they are."""

    def __init__(self, loader: Iterable, device: torch.device | str, *, mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
                 std: Sequence[float] = IMAGENET_DEFAULT_STD, reprob: float = 0.0, remode: str = "pixel",
                 recount: int = 1, channels_last: bool = False):
        self.loader, self.device, self.channels_last = loader, torch.device(device), channels_last
        self.mean = torch.tensor([255 * m for m in mean], device=self.device).view(1, -1, 1, 1)
        self.std = torch.tensor([255 * s for s in std], device=self.device).view(1, -1, 1, 1)
        self.random_erasing = None
        if reprob > 0:
            from timm.data.random_erasing import RandomErasing
            self.random_erasing = RandomErasing(reprob, mode=remode, max_count=recount, device=self.device)

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        for images, targets, skipped in self.loader:
            if images is None:
                yield None, None, skipped
                continue
            yield (*self.to_device(images, targets), skipped)

    def to_device(self, images: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        images = images.to(self.device, non_blocking=True)
        targets = targets.to(self.device, non_blocking=True)
        if images.dtype == torch.uint8:
            images = images.float().sub_(self.mean).div_(self.std)
            if self.random_erasing is not None:
                images = self.random_erasing(images)
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        return images, targets
