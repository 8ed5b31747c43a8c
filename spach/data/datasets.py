"""Data SOURCEs -> datasets that never crash on a bad image.

    base = open_source("mnist5k", "train")             # built-in digits
    base = open_source("fashion-mnist", "train")       # built-in Fashion-MNIST subset (10,000 / 2,000)
    base = open_source("fashion-mnist:/usr/share/datasets/fashion-mnist", "val")   # the full idx files
    base = open_source("~/data/imagenet", "val")       # ImageFolder: ROOT/train/CLASS/*.jpg, ROOT/val/...
    base = open_source("cifar10:~/data", "train")      # torchvision dataset already on disk
    ds = SafeDataset(base, transform, indices=class_balanced_indices(base.targets, 1000), seed=0)
    loader = DataLoader(ds, batch_size=64, collate_fn=collate_skip)   # -> (images, targets, n_skipped)

An ImageFolder root is read by `SafeImageFolder`: hidden entries (`.ipynb_checkpoints`,
`._x.jpg`) are skipped, every folder is read once however many symlinks lead to it (no
loops), 16-bit images keep their values, empty (0-byte) files are no images, and what was
skipped is counted (`.skipped`) and said in one warning. An image over `MAX_IMAGE_PIXELS`
is refused before decoding (and skipped, with a warning saying what was refused). `SafeDataset` returns None for an image that cannot be read (with a warning);
`collate_skip` drops those and counts them. With a `seed`, the augmentation of item
`i` in epoch `e` is drawn from RNGs seeded by (seed, e, i) alone: independent of
worker processes, ranks and resumption (the caller's RNG state is left untouched).
"""
from __future__ import annotations

import functools
import os
import warnings
from collections import Counter
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset, default_collate

from spach.data.fashion_mnist import FashionMnist
from spach.data.mnist5k import Mnist5k
from spach.rng import seeded

# images larger than this (width x height) are refused before decoding, as PIL.Image.MAX_IMAGE_PIXELS does
MAX_IMAGE_PIXELS = 50_000_000
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
    if source == "fashion-mnist":
        return FashionMnist(split)
    name, sep, root = source.partition(":")
    if sep and name == "fashion-mnist":
        return FashionMnist(split, root=Path(root).expanduser())
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
    if not root.exists():
        raise FileNotFoundError(f"data not found: {root} (expected 'mnist5k', 'fashion-mnist', NAME:ROOT for a "
                                f"torchvision dataset or fashion-mnist:ROOT, or an ImageFolder root with train/ "
                                f"and val/)")
    missing = [s for s in ("train", "val") if not (root / s).is_dir()]
    if missing:
        raise FileNotFoundError(f"{root}: missing {' and '.join(s + '/' for s in missing)} — an ImageFolder "
                                f"root must hold train/CLASS/*.jpg and val/CLASS/*.jpg")
    ds = _image_folder_class()(str(root / split))
    if ds.skipped:
        warnings.warn(f"{root / split}: {ds.skipped_summary()}", stacklevel=3)
    other = "val" if split == "train" else "train"
    other_classes = class_folders(root / other)
    if other_classes != ds.classes:
        raise ValueError(f"{root}: train/ and val/ have different class folders: "
                         + class_difference({split: ds.classes, other: other_classes}))
    return ds


def class_difference(classes: dict[str, list[str]]) -> str:
    """'only in train/: x, y; only in val/: z' for the class lists of two splits (at most 5 names each)."""
    (a, ca), (b, cb) = sorted(classes.items(), key=lambda kv: kv[0] != "train")
    parts = []
    for name, mine, theirs in ((a, ca, cb), (b, cb, ca)):
        only = sorted(set(mine) - set(theirs))
        if only:
            shown = ", ".join(only[:5]) + (f", ... ({len(only)} in all)" if len(only) > 5 else "")
            parts.append(f"only in {name}/: {shown}")
    return "; ".join(parts) or "the same names in another order"


def class_folders(directory: str | os.PathLike) -> list[str]:
    """The class names of an ImageFolder split: its sub-folders, hidden ones excepted, sorted."""
    return sorted(e.name for e in os.scandir(directory) if e.is_dir() and not e.name.startswith("."))


