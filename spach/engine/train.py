"""Train a model with the paper's recipe (SPEC §6) — one CPU, one GPU, or many GPUs and nodes.

Single process (CPU or one GPU):

    spach train --model spach_ms_xxs_patch4_224_conv --data mnist5k --output runs/mnist \\
        --img-size 32 --epochs 10 --warmup-epochs 1 --cooldown-epochs 1 --batch-size 64

One node with 8 GPUs (DDP over nccl; --batch-size is per process):

    torchrun --standalone --nproc_per_node 8 -m spach.cli.main train \\
        --model spach_ms_s_patch4_224_hybrid --data /data/imagenet --output runs/hybrid_s \\
        --batch-size 128 --amp bf16

Two nodes with 8 GPUs each (run on both; --node_rank 0 on the master 10.0.0.1, 1 on the other):

    torchrun --nnodes 2 --node_rank 0 --nproc_per_node 8 --master_addr 10.0.0.1 --master_port 29500 \\
        -m spach.cli.main train --model ... --data /data/imagenet --output /shared/runs/x

Several CPU processes (gloo): `torchrun --standalone --nproc_per_node 2 -m spach.cli.main train ... --device cpu`.
Add `--resume auto` to any of these to continue from the newest good checkpoint in --output.

From Python: `train(TrainConfig(...), on_epoch_end=print)`, see `train`.

Conventions: the learning rate is stepped per optimizer update (warm-up and cosine
measured in updates, `epochs - cooldown_epochs` of cosine, then min_lr); accuracies
are in %; only rank 0 prints and writes files. Exact resumption: the sampler is seeded
from seed + epoch, a mid-epoch resume skips the batches already done, each image's
augmentation is seeded from (seed, epoch, index), and the RNG states of every rank are
checkpointed; on CPU, a killed and resumed run ends bit-identical to an uninterrupted one.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import random
import resource
import sys
import time
import warnings
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, DistributedSampler

from spach.engine import checkpoint as ckpt
from spach.engine import distributed as D
from spach.engine.build import build_model, check_model_input
from spach.io import atomic_write
from spach.models import count_params, save_safetensors
from spach.engine.config import TrainConfig
from spach.engine.evaluate import autocast, evaluate


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite; the run stopped, its last good checkpoint (if any) is kept."""


def train(cfg: TrainConfig, on_epoch_end: Optional[Callable[[dict], None]] = None,
          on_step: Optional[Callable[[int, int, int], None]] = None) -> dict:
    """Run (or resume) training as configured; returns the run's summary (on every rank).

    on_epoch_end(record) — rank 0, after each epoch's evaluation; record = {"epoch", "train_loss",
        "val_loss", "val_top1", "val_top5", "lr", "images_per_s", "epoch_time_s", "peak_mem_mb",
        "skipped_images"} (+ "ema_val_*" with an EMA).
    on_step(epoch, step, steps_per_epoch) — rank 0, after each optimizer step (and its step
        checkpoint, if due); `epoch` counts from 0, `step` is the number of steps done in it (1..n).
    peak_mem_mb: peak CUDA memory allocated, or on CPU the process's peak resident set size.
    Returns {"best_top1", "final_top1", "final_top5", "final_val_loss", "history", "train_time_s" (the
             epochs' time, those before a resume included), "params", "checkpoint", "weights", "output"}.
    """
    cfg.validate()
    threads_before = torch.get_num_threads()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    owns_group = not (torch.distributed.is_available() and torch.distributed.is_initialized())
    env = D.setup(cfg.device)
    try:
        return _train(cfg, env, on_epoch_end, on_step)
    finally:
        torch.set_num_threads(threads_before)
        if owns_group:
            D.cleanup()


