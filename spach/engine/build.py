"""Build the model for a run and check, before any training, that it can take the data.

    model = build_model("spach_ms_xxs_patch4_224_conv", num_classes=10, img_size=32,
                        model_kwargs={"hidden_dim": 16}, drop_path=0.1)
    check_model_input(model, img_size=32, num_classes=10)   # ValueError if it cannot
    create_optimizer_v2(model, opt="adamw", lr=1e-3, **optimizer_kernel_kwargs("adamw"))
    model = build_model("spach_ms_xxs_patch4_224_conv", num_classes=10, pretrained=True)  # timm's pretrained path
    print(pretrained_note("spach_ms_xxs_patch4_224_conv", 10))   # where the weights came from, in one line
"""
from __future__ import annotations

import inspect
from typing import Optional

import torch
from timm.models import is_model, parse_model_name
from torch import nn

from spach.models import create_model  # importing spach.models registers the zoo in timm


def build_model(name: str, *, num_classes: int, img_size: Optional[int] = None,
                model_kwargs: Optional[dict] = None, drop_path: Optional[float] = None,
                pretrained: bool = False, pretrained_file: Optional[str] = None) -> nn.Module:
    """`spach.models.create_model` (any spach or timm name) with the run's classes, input size and drop path.

    `img_size` is passed to models whose constructor takes it (spach, ViT-like timm models);
    for others (e.g. ResNets) it is only the data size. ValueError for an unknown name or
    `model_kwargs` the model does not take. `pretrained=True` loads the weights of the
    model's `pretrained_cfg` through timm (its URL, downloaded once into the torch hub
    cache), or `pretrained_file` (a path or an http(s) URL) instead; with another class
    count timm keeps the trunk and starts a new classifier.
    """
    source, _ = parse_model_name(name)  # ValueError for a name that looks like a path
    if source is None and not is_model(name):
        raise ValueError(f"unknown model {name!r} (see `spach models`, or any timm model name)")
    kw = dict(model_kwargs or {})
    if pretrained:
        kw["pretrained"] = True
        kw["pretrained_cfg_overlay"] = _pretrained_overlay(name, pretrained_file)
    if "num_classes" in kw and kw["num_classes"] != num_classes:
        raise ValueError(f"model_kwargs num_classes={kw['num_classes']} does not match the data's "
                         f"{num_classes} classes")
    kw["num_classes"] = num_classes
    if drop_path is not None:
        kw.setdefault("drop_path_rate", drop_path)
    if img_size is not None and "img_size" not in kw:
        try:
            return create_model(name, **kw, img_size=img_size)
        except TypeError:
            pass  # a constructor without img_size (or a model_kwargs key it lacks): tried again below
    try:
        return create_model(name, **kw)
    except TypeError as e:
        if not model_kwargs:
            raise  # nothing of the user's in the call: a bug
        base = {k: v for k, v in kw.items() if k not in model_kwargs and not k.startswith("pretrained")}
        error = _model_kwargs_error(name, model_kwargs, base, e)
        if error is e:
            raise
        raise error from e


def _model_kwargs_error(name: str, model_kwargs: dict, base: dict, error: TypeError) -> Exception:
    """ValueError naming the model_kwargs keys `name` does not take, or `error` itself if they are not to blame.

    The user's keys are blamed only if the model builds without them; then the keys missing from
    the built class's constructor are named (if it takes **kwargs, the error's own text is quoted).
    """
    try:
        cls = type(create_model(name, **base))
    except Exception:  # noqa: BLE001 — it fails without them too: not theirs to blame, the original error stands
        return error
    params = inspect.signature(cls.__init__).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        unknown = []
    else:
        unknown = [k for k in model_kwargs if k not in params]
    if unknown:
        return ValueError(f"model_kwargs: {name} does not take {', '.join(map(repr, unknown))} "
                          f"(check the spelling against its constructor)")
    return ValueError(f"model_kwargs {model_kwargs} do not fit {name}: {type(error).__name__}: {error}")


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



# torch optimizers (as timm builds them) with a fused kernel: one pass over all parameters
# instead of a dozen element-wise ops per parameter tensor (about 10x faster on CPU)
FUSED_OPTIMIZERS = ("adam", "adamw")


def optimizer_kernel_kwargs(opt: str) -> dict:
    """Extra keywords for `timm.optim.create_optimizer_v2(opt=...)` selecting the fastest update kernel.

    Adam/AdamW: torch's fused implementation (CPU and CUDA, same update rule); others: as timm builds them.
    """
    return {"fused": True} if opt.lower() in FUSED_OPTIMIZERS else {}


def _pretrained_overlay(name: str, pretrained_file: Optional[str]) -> dict:
    """timm's pretrained_cfg_overlay for a weights location; ValueError if the model has none."""
    if pretrained_file:
        if pretrained_file.startswith(("http://", "https://")):
            return {"url": pretrained_file, "file": None, "hf_hub_id": None}
        from pathlib import Path

        if not Path(pretrained_file).is_file():
            raise FileNotFoundError(f"pretrained_file not found: {pretrained_file}")
        return {"file": pretrained_file}
    from timm.models import get_pretrained_cfg

    cfg = get_pretrained_cfg(name)
    if cfg is None or not (cfg.url or cfg.file or cfg.hf_hub_id):
        raise ValueError(f"{name} has no pretrained weights (its pretrained_cfg names no file or URL): "
                         f"pass --pretrained-file PATH_OR_URL, or --init-checkpoint FILE, or drop --pretrained")
    return {}


def pretrained_note(name: str, num_classes: int, pretrained_file: Optional[str] = None) -> str:
    """One line saying where `build_model(..., pretrained=True)` took the weights from and whether
    the classifier was kept or started anew (timm drops it when the class count differs)."""
    from timm.models import get_pretrained_cfg

    cfg = get_pretrained_cfg(name)
    where = pretrained_file or (cfg and (cfg.file or cfg.url or cfg.hf_hub_id)) or "?"
    old = cfg.num_classes if cfg is not None else None
    if old is not None and old != num_classes:
        return (f"pretrained weights from {where}: loaded the trunk; their {old}-class classifier "
                f"({cfg.classifier}) does not fit the {num_classes} classes, so a new classifier starts from scratch")
    return f"pretrained weights from {where}: loaded (classifier included)"
