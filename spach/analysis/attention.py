"""Mean attention distance (Dosovitskiy et al. 2021): how far, in input pixels, each head looks.

Protocol: a spatial-mixer module that exposes attention implements
``attention_probs(x) -> (probs, pos_q, pos_k)`` for its input ``x`` (B, H, W, C): probs
(..., heads, Nq, Nk) with rows summing to 1, and token coordinates (Nq, 2), (Nk, 2) in grid units
(row, col; window-local coordinates are fine for windowed attention). Here forward pre-hooks on every
such module collect its inputs during a normal forward; the distance of a query is
Σ_k p(q, k) · ||pos_q - pos_k||, averaged over queries and images, per head, times the stride of the
module's grid (input size / grid height) to give input pixels.

    result = attention_distance_analysis(subject, n_images=32)   # per module (call) and head
"""
from __future__ import annotations

from typing import Optional

import torch

from spach.analysis.common import ImageSet, Subject


def mean_distance(probs: torch.Tensor, pos_q: torch.Tensor, pos_k: torch.Tensor) -> torch.Tensor:
    """Mean attention distance per head (grid units): probs (..., heads, Nq, Nk) -> (heads,)."""
    if probs.shape[-2:] != (pos_q.shape[0], pos_k.shape[0]):
        raise ValueError(f"probs {tuple(probs.shape)} does not match {pos_q.shape[0]} queries and "
                         f"{pos_k.shape[0]} keys")
    dist = torch.cdist(pos_q.double(), pos_k.double())          # (Nq, Nk)
    per_query = (probs.double() * dist).sum(-1)                 # (..., heads, Nq)
    heads = per_query.shape[-2]
    return per_query.transpose(-1, -2).reshape(-1, heads).mean(0)


def attention_modules(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    return [(n, m) for n, m in model.named_modules() if callable(getattr(m, "attention_probs", None))]


@torch.no_grad()
def attention_distance_analysis(subject: Subject, n_images: int = 32, batch_size: int = 32,
                                images: Optional[ImageSet] = None) -> dict:
    """Mean attention distance per head for every call of an attention-exposing module (input pixels).

    Returns {"layers": [{"module", "call", "stride", "grid", "heads": [pixels per head], "mean"}], "n_images"};
    empty layers for a model without attention (conv, MLP).
    """
    modules = attention_modules(subject.model)
    images = images or ImageSet.for_subject(subject, n_images)
    if not modules:
        return {"layers": [], "n_images": images.n}
    sums: dict[int, torch.Tensor] = {}
    meta: dict[int, dict] = {}
    calls: list[tuple[str, torch.nn.Module, torch.Tensor]] = []

    def hook_for(name):
        def hook(module, args):
            calls.append((name, module, args[0]))
        return hook

    handles = [m.register_forward_pre_hook(hook_for(n)) for n, m in modules]
    try:
        for x, _ in images.batches(batch_size):
            calls.clear()
            subject.logits(x)
            seen: dict[str, int] = {}
            for index, (name, module, inp) in enumerate(calls):
                call = seen[name] = seen.get(name, -1) + 1   # a shared module is called by several blocks
                probs, pos_q, pos_k = module.attention_probs(inp)
                stride = subject.img_size / inp.shape[1]
                d = mean_distance(probs, pos_q, pos_k) * stride * x.shape[0]
                sums[index] = sums.get(index, 0) + d
                meta[index] = {"module": name, "call": call, "stride": stride, "grid": list(inp.shape[1:3])}
    finally:
        for h in handles:
            h.remove()
    layers = []
    for index in sorted(sums):
        heads = (sums[index] / images.n).tolist()
        layers.append(dict(meta[index], heads=heads, mean=sum(heads) / len(heads)))
    return {"layers": layers, "n_images": images.n}
