"""Train and eval transforms of the recipe, built with `timm.data.create_transform`.

    t = train_transform(32, auto_augment="rand-m9-mstd0.5-inc1", reprob=0.25)
    e = eval_transform(32, crop_pct=0.875)   # resize to 32/0.875, centre crop 32
    u = eval_transform(32, uint8=True)       # stop at a uint8 tensor: normalise (and random-erase) on the
                                             # device, see spach.data.loader.DeviceLoader
"""
from __future__ import annotations

from typing import Optional, Sequence

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, create_transform


def train_transform(
    img_size: int,
    *,
    auto_augment: Optional[str] = "rand-m9-mstd0.5-inc1",
    reprob: float = 0.25,
    remode: str = "pixel",
    recount: int = 1,
    hflip: float = 0.5,
    scale: Sequence[float] = (0.08, 1.0),
    ratio: Sequence[float] = (3 / 4, 4 / 3),
    interpolation: str = "bicubic",
    mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
    std: Sequence[float] = IMAGENET_DEFAULT_STD,
    uint8: bool = False,
):
    """Random-resized crop, flip, RandAugment, normalise, random erasing (DeiT; docs/design.md §5).

    `uint8=True` stops after the crop, flip and RandAugment with a uint8 C×H×W tensor: 4× less
    data through the loader's processes and to the GPU; `DeviceLoader` normalises and erases.
    """
    transform = create_transform(
        img_size, is_training=True, scale=tuple(scale), ratio=tuple(ratio), hflip=hflip,
        auto_augment=auto_augment or None, interpolation=interpolation,
        mean=tuple(mean), std=tuple(std), re_prob=reprob, re_mode=remode, re_count=recount,
        use_prefetcher=uint8,
    )
    _fix_posterize(transform)
    return transform


def eval_transform(
    img_size: int,
    *,
    crop_pct: float = 0.875,
    interpolation: str = "bicubic",
    mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
    std: Sequence[float] = IMAGENET_DEFAULT_STD,
    uint8: bool = False,
):
    """Resize to img_size / crop_pct, centre crop img_size, normalise (`uint8=True`: not normalised)."""
    return create_transform(
        img_size, is_training=False, crop_pct=crop_pct, interpolation=interpolation,
        mean=tuple(mean), std=tuple(std), use_prefetcher=uint8,
    )


def _posterize(img, bits_to_keep, **_):
    """timm's posterize, also for 0 bits: 'PosterizeIncreasing' at full magnitude asks for 0 bits,
    which recent Pillow rejects (older Pillow returned a black image, as this does)."""
    from PIL import Image, ImageOps

    if bits_to_keep >= 8:
        return img
    if bits_to_keep <= 0:
        return Image.new(img.mode, img.size)
    return ImageOps.posterize(img, bits_to_keep)


def _fix_posterize(transform) -> None:
    """Swap in `_posterize` for the Posterize ops of a RandAugment inside a Compose (in place)."""
    from timm.data.auto_augment import RandAugment

    for t in getattr(transform, "transforms", []):
        if isinstance(t, RandAugment):
            for op in t.ops:
                if op.name.startswith("Posterize"):
                    op.aug_fn = _posterize
