"""Evaluation: top-1 / top-5 accuracy (%) and mean cross-entropy, exact under torchrun.

    metrics = evaluate(model, "mnist5k", img_size=32)          # a SOURCE: its val split
    metrics = evaluate(model, loader)                          # any loader of (images, targets[, skipped])
    metrics = evaluate_checkpoint("spach_ms_xxs_patch4_224_conv", "spach_ms_conv_xxs.pth", "path/to/imagenet")
    # -> {"top1": 73.1, "top5": 91.2, "loss": 1.13, "n": 50000, "skipped": 0}

Under a process group each rank evaluates its own shard (`ShardSampler`: no padding)
and the sums of loss, hits and counts are all-reduced, so every image counts once.
"""
from __future__ import annotations

import contextlib
from typing import Iterable, Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from spach.engine.distributed import ShardSampler, all_reduce_sum, world


def autocast(device: torch.device, amp: str):
    """torch.autocast for 'bf16' / 'fp16', a no-op for 'none'."""
    if amp == "none":
        return contextlib.nullcontext()
    if amp == "fp16" and device.type != "cuda":
        raise ValueError("amp='fp16' needs a CUDA device (loss scaling); on CPU use amp='bf16'")
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16 if amp == "bf16" else torch.float16)


def make_eval_loader(source: str, img_size: int, *, batch_size: int = 128, max_samples: Optional[int] = None,
                     workers: int = 0, crop_pct: float = 0.875, interpolation: str = "bicubic",
                     mean=None, std=None) -> DataLoader:
    """A loader of SOURCE's val split, sharded over the ranks of the process group (if any)."""
    from spach.data import build_dataset, collate_skip

    ds = build_dataset(source, "val", img_size, max_samples=max_samples, crop_pct=crop_pct,
                       interpolation=interpolation, mean=mean, std=std)
    rank, world_size = world()
    return DataLoader(ds, batch_size=batch_size, sampler=ShardSampler(len(ds), rank, world_size),
                      num_workers=workers, collate_fn=collate_skip, pin_memory=torch.cuda.is_available())


@torch.no_grad()
def evaluate(model: nn.Module, loader_or_source: Iterable | str, *, img_size: Optional[int] = None,
             batch_size: int = 128, max_samples: Optional[int] = None, workers: int = 0,
             device: Optional[torch.device | str] = None, amp: str = "none", channels_last: bool = False,
             crop_pct: float = 0.875, interpolation: str = "bicubic",
             distributed: Optional[bool] = None, progress: bool = False) -> dict:
    """Evaluate `model` -> {"top1", "top5", "loss", "n", "skipped"} (accuracies in %).

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
                                  mean=cfg.get("mean"), std=cfg.get("std"))
    else:
        loader = loader_or_source
    if distributed is None:
        distributed = world()[1] > 1

    was_training = model.training
    model.eval()
    sums = torch.zeros(5, dtype=torch.float64)  # loss, top1 hits, top5 hits, n, skipped
    batches = loader
    if progress:
        from tqdm import tqdm
        batches = tqdm(loader, desc="eval", leave=False, dynamic_ncols=True)
    for batch in batches:
        images, targets, skipped = batch if len(batch) == 3 else (*batch, 0)
        sums[4] += skipped
        if images is None:
            continue
        images = images.to(device, non_blocking=True)
        targets = targets.to(device, non_blocking=True)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with autocast(device, amp):
            logits = model(images)
        logits = logits.float()
        k = min(5, logits.shape[-1])
        top = logits.topk(k, dim=-1).indices
        sums[0] += F.cross_entropy(logits, targets, reduction="sum").item()
        sums[1] += (logits.argmax(-1) == targets).sum().item()  # argmax: ties -> first index
        sums[2] += (top == targets[:, None]).any(-1).sum().item()
        sums[3] += targets.numel()
    model.train(was_training)

    if distributed:
        sums = all_reduce_sum(sums.to(device)).cpu()  # nccl needs the tensor on the GPU
    n = int(sums[3])
    if n == 0:
        raise RuntimeError("evaluation saw no readable images")
    return {"top1": 100.0 * sums[1].item() / n, "top5": 100.0 * sums[2].item() / n,
            "loss": sums[0].item() / n, "n": n, "skipped": int(sums[4])}


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
