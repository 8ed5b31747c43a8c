#!/usr/bin/env python
"""One training step of the original release's block maths vs spach's, on the same weights, side by side.

The original SPACH code keeps tokens as ``B×N×C`` and goes through layout
copies for every spatial op: the depthwise conv (CPE and the conv mixer) and
the downsampling read ``x.transpose(1, 2).reshape(B, C, H, W)`` and flatten
back; the token-mixing MLP transposes to ``B×C×N``, runs ``nn.Linear`` over the
tokens and transposes back; attention is the explicit softmax(q·kᵀ)·v; the
optimizer is ``torch.optim.AdamW`` as the original's timm built it (the
per-parameter loop on CPU). `original_forward` below re-states that maths
(a plain reference, not library code) on the parameters of a spach model, so
both steps train the very same weights; the reference's logits are checked
against spach's before anything is timed.

Each repeat times one step of each, alternately (same load on a shared
machine for both); the ratio uses the medians. One more profiled step of each
gives the seconds spent inside matrix products (GEMMs and the fused attention
kernel): spach's step cannot take less than those, so original seconds / spach's
matrix-product seconds bounds what any other work can gain. On an oversubscribed machine
(load average above the core count) wall-clock times mostly measure the other
processes: `--clock cpu` times this process's CPU seconds instead
(`time.process_time`), which at `--threads 1` counts the work itself.

    python benchmarks/original_step.py --threads 2 --repeats 5
    python benchmarks/original_step.py --threads 1 --clock cpu        # a busy machine
    python benchmarks/original_step.py --models spach_ms_xxs_patch4_224_mlp --batch 8 --json out.json
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time

import torch
import torch.nn.functional as F

import spach  # noqa: F401  (registers the zoo)
from spach.bench import create_model
from spach.engine.build import optimizer_kernel_kwargs
from spach.runtime import tune_cpu_allocator
from spach.timing import loadavg, machine_info, num_threads

# the five models of issue 13's comparison
MODELS = ["spach_ms_xxs_patch4_224_conv", "spach_ms_xxs_patch4_224_attn", "spach_ms_xxs_patch4_224_mlp",
          "spach_xxs_patch16_224_attn", "spach_ms_xs_patch4_224_hybrid"]


# --------------------------------------------------------------------------- the original's maths, B×N×C tokens

def _ln(m, x):
    return F.layer_norm(x, m.normalized_shape, m.weight, m.bias, m.eps)


def _to_map(x, hw):  # B×N×C -> B×C×H×W (a copy, as the original's transpose + reshape)
    B, N, C = x.shape
    return x.transpose(1, 2).reshape(B, C, *hw)


def _to_tokens(x):  # B×C×H×W -> B×N×C
    return x.flatten(2).transpose(1, 2)


def _dwconv(m, x, hw):
    return _to_tokens(m.conv(_to_map(x, hw)))


def _attention(m, x):
    B, N, C = x.shape
    qkv = F.linear(x, m.qkv.weight, m.qkv.bias).reshape(B, N, 3, m.num_heads, C // m.num_heads)
    q, k, v = qkv.permute(2, 0, 3, 1, 4)
    attn = (q @ k.transpose(-2, -1) * m.scale).softmax(dim=-1)
    x = (attn @ v).transpose(1, 2).reshape(B, N, C)
    return F.linear(x, m.proj.weight, m.proj.bias)


def _token_mlp(m, x):
    x = x.transpose(1, 2)  # B×C×N: nn.Linear over the tokens
    x = F.linear(F.gelu(F.linear(x, m.fc1.weight, m.fc1.bias)), m.fc2.weight, m.fc2.bias)
    return x.transpose(1, 2)


def _block(blk, x, hw):
    y = x
    if blk.token_mixer is not None:
        h = _ln(blk.norm1, x)
        s = _attention(blk.token_mixer, h) if hasattr(blk.token_mixer, "qkv") else _token_mlp(blk.token_mixer, h)
        y = y + (blk.gamma * s if blk.gamma is not None else s)
    if blk.cpe is not None:
        y = y + _dwconv(blk.cpe, x, hw)
    mlp = blk.mlp
    h = F.linear(F.gelu(F.linear(_ln(blk.norm2, y), mlp.fc1.weight, mlp.fc1.bias)), mlp.fc2.weight, mlp.fc2.bias)
    return y + h


def original_forward(model, x):
    """Logits of a spach model computed with the original release's layouts and ops (no drop path/dropout)."""
    x = model.stem.proj(x)
    hw = x.shape[-2:]
    x = _ln(model.norm_pre, _to_tokens(x))
    for stage in model.stages:
        if not isinstance(stage.downsample, torch.nn.Identity):
            d = stage.downsample
            m = d.norm(d.conv(_to_map(x, hw)))
            hw = m.shape[-2:]
            x = _to_tokens(m)
        for blk in stage.blocks:
            x = _block(blk, x, hw)
    return model.head(_ln(model.norm, x).mean(1))


