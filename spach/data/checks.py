"""The data checks of a study, made once before any run: `check_source`.

    check_source("~/data/flowers", batch_size=64)   # ValueError naming the problem, else a summary

A run trains on SOURCE's train split and is scored on its val split. What would make every run
fail, or succeed meaninglessly, is refused here, with the setting to change:

- fewer than two classes (a one-class classifier scores 100% top-1 and means nothing);
- train and val with different classes (the classes named: the model's outputs would not match
  the validation labels);
- fewer training images than one optimizer step takes (`batch_size` x `accum_steps`, after
  `max_train_samples`), which the engine would only find in each run;
- a split without images.

Images that cannot be used are not counted: empty (0-byte) files and hidden entries are left out
of ImageFolder splits when they are read (`SafeImageFolder`), and an image over
`MAX_IMAGE_PIXELS` is refused, not decoded, when it is read.
"""
from __future__ import annotations

from typing import Optional

from spach.data.datasets import class_difference, open_source

MIN_CLASSES = 2


def check_source(source: str, *, batch_size: int, accum_steps: int = 1, max_train_samples: Optional[int] = None,
                 max_val_samples: Optional[int] = None, setting: str = "batch_size") -> dict:
    """Refuse SOURCE for training (ValueError) if it cannot give a meaningful run; else a summary
    {split: {"classes": n, "images": n}} of what the runs will use. `setting` names the batch size
    where the user wrote it (e.g. "recipe.batch_size" in a study file)."""
    splits = {split: open_source(source, split) for split in ("train", "val")}
    classes = {split: [str(c) for c in ds.classes] for split, ds in splits.items()}
    if classes["train"] != classes["val"]:
        raise ValueError(f"data {source}: train and val have different classes ({class_difference(classes)}); "
                         "the model's outputs would not match the validation labels")
    if len(classes["train"]) < MIN_CLASSES:
        shown = ", ".join(classes["train"]) or "none"
        raise ValueError(f"data {source}: {len(classes['train'])} class ({shown}); a classifier needs at least "
                         f"{MIN_CLASSES} classes (one class gives 100% top-1 that means nothing)")
    limits = {"train": max_train_samples, "val": max_val_samples}
    images = {split: min(len(ds), limits[split] or len(ds)) for split, ds in splits.items()}
    for split, n in images.items():
        if n == 0:
            raise ValueError(f"data {source}: the {split} split has no images")
    step = batch_size * accum_steps
    if images["train"] < step:
        used = f" (max_train_samples {max_train_samples})" if max_train_samples else ""
        per_step = f"{setting} {batch_size}" + (f" x accum_steps {accum_steps}" if accum_steps > 1 else "")
        raise ValueError(f"data {source}: {images['train']} training image(s){used}, fewer than one optimizer "
                         f"step of {per_step}; lower {setting} or use more data")
    return {split: {"classes": len(classes[split]), "images": images[split]} for split in splits}
