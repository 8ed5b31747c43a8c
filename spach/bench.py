"""The benchmark suite: speed of models, judged against this machine's real GEMM limit.

The timing harness and the reference live in `spach.timing`
(`machine_limit(dtype)`: the best rate of BLAS and oneDNN GEMMs over several
shapes, measured now with the same threads and dtype as the model). Here:

- `measure_throughput(model, ...)`: images/s of inference (eval +
  `torch.inference_mode`) or of a training step (forward, cross-entropy on
  random labels, backward, AdamW step). Warm-up, then the median of repeated
  timed passes (or, with `protocol="swin"`, the Swin/SPACH protocol: 50 warm-up
  passes, then the mean of 30 timed passes).
- `benchmark(models, ...)`: one row per (model, dtype, mode) with params,
  GMACs, images/s, achieved GFLOP/s and the fraction of the machine's limit
  ("MFU", at most 100% by construction of the limit), plus a summary
  (geometric mean and minimum of the fractions).
  `format_table` and `write_json` render the result.

Achieved FLOP/s counts 2 FLOPs per multiply-accumulate: 2·MACs·images/s for
inference, and 3× that for a training step (forward + backward, the usual
convention: the backward pass costs two forwards).

Example::

    from spach.bench import benchmark, format_table
    result = benchmark(["spach_ms_s_patch4_224_conv"], dtypes=["fp32", "bf16"], threads=2)
    print(format_table(result))
"""
from __future__ import annotations

import copy
import difflib
import math
import os
import statistics
from typing import Callable, Iterable

import torch
import torch.nn as nn
import torch.nn.functional as F

from spach.engine.device import autocast as amp_autocast
from spach.engine.build import optimizer_kernel_kwargs
from spach.io import write_json as io_write_json
from spach.models import count_macs, count_params
from spach.runtime import cpu_allocator_tuned, num_threads
from spach.timing import (DEVICES, DTYPES, GEMM_SHAPES, check_choice, check_device, loadavg, machine_info,
                          machine_limit, matmul_rate, spread, time_passes)

__all__ = ["DTYPES", "MODES", "DEVICES", "BF16_IMPLS", "GROUPS", "PROTOCOLS", "matmul_rate", "machine_limit",
           "num_threads", "measure_throughput", "zoo_names", "resolve_models", "create_model", "benchmark",
           "summarize", "format_table", "write_json", "machine_info"]

MODES = ("infer", "train")
# bf16 inference: "autocast" keeps fp32 weights and casts inside torch.autocast;
# "weights" casts the model (weights and input) to bf16 and runs it plainly.
BF16_IMPLS = ("autocast", "weights")
GROUPS = ("zoo", "ms", "ss", "release")

# the timing protocols: (warm-up passes, timed passes, statistic)
PROTOCOLS = {
    "default": (3, 10, "median"),
    "swin": (50, 30, "mean"),  # Swin/SPACH throughput: eval, 50 warm-up, mean of 30
}


# --------------------------------------------------------------------------
# GPU: MFU against the device's dense peak
# --------------------------------------------------------------------------

def cuda_mfu(achieved_flops_per_s: float, dtype: str) -> dict:
    """On a GPU: the device's dense peak for the precision its matmuls run in, and MFU against it."""
    from spach.accelerators import matmul_precision_kind, peak_flops

    peak = peak_flops(torch.cuda.get_device_name(), dtype)
    return {"peak_tflops": peak / 1e12 if peak else None, "peak_precision": matmul_precision_kind(dtype),
            "mfu": achieved_flops_per_s / peak if peak else None}


# --------------------------------------------------------------------------
# one model
# --------------------------------------------------------------------------

def _num_classes(model: nn.Module, x: torch.Tensor) -> int:
    n = getattr(model, "num_classes", None)
    if isinstance(n, int) and n > 0:
        return n
    with torch.no_grad():
        return model(x[:1]).shape[-1]


