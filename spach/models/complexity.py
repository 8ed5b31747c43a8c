"""Parameter and MAC counts, measured by ``torch.utils.flop_counter`` (no hand-written formulas)."""
from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn as nn
from timm.layers import to_2tuple
from torch.utils.flop_counter import FlopCounterMode

from spach.models import kernels
from spach.models.layers import Attention


def count_params(model: nn.Module) -> int:
    """Number of distinct parameters (a module shared between blocks counts once)."""
    return sum(p.numel() for p in model.parameters())


@contextmanager
def countable_ops(model: nn.Module):
    """Run attention and channel MLPs through plain aten matmuls, which the FLOP counter sees.

    (Fused kernels — CPU flash attention, oneDNN linear+GELU — are invisible to it.)
    """
    # Attention and every other mixer with the same switch (e.g. window attention)
    attention = [m for m in model.modules()
                 if isinstance(m, Attention) or isinstance(getattr(m, "fused_attn", None), bool)]
    saved = [m.fused_attn for m in attention], kernels.fused_kernels_enabled()
    for m in attention:
        m.fused_attn = False
    kernels.set_fused_kernels(False)
    try:
        yield
    finally:
        for m, value in zip(attention, saved[0]):
            m.fused_attn = value
        kernels.set_fused_kernels(saved[1])


def count_macs(model: nn.Module, img_size=224, in_chans: int = 3, batch_size: int = 1) -> int:
    """Multiply-accumulates of one forward pass per image (matmuls and convolutions), eval mode.

    Works on models built on the ``meta`` device (no memory, no compute) as on real ones.
    """
    h, w = to_2tuple(img_size)
    p = next(model.parameters())
    x = torch.zeros(batch_size, in_chans, h, w, device=p.device, dtype=p.dtype)
    return count_macs_on(model, x) // batch_size


def count_macs_on(module: nn.Module, x: torch.Tensor) -> int:
    """Multiply-accumulates of ``module(x)`` (matmuls and convolutions; FFTs, pooling and elementwise
    operations count 0), in eval mode with the countable (plain) kernels — e.g. one block on
    ``(1, H, W, C)`` tokens."""
    was_training = module.training
    module.eval()
    try:
        with torch.no_grad(), countable_ops(module), FlopCounterMode(display=False) as counter:
            module(x)
    finally:
        module.train(was_training)
    return counter.get_total_flops() // 2