def _train(cfg: TrainConfig, env: D.DistEnv, on_epoch_end, on_step) -> dict:
    from spach.data import build_dataset, collate_skip

    device, main = env.device, env.is_main
    out = Path(cfg.output)
    say = print if main else (lambda *a, **k: None)
    if cfg.amp == "fp16" and device.type != "cuda":
        raise ValueError("TrainConfig.amp: 'fp16' needs a CUDA device (loss scaling); on CPU use 'bf16'")

    # ---- resume: which checkpoint (if any)? -----------------------------------------------
    state, state_path = None, None
    if cfg.resume == "auto":
        state, state_path = ckpt.find_resumable(out) if out.is_dir() else (None, None)
        if state is None:
            say(f"resume auto: no checkpoint in {out}, starting from scratch")
    elif cfg.resume is not None:
        state, state_path = ckpt.load_checkpoint_file(cfg.resume), Path(cfg.resume)
    elif (out / ckpt.LAST).exists() or (out / ckpt.PREV).exists():
        raise ValueError(f"{out} already holds a checkpoint: pass --resume auto to continue it, "
                         f"or choose another --output")
    if state is not None:
        _check_same_run(state["config"], cfg, state_path)

    # ---- data ---------------------------------------------------------------------------------
    img_size = cfg.img_size or _default_img_size(cfg.model)
    data_kw = dict(img_size=img_size, crop_pct=cfg.crop_pct, interpolation=cfg.interpolation)
    aug = dict(auto_augment=cfg.auto_augment, reprob=cfg.reprob, remode=cfg.remode, recount=cfg.recount,
               hflip=cfg.hflip, scale=cfg.scale, ratio=cfg.ratio)
    train_set = build_dataset(cfg.data, "train", train=cfg.augment, max_samples=cfg.max_train_samples,
                              seed=cfg.seed, **data_kw, **(aug if cfg.augment else {}))
    val_set = build_dataset(cfg.data, "val", max_samples=cfg.max_val_samples, **data_kw)
    num_classes = len(train_set.classes)
    if cfg.num_classes is not None and cfg.num_classes != num_classes:
        raise ValueError(f"TrainConfig.num_classes: {cfg.num_classes} but the data has {num_classes} classes")

    # ---- model --------------------------------------------------------------------------------
    _seed_everything(cfg.seed)  # same initial weights on every rank and every resume
    model = build_model(cfg.model, num_classes=num_classes, img_size=img_size,
                        model_kwargs=cfg.model_kwargs, drop_path=cfg.drop_path)
    check_model_input(model, img_size, num_classes)
    if cfg.init_checkpoint and state is None:
        from spach import load_checkpoint
        load_checkpoint(model, cfg.init_checkpoint)
    if cfg.grad_checkpointing:
        model.set_grad_checkpointing(True)
    model.to(device)
    if cfg.channels_last:
        model.to(memory_format=torch.channels_last)
    n_params = count_params(model)
    ema = None
    if cfg.model_ema:
        from timm.utils import ModelEmaV3
        ema = ModelEmaV3(model, decay=cfg.model_ema_decay)

    # ---- optimizer, schedule, loss, mixup -------------------------------------------------------
    from timm.data import Mixup
    from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
    from timm.optim import create_optimizer_v2
    from timm.scheduler import create_scheduler_v2
    from timm.utils import dispatch_clip_grad

    global_batch = cfg.batch_size * env.world_size * cfg.accum_steps
    lr = cfg.lr if cfg.lr is not None else cfg.base_lr * global_batch / 512
    optimizer = create_optimizer_v2(model, opt=cfg.opt, lr=lr, weight_decay=cfg.weight_decay,
                                    eps=cfg.opt_eps, momentum=cfg.momentum)
    sampler = _train_sampler(train_set, cfg, env)
    steps_per_epoch = len(sampler) // cfg.batch_size // cfg.accum_steps
    if steps_per_epoch < 1:
        raise ValueError(f"TrainConfig.batch_size: {len(train_set)} training images give "
                         f"{len(sampler)} per process per epoch, fewer than one optimizer step of "
                         f"batch_size {cfg.batch_size} x accum_steps {cfg.accum_steps}")
    scheduler, _ = create_scheduler_v2(
        optimizer, sched=cfg.sched, step_on_epochs=False, updates_per_epoch=1,
        num_epochs=max(1, round((cfg.epochs - cfg.cooldown_epochs) * steps_per_epoch)),
        warmup_epochs=round(cfg.warmup_epochs * steps_per_epoch), warmup_lr=cfg.warmup_lr, min_lr=cfg.min_lr)
    scaler = torch.amp.GradScaler("cuda") if cfg.amp == "fp16" else None
    mixup = None
    if cfg.mixup_active:
        mixup = Mixup(mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix, prob=cfg.mixup_prob,
                      switch_prob=cfg.mixup_switch_prob, mode=cfg.mixup_mode,
                      label_smoothing=cfg.smoothing, num_classes=num_classes)
        criterion = SoftTargetCrossEntropy()
    elif cfg.smoothing > 0:
        criterion = LabelSmoothingCrossEntropy(cfg.smoothing)
    else:
        criterion = nn.CrossEntropyLoss()

    # ---- restore a checkpoint -------------------------------------------------------------------
    start_epoch, start_step, best_top1, stats = 0, 0, -math.inf, _new_stats()
    if state is not None:
        try:
            model.load_state_dict(state["model"])
            if ema is not None:  # (an EMA switched on at resume starts from the current weights)
                ema.module.load_state_dict(state.get("model_ema") or state["model"])
            optimizer.load_state_dict(state["optimizer"])
        except (RuntimeError, ValueError, KeyError) as e:
            raise ckpt.CheckpointError(f"{state_path} does not fit this model/config: {e}") from None
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        position = state["position"]
        start_epoch, start_step = position["epoch"], position["step"]
        best_top1, stats = state.get("best_top1", -math.inf), state.get("epoch_stats") or _new_stats()
        if start_step and position.get("steps_per_epoch") != steps_per_epoch:
            warnings.warn(f"{state_path}: steps per epoch changed ({position.get('steps_per_epoch')} -> "
                          f"{steps_per_epoch}: other batch size or process count); epoch {start_epoch + 1} "
                          f"restarts from its first step", stacklevel=2)
            start_step, stats = 0, _new_stats()
        # the lr schedule is a function of the config and the update count: rebuilt, not loaded, so a
        # resumed run may change e.g. --epochs (the saved "scheduler" state is for inspection)
        scheduler.step_update(num_updates=start_epoch * steps_per_epoch + start_step)
        say(f"resumed from {state_path} at epoch {start_epoch + 1}, step {start_step}")
    if main:
        if state is None and out.is_dir():  # a fresh start never overwrites an earlier run's results
            moved = ckpt.set_aside_results(out)
            if moved is not None:
                say(f"{out} held results of an earlier run but no checkpoint to continue: "
                    f"moved the results of an earlier run to {moved}")
        out.mkdir(parents=True, exist_ok=True)
        cfg.to_yaml(out / "config.yaml")
        history = _rewrite_history(out / "metrics.jsonl", keep_below=start_epoch)
    val_loader = DataLoader(val_set, batch_size=cfg.batch_size, sampler=D.ShardSampler(len(val_set), *D.world()),
                            num_workers=cfg.workers, collate_fn=collate_skip, pin_memory=device.type == "cuda",
                            generator=torch.Generator())  # leaves the global RNG alone

    # per-rank RNG streams for training randomness (mixup, drop path); restored exactly on resume
    _seed_everything(cfg.seed + env.rank)
    if state is not None:
        rngs = state["rng"]
        ckpt.set_rng_state(rngs[env.rank] if len(rngs) == env.world_size else rngs[0])
    del state

    train_model: nn.Module = model
    if env.distributed:
        train_model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
    if cfg.compile:
        train_model = torch.compile(train_model)
    writer = None
    if main and cfg.tensorboard:
        from torch.utils.tensorboard import SummaryWriter
        writer = SummaryWriter(str(out / "tb"), purge_step=start_epoch + 1)
    say(f"{cfg.model}: {n_params / 1e6:.2f}M params, {len(train_set)} train / {len(val_set)} val images "
        f"at {img_size}px, {num_classes} classes; {env.world_size} process(es) on {device.type}, "
        f"global batch {global_batch}, lr {lr:.2e}, {steps_per_epoch} steps/epoch")

    def save(epoch: int, step: int, stats: dict) -> None:
        rngs = D.all_gather_objects(ckpt.rng_state())  # every rank's RNG, collected on all ranks
        if not main:
            return
        ckpt.save_checkpoint({
            "model": model.state_dict(),
            "model_ema": ema.module.state_dict() if ema is not None else None,
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict() if scaler is not None else None,
            "position": {"epoch": epoch, "step": step, "global_step": epoch * steps_per_epoch + step,
                         "steps_per_epoch": steps_per_epoch},
            "epoch_stats": stats,
            "best_top1": best_top1,
            "rng": rngs,
            "config": cfg.to_dict(),
        }, out)

    # ---- the loop ------------------------------------------------------------------------------
    for epoch in range(start_epoch, cfg.epochs):
        t_epoch = time.perf_counter()
        train_set.set_epoch(epoch)
        sampler.set_epoch(cfg.seed + epoch if cfg.repeated_aug else epoch)  # DistributedSampler adds its seed
        indices = list(sampler)[start_step * cfg.accum_steps * cfg.batch_size:]  # skip batches already done
        loader = DataLoader(train_set, batch_size=cfg.batch_size, sampler=indices, drop_last=True,
                            num_workers=cfg.workers, collate_fn=collate_skip, pin_memory=device.type == "cuda",
                            generator=torch.Generator().manual_seed(cfg.seed + epoch))
        batches = iter(loader)
        model.train()
        bar = _progress(main, epoch, cfg.epochs, steps_per_epoch, start_step)
        t_train, t_saving = time.perf_counter(), 0.0  # throughput excludes checkpoint writes

        def elapsed() -> dict:  # this epoch's stats so far (incl. those before a resume)
            now = time.perf_counter()
            return dict(stats, train_time=stats["train_time"] + now - t_train - t_saving,
                        epoch_time=stats["epoch_time"] + now - t_epoch - t_saving)
        for step in range(start_step, steps_per_epoch):
            # one optimizer step = accum_steps micro-batches
            for micro in range(cfg.accum_steps):
                images, targets, skipped = next(batches)
                stats["skipped"] += skipped
                if images is None:
                    if env.distributed:
                        raise RuntimeError("a whole batch of unreadable images: cannot keep ranks in step")
                    continue
                images, targets = images.to(device, non_blocking=True), targets.to(device, non_blocking=True)
                if mixup is not None:
                    if len(images) % 2:  # a skipped image left an odd batch: mixup pairs samples
                        images, targets = images[:-1], targets[:-1]
                    images, targets = mixup(images, targets)
                if cfg.channels_last:
                    images = images.contiguous(memory_format=torch.channels_last)
                sync = micro == cfg.accum_steps - 1 or not env.distributed
                with (train_model.no_sync() if not sync and hasattr(train_model, "no_sync")
                      else contextlib.nullcontext()):
                    with autocast(device, cfg.amp):
                        loss = criterion(train_model(images), targets)
                    _check_finite(loss, epoch, step, out)
                    loss = loss / cfg.accum_steps
                    (scaler.scale(loss) if scaler is not None else loss).backward()
                stats["loss_sum"] += loss.item() * cfg.accum_steps
                stats["micro_steps"] += 1
                stats["images"] += len(images)
            if scaler is not None:
                scaler.unscale_(optimizer)
            if cfg.clip_grad is not None:
                dispatch_clip_grad(model.parameters(), cfg.clip_grad, mode=cfg.clip_mode)
            if scaler is not None:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            global_step = epoch * steps_per_epoch + step + 1
            scheduler.step_update(num_updates=global_step)
            if ema is not None:
                ema.update(model, step=global_step)
            if bar is not None:
                now = elapsed()
                bar.set_postfix(loss=f"{now['loss_sum'] / max(1, now['micro_steps']):.4f}",
                                lr=f"{optimizer.param_groups[0]['lr']:.2e}",
                                img_s=f"{now['images'] * env.world_size / max(now['train_time'], 1e-9):.0f}")
                bar.update(1)
            if cfg.checkpoint_every_steps and (step + 1) % cfg.checkpoint_every_steps == 0 \
                    and step + 1 < steps_per_epoch:
                t0 = time.perf_counter()
                save(epoch, step + 1, elapsed())
                t_saving += time.perf_counter() - t0
            if on_step is not None and main:
                on_step(epoch, step + 1, steps_per_epoch)
        if bar is not None:
            bar.close()
        stats, t_end_train = elapsed(), time.perf_counter()
        start_step = 0

        # ---- end of epoch: evaluate, log, checkpoint ------------------------------------------
        totals = D.all_reduce_sum(torch.tensor([stats["loss_sum"], stats["micro_steps"], stats["images"],
                                                stats["skipped"]], dtype=torch.float64, device=device)).tolist()
        train_time = D.all_reduce_max(torch.tensor([stats["train_time"]], device=device)).item()  # slowest rank
        kw = dict(device=device, amp=cfg.amp, channels_last=cfg.channels_last)
        val = evaluate(model, val_loader, **kw)
        record = {
            "epoch": epoch + 1,
            "train_loss": totals[0] / max(1.0, totals[1]),
            "val_loss": val["loss"], "val_top1": val["top1"], "val_top5": val["top5"],
            "lr": optimizer.param_groups[0]["lr"],
            "images_per_s": totals[2] / max(train_time, 1e-9),
            "epoch_time_s": stats["epoch_time"] + time.perf_counter() - t_end_train,
            "peak_mem_mb": _peak_mem_mb(device),
            "skipped_images": int(totals[3]) + val["skipped"],
        }
        if ema is not None:
            ev = evaluate(ema.module, val_loader, **kw)
            record.update(ema_val_loss=ev["loss"], ema_val_top1=ev["top1"], ema_val_top5=ev["top5"])
        best_top1 = max(best_top1, record["val_top1"])
        if main:
            _append_jsonl(out / "metrics.jsonl", record)
            history.append(record)
            if writer is not None:
                for k, v in record.items():
                    if k != "epoch":
                        writer.add_scalar(k, v, epoch + 1)
                writer.flush()
            say(_summary_line(record, cfg.epochs))
        stats = _new_stats()
        save(epoch + 1, 0, stats)
        if on_epoch_end is not None and main:
            on_epoch_end(record)

    # ---- export ----------------------------------------------------------------------------------
    if writer is not None:
        writer.close()
    weights = out / "model.safetensors"
    if main:
        save_safetensors(model, weights, {"model": cfg.model, "model_kwargs": json.dumps(cfg.model_kwargs)})
        if ema is not None:
            save_safetensors(ema.module, out / "model_ema.safetensors", {"model": cfg.model})
        say(f"saved {weights}")
    history = D.broadcast_object(history if main else None)
    last = history[-1] if history else {}
    return {
        "best_top1": max((r["val_top1"] for r in history), default=float("nan")),
        "final_top1": last.get("val_top1", float("nan")),
        "final_top5": last.get("val_top5", float("nan")),
        "final_val_loss": last.get("val_loss", float("nan")),
        "history": history,
        "train_time_s": sum(r.get("epoch_time_s", 0.0) for r in history),  # all epochs, resumes included
        "params": n_params,
        "checkpoint": str(out / ckpt.LAST),
        "weights": str(weights),
        "output": str(out),
    }


