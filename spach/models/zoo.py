"""The model zoo of the paper, as data, registered in timm.

``import spach`` registers every name below, so ``timm.create_model(name, **overrides)``
works. Each entry is the class and the original constructor's keywords.
"""
from __future__ import annotations

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model

from spach.models.registry import get_mixer
from spach.models.release_zoo import RELEASE_URL
from spach.models.spach import Spach, SpachMS, checkpoint_filter_fn
from spach.models.staged import build_placed


def _ss(hidden_dim, num_heads, channel_ratio, mixer, depth):
    return dict(cls=Spach, patch_size=16, hidden_dim=hidden_dim, num_heads=num_heads,
                channel_ratio=channel_ratio, net_arch=[(mixer, depth)])


def _ms(hidden_dim, num_heads, channel_ratio, net_arch, **kw):
    return dict(cls=SpachMS, patch_size=4, hidden_dim=hidden_dim, num_heads=num_heads,
                channel_ratio=channel_ratio, net_arch=net_arch, **kw)


def _ms_family(mixer, depths):
    """Stage 1 is conv; stages 2-4 use ``mixer``."""
    return [[("conv", depths[0])]] + [[(mixer, d)] for d in depths[1:]]


_XS_HYBRID = [[("conv", 3)], [("conv", 4)], [("conv", 2), ("attn", 10)], [("conv", 1), ("attn", 2)]]
_S_HYBRID = [[("conv", 3)], [("conv", 2), ("attn", 2)], [("conv", 2), ("attn", 10)], [("conv", 1), ("attn", 2)]]

# name -> (class + constructor keywords), the zoo of the README ("Models"); all at img_size 224, token_ratio 0.5, stem conv1.
ZOO: dict[str, dict] = {
    "spach_xxs_patch16_224_conv": _ss(384, 12, 2.0, "conv", 12),
    "spach_xxs_patch16_224_attn": _ss(192, 6, 2.0, "attn", 12),
    "spach_xxs_patch16_224_mlp": _ss(384, 12, 2.0, "mlp", 12),
    "spach_xs_patch16_224_conv": _ss(384, 12, 2.0, "conv", 24),
    "spach_xs_patch16_224_attn": _ss(384, 12, 2.0, "attn", 12),
    "spach_xs_patch16_224_mlp": _ss(384, 12, 2.0, "mlp", 24),
    "spach_s_patch16_224_conv": _ss(512, 16, 3.0, "conv", 24),
    "spach_s_patch16_224_attn": _ss(512, 16, 3.0, "attn", 12),
    "spach_s_patch16_224_mlp": _ss(512, 16, 3.0, "mlp", 24),
    "spach_ms_xxs_patch4_224_conv": _ms(64, 2, 2.0, _ms_family("conv", (2, 2, 6, 2))),
    "spach_ms_xxs_patch4_224_attn": _ms(32, 1, 2.0, _ms_family("attn", (2, 2, 6, 2))),
    "spach_ms_xxs_patch4_224_mlp": _ms(64, 2, 2.0, _ms_family("mlp", (2, 2, 6, 2))),
    "spach_ms_xs_patch4_224_conv": _ms(96, 3, 2.0, _ms_family("conv", (3, 4, 12, 3))),
    "spach_ms_xs_patch4_224_attn": _ms(64, 2, 2.0, _ms_family("attn", (3, 4, 12, 3))),
    "spach_ms_xs_patch4_224_mlp": _ms(96, 3, 2.0, _ms_family("mlp", (3, 4, 12, 3))),
    "spach_ms_s_patch4_224_conv": _ms(128, 4, 3.0, _ms_family("conv", (3, 4, 12, 3))),
    "spach_ms_s_patch4_224_attn": _ms(96, 3, 3.0, _ms_family("attn", (3, 4, 12, 3))),
    "spach_ms_s_patch4_224_mlp": _ms(128, 4, 3.0, _ms_family("mlp", (3, 4, 12, 3))),
    "spach_ms_xs_patch4_224_hybrid": _ms(96, 3, 2.0, _XS_HYBRID),
    "spach_ms_s_patch4_224_hybrid": _ms(128, 4, 3.0, _S_HYBRID),
    "spach_ms_s_plus_patch4_224_hybrid": _ms(128, 4, 3.0, _S_HYBRID, stem_type="conv4"),
}

# The arena's newcomers (spach.models.mixers) in the multi-stage layout of the paper (stage 1 conv), with the
# conv models' depths and channel ratios; widths chosen so that each has the conv model's parameters
# within ±15% (docs/mixers.md lists params and MACs). (hidden_dim, num_heads) per size:
NEWCOMER_WIDTHS: dict[str, dict[str, tuple[int, int]]] = {
    "pool": {"xxs": (64, 2), "xs": (96, 3), "s": (128, 4)},       # no weights: the conv model's widths
    "shift": {"xxs": (64, 2), "xs": (96, 3), "s": (128, 4)},      # no weights: the conv model's widths
    "smlp": {"xxs": (48, 2), "xs": (72, 3), "s": (104, 4)},       # + a 3C -> C fuse per block: narrower
    "gfilter": {"xxs": (64, 2), "xs": (96, 3), "s": (128, 4)},    # + an H x (W/2+1) x C complex filter
    "window": {"xxs": (48, 2), "xs": (72, 3), "s": (96, 3)},      # attention's 4C^2 per block: narrower
}
_CONV_SIZES = {"xxs": (2.0, (2, 2, 6, 2)), "xs": (2.0, (3, 4, 12, 3)), "s": (3.0, (3, 4, 12, 3))}
# name -> class + keywords, like ZOO (which stays the paper's 21 models)
NEWCOMERS: dict[str, dict] = {
    f"spach_ms_{size}_patch4_224_{mixer}": _ms(dim, heads, _CONV_SIZES[size][0],
                                               _ms_family(mixer, _CONV_SIZES[size][1]))
    for mixer, widths in NEWCOMER_WIDTHS.items() for size, (dim, heads) in widths.items()
}
# every registered name: the paper's zoo, then the newcomers
ALL_MODELS: dict[str, dict] = {**ZOO, **NEWCOMERS}

