"""The timing harness: timed passes, thread control, machine probes and the machine's real GEMM limit.

`spach.bench` (the model suite) measures models with these; nothing here knows
about models.

- `time_passes(step, ...)` / `spread(times)`: seconds per pass after a warm-up,
  and their summary (median, mean, min, max, relative spread).
- `gemm_rate(dtype, kernel, shape)`: FLOP/s of one GEMM kernel on one shape —
  `"blas"` is `torch.matmul` (MKL/OpenBLAS on CPU, cuBLAS on CUDA), `"onednn"`
  is `torch.ops.mkldnn._linear_pointwise` (oneDNN, CPU only).
- `machine_limit(dtype)`: the real limit of this machine per dtype — the best
  rate over both kernels and several shapes (square, and the tall-skinny
  shapes of a vision model's linears), measured now with the caller's threads.
  On AMD CPUs MKL's fp32 GEMM reaches about half of oneDNN's, so a BLAS-only
  reference lets models read above 100%; against this limit none can.

On a GPU the limit is `spach.accelerators.cuda_gemm_rate` (an n ≥ 8192 GEMM
timed with CUDA events); device peaks and MFU live in `spach.accelerators`.
"""
from __future__ import annotations

import datetime
import os
import platform
import statistics
import time
from typing import Callable, Iterable

import torch

from spach.errors import SpachError
from spach.runtime import num_threads

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
DEVICES = ("cpu", "cuda")
GEMM_KERNELS = ("blas", "onednn")
# (M, K, N): the square reference, and the shapes of MS-S linears at batch 16 (tokens x width x hidden)
GEMM_SHAPES = ((2048, 2048, 2048), (12544, 384, 768), (12544, 768, 384))
EMULATED_BF16_SHAPE = (512, 512, 512)

def check_choice(what: str, value: str, choices: Iterable[str]) -> str:
    """`value` if it is one of `choices`, else a ValueError listing them."""
    choices = tuple(choices)
    if value not in choices:
        raise ValueError(f"unknown {what} {value!r}; choose one of: {', '.join(choices)}")
    return value


def check_device(device: str) -> torch.device:
    """The torch device for "cpu"/"cuda"; a clear error when CUDA is asked for and absent."""
    check_choice("device", device, DEVICES)
    if device == "cuda" and not torch.cuda.is_available():
        raise SpachError("device 'cuda' requested but no CUDA GPU is available")
    return torch.device(device)


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA); nothing on CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_passes(step: Callable[[], object], warmup: int, repeats: int, device: torch.device,
                together: bool = False) -> list[float]:
    """Seconds per pass of `step`, after `warmup` untimed passes.

    `together=True` times all `repeats` passes as one block (the Swin way) and
    returns that block's mean once per pass.
    """
    if repeats < 1 or warmup < 0:
        raise ValueError(f"need repeats >= 1 and warmup >= 0, got repeats={repeats}, warmup={warmup}")
    for _ in range(warmup):
        step()
    sync(device)
    if together:
        start = time.perf_counter()
        for _ in range(repeats):
            step()
        sync(device)
        return [(time.perf_counter() - start) / repeats] * repeats
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        sync(device)
        times.append(time.perf_counter() - start)
    return times


def spread(times: list[float]) -> dict:
    """Summary of per-pass times: median, mean, min, max and relative spread (max-min)/median."""
    med = statistics.median(times)
    return {
        "median_s": med,
        "mean_s": statistics.fmean(times),
        "min_s": min(times),
        "max_s": max(times),
        "spread": (max(times) - min(times)) / med if med > 0 else 0.0,
    }


# --------------------------------------------------------------------------
# GEMM rates and the machine's limit
# --------------------------------------------------------------------------

