"""Execute one run: train it through the engine (continuing from its checkpoint), count its parameters and
MACs, measure its inference throughput, and record the outcome in the study database.

Every launcher executes runs through these functions: in the coordinator's process and in local worker
processes (`execute_run`, which writes the database), in Slurm and Ray jobs (`train_and_measure`, which
does not: the job writes its result file, see `spach.battle.jobfiles`).
"""
from __future__ import annotations

import contextlib
import json
import os
import time
import traceback
from pathlib import Path
from typing import Any, Callable

from spach.battle import db
from spach.battle.progress import Progress, done_detail, error_line
from spach.battle.threads import threads_per_run


def build_run_model(config: dict[str, Any]):
    """The run's model, built exactly as the engine builds it for training (3-channel input), and its img_size."""
    from spach.data import open_source
    from spach.engine.build import build_model

    train = config["train"]
    # the train split's classes (the same as val's): a tuning trial never opens the validation split
    num_classes = train.get("num_classes") or len(open_source(train["data"], "train").classes)
    img_size = int(train["img_size"])
    return build_model(config["model"], num_classes=num_classes, img_size=img_size,
                       model_kwargs=config["model_kwargs"]), img_size


def count_run(config: dict[str, Any]) -> dict[str, Any]:
    """Params and MACs of a run's architecture at the study's input size."""
    from spach.models import count_macs, count_params

    model, img_size = build_run_model(config)
    return {"params": int(count_params(model)), "macs": int(count_macs(model, img_size, in_chans=3))}


def measure_speed(config: dict[str, Any], threads: int | None) -> float:
    """Inference images/s of a run's architecture at the study's `measure` settings.

    By the Swin protocol (eval mode, `warmup` untimed passes, the mean of `repeats` timed ones),
    on CUDA with cuDNN autotuning and TF32 matmuls as in training.
    """
    from spach.bench import measure_throughput
    from spach.engine.device import cuda_math

    m = config["measure"]
    model, img_size = build_run_model(config)
    device = m.get("device", "cpu")
    threads = threads_per_run(threads, measure=m["threads"], machine=False)  # None: torch's current count
    with cuda_math(device):
        speed = measure_throughput(model, batch_size=m["batch_size"], img_size=img_size, dtype=m["dtype"],
                                   threads=threads, mode="infer", warmup=m["warmup"],
                                   repeats=m["repeats"], device=device, protocol="swin")
    return float(speed["images_per_s"])


def train_and_measure(config: dict[str, Any], output_dir: str | Path, threads: int | None,
                      on_epoch_end: Callable[[dict], None] | None = None,
                      on_step: Callable[[int, int, int], None] | None = None,
                      speed_now: bool = True) -> tuple[dict[str, Any], list[dict]]:
    """Train a run (continuing from its checkpoint, if any) and measure it: (metrics, per-epoch history).

    `config` is the run's resolved configuration (its `config` column). The engine's own lines go to
    OUTPUT/train.log. Under torch.distributed only rank 0 measures; other ranks get ({}, history).
    `speed_now=False` leaves the inference throughput to the study's quiet phase (`measure_speeds`):
    local runs share the cores with other runs' training; a Slurm job has its node to itself.
    A tuning trial with a pruner (``config["prune"]``) reports each epoch to its Optuna trial, and may be
    stopped after one (`spach.battle.pruning`): its metrics' `pruned_after` is then the epochs it trained.
    """
    from spach.engine import TrainConfig, train
    from spach.engine.config import settings_language
    from spach.engine.distributed import process_rank
    from spach.models.registry import import_plugins

    import_plugins(config.get("plugins") or [])  # the study's own mixers (a worker or Slurm job imports them anew)
    cfg_dict = dict(config["train"], output=str(output_dir), resume="auto", threads=threads)
    should_stop = None
    if config.get("prune"):
        from spach.battle.pruning import TrialPruning
        should_stop = TrialPruning(config["prune"], output_dir)
    t0 = time.time()
    Path(output_dir).mkdir(parents=True, exist_ok=True)
    # the engine's own lines go to the run's log; the study's progress stays readable
    # the engine's errors name options as the study file does (recipe: {lr: ...}), not as spach train's flags
    with open(Path(output_dir) / "train.log", "a") as log, contextlib.redirect_stdout(log), \
            settings_language("study"):
        result = train(TrainConfig.from_dict(cfg_dict), on_epoch_end=on_epoch_end, on_step=on_step,
                       should_stop=should_stop)
    train_time = time.time() - t0
    history = result.get("history") or []
    if process_rank() != 0:
        return {}, history
    metrics = count_run(config)
    if speed_now:
        metrics["images_per_s"] = measure_speed(config, threads)
    metrics.update(best_top1=result.get("best_top1"), final_top1=result.get("final_top1"),
                   final_top5=result.get("final_top5"), final_val_loss=result.get("final_val_loss"),
                   final_train_loss=(history[-1] if history else {}).get("train_loss"),
                   train_time_s=result.get("train_time_s", train_time),  # resumed runs: all epochs
                   pruned_after=result.get("stopped_after"))
    return metrics, history


def execute_run(out_dir: str | Path, key: str, threads: int | None = None,
                progress: Progress | None = None, index: int = 1) -> bool:
    """Train and measure one run of the database; record the outcome. Returns True if it is done.

    Under torchrun only rank 0 writes to the database and measures.
    """
    from spach.engine.distributed import process_rank

    rank = process_rank()
    conn = db.connect(out_dir)
    row = db.get_run(conn, key)
    config = json.loads(row["config"])
    epochs = config["train"].get("epochs")
    name = row["name"]
    if rank == 0:
        db.mark_running(conn, key, os.getpid())
        if progress:
            progress.run_started(name, epochs, index)
    cpu_clock = [time.process_time()]  # this process's CPU time, all its threads

    def on_epoch_end(record: dict[str, Any]) -> None:
        if rank == 0:
            db.record_epoch(conn, key, record)
            db.add_cpu_time(conn, key, time.process_time() - cpu_clock[0])
            cpu_clock[0] = time.process_time()
            if progress:
                progress.epoch_done(name, record, epochs)

    def on_step(epoch: int, step: int, steps: int) -> None:
        if rank == 0 and progress:
            progress.step(name, epoch, step, steps, epochs)

    try:
        # throughput: later, one run at a time, in the quiet phase (measure_speeds)
        metrics, history = train_and_measure(config, row["output_dir"], threads, on_epoch_end, on_step,
                                             speed_now=False)
        if rank != 0:
            conn.close()
            return True
        for record in history:
            db.record_epoch(conn, key, record)  # complete curves, also for epochs trained before a resume
    except Exception as e:  # a failing run never stops the study
        if rank == 0:
            error = f"{type(e).__name__}: {e}\n" + "".join(traceback.format_exc(limit=8))
            db.mark_failed(conn, key, error)
            if progress:
                progress.run_finished(name, False, error_line(error))
        conn.close()
        return False
    db.mark_done(conn, key, metrics)
    conn.close()
    if progress:
        progress.run_finished(name, True, done_detail(
            metrics, epochs, f" (best {metrics['best_top1']:.2f}%), {metrics['params'] / 1e6:.3f}M params, "
                             f"{metrics['train_time_s']:.0f}s"))
    return True
