"""The device side of a run: autocast, CUDA math modes (TF32, cuDNN autotuning), peak memory.

    with autocast(device, "bf16"):                      # no-op for "none"
        loss = model(x)
    with cuda_math(device, matmul_precision="high", cudnn_benchmark=True):
        ...                                             # CUDA only; previous settings restored after
    reset_peak_memory(device); ...; peak_memory_mb(device)

`matmul_precision` is torch's `float32_matmul_precision`: "highest" runs fp32 matmuls in
fp32 (~67 TFLOP/s dense on an H100/H200), "high" lets them use TF32 (~495), as cuDNN
convolutions already do by default. The settings are applied only for CUDA devices:
CPU runs stay bit-identical whatever the config says.
"""
from __future__ import annotations

import contextlib
import resource
from typing import Iterator

import torch

MATMUL_PRECISIONS = ("highest", "high", "medium")


def autocast(device: torch.device, amp: str):
    """torch.autocast for 'bf16' / 'fp16', a no-op for 'none'."""
    if amp == "none":
        return contextlib.nullcontext()
    if amp == "fp16" and device.type != "cuda":
        raise ValueError("amp='fp16' needs a CUDA device (loss scaling); on CPU use amp='bf16'")
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16 if amp == "bf16" else torch.float16)


@contextlib.contextmanager
def cuda_math(device: torch.device, matmul_precision: str = "high", cudnn_benchmark: bool = True) -> Iterator[dict]:
    """On CUDA: set float32_matmul_precision and cudnn.benchmark for the block (restored after).

    Yields the settings in force ({} on other devices), to be recorded with the results.
    """
    if matmul_precision not in MATMUL_PRECISIONS:
        raise ValueError(f"matmul_precision must be one of {', '.join(MATMUL_PRECISIONS)}, got {matmul_precision!r}")
    if torch.device(device).type != "cuda":
        yield {}
        return
    before = torch.get_float32_matmul_precision(), torch.backends.cudnn.benchmark
    torch.set_float32_matmul_precision(matmul_precision)
    torch.backends.cudnn.benchmark = cudnn_benchmark
    try:
        yield {"matmul_precision": matmul_precision, "cudnn_benchmark": cudnn_benchmark,
               "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32}
    finally:
        torch.set_float32_matmul_precision(before[0])
        torch.backends.cudnn.benchmark = before[1]


def reset_peak_memory(device: torch.device) -> None:
    """Start a new peak-memory window: CUDA's allocator peak, or on Linux the process's peak RSS."""
    if torch.device(device).type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM (Linux >= 4.0)
    except OSError:
        pass  # elsewhere the peak is the process's lifetime peak


def peak_memory_mb(device: torch.device) -> float:
    """Peak CUDA memory allocated on the device since the last reset, or the process's peak resident
    memory on CPU (since the last reset on Linux)."""
    if torch.device(device).type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 2**10  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10  # Linux: kB

