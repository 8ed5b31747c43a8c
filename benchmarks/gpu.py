#!/usr/bin/env python
"""GPU readiness (`make bench-gpu`): the zoo's bf16 inference and a bf16 training of the MS-S models, with MFU.

1. Inference: every zoo model in bf16 (weights cast) at batch 256, channels-last,
   through `spach.bench.measure_throughput`.
2. Training: `--steps` (200) optimizer steps of each MS-S model on synthetic
   data — bf16 autocast, channels-last, `torch.compile`, fused AdamW — timed
   after the compile/warm-up steps.

Images/s and MFU (achieved FLOP/s ÷ the device's dense bf16 peak from
`spach.accelerators.DENSE_PEAKS_TFLOPS`; 2·MACs per image for inference, 3× that for a
training step). Without CUDA it says so and exits 0. `--device cpu` runs the
same code on the CPU (for its test: tiny models, a few steps).

    python benchmarks/gpu.py --json benchmarks/results-gpu.json
    python benchmarks/gpu.py --device cpu --models test_resnet --batch 2 --img-size 32 --steps 2 --no-compile
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import torch
import torch.nn.functional as F

import spach  # noqa: F401  (registers the zoo)
from spach.bench import create_model, cuda_mfu, measure_throughput, resolve_models
from spach.engine.build import optimizer_kernel_kwargs
from spach.io import atomic_write
from spach.models import count_macs
from spach.timing import check_device, machine_info, sync

MS_S = ["spach_ms_s_patch4_224_conv", "spach_ms_s_patch4_224_attn", "spach_ms_s_patch4_224_mlp",
        "spach_ms_s_patch4_224_hybrid"]


def bf16_mfu(device: torch.device, achieved_flops_per_s: float) -> float | None:
    """Model FLOPs utilisation of bf16 work against the device's dense peak (None on CPU or an unknown GPU)."""
    return cuda_mfu(achieved_flops_per_s, "bf16")["mfu"] if device.type == "cuda" else None


def train_throughput(name: str, steps: int, batch: int, img_size: int, device: torch.device,
                     compile_model: bool = True, compile_backend: str = "inductor", warmup: int = 10) -> dict:
    """Images/s of `steps` bf16-autocast training steps (channels-last, fused AdamW) on synthetic data."""
    model = create_model(name, img_size).to(device).to(memory_format=torch.channels_last).train()
    macs = float(count_macs(model, img_size))
    step_model = torch.compile(model, backend=compile_backend) if compile_model else model
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, **optimizer_kernel_kwargs("adamw"))
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, img_size, img_size, generator=gen).to(device).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, model.num_classes, (batch,), generator=gen).to(device)

    def step():
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = F.cross_entropy(step_model(x), y)
        loss.backward()
        opt.step()
        return loss

    start = time.perf_counter()
    for _ in range(warmup):  # includes the compilation
        step()
    sync(device)
    warm_s = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(steps):
        loss = step()
    sync(device)
    seconds = time.perf_counter() - start
    images_per_s = steps * batch / seconds
    achieved = 3 * 2 * macs * images_per_s
    return {"model": name, "mode": "train", "steps": steps, "batch": batch, "img_size": img_size,
            "compile": compile_backend if compile_model else None, "warmup_s": warm_s,
            "images_per_s": images_per_s, "achieved_tflops": achieved / 1e12,
            "mfu": bf16_mfu(device, achieved), "final_loss": loss.item()}


def infer_throughput(name: str, batch: int, img_size: int, device: torch.device, repeats: int = 20) -> dict:
    """Images/s of bf16 inference (weights cast, channels-last) and its MFU."""
    model = create_model(name, img_size)
    macs = float(count_macs(model, img_size))
    res = measure_throughput(model, batch_size=batch, img_size=img_size, dtype="bf16", mode="infer",
                             device=device.type, channels_last=True, warmup=5, repeats=repeats)
    achieved = 2 * macs * res["images_per_s"]
    return {"model": name, "mode": "infer", "batch": batch, "img_size": img_size,
            "images_per_s": res["images_per_s"], "achieved_tflops": achieved / 1e12,
            "mfu": bf16_mfu(device, achieved)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--models", nargs="+", default=["zoo"], help="inference models (default: the zoo)")
    parser.add_argument("--train-models", nargs="+", default=MS_S, help="training models (default: MS-S)")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--no-compile", action="store_true", help="train without torch.compile")
    parser.add_argument("--compile-backend", default="inductor")
    parser.add_argument("--json", default=None, help="write the results as JSON (atomically)")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("bench-gpu: no CUDA device here; nothing to measure (run it on a GPU machine)")
        return 0
    device = check_device(args.device)
    rows = []
    for name in resolve_models(args.models):
        rows.append(infer_throughput(name, args.batch, args.img_size, device))
        _print(rows[-1])
    for name in resolve_models(args.train_models):
        rows.append(train_throughput(name, args.steps, args.batch, args.img_size, device,
                                     compile_model=not args.no_compile, compile_backend=args.compile_backend))
        _print(rows[-1])
    if args.json:
        with atomic_write(args.json, "w") as f:
            json.dump({"meta": {**machine_info(), "args": vars(args)}, "rows": rows}, f, indent=2)
    return 0


def _print(row: dict) -> None:
    mfu = f"{100 * row['mfu']:.1f}% MFU" if row["mfu"] is not None else "MFU n/a (no peak for this device)"
    print(f"{row['model']:40s} {row['mode']:5s} {row['images_per_s']:9.1f} img/s  "
          f"{row['achieved_tflops']:7.2f} TFLOP/s  {mfu}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
