"""ShiftViT of the original SPACH release (arXiv 2201.10801): exact, channels-last, timm's face.

Attention replaced by a zero-parameter shift of a few channels; each block::

    x = shift(x)                                   # 4 groups of C // n_div channels move one pixel
    x = x + DropPath(MLP(norm(x)))                 # norm: GroupNorm(1, C) ("GN1") or BatchNorm

A patch-embedding conv (+ norm), four stages at strides ``patch_size * 2**i``
and widths ``embed_dim * 2**i``; the original ends stages 1-3 with a
PatchMerging (norm, 2x2 stride-2 conv), which here starts stages 2-4, so each
stage's output is a feature map at its stride. No weight depends on the input
size: any size whose sides divide by ``patch_size * 8`` works. Tokens flow
``(B, H, W, C)`` (the 1x1 convs of the MLP are Linear layers on them);
``forward_features`` returns that map after the final norm
(``output_fmt = "NHWC"``). The original release's checkpoints load through
:func:`checkpoint_filter_fn`.
"""
from __future__ import annotations

import re
from typing import Sequence

import torch
import torch.nn as nn
from timm.layers import DropPath, to_2tuple, trunc_normal_

from spach.models.kernels import use_fused_mlp
from spach.models.layers import ChannelMlp, nchw_to_nhwc, nhwc_to_nchw
from spach.models.ops import BatchNormNhwc, GroupNorm1Nhwc, partial_shift
from spach.models.staged import (StagedNet, StagedStage, check_global_pool, linear_drop_path_rates,
                                  original_layout_filter)

NORM_LAYERS = {"GN1": GroupNorm1Nhwc, "BN": BatchNormNhwc}
ACT_LAYERS = {"GELU": nn.GELU, "RELU": nn.ReLU}


def _layer(kind: str, value, table: dict):
    # 'GN1' / 'BN' and 'GELU' / 'RELU' as in the original (any case), or a module class
    if isinstance(value, type) and issubclass(value, nn.Module):
        return value
    if isinstance(value, str) and value.upper() in table:
        return table[value.upper()]
    raise ValueError(f"unknown {kind} {value!r}: expected one of {', '.join(repr(k) for k in table)}")


class ShiftBlock(nn.Module):
    """``x = shift(x); x = x + DropPath(MLP(norm(x)))``; no residual around the shift."""

    def __init__(self, dim: int, n_div: int = 12, mlp_ratio: float = 4.0, drop: float = 0.0,
                 drop_path: float = 0.0, norm_layer=GroupNorm1Nhwc, act_layer=nn.GELU):
        super().__init__()
        self.n_div = n_div
        self.norm = norm_layer(dim)
        self.mlp = ChannelMlp(dim, int(dim * mlp_ratio), drop=drop)
        self.fusable = act_layer is nn.GELU  # oneDNN fuses GELU; other activations run the plain path
        if not self.fusable:
            self.mlp.act = act_layer()
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (B, H, W, C)
        x = partial_shift(x, self.n_div, channel_dim=-1)
        if self.fusable and not torch.jit.is_scripting() and use_fused_mlp(x, self.training):
            return self.mlp.fused_residual(self.norm(x), x)  # CPU inference: bias, GELU and sum in oneDNN
        return x + self.drop_path(self.mlp(self.norm(x)))


class PatchEmbed(nn.Module):
    """Conv2d(C_in -> C, kernel = stride = patch_size, with bias), then the norm (``patch_norm``)."""

    def __init__(self, in_chans: int, dim: int, patch_size: int, norm_layer=GroupNorm1Nhwc, patch_norm: bool = True):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, dim, patch_size, stride=patch_size)
        self.norm = norm_layer(dim) if patch_norm else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # (B, C_in, H, W) -> (B, H/p, W/p, C)
        return self.norm(nchw_to_nhwc(self.proj(x.contiguous(memory_format=torch.channels_last))))


