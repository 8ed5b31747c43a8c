"""The rest of the original release, sMLPNet and ShiftViT, as data, registered in timm.

``import spach`` registers every name below, so ``timm.create_model(name, **overrides)``
works (``num_classes``, ``drop_path_rate``, ``img_size``, ``in_chans`` and every
constructor keyword). Each entry is the class and the original factory's keywords.
"""
from __future__ import annotations

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model

from spach.models.checkpoint import ORIGINAL_LAYOUT_FILTERS, SAFE_CLASSES
from spach.models.shiftvit import ShiftViT
from spach.models.smlpnet import SMLPNet
from spach.models.staged import build_placed

RELEASE_URL = "https://github.com/microsoft/SPACH/releases/download/v1.0/"


def _smlp(dim, depths, dp_rate):
    return dict(cls=SMLPNet, dim=dim, alpha=3, patch_size=4, depths=depths, dp_rate=dp_rate)


def _shift(embed_dim, n_div, depths, mlp_ratio, drop_path_rate):
    return dict(cls=ShiftViT, embed_dim=embed_dim, depths=depths, mlp_ratio=mlp_ratio,
                drop_path_rate=drop_path_rate, n_div=n_div)


# name -> (class + constructor keywords), as in the original release; all at 224x224.
RELEASE_ZOO: dict[str, dict] = {
    "smlpnet_tiny": _smlp(80, [2, 8, 14, 2], 0.0),
    "smlpnet_small": _smlp(96, [2, 10, 24, 2], 0.2),
    "smlpnet_base": _smlp(112, [2, 10, 24, 2], 0.3),
    "shiftvit_light_tiny": _shift(96, 12, [2, 2, 6, 2], 4, 0.2),
    "shiftvit_r4_tiny": _shift(96, 12, [2, 2, 12, 3], 4, 0.2),
    "shiftvit_r2_tiny": _shift(96, 12, [6, 8, 18, 6], 2, 0.2),
    "shiftvit_light_small": _shift(96, 12, [2, 2, 18, 2], 4, 0.4),
    "shiftvit_r4_small": _shift(96, 12, [2, 6, 24, 4], 4, 0.4),
    "shiftvit_r2_small": _shift(96, 12, [10, 18, 36, 10], 2, 0.4),
    "shiftvit_light_base": _shift(128, 16, [2, 2, 18, 2], 4, 0.5),
    "shiftvit_r4_base": _shift(128, 16, [4, 6, 22, 4], 4, 0.5),
    "shiftvit_r2_base": _shift(128, 16, [10, 18, 36, 10], 2, 0.6),
}

# ImageNet-1k top-1 of the original README, and the released weight file (None: not released)
RELEASE_WEIGHTS: dict[str, tuple[str | None, float]] = {
    "smlpnet_tiny": (None, 81.9),
    "smlpnet_small": ("smlp_s.pth", 83.1),
    "smlpnet_base": ("smlp_b.pth", 83.4),
    "shiftvit_light_tiny": ("shiftvit_tiny_light.pth", 79.4),
    "shiftvit_r2_tiny": ("shiftvit_tiny_r2.pth", 81.7),
    "shiftvit_light_small": ("shiftvit_small_light.pth", 81.6),
    "shiftvit_r2_small": ("shiftvit_small_r2.pth", 82.8),
}

FAMILIES = {SMLPNet: "smlp-net", ShiftViT: "shift-vit"}


def release_family(name: str) -> str:
    """``smlp-net`` or ``shift-vit`` for a name of :data:`RELEASE_ZOO`."""
    return FAMILIES[RELEASE_ZOO[name]["cls"]]


def release_size(name: str) -> str:
    """The size part of a name: ``tiny`` for ``smlpnet_tiny``, ``r2_small`` for ``shiftvit_r2_small``."""
    return name.split("_", 1)[1]


def _cfg(name: str) -> dict:
    entry = RELEASE_ZOO[name]
    file, top1 = RELEASE_WEIGHTS.get(name, (None, None))
    is_smlp = entry["cls"] is SMLPNet
    return dict(
        url=RELEASE_URL + file if file else "", num_classes=1000, input_size=(3, 224, 224),
        pool_size=(7, 7), crop_pct=0.875, interpolation="bicubic", mean=IMAGENET_DEFAULT_MEAN,
        std=IMAGENET_DEFAULT_STD, fixed_input_size=is_smlp, first_conv="stem" if is_smlp else "stem.proj",
        classifier="head", license="mit", paper_ids="arXiv:2109.05422" if is_smlp else "arXiv:2201.10801",
        origin_url="https://github.com/microsoft/SPACH",
        notes=(f"original release weights: {file} (ImageNet-1k top-1 {top1})",) if file else
              ((f"no released weights (ImageNet-1k top-1 {top1} in the original README)",) if top1 else ()),
    )


default_cfgs = generate_default_cfgs({name: _cfg(name) for name in RELEASE_ZOO})


def _create(name: str, pretrained: bool = False, **kwargs):
    entry = dict(RELEASE_ZOO[name])
    cls = entry.pop("cls")
    if cls is SMLPNet:
        # timm's spellings override the original ones of the table (and reach the model under one name)
        if "drop_path_rate" in kwargs:
            entry.pop("dp_rate")
        if "image_size" in kwargs and "img_size" not in kwargs:
            kwargs["img_size"] = kwargs.pop("image_size")
    kwargs = {**entry, **kwargs}
    out_indices = kwargs.pop("out_indices", (0, 1, 2, 3))
    device, dtype = kwargs.pop("device", None), kwargs.pop("dtype", None)  # timm's factory placement
    # timm reads pretrained files with weights_only=True; the original's may carry their run's Namespace
    with torch.serialization.safe_globals(SAFE_CLASSES):
        return build_placed(lambda: build_model_with_cfg(
            cls, name, pretrained, pretrained_filter_fn=ORIGINAL_LAYOUT_FILTERS[cls],
            feature_cfg=dict(out_indices=out_indices, feature_cls="getter"), **kwargs), device, dtype)


def _make_entrypoint(name: str):
    def entrypoint(pretrained: bool = False, **kwargs):
        return _create(name, pretrained=pretrained, **kwargs)

    paper = "sMLPNet (arXiv 2109.05422)" if RELEASE_ZOO[name]["cls"] is SMLPNet else "ShiftViT (arXiv 2201.10801)"
    entrypoint.__name__ = entrypoint.__qualname__ = name
    entrypoint.__doc__ = f"{paper}: {name} of the original SPACH release."
    entrypoint.__module__ = __name__
    return register_model(entrypoint)


for _name in RELEASE_ZOO:
    globals()[_name] = _make_entrypoint(_name)