def _throughput_settings(dtype: str, mode: str, protocol: str, bf16_impl: str | None, device: str,
                         batch_size: int, img_size: int, warmup: int | None, repeats: int | None) -> tuple:
    """The checked settings of :func:`measure_throughput`: (device, bf16_impl, warmup, repeats, statistic)."""
    check_choice("dtype", dtype, DTYPES)
    check_choice("mode", mode, MODES)
    check_choice("protocol", protocol, PROTOCOLS)
    if bf16_impl is None:
        bf16_impl = "weights" if mode == "infer" else "autocast"
    check_choice("bf16_impl", bf16_impl, BF16_IMPLS)
    dev = check_device(device)
    if batch_size < 1 or img_size < 1:
        raise ValueError(f"batch_size and img_size must be >= 1, got {batch_size} and {img_size}")
    if protocol == "swin" and mode != "infer":
        raise ValueError("the Swin throughput protocol measures inference only (mode='infer')")
    if mode == "train" and bf16_impl == "weights" and dtype == "bf16":
        raise ValueError("bf16_impl='weights' is for inference; training uses autocast")
    default_warmup, default_repeats, statistic = PROTOCOLS[protocol]
    warmup = default_warmup if warmup is None else warmup
    repeats = default_repeats if repeats is None else repeats
    return dev, bf16_impl, warmup, repeats, statistic


def _model_to_measure(model: nn.Module, dev: torch.device, mode: str, cast_weights: bool,
                      channels_last: bool) -> tuple[nn.Module, bool]:
    """(the model on `dev` in the measured dtype and layout, whether it is the caller's own object): a copy is
    made whenever weights, layout or mode would change, so the model passed in is never modified."""
    first = next(model.parameters(), None)
    in_place = first is None or (first.device == dev and first.dtype == torch.float32
                                 and mode == "infer" and not cast_weights and not channels_last)
    if not in_place:
        model = copy.deepcopy(model)
    model = model.to(dev)
    if cast_weights:
        model = model.to(torch.bfloat16)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model, in_place


def _pass(model: nn.Module, x: torch.Tensor, mode: str, dev: torch.device, amp: str,
          gen: torch.Generator) -> Callable[[], None]:
    """One timed pass: inference (eval mode, `inference_mode`), or a training step (forward, cross-entropy on
    random labels, backward, the engine's fused AdamW step)."""
    if mode == "infer":
        model.eval()

        def step():
            with torch.inference_mode(), amp_autocast(dev, amp):
                model(x)
        return step
    model.train()
    y = torch.randint(0, _num_classes(model, x), (x.shape[0],), generator=gen).to(dev)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-6, **optimizer_kernel_kwargs("adamw"))

    def step():
        opt.zero_grad(set_to_none=True)
        with amp_autocast(dev, amp):
            out = model(x)
        F.cross_entropy(out.float(), y).backward()
        opt.step()
    return step


def measure_throughput(model: nn.Module, batch_size: int = 16, img_size: int = 224, dtype: str = "fp32",
                       threads: int | None = None, mode: str = "infer", warmup: int | None = None,
                       repeats: int | None = None, device: str = "cpu", channels_last: bool = False,
                       protocol: str = "default", bf16_impl: str | None = None, in_chans: int | None = None) -> dict:
    """Images/s of `model` on random input of `batch_size`×3×`img_size`².

    mode "infer": eval mode under `torch.inference_mode`; mode "train": train
    mode, forward, cross-entropy on random labels, backward and an AdamW step.
    bf16 inference casts the model to bf16 (`bf16_impl="weights"`, the default and
    the faster path) or runs under `torch.autocast` (`"autocast"`, the only option
    for training). The model passed in is never modified
    (a copy is made when weights, layout or mode would change).

    Returns a dict: `images_per_s` (from the median pass, or the mean for
    `protocol="swin"`), the per-pass timing summary (`median_s`, `mean_s`,
    `min_s`, `max_s`, `spread` = (max-min)/median) and the settings used.
    """
    dev, bf16_impl, warmup, repeats, statistic = _throughput_settings(
        dtype, mode, protocol, bf16_impl, device, batch_size, img_size, warmup, repeats)
    cast_weights = dtype == "bf16" and bf16_impl == "weights"
    was_training = model.training
    model, in_place = _model_to_measure(model, dev, mode, cast_weights, channels_last)
    if in_chans is None:
        in_chans = getattr(model, "in_chans", None) or 3
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch_size, in_chans, img_size, img_size, generator=gen).to(dev)
    if cast_weights:
        x = x.to(torch.bfloat16)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    amp = "bf16" if dtype == "bf16" and not cast_weights else "none"
    try:
        with num_threads(threads) as used_threads:
            step = _pass(model, x, mode, dev, amp, gen)
            times = time_passes(step, warmup, repeats, dev, together=(protocol == "swin"))
    finally:
        if in_place:
            model.train(was_training)

    stats = spread(times)
    seconds = stats["mean_s"] if statistic == "mean" else stats["median_s"]
    precision = dtype if dtype == "fp32" else ("bf16-weights" if cast_weights else "bf16-autocast")
    return {
        "images_per_s": batch_size / seconds,
        **stats,
        "mode": mode, "dtype": dtype, "precision": precision, "batch": batch_size, "img_size": img_size,
        "threads": used_threads, "device": device, "channels_last": channels_last,
        "protocol": protocol, "statistic": statistic, "warmup": warmup, "repeats": repeats,
    }


