"""Process-level settings: the CPU allocator's thresholds and the intra-op thread count.

Networks at 224² allocate and free tens of megabytes per layer. glibc returns
such blocks to the kernel (mmap/munmap) on every free, so each new activation
pays page faults on fresh memory — up to ~20% of a CPU forward pass here.
Raising glibc's mmap and trim thresholds keeps freed blocks in the heap for
reuse, which is what tcmalloc/jemalloc give PyTorch when preloaded.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import sys
from contextlib import contextmanager
from typing import Iterator

import torch

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_tuned = False


def tune_cpu_allocator(mmap_threshold: int = 1 << 30, trim_threshold: int = 1 << 31) -> bool:
    """Keep freed large blocks in the process heap (glibc only). Returns True when applied."""
    global _tuned
    if _tuned:
        return True
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl or another libc without mallopt
        return False
    _tuned = bool(mallopt(_M_MMAP_THRESHOLD, mmap_threshold)) and bool(mallopt(_M_TRIM_THRESHOLD, trim_threshold))
    return _tuned


@contextmanager
def num_threads(threads: int | None) -> Iterator[int]:
    """Run the body with `threads` intra-op threads (None: leave as is); restore the count afterwards."""
    before = torch.get_num_threads()
    if threads is not None:
        if threads < 1:
            raise ValueError(f"threads must be >= 1, got {threads}")
        torch.set_num_threads(threads)
    try:
        yield torch.get_num_threads()
    finally:
        torch.set_num_threads(before)


def cpu_allocator_tuned() -> bool:
    """Whether `tune_cpu_allocator()` has been applied in this process (`spach` commands apply it)."""
    return _tuned