# ---- helpers (in the order the loop uses them) ------------------------------------------------

def _check_same_run(saved: dict, cfg: TrainConfig, path) -> None:
    """A checkpoint only continues the same model on the same data."""
    for key in ("model", "model_kwargs", "data", "img_size", "max_train_samples", "num_classes"):
        if saved.get(key) != cfg.to_dict()[key]:
            raise ckpt.CheckpointError(f"{path} was saved with {key}={saved.get(key)!r}, this run has "
                                       f"{key}={cfg.to_dict()[key]!r}; use another --output or the same options")


def _default_img_size(name: str) -> int:
    """The input size of a registered model's default config (224 if it has none)."""
    from timm.models import get_pretrained_cfg

    pretrained_cfg = get_pretrained_cfg(name)
    return int(pretrained_cfg.input_size[-1]) if pretrained_cfg is not None else 224


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _train_sampler(dataset, cfg: TrainConfig, env: D.DistEnv):
    """Repeated-augmentation or plain shuffling sampler; its order depends only on seed + epoch."""
    if cfg.repeated_aug:
        from timm.data.distributed_sampler import RepeatAugSampler
        return RepeatAugSampler(dataset, num_replicas=env.world_size, rank=env.rank, shuffle=True,
                                num_repeats=cfg.aug_repeats)
    return DistributedSampler(dataset, num_replicas=env.world_size, rank=env.rank, shuffle=True,
                              seed=cfg.seed, drop_last=True)