# --------------------------------------------------------------------------
# model names, parameter and MAC counts
# --------------------------------------------------------------------------

def zoo_names() -> list[str]:
    """The SPACH zoo's registered names (imports the model library)."""
    import spach.models

    return list(spach.models.list_models())


def release_names() -> list[str]:
    """The release's sMLPNet and ShiftViT names (imports the model library)."""
    import spach.models

    return spach.models.list_release_models()


def resolve_models(names: Iterable[str]) -> list[str]:
    """Expand the groups `zoo` (all SPACH models), `ms` (multi-stage), `ss`
    (single-stage), `release` (sMLPNet and ShiftViT) and check every other name is a model known to timm
    (SPACH models are registered in timm by `import spach`)."""
    import timm

    names = list(names)
    if not names:
        raise ValueError("no models given")
    out: list[str] = []
    known: list[str] | None = None
    for name in names:
        if name in GROUPS:
            zoo = zoo_names()
            picked = {"zoo": zoo,
                      "ms": [n for n in zoo if "_ms_" in n],
                      "ss": [n for n in zoo if "_ms_" not in n],
                      "release": release_names()}[name]
            out.extend(picked)
            continue
        if not timm.is_model(name):
            if known is None:
                known = list(GROUPS) + sorted(set(zoo_names()) | set(timm.list_models()))
            close = difflib.get_close_matches(name, known, n=3)
            hint = f"; did you mean: {', '.join(close)}?" if close else ""
            raise ValueError(f"unknown model {name!r}{hint} (groups: {', '.join(GROUPS)})")
        out.append(name)
    return list(dict.fromkeys(out))  # keep order, drop repeats


def _is_spach(name: str) -> bool:
    return name.startswith("spach_") or name in release_names()


def create_model(name: str, img_size: int = 224) -> nn.Module:
    """Build `name` (random weights) through timm; SPACH, sMLPNet and ShiftViT models get `img_size`."""
    import timm

    if _is_spach(name):  # the zoo is registered in timm by the spach.models import above
        return timm.create_model(name, pretrained=False, img_size=img_size)
    return timm.create_model(name, pretrained=False)


# --------------------------------------------------------------------------
# many models
# --------------------------------------------------------------------------

def _as_named(models) -> list[tuple[str, nn.Module | None]]:
    """Accept names, modules, (name, module) pairs or a {name: module} dict."""
    if isinstance(models, (str, nn.Module)):
        models = [models]
    if isinstance(models, dict):
        models = list(models.items())
    named = []
    for item in models:
        if isinstance(item, str):
            named.extend((name, None) for name in resolve_models([item]))
        elif isinstance(item, nn.Module):
            named.append((type(item).__name__, item))
        elif isinstance(item, tuple) and len(item) == 2 and isinstance(item[1], nn.Module):
            named.append((str(item[0]), item[1]))
        else:
            raise ValueError(f"a model must be a name, an nn.Module or a (name, module) pair, got {item!r}")
    return list(dict.fromkeys(named))  # keep order, drop repeats



