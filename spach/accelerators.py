"""GPU facts and GPU timing: the table of dense peak FLOP/s, CUDA-event timing, the GEMM reference, MFU.

    peak = peak_flops("NVIDIA H200", "bf16")                   # 989e12 (dense, SXM)
    peak_flops("NVIDIA H100 80GB HBM3", "fp32")                # 495e12: fp32 matmuls run as TF32 ...
    peak_flops("NVIDIA H100 80GB HBM3", "fp32", "highest")     # 67e12:  ... unless precision is "highest"
    ref = cuda_gemm_rate("bf16", n=8192)                       # {"flops_per_s", "seconds", "peak_flops", ...}
    mfu = achieved_flops_per_s / peak

On a GPU one kernel launch costs microseconds: timing single small matmuls with a host sync
after each measures the launch, not the math. The reference here is an n x n GEMM with
n >= 8192 (2n^3 = 1.1 TFLOP per pass), `repeats` passes enqueued back to back between two CUDA
events, so the host never sits between them.

Peaks are the vendors' dense (no 2:4 sparsity) tensor-core figures for the SXM / PCIe parts,
in TFLOP/s. MFU = achieved model FLOP/s / the peak of the precision the matmuls actually use.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

# (name fragment, {precision: dense peak TFLOP/s}); the first fragment found in the device name wins,
# so the specific names come before the general ones
DENSE_PEAKS_TFLOPS: list[tuple[str, dict[str, float]]] = [
    ("H200", {"bf16": 989.0, "fp16": 989.0, "tf32": 495.0, "fp32": 67.0}),        # H200 SXM
    ("H100 PCIe", {"bf16": 756.0, "fp16": 756.0, "tf32": 378.0, "fp32": 51.0}),
    ("H100 NVL", {"bf16": 835.0, "fp16": 835.0, "tf32": 418.0, "fp32": 60.0}),
    ("H100", {"bf16": 989.0, "fp16": 989.0, "tf32": 495.0, "fp32": 67.0}),        # H100 SXM
    ("A100", {"bf16": 312.0, "fp16": 312.0, "tf32": 156.0, "fp32": 19.5}),
    ("L40S", {"bf16": 362.0, "fp16": 362.0, "tf32": 183.0, "fp32": 91.6}),
    ("L4", {"bf16": 121.0, "fp16": 121.0, "tf32": 60.0, "fp32": 30.3}),
    ("A10", {"bf16": 125.0, "fp16": 125.0, "tf32": 62.5, "fp32": 31.2}),
    ("V100", {"fp16": 125.0, "fp32": 15.7}),
]
TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def matmul_precision_kind(dtype: str, matmul_precision: Optional[str] = None) -> str:
    """The precision fp32/bf16/fp16 matmuls run in: 'fp32' tensors become 'tf32' unless the float32
    matmul precision (default: torch's current setting) is 'highest'."""
    if dtype != "fp32":
        return dtype
    precision = matmul_precision or torch.get_float32_matmul_precision()
    return "fp32" if precision == "highest" else "tf32"


def peak_flops(device_name: str, dtype: str, matmul_precision: Optional[str] = None) -> Optional[float]:
    """Dense peak FLOP/s of `device_name` for matmuls in `dtype` (see `matmul_precision_kind`);
    None for a device or precision the table does not know."""
    kind = matmul_precision_kind(dtype, matmul_precision)
    for fragment, peaks in DENSE_PEAKS_TFLOPS:
        if fragment in device_name:
            return peaks[kind] * 1e12 if kind in peaks else None
    return None


def time_with_events(step: Callable[[], object], warmup: int, repeats: int,
                     event: Callable[..., object] = None) -> float:
    """Seconds per pass of `step`: `warmup` untimed passes, then `repeats` passes enqueued back to
    back between two CUDA events (one host sync at the end)."""
    if repeats < 1 or warmup < 0:
        raise ValueError(f"need repeats >= 1 and warmup >= 0, got repeats={repeats}, warmup={warmup}")
    event = event or torch.cuda.Event
    for _ in range(warmup):
        step()
    start, end = event(enable_timing=True), event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        step()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3 / repeats  # elapsed_time is in milliseconds


def cuda_gemm_rate(dtype: str = "bf16", n: int = 8192, warmup: int = 5, repeats: int = 20,
                   device: str | torch.device = "cuda", matmul_precision: Optional[str] = None) -> dict:
    """FLOP/s of an n x n GEMM (2n^3 FLOPs) on a CUDA device, timed with CUDA events; with the
    device's dense peak for that precision and the fraction of it reached."""
    if dtype not in TORCH_DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of: {', '.join(TORCH_DTYPES)}")
    if n < 8192:
        raise ValueError(f"the GPU reference GEMM needs n >= 8192 (launch overhead hides smaller ones), got {n}")
    device = torch.device(device)
    previous = torch.get_float32_matmul_precision()
    if matmul_precision is not None:
        torch.set_float32_matmul_precision(matmul_precision)
    try:
        gen = torch.Generator(device=device).manual_seed(0)
        a = torch.randn(n, n, device=device, generator=gen).to(TORCH_DTYPES[dtype])
        b = torch.randn(n, n, device=device, generator=gen).to(TORCH_DTYPES[dtype])
        out = torch.empty_like(a)
        seconds = time_with_events(lambda: torch.matmul(a, b, out=out), warmup, repeats)
        kind = matmul_precision_kind(dtype)
    finally:
        torch.set_float32_matmul_precision(previous)
    name = torch.cuda.get_device_name(device)
    rate = 2 * n**3 / seconds
    peak = peak_flops(name, dtype, "highest" if kind == "fp32" else "high")
    return {"dtype": dtype, "precision": kind, "n": n, "device": name, "seconds": seconds, "flops_per_s": rate,
            "peak_flops": peak, "fraction_of_peak": rate / peak if peak else None,
            "warmup": warmup, "repeats": repeats, "timing": "cuda-events"}