class PatchMerging(nn.Module):
    """The original's downsampling: norm, then Conv2d(C -> 2C, 2x2, stride 2, no bias)."""

    def __init__(self, dim: int, out_dim: int, norm_layer=GroupNorm1Nhwc):
        super().__init__()
        self.norm = norm_layer(dim)
        self.reduction = nn.Conv2d(dim, out_dim, 2, stride=2, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nchw_to_nhwc(self.reduction(nhwc_to_nchw(self.norm(x))))


class ShiftViT(StagedNet):
    """ShiftViT. Keywords are the original release's::

        ShiftViT(n_div=12, img_size=224, patch_size=4, in_chans=3, num_classes=1000, embed_dim=96,
                 depths=(2, 2, 6, 2), mlp_ratio=4., drop_rate=0., drop_path_rate=0.1,
                 norm_layer='GN1' | 'BN', act_layer='GELU' | 'RELU', patch_norm=True)

    plus ``global_pool`` ('avg' or ''). Stochastic depth rises linearly from 0 to
    ``drop_path_rate`` over all blocks. ``img_size`` only sets the default input
    size (``pretrained_cfg``); no weight depends on it.
    """

    def __init__(self, n_div: int = 12, img_size=224, patch_size: int = 4, in_chans: int = 3,
                 num_classes: int = 1000, embed_dim: int = 96, depths: Sequence[int] = (2, 2, 6, 2),
                 mlp_ratio: float = 4.0, drop_rate: float = 0.0, drop_path_rate: float = 0.1,
                 norm_layer="GN1", act_layer="GELU", patch_norm: bool = True, global_pool: str = "avg"):
        super().__init__()
        norm_layer = _layer("norm_layer", norm_layer, NORM_LAYERS)
        act_layer = _layer("act_layer", act_layer, ACT_LAYERS)
        depths = list(depths)
        if not depths or any(not isinstance(d, int) or d < 1 for d in depths):
            raise ValueError(f"depths must be a non-empty list of positive block counts, got {depths!r}")
        if n_div < 1:
            raise ValueError(f"n_div must be >= 1 (a quarter of C // n_div channels shifts each way), got {n_div}")
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.global_pool = check_global_pool(global_pool)
        self.img_size = to_2tuple(img_size)
        self.patch_size = patch_size
        self.stride = patch_size * 2 ** (len(depths) - 1)
        self.fixed_input_size = False  # no weight depends on the input size
        self.depths = depths

        self.stem = PatchEmbed(in_chans, embed_dim, patch_size, norm_layer, patch_norm)
        self.pos_drop = nn.Dropout(drop_rate)
        dpr = linear_drop_path_rates(drop_path_rate, depths)
        stages, self.feature_info = [], []
        width = embed_dim
        for i, depth in enumerate(depths):
            downsample = None
            if i > 0:
                downsample, width = PatchMerging(width, width * 2, norm_layer), width * 2
            stages.append(StagedStage(downsample, [
                ShiftBlock(width, n_div, mlp_ratio, drop_rate, dpr[i][j], norm_layer, act_layer)
                for j in range(depth)]))
            self.feature_info.append(dict(num_chs=width, reduction=patch_size * 2 ** i, module=f"stages.{i}"))
        self.stages = nn.Sequential(*stages)
        self.num_features = self.head_hidden_size = width
        self.norm = norm_layer(width)
        self.head = nn.Linear(width, num_classes) if num_classes > 0 else nn.Identity()
        if isinstance(self.head, nn.Linear):  # the classifier trunc-normal(0.02), zero bias (Swin's convention);
            # every other layer keeps PyTorch's default init (the MLP's Linear equals the 1x1 conv's)
            trunc_normal_(self.head.weight, std=0.02)
            nn.init.zeros_(self.head.bias)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Patch embedding: (B, C_in, H, W) -> (B, H/p, W/p, C)."""
        return self.pos_drop(self.stem(x))


# ---------------------------------------------------------------------- original checkpoints
def is_original_layout(state_dict: dict) -> bool:
    """True for a state dict in the original ShiftViT layout (``patch_embed.*``, ``layers.*``)."""
    return any(k.startswith("patch_embed.") for k in state_dict)


@original_layout_filter(is_original_layout)
def checkpoint_filter_fn(state_dict: dict, model: nn.Module | None = None) -> dict:
    """Map an original ShiftViT state dict (``{"model": sd}`` or ``sd``) to this layout.

    ``layers.i.downsample`` (end of stage i) becomes ``stages.{i+1}.downsample``;
    the MLP's 1x1 conv weights ``(out, in, 1, 1)`` become Linear weights ``(out, in)``.
    State dicts already in this layout pass through unchanged.
    """
    out = {}
    for key, value in state_dict.items():
        if key.startswith("patch_embed."):
            new = "stem." + key[len("patch_embed."):]
        elif m := re.match(r"^layers\.(\d+)\.blocks\.(\d+)\.norm2\.(.+)$", key):
            new = f"stages.{m[1]}.blocks.{m[2]}.norm.{m[3]}"
        elif m := re.match(r"^layers\.(\d+)\.blocks\.(\d+)\.mlp\.(fc[12])\.(.+)$", key):
            new = f"stages.{m[1]}.blocks.{m[2]}.mlp.{m[3]}.{m[4]}"
            if value.ndim == 4:
                value = value.flatten(1)  # 1x1 conv (out, in, 1, 1) -> Linear (out, in)
        elif m := re.match(r"^layers\.(\d+)\.downsample\.(.+)$", key):
            new = f"stages.{int(m[1]) + 1}.downsample.{m[2]}"
        else:
            new = key  # norm.*, head.*; unknown keys are reported by the loader
        out[new] = value
    return out