def to_8bit(img):
    """A 16-bit (or 32-bit) greyscale PIL image as 8-bit 'L' over its full range; others unchanged.

    PIL's convert("RGB") clips such images at 255 (all white); here 65535 -> 255.
    """
    from PIL import Image

    if img.mode.startswith("I;16") or img.mode == "I":
        a = np.asarray(img).astype(np.float64)
        if img.mode.startswith("I;16") or a.max(initial=0) > 255:  # 'I': 8-bit values stay as they are
            a = a / 257.0
        return Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8), mode="L")
    if img.mode == "F":
        a = np.asarray(img).astype(np.float64)
        a = a * 255.0 if a.max(initial=0) <= 1.0 else a  # [0, 1] floats, else already 0..255
        return Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8), mode="L")
    return img


def load_image(path: str):
    """Open and decode an image file (8-bit or 16-bit; mode kept, see `to_8bit`).

    An image of more than `MAX_IMAGE_PIXELS` pixels is refused before it is decoded (ValueError
    saying its size and the limit): a 12000x12000 PNG would take 432 MB and seconds per read.
    PIL's own decompression-bomb warning (above 89 MP) is replaced by this error.
    """
    from PIL import Image

    with open(path, "rb") as f:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            try:
                img = Image.open(f)
            except Image.DecompressionBombError:  # over twice PIL's limit: PIL refuses to open it
                raise ValueError(f"{path}: more than {2 * Image.MAX_IMAGE_PIXELS / 1e6:.0f} MP, over the "
                                 f"limit of {MAX_IMAGE_PIXELS / 1e6:.0f} MP per image "
                                 "(spach.data.datasets.MAX_IMAGE_PIXELS); not decoded") from None
        width, height = img.size
        if width * height > MAX_IMAGE_PIXELS:
            raise ValueError(f"{path}: {width}x{height} = {width * height / 1e6:.0f} MP, over the limit of "
                             f"{MAX_IMAGE_PIXELS / 1e6:.0f} MP per image (spach.data.datasets.MAX_IMAGE_PIXELS); "
                             "not decoded")
        img.load()
    return img


@functools.lru_cache(maxsize=None)
def _image_folder_class():
    from torchvision.datasets import ImageFolder
    from torchvision.datasets.folder import IMG_EXTENSIONS, has_file_allowed_extension

    class SafeImageFolder(ImageFolder):
        """torchvision's ImageFolder, same samples in the same order for a clean folder, but: hidden
        entries and empty files skipped, each folder read once (symlink loops, two links to one folder),
        16-bit images loaded correctly; `skipped` counts what was left out, by reason."""

        HIDDEN, TWICE, NOT_IMAGE, SPECIAL, EMPTY = (
            "hidden", "folder(s) already visited through a symlink (a loop?)", "not image file(s)",
            "broken link(s) or special file(s)", "empty (0-byte) file(s)")

        def __init__(self, root: str):
            self.skipped: Counter = Counter()
            self._examples: dict[str, list[str]] = {}
            super().__init__(root, loader=load_image)

        def find_classes(self, directory):
            classes = class_folders(directory)
            for e in os.scandir(directory):
                if e.name.startswith("."):
                    self._skip(self.HIDDEN, e.name)
            if not classes:
                raise FileNotFoundError(f"no class folders in {directory} (expected {directory}/CLASS/*.jpg)")
            return classes, {c: i for i, c in enumerate(classes)}

        def make_dataset(self, directory, class_to_idx, extensions=None, is_valid_file=None, allow_empty=False):
            extensions = extensions or IMG_EXTENSIONS
            top = os.stat(directory)  # the split's own folder is no class's sub-folder (a link up to it: a loop)
            found = self._scan([(i, Path(directory) / c) for c, i in class_to_idx.items()], {(top.st_dev, top.st_ino)})
            samples, counts = [], Counter()
            for idx, folder, names in sorted(found):  # torchvision's order: class, then folder path, then name
                for name in names:
                    if has_file_allowed_extension(name, extensions):
                        samples.append((os.path.join(folder, name), idx))
                        counts[idx] += 1
                    else:
                        self._skip(self.NOT_IMAGE, name)
            empty = [c for c, i in class_to_idx.items() if not counts[i]]
            if empty:
                raise FileNotFoundError(f"{directory}: no image files ({', '.join(extensions)}) for class(es) "
                                        f"{', '.join(sorted(empty))}")
            return samples

        def _scan(self, starts: list, seen: set) -> list:
            """(class index, folder, sorted file names) of every folder under `starts`, each folder once.
            Real sub-folders are read before folders reached through symlinks, so a link never takes a
            folder away from the class it is really in."""
            found, links = [], []
            queue = list(starts)
            while queue or links:
                idx, folder = queue.pop() if queue else links.pop(0)
                try:
                    st = os.stat(folder)
                except OSError:
                    self._skip(self.SPECIAL, folder.name)
                    continue
                if (st.st_dev, st.st_ino) in seen:
                    self._skip(self.TWICE, folder.name)
                    continue
                seen.add((st.st_dev, st.st_ino))
                names = []
                for e in os.scandir(folder):
                    if e.name.startswith("."):
                        self._skip(self.HIDDEN, e.name)
                    elif e.is_dir():
                        (links if e.is_symlink() else queue).append((idx, Path(e.path)))
                    elif e.is_file():
                        if e.stat().st_size == 0:  # not an image: neither read nor counted
                            self._skip(self.EMPTY, e.name)
                        else:
                            names.append(e.name)
                    else:
                        self._skip(self.SPECIAL, e.name)
                found.append((idx, str(folder), sorted(names)))
            return found

        def _skip(self, reason: str, name: str) -> None:
            self.skipped[reason] += 1
            self._examples.setdefault(reason, []).append(name)

        def skipped_summary(self) -> str:
            """One line: how many entries were skipped and why, with examples."""
            parts = []
            for reason, n in self.skipped.items():
                examples = sorted(set(self._examples[reason]))
                shown = ", ".join(examples[:3]) + (", ..." if len(examples) > 3 else "")
                parts.append(f"{n} {reason}" + (f" ({shown})" if reason != self.TWICE else ""))
            return f"skipped {sum(self.skipped.values())} entries: " + "; ".join(parts)

    return SafeImageFolder