# The original release (v1.0 of microsoft/SPACH): file name and ImageNet-1k top-1.
# Hybrid-MS-XS has a published top-1 but no released file (file None: no URL).
ORIGINAL_WEIGHTS: dict[str, tuple[str | None, float]] = {
    "spach_ms_xxs_patch4_224_conv": ("spach_ms_conv_xxs.pth", 73.1),
    "spach_ms_xxs_patch4_224_attn": ("spach_ms_trans_xxs.pth", 65.4),
    "spach_ms_xxs_patch4_224_mlp": ("spach_ms_mlp_xxs.pth", 74.5),
    "spach_ms_s_patch4_224_conv": ("spach_ms_conv_s.pth", 81.6),
    "spach_ms_s_patch4_224_attn": ("spach_ms_trans_s.pth", 82.9),
    "spach_ms_s_patch4_224_mlp": ("spach_ms_mlp_s.pth", 82.1),
    "spach_ms_xs_patch4_224_hybrid": (None, 82.4),
    "spach_ms_s_patch4_224_hybrid": ("spach_ms_hybrid_s.pth", 83.7),
    "spach_ms_s_plus_patch4_224_hybrid": ("spach_ms_hybrid_s+.pth", 83.9),
}


def release_url(name: str) -> str:
    """The download URL of a zoo name's original weights ('' where none were released)."""
    file = ORIGINAL_WEIGHTS.get(name, (None, 0.0))[0]
    return RELEASE_URL + file if file else ""


def family(name: str) -> str:
    """The mixer family of a zoo name (``conv``, ``attn``, ``mlp``, ``pool``, ..., or ``hybrid``)."""
    return name.rsplit("_", 1)[-1]


def layout(name: str) -> str:
    """``ms`` (multi-stage) or ``ss`` (single-stage) for a zoo name."""
    return "ms" if ALL_MODELS[name]["cls"] is SpachMS else "ss"


def fixed_input_size(net_arch) -> bool:
    """Does a ``net_arch`` (single- or multi-stage) use a mixer whose weights fix the input size?"""
    stages = [net_arch] if isinstance(net_arch[0][0], str) else net_arch
    return any(get_mixer(m).fixed_input_size for stage in stages for m, _ in stage)


def _cfg(name: str) -> dict:
    entry = ALL_MODELS[name]
    multi_stage = entry["cls"] is SpachMS
    file, top1 = ORIGINAL_WEIGHTS.get(name, (None, None))
    if file:
        notes = (f"original release weights: {file} (ImageNet-1k top-1 {top1})",)
    elif top1 is not None:
        notes = (f"ImageNet-1k top-1 {top1} published; no weights were released",)
    else:
        notes = ()
    return dict(
        url=release_url(name), num_classes=1000, input_size=(3, 224, 224), pool_size=(7, 7) if multi_stage else (14, 14),
        crop_pct=0.875, interpolation="bicubic", mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD,
        fixed_input_size=fixed_input_size(entry["net_arch"]),
        first_conv="stem.proj.0" if entry.get("stem_type") == "conv4" else "stem.proj",
        classifier="head", license="mit", paper_ids="arXiv:2108.13002",
        origin_url="https://github.com/microsoft/SPACH",
        notes=notes,
    )


default_cfgs = generate_default_cfgs({name: _cfg(name) for name in ALL_MODELS})


def _create(name: str, pretrained: bool = False, **kwargs):
    entry = dict(ALL_MODELS[name])
    cls = entry.pop("cls")
    multi_stage = cls is SpachMS
    kwargs = {**entry, **kwargs}
    # features_only: the four stage maps of multi-stage models; the last four block maps of single-stage ones
    out_indices = kwargs.pop("out_indices", (0, 1, 2, 3) if multi_stage else 4)
    device, dtype = kwargs.pop("device", None), kwargs.pop("dtype", None)  # timm's factory placement
    return build_placed(lambda: build_model_with_cfg(
        cls, name, pretrained, pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(out_indices=out_indices, feature_cls="getter"), **kwargs), device, dtype)


def _make_entrypoint(name: str):
    def entrypoint(pretrained: bool = False, **kwargs):
        return _create(name, pretrained=pretrained, **kwargs)

    entrypoint.__name__ = entrypoint.__qualname__ = name
    entrypoint.__doc__ = f"SPACH {name} (A Battle of Network Structures, arXiv 2108.13002)." + (
        f" Spatial mixer: {get_mixer(family(name)).paper}." if family(name) in NEWCOMER_WIDTHS else "")
    entrypoint.__module__ = __name__
    return register_model(entrypoint)


for _name in ALL_MODELS:
    globals()[_name] = _make_entrypoint(_name)
