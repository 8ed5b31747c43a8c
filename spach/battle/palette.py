"""How families are ordered and coloured in the report's tables and figures (one colour per family, stable)."""
from __future__ import annotations

FAMILY_COLOR = {"conv": "tab:blue", "attn": "tab:red", "mlp": "tab:green", "hybrid": "tab:purple",
                "smlp-net": "tab:olive", "shift-vit": "tab:orange", "pool": "gold", "shift": "tab:brown",
                "smlp": "yellowgreen", "gfilter": "tab:cyan", "window": "tab:pink"}
_PLUGIN_COLORS = ("black", "navy", "lime", "teal", "maroon", "gray")


def family_rank(family: str) -> int:
    """Table order: the paper's families, the release's sMLPNet/ShiftViT, then the registry's other mixers
    (newcomers, then plugins)."""
    from spach.models.registry import mixer_names

    order = ["conv", "attn", "mlp", "hybrid", "smlp-net", "shift-vit"]
    order += [m for m in mixer_names() if m not in order]
    return order.index(family) if family in order else len(order)


def family_color(family: str) -> str:
    """A fixed colour per family; plugin families get one of a spare palette (stable per name)."""
    if family in FAMILY_COLOR:
        return FAMILY_COLOR[family]
    return _PLUGIN_COLORS[sum(map(ord, family)) % len(_PLUGIN_COLORS)]
