"""Helpers shared by the model tests: randomised tiny models, gradient and feature-map comparisons."""
from __future__ import annotations

import timm
import torch


def randomised(model: torch.nn.Module, std: float = 0.2) -> torch.nn.Module:
    """Every weight drawn from N(0, std) (timm zero-inits the head), so no branch is negligible; eval mode."""
    for p in model.parameters():
        torch.nn.init.normal_(p, std=std)
    return model.eval()


def assert_checkpointing_keeps_gradients(model: torch.nn.Module, x: torch.Tensor) -> None:
    """Gradient checkpointing must give the gradients of the plain backward pass."""
    model(x).pow(2).sum().backward()
    ref = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    model.set_grad_checkpointing(True)
    model(x).pow(2).sum().backward()
    for g, r in zip((p.grad for p in model.parameters()), ref):
        assert torch.allclose(g, r, atol=1e-6)


def getter_and_fx_maps(name: str, x: torch.Tensor, **kwargs):
    """The ``features_only`` maps of ``name`` through timm's getter and its torch.fx extractor (same weights).

    Returns ``(getter_maps, fx_maps, fx_model)``.
    """
    torch.manual_seed(0)
    getter = timm.create_model(name, features_only=True, **kwargs).eval()
    torch.manual_seed(0)  # the same initial weights
    fx = timm.create_model(name, features_only=True, feature_cls="fx", **kwargs).eval()
    with torch.no_grad():
        return getter(x), fx(x), fx
