"""Build the model for a run and check, before any training, that it can take the data.

    model = build_model("spach_ms_xxs_patch4_224_conv", num_classes=10, img_size=32,
                        model_kwargs={"hidden_dim": 16}, drop_path=0.1)
    check_model_input(model, img_size=32, num_classes=10)   # ValueError if it cannot
"""
from __future__ import annotations

import re
from typing import Optional

import torch
from torch import nn


def build_model(name: str, *, num_classes: int, img_size: Optional[int] = None,
                model_kwargs: Optional[dict] = None, drop_path: Optional[float] = None) -> nn.Module:
    """`spach.create_model` (any spach or timm name) with the run's classes, input size and drop path.

    `img_size` is passed to models whose constructor takes it (spach, ViT-like timm models);
    for others (e.g. ResNets) it is only the data size.
    """
    from spach import create_model  # the zoo registers itself in timm on `import spach`

    kw = dict(model_kwargs or {})
    if "num_classes" in kw and kw["num_classes"] != num_classes:
        raise ValueError(f"model_kwargs num_classes={kw['num_classes']} does not match the data's "
                         f"{num_classes} classes")
    kw["num_classes"] = num_classes
    if drop_path is not None:
        kw.setdefault("drop_path_rate", drop_path)
    try:
        if img_size is not None and "img_size" not in kw:
            try:
                return create_model(name, **kw, img_size=img_size)
            except TypeError as e:
                if "img_size" not in str(e):
                    raise
        return create_model(name, **kw)
    except RuntimeError as e:
        if "Unknown model" in str(e):
            raise ValueError(f"unknown model {name!r} (see `spach models`, or any timm model name)") from None
        raise
    except TypeError as e:  # a model_kwargs key the constructor does not know
        unknown = re.search(r"unexpected keyword argument '(\w+)'", str(e))
        if unknown is None:
            raise
        raise ValueError(f"model_kwargs: {name} does not take {unknown.group(1)!r} "
                         f"(check the spelling against its constructor)") from None


def check_model_input(model: nn.Module, img_size: int, num_classes: int, device=None) -> None:
    """One dry forward of a 1-image batch: ValueError naming the problem if the model cannot take it."""
    name = type(model).__name__
    device = device or next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(torch.zeros(1, 3, img_size, img_size, device=device))
    except Exception as e:  # noqa: BLE001 — any failure here means the size is wrong for the model
        raise ValueError(f"{name} cannot take {img_size}x{img_size} inputs (--img-size): "
                         f"{type(e).__name__}: {e}") from None
    finally:
        model.train(was_training)
    if tuple(out.shape) != (1, num_classes):
        raise ValueError(f"{name} returns shape {tuple(out.shape)} for one image, expected (1, {num_classes})")

