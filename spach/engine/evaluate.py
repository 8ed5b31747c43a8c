"""Evaluation: top-1 / top-5 accuracy (%) and mean cross-entropy, exact under torchrun.

    metrics = evaluate(model, "mnist5k", img_size=32)          # a SOURCE: its val split
    metrics = evaluate(model, loader)                          # any loader of (images, targets[, skipped])
    metrics = evaluate_checkpoint("spach_ms_xxs_patch4_224_conv", "spach_ms_conv_xxs.pth", "path/to/imagenet")
    # -> {"top1": 73.1, "top5": 91.2, "loss": 1.13, "n": 50000, "skipped": 0}
    metrics = evaluate(model, loader, predictions=True)       # + "predictions", "targets" (numpy, dataset order)

Under a process group each rank evaluates its own shard (`ShardSampler`: no padding)
and the sums of loss, hits and counts are all-reduced, so every image counts once.
"""
from __future__ import annotations

from typing import Iterable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from spach.data.loader import DeviceLoader, make_loader
from spach.engine.device import autocast
from spach.engine.distributed import ShardSampler, all_gather_objects, all_reduce_sum, world
from spach.errors import SpachError


def make_eval_loader(source: str, img_size: int, *, batch_size: int = 128, max_samples: Optional[int] = None,
                     workers: int = 0, crop_pct: float = 0.875, interpolation: str = "bicubic",
                     mean=None, std=None, device: torch.device | str = "cpu",
                     channels_last: bool = False) -> DeviceLoader:
    """A loader of SOURCE's val split, sharded over the ranks of the process group (if any): uint8
    batches from persistent workers, normalised on `device` (memory pinned only for CUDA)."""
    from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

    from spach.data import build_dataset

    mean, std = mean or IMAGENET_DEFAULT_MEAN, std or IMAGENET_DEFAULT_STD
    ds = build_dataset(source, "val", img_size, max_samples=max_samples, crop_pct=crop_pct,
                       interpolation=interpolation, uint8=True)
    rank, world_size = world()
    loader = make_loader(ds, batch_size=batch_size, sampler=ShardSampler(len(ds), rank, world_size),
                         workers=workers, device=device)
    return DeviceLoader(loader, device, mean=mean, std=std, channels_last=channels_last)


def evaluate(model: nn.Module, loader_or_source: Iterable | str, *, img_size: Optional[int] = None,
             batch_size: int = 128, max_samples: Optional[int] = None, workers: int = 0,
             device: Optional[torch.device | str] = None, amp: str = "none", channels_last: bool = False,
             crop_pct: float = 0.875, interpolation: str = "bicubic",
             distributed: Optional[bool] = None, progress: bool = False, predictions: bool = False) -> dict:
    """Evaluate `model` -> {"top1", "top5", "loss", "n", "skipped"} (accuracies in %).

    `predictions=True` adds "predictions" and "targets": the predicted and true class of every
    validation image as int64 numpy arrays in the dataset's order (the per-example evidence of the
    battle's statistics), or None for both when some images were unreadable (skipped), since the
    order of the rest is then not the dataset's.

    `loader_or_source`: a SOURCE string (its val split, transformed with the model's
    mean/std, `img_size` (default: the model's) and `crop_pct`), or an iterable of
    (images, targets) or (images, targets, n_skipped) batches. `distributed` (default:
    whether a process group exists) all-reduces the sums: the loader must then give
    each rank a disjoint shard, as the loaders built here do.
    """
    device = torch.device(device) if device is not None else next(model.parameters()).device
    if isinstance(loader_or_source, str):
        cfg = getattr(model, "pretrained_cfg", None) or {}
        img_size = img_size or int(cfg.get("input_size", (3, 224, 224))[-1])
        loader = make_eval_loader(loader_or_source, img_size, batch_size=batch_size, max_samples=max_samples,
                                  workers=workers, crop_pct=crop_pct, interpolation=interpolation,
                                  mean=cfg.get("mean"), std=cfg.get("std"), device=device)
    else:
        loader = loader_or_source
    if distributed is None:
        distributed = world()[1] > 1
    if progress:
        from tqdm import tqdm
        loader = tqdm(loader, desc="eval", leave=False, dynamic_ncols=True)

    was_training = model.training
    model.eval()
    try:
        kept: Optional[list] = [] if predictions else None
        sums, n, skipped = _eval_sums(model, loader, device, amp, channels_last, kept)
    finally:
        model.train(was_training)
    totals = torch.cat([sums, torch.tensor([n, skipped], dtype=torch.float64).to(device)])
    if distributed:
        totals = all_reduce_sum(totals)
    loss, top1, top5, n, skipped = totals.tolist()  # the one host sync of the evaluation
    if n == 0:
        raise SpachError("evaluation saw no readable images")
    out = {"top1": 100.0 * top1 / n, "top5": 100.0 * top5 / n, "loss": loss / n, "n": int(n),
           "skipped": int(skipped)}
    if predictions:
        out["predictions"], out["targets"] = _in_dataset_order(kept, int(skipped), distributed)
    return out