def onednn_available(dtype: str = "fp32") -> bool:
    """Whether oneDNN's linear kernel (`torch.ops.mkldnn._linear_pointwise`) exists in this torch build and, for
    bf16, runs on this CPU (it needs bf16 support: AVX512-BF16 / AMX or AVX512)."""
    if not (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")):
        return False
    return dtype != "bf16" or bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def gemm_rate(dtype: str = "fp32", kernel: str = "blas", shape: tuple[int, int, int] = (2048, 2048, 2048),
              threads: int | None = None, warmup: int = 3, repeats: int = 10, device: str = "cpu",
              details: bool = False) -> float | dict:
    """FLOP/s of one (M, K) x (K, N) GEMM (2·M·K·N FLOPs) with `kernel`, from the median pass.

    With `details=True`, a dict: `flops_per_s`, the kernel, shape and the timing spread.
    """
    check_choice("dtype", dtype, DTYPES)
    check_choice("kernel", kernel, GEMM_KERNELS)
    dev = check_device(device)
    if kernel == "onednn" and (dev.type != "cpu" or not onednn_available(dtype)):
        raise ValueError("the oneDNN GEMM runs on CPU builds with mkldnn only (in bf16: on a CPU with bf16 support); "
                         "use kernel='blas'")
    if dev.type == "cuda":
        return _cuda_gemm_rate(dtype, shape, warmup, repeats, details)
    m, k, n = shape
    torch_dtype = DTYPES[dtype]
    with num_threads(threads) as used_threads:
        gen = torch.Generator().manual_seed(0)
        a = torch.randn(m, k, generator=gen).to(dev, torch_dtype)
        if kernel == "blas":
            b = torch.randn(k, n, generator=gen).to(dev, torch_dtype)
            out = torch.empty(m, n, device=dev, dtype=torch_dtype)

            def step():
                torch.matmul(a, b, out=out)
        else:
            w = torch.randn(n, k, generator=gen).to(dev, torch_dtype)  # (out, in), as a linear layer's weight

            def step():
                torch.ops.mkldnn._linear_pointwise(a, w, None, "none", [], "")
        times = time_passes(step, warmup, repeats, dev)
    stats = spread(times)
    rate = 2 * m * k * n / stats["median_s"]
    if not details:
        return rate
    return {"dtype": dtype, "kernel": kernel, "shape": list(shape), "threads": used_threads, "device": device,
            "flops_per_s": rate, **stats}


def _cuda_gemm_rate(dtype: str, shape: tuple[int, int, int], warmup: int, repeats: int,
                    details: bool) -> float | dict:
    """On a GPU: a square GEMM of side max(shape, 8192) timed with CUDA events (`spach.accelerators`)."""
    from spach.accelerators import cuda_gemm_rate

    ref = cuda_gemm_rate(dtype, n=max(8192, *shape), warmup=max(warmup, 3), repeats=max(repeats, 10))
    if not details:
        return ref["flops_per_s"]
    n = ref["n"]
    return {**ref, "kernel": "blas", "shape": [n, n, n], "threads": None, "device": "cuda",
            "median_s": ref["seconds"], "mean_s": ref["seconds"], "min_s": ref["seconds"],
            "max_s": ref["seconds"], "spread": 0.0}


def matmul_rate(dtype: str = "fp32", n: int = 2048, threads: int | None = None, warmup: int = 3,
                repeats: int = 10, device: str = "cpu", details: bool = False) -> float | dict:
    """FLOP/s of `torch.matmul` of two n×n matrices (the BLAS reference alone); see `gemm_rate`."""
    res = gemm_rate(dtype, "blas", (n, n, n), threads=threads, warmup=warmup, repeats=repeats,
                    device=device, details=True)
    if not details:
        return res["flops_per_s"]
    return {**res, "n": n}


def machine_limit(dtype: str = "fp32", threads: int | None = None, device: str = "cpu",
                  shapes: Iterable[tuple[int, int, int]] | None = None, kernels: Iterable[str] | None = None,
                  warmup: int = 2, repeats: int = 5) -> dict:
    """The best GEMM rate this machine reaches now in `dtype`: every kernel on every shape.

    Returns `flops_per_s` (the best), `kernel` and `shape` of the best, and `rates`
    (one entry per kernel and shape). `shapes` default: `GEMM_SHAPES`; `kernels`:
    BLAS and, on CPU builds with it, oneDNN.
    """
    dev = check_device(device)
    if shapes is None and dev.type == "cpu" and dtype == "bf16" and not onednn_available("bf16"):
        # a CPU without bf16 support emulates it at ~1 GFLOP/s whatever the shape: one small GEMM measures that
        shapes = [EMULATED_BF16_SHAPE]
    shapes = [tuple(s) for s in (shapes or GEMM_SHAPES)]
    if dev.type == "cuda":  # one large GEMM: smaller ones measure the launch, not the math
        shapes = shapes[:1]
    if kernels is None:
        kernels = [k for k in GEMM_KERNELS if k == "blas" or (dev.type == "cpu" and onednn_available(dtype))]
    rates = [gemm_rate(dtype, kernel, shape, threads=threads, warmup=warmup, repeats=repeats, device=device,
                       details=True)
             for kernel in kernels for shape in shapes]
    best = max(rates, key=lambda r: r["flops_per_s"])
    return {"dtype": dtype, "device": device, "threads": best["threads"], "flops_per_s": best["flops_per_s"],
            "kernel": best["kernel"], "shape": best["shape"],
            "rates": [{k: r[k] for k in ("kernel", "shape", "flops_per_s", "spread")} for r in rates]}


# --------------------------------------------------------------------------
# machine probes
# --------------------------------------------------------------------------

def machine_info() -> dict:
    """Software versions, CPU, core count, date and (if any) the CUDA device."""
    info = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "processor": cpu_name(),
        "cpu_count": os.cpu_count(),
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
    }
    if torch.cuda.is_available():
        info["cuda_device"] = torch.cuda.get_device_name()
    return info


def loadavg() -> list[float] | None:
    """The 1/5/15-minute load averages (other processes slow every figure: look here first)."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def cpu_name() -> str:
    """The CPU's model name."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"