def _new_stats() -> dict:
    return {"loss_sum": 0.0, "micro_steps": 0, "images": 0, "skipped": 0, "train_time": 0.0, "epoch_time": 0.0}


def _rewrite_history(path: Path, keep_below: int) -> list[dict]:
    """Records of epochs < keep_below from metrics.jsonl (rewritten atomically without the rest)."""
    records = []
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                r = json.loads(line)
            except json.JSONDecodeError:  # a line cut by a crash
                continue
            if r.get("epoch", 0) <= keep_below:
                records = [x for x in records if x["epoch"] != r["epoch"]] + [r]
    text = "".join(json.dumps(r) + "\n" for r in records)
    with atomic_write(path, "w") as f:
        f.write(text)
    return records


def _progress(main: bool, epoch: int, epochs: int, total: int, initial: int):
    if not main or not sys.stdout.isatty():
        return None
    from tqdm import tqdm
    return tqdm(total=total, initial=initial, desc=f"epoch {epoch + 1}/{epochs}", unit="step",
                dynamic_ncols=True, leave=False)


def _check_finite(loss: torch.Tensor, epoch: int, step: int, out: Path) -> None:
    """Stop every rank together on a NaN/inf loss (the check is all-reduced)."""
    bad = D.all_reduce_sum((~torch.isfinite(loss.detach())).float().reshape(1))
    if bad.item() > 0:
        kept = (f"The last good checkpoint is kept in {out} (resume with --resume auto)."
                if (out / ckpt.LAST).exists() else f"No checkpoint was written to {out} yet.")
        raise NonFiniteLossError(
            f"non-finite loss ({loss.item()}) at epoch {epoch + 1}, step {step + 1}; training stopped. {kept} "
            f"Try a lower --lr, --clip-grad 1.0, or --amp bf16 instead of fp16.")


def _append_jsonl(path: Path, record: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()
        os.fsync(f.fileno())


def _peak_mem_mb(device: torch.device) -> float:
    """Peak CUDA memory allocated on the device, or the process's peak resident memory on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10  # Linux: kB


def _summary_line(r: dict, epochs: int) -> str:
    line = (f"epoch {r['epoch']}/{epochs}  train_loss {r['train_loss']:.4f}  lr {r['lr']:.2e}  "
            f"val_loss {r['val_loss']:.4f}  top1 {r['val_top1']:.2f}%  top5 {r['val_top5']:.2f}%")
    if "ema_val_top1" in r:
        line += f"  ema_top1 {r['ema_val_top1']:.2f}%"
    line += f"  {r['images_per_s']:.0f} img/s  {r['epoch_time_s']:.1f}s  peak {r['peak_mem_mb']:.0f} MB"
    if r["skipped_images"]:
        line += f"  skipped {r['skipped_images']} unreadable images"
    return line