def _in_dataset_order(kept: list, skipped: int, distributed: bool):
    """(predictions, targets) of the whole validation set in dataset order, from this rank's batches.

    Under a process group rank r holds items r, r+W, r+2W, ... (`ShardSampler`): gather and interleave.
    None, None when images were skipped (their places in the order are unknown)."""
    import numpy as np

    pairs = torch.cat([torch.stack([p, t], 1) for p, t in kept]).cpu().numpy() if kept else np.zeros((0, 2), np.int64)
    shards = all_gather_objects(pairs) if distributed else [pairs]
    if skipped:
        return None, None
    order = np.empty((sum(len(s) for s in shards), 2), dtype=np.int64)
    for rank, shard in enumerate(shards):
        order[rank::len(shards)] = shard
    return order[:, 0], order[:, 1]


@torch.inference_mode()
def _eval_sums(model: nn.Module, batches: Iterable, device: torch.device, amp: str,
               channels_last: bool, kept: Optional[list] = None) -> tuple[torch.Tensor, int, int]:
    """(device tensor [loss sum, top-1 hits, top-5 hits], images seen, images skipped): no host sync
    per batch. `kept`: a list that receives (predicted class, target) tensors of every batch."""
    sums = torch.zeros(3, dtype=torch.float64, device=device)
    n = skipped = 0
    for batch in batches:
        images, targets, n_skipped = batch if len(batch) == 3 else (*batch, 0)
        skipped += n_skipped
        if images is None:
            continue
        images = images.to(device, non_blocking=True)
        targets = targets.to(device, non_blocking=True)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with autocast(device, amp):
            logits = model(images)
        logits = logits.float()
        top = logits.topk(min(5, logits.shape[-1]), dim=-1).indices
        predicted = logits.argmax(-1)  # ties -> first index
        if kept is not None:
            kept.append((predicted, targets))
        sums += torch.stack([F.cross_entropy(logits, targets, reduction="sum").double(),
                             (predicted == targets).sum().double(),
                             (top == targets[:, None]).any(-1).sum().double()])
        n += targets.numel()
    return sums, n, skipped


def evaluate_checkpoint(model_name: str, checkpoint: str, data: str, *, img_size: Optional[int] = None,
                        model_kwargs: Optional[dict] = None, ema: bool = False, **eval_kwargs) -> dict:
    """Build `model_name` for `data`'s classes, load `checkpoint` (an original release
    `{"model": sd}`, a project training checkpoint, a state dict or .safetensors) and evaluate it.

    For the project's own checkpoints the run's model_kwargs and img_size are reused
    unless given. `ema=True` evaluates the EMA weights (key "model_ema"). Under torchrun
    each process evaluates a shard and every process returns the totals.
    """
    from pathlib import Path

    from spach import load_checkpoint
    from spach.data import open_source
    from spach.models import read_state_file
    from spach.engine.build import build_model, check_model_input

    source = read_state_file(Path(checkpoint))  # .pth (weights_only) or .safetensors
    run_cfg = source["config"] if isinstance(source.get("config"), dict) else {}
    if run_cfg.get("model") and run_cfg["model"] != model_name:
        import warnings
        warnings.warn(f"{checkpoint} was trained as {run_cfg['model']}, not {model_name}: the run's model options "
                      f"are reused, so the numbers are {run_cfg['model']}'s; pass --model {run_cfg['model']}",
                      stacklevel=2)
    if model_kwargs is None:
        model_kwargs = run_cfg.get("model_kwargs") or {}
    img_size = img_size or run_cfg.get("img_size")
    num_classes = len(open_source(data, "val").classes)
    model = build_model(model_name, num_classes=num_classes, img_size=img_size, model_kwargs=model_kwargs)
    img_size = img_size or int(model.pretrained_cfg.get("input_size", (3, 224, 224))[-1])
    check_model_input(model, img_size, num_classes)
    load_checkpoint(model, source, key="model_ema" if ema else None)
    from spach.engine import distributed as D

    env = D.setup(eval_kwargs.pop("device", None))  # under torchrun: join the group, evaluate a shard each
    model.to(env.device)
    try:
        return evaluate(model, data, img_size=img_size, device=env.device, **eval_kwargs)
    finally:
        D.cleanup()
