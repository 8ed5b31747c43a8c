"""The process's random number generators: their state as plain data, restored exactly, and seeded blocks.

    state = get_rng_state()        # python, numpy, torch CPU and this process's own CUDA device
    set_rng_state(state)           # restores what it holds (a checkpoint from any number of GPUs)
    with seeded(1234):             # python / numpy / torch CPU seeded for the block, restored after
        ...

States are tensors, lists and numbers only, so `torch.load(..., weights_only=True)` reads
them back. Each process saves and restores only the CUDA device it uses (the one set by
`torch.cuda.set_device`): a run saved on 8 GPUs resumes on 4, and one saved by a battle
worker that saw another `CUDA_VISIBLE_DEVICES` resumes anywhere.
"""
from __future__ import annotations

import random
from contextlib import contextmanager
from typing import Iterator

import numpy as np
import torch


def get_rng_state(cuda: bool = True) -> dict:
    """python / numpy / torch (CPU) states, plus this process's current CUDA device's if CUDA is in use."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, py_state, py_gauss = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "gauss": float(gauss)},
        "python": {"version": version, "state": list(py_state), "gauss": py_gauss},
    }
    if cuda and torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state(torch.cuda.current_device())
    return state


def set_rng_state(state: dict) -> None:
    """Restore a `get_rng_state()` (the CUDA part onto this process's current device)."""
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["state"]), p["gauss"]))
    cuda = state.get("cuda")
    if cuda is not None and torch.cuda.is_available():
        if isinstance(cuda, (list, tuple)):  # older checkpoints held every visible device's state
            index = torch.cuda.current_device()
            cuda = cuda[index] if index < len(cuda) else cuda[0]
        torch.cuda.set_rng_state(cuda, torch.cuda.current_device())


@contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Seed python, numpy and torch (CPU) RNGs for the block; put the previous states back afterwards."""
    saved = get_rng_state(cuda=False)
    torch.default_generator.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)
    try:
        yield
    finally:
        set_rng_state(saved)