# --------------------------------------------------------------------------- the side-by-side timing

CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def compare(name: str, batch: int, img_size: int, threads: int, repeats: int, warmup: int = 1,
            clock: str = "wall") -> dict:
    torch.manual_seed(0)
    model = create_model(name, img_size).train()
    for p in model.parameters():  # non-trivial weights (the zero-initialised head would hide branches)
        torch.nn.init.normal_(p, std=0.02)
    x = torch.randn(batch, 3, img_size, img_size)
    y = torch.randint(0, model.num_classes, (batch,))
    with torch.no_grad():
        model.eval()
        ref, ours = original_forward(model, x), model(x)
        model.train()
    err = ((ref - ours).abs().max() / ref.abs().max().clamp_min(1e-12)).item()
    if err > 1e-3:
        raise RuntimeError(f"{name}: the reference maths and spach disagree (relative error {err:.1e})")
    params = list(model.parameters())
    original_opt = torch.optim.AdamW(params, lr=1e-9, foreach=False)  # the per-parameter loop
    spach_opt = torch.optim.AdamW(params, lr=1e-9, **optimizer_kernel_kwargs("adamw"))

    def step(forward, opt):
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(forward(x), y).backward()
        opt.step()

    steps = {"original": lambda: step(lambda t: original_forward(model, t), original_opt),
             "spach": lambda: step(model, spach_opt)}
    times = {k: [] for k in steps}
    with num_threads(threads):
        for _ in range(warmup):
            for run in steps.values():
                run()
        for _ in range(repeats):
            for k, run in steps.items():
                start = CLOCKS[clock]()
                run()
                times[k].append(CLOCKS[clock]() - start)
        gemm = {k: gemm_seconds(run) for k, run in steps.items()}
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"model": name, "batch": batch, "img_size": img_size, "threads": threads, "clock": clock,
            "relative_logit_error": err,
            "original_s": med["original"], "spach_s": med["spach"], "speedup": med["original"] / med["spach"],
            "original_gemm_s": gemm["original"], "spach_gemm_s": gemm["spach"],
            "speedup_bound": med["original"] / gemm["spach"], "times": times}


# the matrix products of a step: BLAS (mm, addmm, bmm), oneDNN's linear, and the fused attention kernel
# (forward and backward; it holds attention's two products, and its softmax)
GEMM_OPS = {"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "mkldnn::_linear_pointwise",
            "aten::_scaled_dot_product_flash_attention_for_cpu",
            "aten::_scaled_dot_product_flash_attention_for_cpu_backward"}


def gemm_seconds(run) -> float:
    """Seconds one step spends inside matrix-product kernels (torch.profiler, one step after the timed ones).

    spach's step cannot be faster than its matrix products: original_s / spach_gemm_s bounds the speed-up
    that any work on the rest of the step can reach (the `*_gemm_s` keys count the attention kernel too)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        run()
    return sum(e.self_cpu_time_total for e in prof.key_averages() if e.key in GEMM_OPS) / 1e6


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=MODELS)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--clock", choices=list(CLOCKS), default="wall",
                        help="wall: elapsed time; cpu: this process's CPU time (a busy machine, --threads 1)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    tune_cpu_allocator()
    rows = []
    load_before = loadavg()
    for name in args.models:
        row = compare(name, args.batch, args.img_size, args.threads, args.repeats, clock=args.clock)
        rows.append(row)
        print(f"{name:36s} original {row['original_s']:.3f} s  spach {row['spach_s']:.3f} s  "
              f"{row['speedup']:.2f}x  | matrix products original {row['original_gemm_s']:.3f} s  spach "
              f"{row['spach_gemm_s']:.3f} s  -> bound {row['speedup_bound']:.2f}x", flush=True)
    geo = math.exp(statistics.fmean(math.log(r["speedup"]) for r in rows))
    bound = math.exp(statistics.fmean(math.log(r["speedup_bound"]) for r in rows))
    print(f"geometric mean {geo:.2f}x, min {min(r['speedup'] for r in rows):.2f}x over {len(rows)} models; "
          f"the bound if all but spach's matrix products took no time: {bound:.2f}x")
    if args.json:
        from spach.io import atomic_write
        with atomic_write(args.json, "w") as f:
            json.dump({"meta": {**machine_info(), "loadavg_before": load_before, "loadavg_after": loadavg(),
                                "args": vars(args)}, "rows": rows, "geomean_speedup": geo}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