def benchmark(models, batch_size: int = 16, img_size: int = 224, dtypes: Iterable[str] = ("fp32",),
              modes: Iterable[str] = ("infer",), threads: int | None = None, warmup: int | None = None,
              repeats: int | None = None, device: str = "cpu", channels_last: bool = False,
              protocol: str = "default", bf16_impl: str | None = None,
              limit_shapes: Iterable[tuple[int, int, int]] | None = None,
              log: Callable[[str], None] | None = None) -> dict:
    """Benchmark `models` in every dtype and mode; return `{"meta", "rows", "summary"}`.

    `models`: names (timm/SPACH names or the groups zoo/ms/ss), nn.Modules, or
    (name, module) pairs. The machine's limit (`spach.timing.machine_limit`: the
    best of BLAS and oneDNN GEMMs over `limit_shapes`, default
    `spach.timing.GEMM_SHAPES`) is measured right before and right after each
    (model, dtype, mode) in the same dtype, threads and device; the fraction
    divides by the better of the two, so model and limit are measured under the
    same conditions (on a shared machine both move) and a momentary dip of the
    reference cannot inflate the fraction.

    Each row: model, params, gmacs, dtype, precision, mode, batch, img_size,
    threads, images_per_s, the timing spread (median_s, mean_s, min_s, max_s,
    spread = (max-min)/median), achieved_gflops, limit_gflops (and its
    _before/_after, the kernel and shape that reached it), fraction
    (= achieved_gflops / limit_gflops).
    """
    dtypes, modes = list(dtypes), list(modes)
    for d in dtypes:
        check_choice("dtype", d, DTYPES)
    for m in modes:
        check_choice("mode", m, MODES)
    check_choice("protocol", protocol, PROTOCOLS)
    check_device(device)
    shapes = [tuple(int(v) for v in s) for s in (limit_shapes or GEMM_SHAPES)]
    if any(len(s) != 3 or min(s) < 1 for s in shapes):
        raise ValueError(f"limit shapes must be (M, K, N) triples of positive sizes, got {shapes}")
    named = _as_named(models)
    log = log or (lambda msg: None)

    def limit(dtype: str) -> dict:
        return machine_limit(dtype, device=device, shapes=shapes)

    rows = []
    load_before = loadavg()
    with num_threads(threads) as used_threads:
        for dtype in dtypes:  # wake the thread pool and the GEMM kernels before anything is timed
            machine_limit(dtype, device=device, shapes=shapes, warmup=3, repeats=1)
        for name, module in named:
            model = module if module is not None else create_model(name, img_size)
            params = count_params(model)
            macs = float(count_macs(model, img_size))
            for dtype in dtypes:
                for mode in modes:
                    if protocol == "swin" and mode != "infer":
                        continue
                    before = limit(dtype)
                    res = measure_throughput(model, batch_size, img_size, dtype, mode=mode, warmup=warmup,
                                             repeats=repeats, device=device, channels_last=channels_last,
                                             protocol=protocol, bf16_impl=bf16_impl if mode == "infer" else "autocast")
                    after = limit(dtype)
                    row = _row(name, params, macs, res, before, after, used_threads)
                    if device == "cuda":
                        row.update(cuda_mfu(row["achieved_gflops"] * 1e9, dtype))
                    rows.append(row)
                    log(f"{name:40s} {dtype} {mode:5s} {row['images_per_s']:8.1f} img/s  "
                        f"{row['achieved_gflops']:6.1f} GFLOP/s  {100 * row['fraction']:5.1f}% of the limit "
                        f"({row['limit_gflops']:.0f} GFLOP/s, {row['limit_kernel']})  "
                        f"spread {100 * row['spread']:.0f}%")
            del model

    meta = {
        **machine_info(), "threads": used_threads, "device": device, "batch": batch_size,
        "img_size": img_size, "protocol": protocol, "statistic": PROTOCOLS[protocol][2],
        "warmup": warmup if warmup is not None else PROTOCOLS[protocol][0],
        "repeats": repeats if repeats is not None else PROTOCOLS[protocol][1],
        "channels_last": channels_last, "bf16_impl": bf16_impl or "weights",
        "limit_shapes": [list(s) for s in shapes],
        # other processes on the machine slow both the models and the limit: look here first
        "loadavg_before": load_before, "loadavg_after": loadavg(),
        "cpu_allocator_tuned": cpu_allocator_tuned(),
    }
    return {"meta": meta, "rows": rows, "summary": summarize(rows)}


def _row(name: str, params: int, macs: float, res: dict, before: dict, after: dict, threads: int) -> dict:
    """One row of :func:`benchmark`: the throughput `res` of `measure_throughput`, the achieved FLOP/s and its
    fraction of the better of the two machine limits measured around it (`before`, `after`)."""
    best = max(before, after, key=lambda r: r["flops_per_s"])
    achieved = 2 * macs * (3 if res["mode"] == "train" else 1) * res["images_per_s"]
    return {
        "model": name, "params": params, "gmacs": macs / 1e9,
        "dtype": res["dtype"], "precision": res["precision"], "mode": res["mode"],
        "batch": res["batch"], "img_size": res["img_size"], "threads": threads, "device": res["device"],
        "images_per_s": res["images_per_s"],
        **{k: res[k] for k in ("median_s", "mean_s", "min_s", "max_s", "spread")},
        "achieved_gflops": achieved / 1e9,
        "limit_gflops": best["flops_per_s"] / 1e9,
        "limit_gflops_before": before["flops_per_s"] / 1e9,
        "limit_gflops_after": after["flops_per_s"] / 1e9,
        "limit_kernel": best["kernel"], "limit_shape": best["shape"],
        "fraction": achieved / best["flops_per_s"],
    }


