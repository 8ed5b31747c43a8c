"""Train a model with the paper's recipe (docs/design.md §5) — one CPU, one GPU, or many GPUs and nodes.

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

The loop reads as timm's and nanoGPT's: `setup` (data, model, optimisation, resume), then per
epoch `train_one_epoch` and `end_of_epoch` (evaluate, log, checkpoint), then `finish`. The device
never waits on the host inside an epoch: losses are summed on the device and read once every
`check_finite_every` optimizer steps (the NaN/inf check), before a checkpoint and at the epoch's end.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from spach.engine import checkpoint as ckpt
from spach.engine import distributed as D
from spach.engine.build import build_model, check_model_input, optimizer_kernel_kwargs, pretrained_note
from spach.engine.config import TrainConfig, option_text, settings_language_now
from spach.engine.device import autocast, cuda_math, peak_memory_mb, reset_peak_memory
from spach.engine.evaluate import evaluate
from spach.engine.evidence import write_evidence
from spach.errors import SpachError
from spach.io import atomic_write
from spach.models import count_params, save_safetensors
from spach.rng import get_rng_state, set_rng_state
from spach.runtime import num_threads


class NonFiniteLossError(SpachError):
    """The training loss became NaN or infinite; the run stopped, its last good checkpoint (if any) is kept."""


def train(cfg: TrainConfig, on_epoch_end: Optional[Callable[[dict], None]] = None,
          on_step: Optional[Callable[[int, int, int], None]] = None,
          should_stop: Optional[Callable[[dict], bool]] = None) -> dict:
    """Run (or resume) training as configured; returns the run's summary (on every rank).

    on_epoch_end(record) — rank 0, after each epoch's evaluation; record = {"epoch", "train_loss",
        "val_loss", "val_top1", "val_top5", "lr", "images_per_s", "epoch_time_s", "peak_mem_mb",
        "skipped_images"} (+ "ema_val_*" with an EMA).
    on_step(epoch, step, steps_per_epoch) — rank 0, after each optimizer step (and its step
        checkpoint, if due); `epoch` counts from 0, `step` is the number of steps done in it (1..n).
    should_stop(record) — rank 0, after on_epoch_end, with the same record: True ends the training
        after this epoch, on every rank (e.g. a tuning trial's pruner, `spach.battle.pruning`); after the
        last epoch its answer changes nothing. A run resumed at the end of an epoch asks it again with
        that epoch's record before training on, so a decision to stop outlives a crash.
    peak_mem_mb: this epoch's peak CUDA memory allocated, or on CPU the process's peak resident set
        size (reset each epoch on Linux).
    Returns {"best_top1", "final_top1", "final_top5", "final_val_loss", "history", "train_time_s" (the
             epochs' time, those before a resume included), "params", "checkpoint", "weights", "output",
             "stopped_after" (the epochs trained when should_stop ended the training early, else None)}.
    """
    cfg.validate()
    owns_group = not (torch.distributed.is_available() and torch.distributed.is_initialized())
    with num_threads(cfg.threads):
        env = D.setup(cfg.device)
        try:
            with cuda_math(env.device, cfg.matmul_precision, cfg.cudnn_benchmark):
                run = setup(cfg, env)
                epoch = run.start_epoch
                # a run resumed at the end of an epoch asks again: it may have been told to stop there
                stop = run.start_step == 0 and stop_requested(run, should_stop, epoch)
                while not stop and epoch < cfg.epochs:
                    stats = train_one_epoch(run, epoch, on_step)
                    end_of_epoch(run, epoch, stats, on_epoch_end)
                    epoch += 1
                    stop = stop_requested(run, should_stop, epoch)
                if stop:
                    run.stopped_after = epoch
                return finish(run)
        finally:
            if owns_group:
                D.cleanup()


@dataclass
class TrainingRun:
    """What a training run holds from its set-up to its end (built by `setup`)."""
    cfg: TrainConfig
    env: D.DistEnv
    out: Path
    model: nn.Module                     # the bare model (saved, exported)
    train_model: nn.Module               # what the step calls: DDP and/or compiled
    eval_model: nn.Module                # the model for evaluation (compiled under --compile)
    ema: Any                             # timm ModelEmaV3 or None
    ema_eval_model: Optional[nn.Module]
    optimizer: torch.optim.Optimizer
    scheduler: Any
    loss_scaler: Any                     # timm NativeScaler (fp16) or None
    criterion: nn.Module
    mixup: Any
    sampler: Any                         # spach.data.EpochSampler
    train_loader: Any                    # spach.data.DeviceLoader
    val_loader: Any
    steps_per_epoch: int
    n_params: int
    start_epoch: int = 0
    start_step: int = 0
    best_top1: float = -math.inf
    stats: dict = field(default_factory=lambda: new_stats())
    history: list = field(default_factory=list)
    writer: Any = None
    resumed: bool = False                # continued from a checkpoint
    stopped_after: Optional[int] = None  # epochs trained when `should_stop` ended the training early
    first_loss: Optional[torch.Tensor] = None  # this process's first training loss (on the device, no sync)

    @property
    def say(self) -> Callable[..., None]:
        return print if self.env.is_main else (lambda *a, **k: None)


# ---- set-up ---------------------------------------------------------------------------------------

def setup(cfg: TrainConfig, env: D.DistEnv) -> TrainingRun:
    """Data, model, optimisation and, when resuming, the checkpoint's state: a `TrainingRun` ready to train."""
    out = Path(cfg.output)
    if cfg.amp == "fp16" and env.device.type != "cuda":
        raise ValueError("TrainConfig.amp: 'fp16' needs a CUDA device (loss scaling); on CPU use 'bf16'")
    state, state_path = _checkpoint_to_resume(cfg, out, print if env.is_main else (lambda *a, **k: None))
    train_set, val_set, img_size = _datasets(cfg)
    num_classes = len(train_set.classes)

    from timm.utils import random_seed
    random_seed(cfg.seed)  # same initial weights on every rank and every resume
    model, ema = _model(cfg, env, img_size, num_classes, init=state is None)
    run = _optimisation(cfg, env, out, model, ema, train_set, val_set, num_classes)
    if state is not None:
        _restore(run, state, state_path)
    if env.is_main:
        if state is None and out.is_dir():  # a fresh start never overwrites an earlier run's results
            moved = ckpt.set_aside_results(out)
            if moved is not None:
                run.say(f"{out} held results of an earlier run but no checkpoint to continue: "
                        f"moved the results of an earlier run to {moved}")
        out.mkdir(parents=True, exist_ok=True)
        cfg.to_yaml(out / "config.yaml")
        run.history = _rewrite_history(out / "metrics.jsonl", keep_below=run.start_epoch)
        if cfg.tensorboard:
            from torch.utils.tensorboard import SummaryWriter
            run.writer = SummaryWriter(str(out / "tb"), purge_step=run.start_epoch + 1)
    # per-rank RNG streams for training randomness (mixup, drop path, erasing); restored exactly on resume
    random_seed(cfg.seed, env.rank)
    if state is not None:
        rngs = state["rng"]
        set_rng_state(rngs[env.rank] if len(rngs) == env.world_size else rngs[0])
    global_batch = cfg.batch_size * env.world_size * cfg.accum_steps
    run.say(f"{cfg.model}: {run.n_params / 1e6:.2f}M params, {len(train_set)} train / {len(val_set)} val images "
            f"at {img_size}px, {num_classes} classes; {env.world_size} process(es) on {env.device.type}, "
            f"global batch {global_batch}, lr {run.optimizer.param_groups[0]['lr']:.2e}, "
            f"{run.steps_per_epoch} steps/epoch")
    return run


def _checkpoint_to_resume(cfg: TrainConfig, out: Path, say) -> tuple[Optional[dict], Optional[Path]]:
    """The checkpoint this run continues (resume auto / a path), or (None, None) for a fresh run."""
    state, path = None, None
    if cfg.resume == "auto":
        state, path = ckpt.find_resumable(out) if out.is_dir() else (None, None)
        if state is None:
            say(f"resume auto: no checkpoint in {out}, starting from scratch")
    elif cfg.resume is not None:
        state, path = ckpt.load_checkpoint_file(cfg.resume), Path(cfg.resume)
    elif (out / ckpt.LAST).exists() or (out / ckpt.PREV).exists():
        raise ValueError(f"{out} already holds a checkpoint: pass --resume auto to continue it, "
                         f"or choose another --output")
    if state is not None:
        _check_same_run(state["config"], cfg, path)
    return state, path


def _datasets(cfg: TrainConfig):
    """(train set, val set, image size): uint8 items, normalised and erased later on the device."""
    from spach.data import build_dataset

    img_size = cfg.img_size or _default_img_size(cfg.model)
    data_kw = dict(img_size=img_size, crop_pct=cfg.crop_pct, interpolation=cfg.interpolation, uint8=True)
    aug = dict(auto_augment=cfg.auto_augment, hflip=cfg.hflip, scale=cfg.scale, ratio=cfg.ratio)
    selection = cfg.selection_fraction, cfg.selection_seed  # model selection: evaluate on held-out train images
    train_set = build_dataset(cfg.data, "train", train=cfg.augment, max_samples=cfg.max_train_samples,
                              seed=cfg.seed, selection=(*selection, "fit") if cfg.selection_fraction else None,
                              **data_kw, **(aug if cfg.augment else {}))
    if cfg.selection_fraction:
        val_set = build_dataset(cfg.data, "train", max_samples=cfg.max_train_samples,
                                selection=(*selection, "selection"), **data_kw)
    else:
        val_set = build_dataset(cfg.data, "val", max_samples=cfg.max_val_samples, **data_kw)
    num_classes = len(train_set.classes)
    if cfg.num_classes is not None and cfg.num_classes != num_classes:
        raise ValueError(f"TrainConfig.num_classes: {cfg.num_classes} but the data has {num_classes} classes")
    return train_set, val_set, img_size


def _model(cfg: TrainConfig, env: D.DistEnv, img_size: int, num_classes: int, init: bool):
    """(model on the device, its EMA or None), checked against the input size. `init`: a new run, which
    starts from the pretrained or init_checkpoint weights if asked (each says in one line what it loaded)."""
    say = print if env.is_main else (lambda *a, **k: None)
    model = build_model(cfg.model, num_classes=num_classes, img_size=img_size, model_kwargs=cfg.model_kwargs,
                        drop_path=cfg.drop_path, pretrained=cfg.pretrained and init,
                        pretrained_file=cfg.pretrained_file)
    check_model_input(model, img_size, num_classes)
    if cfg.pretrained and init:
        say(pretrained_note(cfg.model, num_classes, cfg.pretrained_file))
    if cfg.init_checkpoint and init:
        from spach.models import load_for_finetuning
        note = load_for_finetuning(model, cfg.init_checkpoint)
        if note:
            say(note)
    if cfg.grad_checkpointing:
        model.set_grad_checkpointing(True)
    model.to(env.device)
    if cfg.channels_last:
        model.to(memory_format=torch.channels_last)
    ema = None
    if cfg.model_ema:
        from timm.utils import ModelEmaV3
        ema = ModelEmaV3(model, decay=cfg.model_ema_decay)
    return model, ema


def _optimisation(cfg: TrainConfig, env: D.DistEnv, out: Path, model: nn.Module, ema, train_set, val_set,
                  num_classes: int) -> TrainingRun:
    """Optimizer, schedule, loss scaling, loss, mixup, loaders and the wrapped models: a fresh `TrainingRun`."""
    from timm.data import Mixup
    from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
    from timm.optim import create_optimizer_v2
    from timm.scheduler import create_scheduler_v2
    from timm.utils import NativeScaler

    global_batch = cfg.batch_size * env.world_size * cfg.accum_steps
    lr = cfg.lr if cfg.lr is not None else cfg.base_lr * global_batch / 512
    optimizer = create_optimizer_v2(model, opt=cfg.opt, lr=lr, weight_decay=cfg.weight_decay,
                                    eps=cfg.opt_eps, momentum=cfg.momentum, **optimizer_kernel_kwargs(cfg.opt))
    sampler, train_loader, val_loader, steps = _loaders(cfg, env, train_set, val_set)
    scheduler, _ = create_scheduler_v2(
        optimizer, sched=cfg.sched, step_on_epochs=False, updates_per_epoch=1,
        num_epochs=max(1, round((cfg.epochs - cfg.cooldown_epochs) * steps)),
        warmup_epochs=round(cfg.warmup_epochs * steps), warmup_lr=cfg.warmup_lr, min_lr=cfg.min_lr)
    mixup, criterion = None, nn.CrossEntropyLoss()
    if cfg.mixup_active:
        mixup = Mixup(mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix, prob=cfg.mixup_prob,
                      switch_prob=cfg.mixup_switch_prob, mode=cfg.mixup_mode,
                      label_smoothing=cfg.smoothing, num_classes=num_classes)
        criterion = SoftTargetCrossEntropy()
    elif cfg.smoothing > 0:
        criterion = LabelSmoothingCrossEntropy(cfg.smoothing)
    train_model = DDP(model, device_ids=[env.device.index] if env.device.type == "cuda" else None) \
        if env.distributed else model
    compile_ = torch.compile if cfg.compile else (lambda m: m)
    return TrainingRun(cfg=cfg, env=env, out=out, model=model, train_model=compile_(train_model),
               eval_model=compile_(model), ema=ema,
               ema_eval_model=compile_(ema.module) if ema is not None else None,
               optimizer=optimizer, scheduler=scheduler,
               loss_scaler=NativeScaler("cuda") if cfg.amp == "fp16" else None,
               criterion=criterion, mixup=mixup, sampler=sampler, train_loader=train_loader,
               val_loader=val_loader, steps_per_epoch=steps, n_params=count_params(model))


def _loaders(cfg: TrainConfig, env: D.DistEnv, train_set, val_set):
    """(epoch sampler, train loader, val loader, optimizer steps per epoch): persistent workers,
    uint8 batches normalised (and, in training, random-erased) on the device."""
    from spach.data import DeviceLoader, EpochSampler, make_loader

    base = _train_sampler(train_set, cfg, env)
    steps = len(base) // cfg.batch_size // cfg.accum_steps
    if steps < 1:
        raise ValueError(f"TrainConfig.batch_size: {len(train_set)} training images give "
                         f"{len(base)} per process per epoch, fewer than one optimizer step of "
                         f"batch_size {cfg.batch_size} x accum_steps {cfg.accum_steps}")
    sampler = EpochSampler(base, length=steps * cfg.accum_steps * cfg.batch_size)
    on_device = dict(channels_last=cfg.channels_last)
    erasing = dict(reprob=cfg.reprob, remode=cfg.remode, recount=cfg.recount) if cfg.augment else {}
    train_loader = DeviceLoader(make_loader(train_set, batch_size=cfg.batch_size, sampler=sampler,
                                            workers=cfg.workers, device=env.device, seed=cfg.seed, drop_last=True),
                                env.device, **erasing, **on_device)
    val_loader = DeviceLoader(make_loader(val_set, batch_size=cfg.batch_size, workers=cfg.workers,
                                          sampler=D.ShardSampler(len(val_set), *D.world()), device=env.device),
                              env.device, **on_device)
    return sampler, train_loader, val_loader, steps


def _restore(run: TrainingRun, state: dict, path: Path) -> None:
    """Load a checkpoint's model, EMA, optimizer, scaler and position into `run`."""
    try:
        run.model.load_state_dict(state["model"])
        if run.ema is not None:  # (an EMA switched on at resume starts from the current weights)
            run.ema.module.load_state_dict(state.get("model_ema") or state["model"])
        run.optimizer.load_state_dict(state["optimizer"])
    except (RuntimeError, ValueError, KeyError) as e:
        raise ckpt.CheckpointError(f"{path} does not fit this model/config: {e}") from None
    if run.loss_scaler is not None and state.get("scaler"):
        run.loss_scaler.load_state_dict(state["scaler"])
    position, steps = state["position"], run.steps_per_epoch
    run.start_epoch, run.start_step, run.resumed = position["epoch"], position["step"], True
    run.best_top1 = state.get("best_top1", -math.inf)
    run.stats = new_stats(**(state.get("epoch_stats") or {}))
    if run.start_step and position.get("steps_per_epoch") != steps:
        warnings.warn(f"{path}: steps per epoch changed ({position.get('steps_per_epoch')} -> {steps}: other "
                      f"batch size or process count); epoch {run.start_epoch + 1} restarts from its first step",
                      stacklevel=3)
        run.start_step, run.stats = 0, new_stats()
    # the lr schedule is a function of the config and the update count: rebuilt, not loaded, so a
    # resumed run may change e.g. --epochs (the saved "scheduler" state is for inspection)
    run.scheduler.step_update(num_updates=run.start_epoch * steps + run.start_step)
    run.say(f"resumed from {path} at epoch {run.start_epoch + 1}, step {run.start_step}")


# ---- one epoch ------------------------------------------------------------------------------------

def train_one_epoch(run: TrainingRun, epoch: int, on_step=None) -> dict:
    """The optimizer steps of `epoch` (from `run.start_step` after a resume); returns the epoch's stats."""
    cfg, env = run.cfg, run.env
    reset_peak_memory(env.device)
    stats, start = run.stats, run.start_step
    stats["loss_sum"] = stats["loss_sum"].to(env.device)
    clock = EpochClock(stats)
    run.sampler.set_epoch(epoch, skip=start * cfg.accum_steps * cfg.batch_size,
                          base_epoch=cfg.seed + epoch if cfg.repeated_aug else epoch)  # DistributedSampler adds its seed
    batches = iter(run.train_loader)
    run.model.train()
    bar = _progress(env.is_main, epoch, cfg.epochs, run.steps_per_epoch, start)
    for step in range(start, run.steps_per_epoch):
        for micro in range(cfg.accum_steps):
            forward_backward(run, next(batches), stats, update=micro == cfg.accum_steps - 1)
        global_step = epoch * run.steps_per_epoch + step + 1
        run.scheduler.step_update(num_updates=global_step)
        if run.ema is not None:
            run.ema.update(run.model, step=global_step)
        save_due = bool(cfg.checkpoint_every_steps) and (step + 1) % cfg.checkpoint_every_steps == 0 \
            and step + 1 < run.steps_per_epoch
        if save_due or (cfg.check_finite_every and (step + 1 - start) % cfg.check_finite_every == 0):
            loss = check_finite(run, stats, epoch, step)
            if bar is not None:
                bar.set_postfix(loss=f"{loss:.4f}", lr=f"{run.optimizer.param_groups[0]['lr']:.2e}",
                                img_s=f"{stats['images'] * env.world_size / max(clock.train_time(), 1e-9):.0f}")
        if bar is not None:
            bar.update(1)
        if save_due:
            with clock.paused():  # throughput excludes checkpoint writes
                save(run, epoch, step + 1, clock.stats())
        if on_step is not None and env.is_main:
            on_step(epoch, step + 1, run.steps_per_epoch)
    check_finite(run, stats, epoch, run.steps_per_epoch - 1)  # also waits for the device: the clock is true
    if bar is not None:
        bar.close()
    run.start_step = 0
    return clock.stats(done_training=True)


def forward_backward(run: TrainingRun, batch, stats: dict, update: bool) -> None:
    """One micro-batch: forward, loss, backward; with `update`, the optimizer step (clipped, scaled).

    The loss is added to `stats["loss_sum"]` on the device: no host sync here."""
    cfg, env = run.cfg, run.env
    images, targets, skipped = batch
    stats["skipped"] += skipped
    if images is None:
        if env.distributed:
            raise SpachError("a whole batch of unreadable images: cannot keep ranks in step")
        return
    if run.mixup is not None:
        if len(images) % 2:  # a skipped image left an odd batch: mixup pairs samples
            images, targets = images[:-1], targets[:-1]
        images, targets = run.mixup(images, targets)
    sync_grads = update or not env.distributed
    with (run.train_model.no_sync() if not sync_grads and hasattr(run.train_model, "no_sync")
          else contextlib.nullcontext()):
        with autocast(env.device, cfg.amp):
            loss = run.criterion(run.train_model(images), targets)
        stats["loss_sum"] += loss.detach().double()
        if run.first_loss is None:  # kept to tell a model that is non-finite from the start (check_finite)
            run.first_loss = loss.detach().double().reshape(1)
        _backward_and_step(run, loss / cfg.accum_steps, update)
    stats["micro_steps"] += 1
    stats["images"] += len(images)


def _backward_and_step(run: TrainingRun, loss: torch.Tensor, update: bool) -> None:
    """Backward; on the last micro-batch of a step, clip, step and zero the gradients (timm's way)."""
    cfg = run.cfg
    if run.loss_scaler is not None:  # fp16: scaled loss, unscaled before clipping, skipped steps on inf
        run.loss_scaler(loss, run.optimizer, clip_grad=cfg.clip_grad, clip_mode=cfg.clip_mode,
                        parameters=run.model.parameters(), need_update=update)
    else:
        loss.backward()
        if update:
            if cfg.clip_grad is not None:
                from timm.utils import dispatch_clip_grad
                dispatch_clip_grad(run.model.parameters(), cfg.clip_grad, mode=cfg.clip_mode)
            run.optimizer.step()
    if update:
        run.optimizer.zero_grad(set_to_none=True)


def check_finite(run: TrainingRun, stats: dict, epoch: int, step: int) -> float:
    """The one host sync of training: every rank's loss sum so far, all-reduced; stop every rank
    together if any is NaN/inf. Returns the mean loss of the epoch so far (all ranks)."""
    local = stats["loss_sum"].reshape(1)
    first = run.first_loss if run.first_loss is not None else torch.zeros(1, dtype=torch.float64, device=local.device)
    total = D.all_reduce_sum(torch.cat([(~torch.isfinite(local)).double(), local.nan_to_num(0.0, 0.0, 0.0),
                                        torch.tensor([float(stats["micro_steps"])], dtype=torch.float64,
                                                     device=local.device),
                                        (~torch.isfinite(first)).double()]))
    bad, loss_sum, micro, first_bad = total.tolist()
    if bad:
        raise NonFiniteLossError(non_finite_message(run, epoch, step, from_first_step=bool(first_bad)))
    return loss_sum / max(1.0, micro)


def non_finite_message(run: TrainingRun, epoch: int, step: int, from_first_step: bool) -> str:
    """What went wrong, what is kept, and advice that fits the run: its own settings, named as the user sets
    them (`--lr` for `spach train`, `recipe: {lr}` in a study file: `config.settings_language`)."""
    cfg = run.cfg
    every = cfg.check_finite_every
    where = f"step {step + 1}" if every <= 1 else f"step {step + 1} (checked every {every} steps)"
    resume = ("`spach battle ... --retry-failed` continues from it" if settings_language_now() == "study"
              else f"resume with {option_text(resume='auto')}")
    kept = (f"The last good checkpoint is kept in {run.out} ({resume})."
            if (run.out / ckpt.LAST).exists() else f"No checkpoint was written to {run.out} yet.")
    if from_first_step:
        first = "first step" + (" after resuming" if run.resumed else "")
        return (f"non-finite loss (nan or inf) at epoch {epoch + 1}, {where}; training stopped. {kept} The loss "
                f"was already non-finite at the {first}, before the weights had changed: the model itself (its "
                "forward pass, e.g. a plugin mixer) or the data produces nan/inf, so a lower learning rate will not "
                "help; run the model on one batch to find where it appears.")
    lr = run.optimizer.param_groups[0].get("initial_lr", run.optimizer.param_groups[0]["lr"])
    advice = [f"a lower learning rate ({option_text(lr=float(f'{lr / 10:.3g}'))}; it is {lr:.3g})"]
    if cfg.clip_grad is None:
        advice.append(f"gradient clipping ({option_text(clip_grad=1.0)})")
    if cfg.amp == "fp16":
        advice.append(f"bf16 instead of fp16 autocast ({option_text(amp='bf16')}), whose range does not overflow")
    elif cfg.amp == "bf16":
        advice.append(f"full precision ({option_text(amp='none')}) to rule bf16 out")
    return (f"non-finite loss (nan or inf) at epoch {epoch + 1}, {where}; training stopped. {kept} "
            f"Try {', or '.join(advice)}.")


class EpochClock:
    """An epoch's training and total time, without checkpoint writes, continued across a resume."""

    def __init__(self, stats: dict):
        self.stats_ = stats
        self.t0, self.excluded, self.t_train_end = time.perf_counter(), 0.0, None

    @contextlib.contextmanager
    def paused(self):
        t = time.perf_counter()
        try:
            yield
        finally:
            self.excluded += time.perf_counter() - t

    def train_time(self) -> float:
        end = self.t_train_end or time.perf_counter()
        return self.stats_["train_time"] + end - self.t0 - self.excluded

    def stats(self, done_training: bool = False) -> dict:
        """The stats with the times so far (`done_training`: the training part ends now)."""
        if done_training:
            self.t_train_end = time.perf_counter()
        now = time.perf_counter()
        return dict(self.stats_, train_time=self.train_time(),
                    epoch_time=self.stats_["epoch_time"] + now - self.t0 - self.excluded)


def new_stats(loss_sum: float = 0.0, **counts) -> dict:
    """An epoch's running sums; the loss sum lives on the device until read."""
    stats = {"loss_sum": torch.tensor(float(loss_sum), dtype=torch.float64), "micro_steps": 0, "images": 0,
             "skipped": 0, "train_time": 0.0, "epoch_time": 0.0}
    stats.update(counts)
    return stats


# ---- end of epoch ------------------------------------------------------------------------------

def end_of_epoch(run: TrainingRun, epoch: int, stats: dict, on_epoch_end=None) -> None:
    """Evaluate (and the EMA), log a record (metrics.jsonl, TensorBoard, a line), checkpoint; after the last
    epoch also the per-example evidence (OUT/evidence.npz, `spach.engine.evidence`)."""
    cfg, env, t_eval = run.cfg, run.env, time.perf_counter()
    totals = D.all_reduce_sum(torch.stack([stats["loss_sum"].to(env.device)] + [
        torch.tensor(float(stats[k]), dtype=torch.float64, device=env.device)
        for k in ("micro_steps", "images", "skipped")])).tolist()
    train_time = D.all_reduce_max(torch.tensor([stats["train_time"]], device=env.device)).item()  # slowest rank
    kw = dict(device=env.device, amp=cfg.amp, channels_last=cfg.channels_last)
    last = epoch + 1 == cfg.epochs
    val = evaluate(run.eval_model, run.val_loader, predictions=last, **kw)
    if last and env.is_main and val["predictions"] is not None:  # before the checkpoint that ends the run
        write_evidence(run.out, val["predictions"], val["targets"])
    record = {
        "epoch": epoch + 1,
        "train_loss": totals[0] / max(1.0, totals[1]),
        "val_loss": val["loss"], "val_top1": val["top1"], "val_top5": val["top5"],
        "lr": run.optimizer.param_groups[0]["lr"],
        "images_per_s": totals[2] / max(train_time, 1e-9),
        "epoch_time_s": stats["epoch_time"] + time.perf_counter() - t_eval,
        "peak_mem_mb": peak_memory_mb(env.device),
        "skipped_images": int(totals[3]) + val["skipped"],
    }
    if run.ema is not None:
        ev = evaluate(run.ema_eval_model, run.val_loader, **kw)
        record.update(ema_val_loss=ev["loss"], ema_val_top1=ev["top1"], ema_val_top5=ev["top5"])
    run.best_top1 = max(run.best_top1, record["val_top1"])
    if env.is_main:
        _append_jsonl(run.out / "metrics.jsonl", record)
        run.history.append(record)
        if run.writer is not None:
            for k, v in record.items():
                if k != "epoch":
                    run.writer.add_scalar(k, v, epoch + 1)
            run.writer.flush()
        run.say(_summary_line(record, cfg.epochs))
    run.stats = new_stats()
    save(run, epoch + 1, 0, run.stats)
    if on_epoch_end is not None and env.is_main:
        on_epoch_end(record)


def stop_requested(run: TrainingRun, should_stop: Optional[Callable[[dict], bool]], done: int) -> bool:
    """Whether to end the training after `done` epochs: `should_stop` asked on rank 0 with the last epoch's
    record, its answer sent to every rank so that all stop together. False without a hook, before the
    first epoch, and after the last one (nothing is left to stop)."""
    if should_stop is None or done == 0:
        return False
    answer = bool(should_stop(run.history[-1])) if run.env.is_main and run.history else False
    return bool(D.broadcast_object(answer)) and done < run.cfg.epochs


def save(run: TrainingRun, epoch: int, step: int, stats: dict) -> None:
    """Checkpoint the run at (epoch, step) with every rank's RNG state (written by rank 0)."""
    rngs = D.all_gather_objects(get_rng_state())  # every rank's RNG, collected on all ranks
    if not run.env.is_main:
        return
    ema = run.ema
    ckpt.save_checkpoint({
        "model": run.model.state_dict(),
        "model_ema": ema.module.state_dict() if ema is not None else None,
        "optimizer": run.optimizer.state_dict(),
        "scheduler": run.scheduler.state_dict(),
        "scaler": run.loss_scaler.state_dict() if run.loss_scaler is not None else None,
        "position": {"epoch": epoch, "step": step, "global_step": epoch * run.steps_per_epoch + step,
                     "steps_per_epoch": run.steps_per_epoch},
        "epoch_stats": dict(stats, loss_sum=float(stats["loss_sum"])),
        "best_top1": run.best_top1,
        "rng": rngs,
        "config": run.cfg.to_dict(),
    }, run.out)


def finish(run: TrainingRun) -> dict:
    """Export the weights (and the EMA's) as safetensors; the run's summary on every rank."""
    cfg, out = run.cfg, run.out
    if run.writer is not None:
        run.writer.close()
    weights = out / "model.safetensors"
    if run.env.is_main:
        save_safetensors(run.model, weights, {"model": cfg.model, "model_kwargs": json.dumps(cfg.model_kwargs)})
        if run.ema is not None:
            save_safetensors(run.ema.module, out / "model_ema.safetensors", {"model": cfg.model})
        run.say(f"saved {weights}")
    history = D.broadcast_object(run.history if run.env.is_main else None)
    last = history[-1] if history else {}
    return {
        "best_top1": max((r["val_top1"] for r in history), default=float("nan")),
        "final_top1": last.get("val_top1", float("nan")),
        "final_top5": last.get("val_top5", float("nan")),
        "final_val_loss": last.get("val_loss", float("nan")),
        "history": history,
        "train_time_s": sum(r.get("epoch_time_s", 0.0) for r in history),  # all epochs, resumes included
        "params": run.n_params,
        "checkpoint": str(out / ckpt.LAST),
        "weights": str(weights),
        "output": str(out),
        "stopped_after": run.stopped_after,
    }


# ---- small helpers ----------------------------------------------------------------------------------

def _check_same_run(saved: dict, cfg: TrainConfig, path) -> None:
    """A checkpoint only continues the same model on the same data."""
    defaults = {"selection_fraction": None, "selection_seed": 0}  # checkpoints written before these options
    for key in ("model", "model_kwargs", "data", "img_size", "max_train_samples", "num_classes", *defaults):
        if saved.get(key, defaults.get(key)) != cfg.to_dict()[key]:
            raise ckpt.CheckpointError(f"{path} was saved with {key}={saved.get(key)!r}, this run has "
                                       f"{key}={cfg.to_dict()[key]!r}; use another --output or the same options")


def _default_img_size(name: str) -> int:
    """The input size of a registered model's default config (224 if it has none)."""
    from timm.models import get_pretrained_cfg

    pretrained_cfg = get_pretrained_cfg(name)
    return int(pretrained_cfg.input_size[-1]) if pretrained_cfg is not None else 224


def _train_sampler(dataset, cfg: TrainConfig, env: D.DistEnv):
    """Repeated-augmentation or plain shuffling sampler; its order depends only on seed + epoch."""
    from torch.utils.data import DistributedSampler

    if cfg.repeated_aug:
        from timm.data.distributed_sampler import RepeatAugSampler
        return RepeatAugSampler(dataset, num_replicas=env.world_size, rank=env.rank, shuffle=True,
                                num_repeats=cfg.aug_repeats)
    return DistributedSampler(dataset, num_replicas=env.world_size, rank=env.rank, shuffle=True,
                              seed=cfg.seed, drop_last=True)


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


def _append_jsonl(path: Path, record: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()
        os.fsync(f.fileno())


def _summary_line(r: dict, epochs: int) -> str:
    line = (f"epoch {r['epoch']}/{epochs}  train_loss {r['train_loss']:.4f}  lr {r['lr']:.2e}  "
            f"val_loss {r['val_loss']:.4f}  top1 {r['val_top1']:.2f}%  top5 {r['val_top5']:.2f}%")
    if "ema_val_top1" in r:
        line += f"  ema_top1 {r['ema_val_top1']:.2f}%"
    line += f"  {r['images_per_s']:.0f} img/s  {r['epoch_time_s']:.1f}s  peak {r['peak_mem_mb']:.0f} MB"
    if r["skipped_images"]:
        line += f"  skipped {r['skipped_images']} unreadable images"
    return line