def __getattr__(name: str):
    if name == "SafeImageFolder":  # built on first use: torchvision is imported lazily
        return _image_folder_class()
    raise AttributeError(name)


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


def selection_split(targets: Sequence[int], fraction: float, seed: int,
                    pool: Optional[Sequence[int]] = None) -> tuple[list[int], list[int]]:
    """(fit indices, selection indices): a stratified hold-out of `fraction` of each class of `pool`.

    Method: within each class (of the items in `pool`, default every item), the indices are shuffled by
    a NumPy generator seeded with `seed` and the first ``max(1, round(fraction * n_class))`` of them are
    held out; a class of one item is never held out whole. Both lists are sorted and disjoint, and
    their union is `pool`: the class proportions of the selection split are those of the pool
    (class-balanced in the stratified sense). The same (targets, fraction, seed, pool) always gives the
    same split. Used for model selection on training data (hyper-parameter search) so that the
    validation split is never read before the final runs.
    """
    if not 0 < fraction < 1:
        raise ValueError(f"selection fraction must be in (0, 1), got {fraction!r}")
    pool = list(range(len(targets))) if pool is None else list(pool)
    per_class: dict[int, list[int]] = {}
    for i in pool:
        per_class.setdefault(int(targets[i]), []).append(i)
    rng = np.random.default_rng(seed)
    held: list[int] = []
    for c in sorted(per_class):
        members = np.asarray(per_class[c])
        n_held = min(len(members) - 1, max(1, round(fraction * len(members))))
        held.extend(int(i) for i in rng.permutation(members)[:n_held])
    held_set = set(held)
    return sorted(i for i in pool if i not in held_set), sorted(held)


class SafeDataset(Dataset):
    """`base` items (PIL, label) -> (3-channel transformed tensor, label), or None when unreadable.

    `cache=True` keeps every item after its first read (for a deterministic transform only: the
    eval transform, or training without augmentation): small datasets such as mnist5k then cost
    their decoding and resizing once per process instead of once per epoch.
    """

    def __init__(self, base, transform: Callable, indices: Optional[Sequence[int]] = None,
                 seed: Optional[int] = None, cache: bool = False):
        self.base, self.transform, self.seed, self.epoch = base, transform, seed, 0
        self.indices = list(range(len(base))) if indices is None else list(indices)
        self.targets = [int(base.targets[i]) for i in self.indices]
        self.classes = list(base.classes)
        self.cache: Optional[dict] = {} if cache else None

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, key: int | tuple[int, int]):
        """Item `i`, or `(epoch, i)`: item i as augmented in that epoch (how `EpochSampler` tells
        persistent worker processes the epoch)."""
        epoch, i = key if isinstance(key, tuple) else (self.epoch, key)
        if self.cache is not None:
            if i not in self.cache:
                self.cache[i] = self._read(epoch, i)
            return self.cache[i]
        return self._read(epoch, i)

    def _read(self, epoch: int, i: int):
        j = self.indices[i]
        try:
            img, target = self.base[j]
            if img.mode != "RGB":  # greyscale (MNIST, 16-bit) and palette images -> 3 channels; RGB not copied
                img = to_8bit(img).convert("RGB")
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
