"""Parameter and MAC counts, measured by ``torch.utils.flop_counter`` (no hand-written formulas)."""
from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn as nn
from timm.layers import to_2tuple
from torch.utils.flop_counter import FlopCounterMode

from spach.models.layers import Attention


def count_params(model: nn.Module) -> int:
    """Number of distinct parameters (a module shared between blocks counts once)."""
    return sum(p.numel() for p in model.parameters())


@contextmanager
def plain_attention(model: nn.Module):
    """Run attention through explicit matmuls so the FLOP counter sees them on every device."""
    modules = [m for m in model.modules() if isinstance(m, Attention)]
    saved = [m.fused_attn for m in modules]
    for m in modules:
        m.fused_attn = False
    try:
        yield
    finally:
        for m, fused in zip(modules, saved):
            m.fused_attn = fused


def count_macs(model: nn.Module, img_size=224, in_chans: int = 3, batch_size: int = 1) -> int:
    """Multiply-accumulates of one forward pass per image (matmuls and convolutions), eval mode.

    Works on models built on the ``meta`` device (no memory, no compute) as on real ones.
    """
    h, w = to_2tuple(img_size)
    p = next(model.parameters())
    x = torch.zeros(batch_size, in_chans, h, w, device=p.device, dtype=p.dtype)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), plain_attention(model), FlopCounterMode(display=False) as counter:
            model(x)
    finally:
        model.train(was_training)
    return counter.get_total_flops() // 2 // batch_size