def summarize(rows: list[dict]) -> list[dict]:
    """Per (dtype, mode): geometric mean and minimum of the fractions, and
    where both dtypes were run, the bf16/fp32 speed-up per model."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for row in rows:
        groups.setdefault((row["dtype"], row["mode"]), []).append(row)
    summary = []
    for (dtype, mode), group in groups.items():
        fractions = [r["fraction"] for r in group]
        worst = min(group, key=lambda r: r["fraction"])
        summary.append({
            "dtype": dtype, "mode": mode, "models": len(group),
            "geomean_fraction": math.exp(statistics.fmean(math.log(f) for f in fractions)),
            "min_fraction": worst["fraction"], "min_model": worst["model"],
        })
    for mode in dict.fromkeys(r["mode"] for r in rows):
        fp32 = {r["model"]: r for r in rows if r["mode"] == mode and r["dtype"] == "fp32"}
        bf16 = {r["model"]: r for r in rows if r["mode"] == mode and r["dtype"] == "bf16"}
        both = [m for m in fp32 if m in bf16]
        if both:
            speedups = {m: bf16[m]["images_per_s"] / fp32[m]["images_per_s"] for m in both}
            summary.append({
                "dtype": "bf16/fp32", "mode": mode, "models": len(both),
                "geomean_speedup": math.exp(statistics.fmean(math.log(s) for s in speedups.values())),
                "min_speedup": min(speedups.values()), "min_model": min(speedups, key=speedups.get),
                "speedups": speedups,
            })
    return summary


# --------------------------------------------------------------------------
# output
# --------------------------------------------------------------------------

def format_table(result: dict) -> str:
    """A markdown table of the rows followed by the summary lines."""
    head = ["model", "params", "GMACs", "dtype", "mode", "batch", "threads", "images/s", "spread",
            "GFLOP/s", "limit GFLOP/s", "fraction"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    with_mfu = any("mfu" in r for r in result["rows"])
    if with_mfu:  # on a GPU: the fraction of the device's dense peak, too
        lines = ["| " + " | ".join(head + ["peak TFLOP/s", "MFU"]) + " |", "|" + "|".join("---" for _ in head + [0, 0]) + "|"]
    for r in result["rows"]:
        cells = [r["model"], f"{r['params'] / 1e6:.2f}M", f"{r['gmacs']:.2f}", r["precision"], r["mode"],
                 str(r["batch"]), str(r["threads"]), f"{r['images_per_s']:.1f}", f"{100 * r['spread']:.0f}%",
                 f"{r['achieved_gflops']:.1f}", f"{r['limit_gflops']:.1f}", f"{100 * r['fraction']:.1f}%"]
        if with_mfu:
            cells += [f"{r['peak_tflops']:.0f}" if r.get("peak_tflops") else "?",
                      f"{100 * r['mfu']:.1f}%" if r.get("mfu") is not None else "?"]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    for s in result["summary"]:
        if "geomean_fraction" in s:
            lines.append(f"- {s['dtype']} {s['mode']}: geometric mean {100 * s['geomean_fraction']:.1f}% of the "
                         f"machine's limit over {s['models']} models; min {100 * s['min_fraction']:.1f}% "
                         f"({s['min_model']})")
        else:
            lines.append(f"- bf16 vs fp32 {s['mode']}: speed-up geometric mean {s['geomean_speedup']:.2f}×, "
                         f"min {s['min_speedup']:.2f}× ({s['min_model']})")
    return "\n".join(lines)


def write_json(result: dict, path: str | os.PathLike) -> None:
    """Write `result` as JSON to `path` (its folder made if missing) with `spach.io.write_json` (atomic)."""
    os.makedirs(os.path.dirname(os.path.abspath(os.fspath(path))), exist_ok=True)
    io_write_json(path, result, indent=2)