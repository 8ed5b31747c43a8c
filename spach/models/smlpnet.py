"""sMLPNet of the original SPACH release (Sparse MLP, arXiv 2109.05422): exact, channels-last, timm's face.

Each block mixes tokens with a depthwise 3x3 conv and a sparse axial MLP, then
mixes channels with an MLP::

    x = x + DropPath(sMLP(GELU(BN(DWConv(GELU(BN(x)))))))     # token mixing
    x = x + DropPath(FFN(LN(x)))                               # channel mixing

Four stages at strides ``patch_size * 2**i``, widths ``dim * 2**i``, each
starting with a strided conv (no norm); the head is BatchNorm, mean over
tokens, Linear. The sparse MLP's weights depend on the token grid, so a model
takes only the input size it was built for. Tokens flow ``(B, H, W, C)``;
``forward_features`` returns that map (``output_fmt = "NHWC"``). The original
release's checkpoints load through :func:`checkpoint_filter_fn`.
"""
from __future__ import annotations

import re
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import DropPath, to_2tuple

from spach.models.kernels import use_fused_mlp
from spach.models.layers import ChannelMlp, nchw_to_nhwc, nhwc_to_nchw
from spach.models.ops import BatchNormNhwc, SparseMLP
from spach.models.staged import (StagedNet, StagedStage, check_global_pool, linear_drop_path_rates,
                                  original_layout_filter, stage_shapes)


class SmlpBlock(nn.Module):
    """Token mixing (depthwise conv, then the sparse MLP, each after BN + GELU) and channel mixing."""

    def __init__(self, dim: int, grid_size: tuple[int, int], alpha: float = 3, drop: float = 0.0,
                 drop_path: float = 0.0):
        super().__init__()
        self.dw_norm = BatchNormNhwc(dim)
        self.dw_conv = nn.Conv2d(dim, dim, 3, padding=1, groups=dim, bias=False)
        self.smlp_norm = BatchNormNhwc(dim)
        self.smlp = SparseMLP(dim, grid_size)
        self.norm = nn.LayerNorm(dim)  # eps 1e-5, as in the original
        self.mlp = ChannelMlp(dim, int(alpha * dim), drop=drop)
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (B, H, W, C); the depthwise conv reads it as a channels_last (B, C, H, W) view
        t = nchw_to_nhwc(self.dw_conv(nhwc_to_nchw(F.gelu(self.dw_norm(x)))))
        t = F.gelu(self.smlp_norm(t))
        if not torch.jit.is_scripting() and use_fused_mlp(x, self.training):
            # CPU inference: the fuse matmul, the MLP's bias and GELU, and both sums in oneDNN (same numbers)
            x = self.smlp.fused_residual(t, x)
            return self.mlp.fused_residual(self.norm(x), x)
        x = x + self.drop_path(self.smlp(t))
        return x + self.drop_path(self.mlp(self.norm(x)))


class Downsample(nn.Module):
    """Between stages: Conv2d(C -> 2C, 2x2, stride 2, no bias), no norm; tokens (B, H, W, C) in and out."""

    def __init__(self, dim: int, out_dim: int):
        super().__init__()
        self.conv = nn.Conv2d(dim, out_dim, 2, stride=2, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nchw_to_nhwc(self.conv(nhwc_to_nchw(x)))


def _pick(names: tuple[str, str], original, ours, default):
    # one value from the original keyword and timm's spelling of it; both given must agree
    if original is not None and ours is not None and original != ours:
        raise ValueError(f"sMLPNet got {names[0]}={original!r} and {names[1]}={ours!r}: give one of them")
    return original if original is not None else ours if ours is not None else default


class SMLPNet(StagedNet):
    """sMLPNet. Positional and keyword arguments are the original release's::

        SMLPNet(in_chans=3, dim=80, alpha=3, num_classes=1000, patch_size=4, image_size=224,
                depths=[2, 8, 14, 2], dp_rate=0.)

    and timm's spellings work too: ``img_size`` (= ``image_size``), ``drop_path_rate``
    (= ``dp_rate``: stochastic depth rising linearly from 0 over all blocks),
    ``drop_rate`` (dropout in the channel MLPs), ``global_pool`` ('avg' or '').
    """

    def __init__(self, in_chans: int = 3, dim: int = 80, alpha: float = 3, num_classes: int = 1000,
                 patch_size: int = 4, image_size=None, depths: Sequence[int] = (2, 8, 14, 2), dp_rate=None,
                 img_size=None, drop_path_rate: float | None = None, drop_rate: float = 0.0,
                 global_pool: str = "avg"):
        super().__init__()
        img_size = _pick(("image_size", "img_size"), None if image_size is None else tuple(to_2tuple(image_size)),
                         None if img_size is None else tuple(to_2tuple(img_size)), (224, 224))
        drop_path_rate = float(_pick(("dp_rate", "drop_path_rate"), dp_rate, drop_path_rate, 0.0))
        depths = list(depths)
        if not depths or any(not isinstance(d, int) or d < 1 for d in depths):
            raise ValueError(f"depths must be a non-empty list of positive block counts, got {depths!r}")
        grid = (img_size[0] // patch_size, img_size[1] // patch_size)
        if min(grid) >> (len(depths) - 1) < 1:
            raise ValueError(f"img_size={tuple(img_size)} with patch_size={patch_size} leaves no tokens at stage "
                             f"{len(depths)}: use a larger img_size (at least {patch_size * 2 ** (len(depths) - 1)})")
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.global_pool = check_global_pool(global_pool)
        self.img_size = tuple(img_size)
        self.fixed_input_size = True  # the sparse MLPs' weights depend on the token grid
        self.stride = 1  # the original floors odd sides at each downsampling; only the built size is checked
        self.patch_size = patch_size
        self.depths = depths
        self.drop_path_rate = drop_path_rate

        dpr = linear_drop_path_rates(drop_path_rate, depths)
        self.stem = nn.Conv2d(in_chans, dim, patch_size, stride=patch_size, bias=False)
        stages, self.feature_info = [], []
        for i, (depth, (in_dim, width, grid)) in enumerate(zip(depths, stage_shapes(dim, grid, len(depths)))):
            stages.append(StagedStage(
                Downsample(in_dim, width) if in_dim is not None else None,
                [SmlpBlock(width, grid, alpha, drop_rate, dpr[i][j]) for j in range(depth)]))
            self.feature_info.append(dict(num_chs=width, reduction=patch_size * 2 ** i, module=f"stages.{i}"))
        self.stages = nn.Sequential(*stages)
        self.num_features = self.head_hidden_size = width
        self.norm = BatchNormNhwc(width)
        self.head = nn.Linear(width, num_classes) if num_classes > 0 else nn.Identity()

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """The stem: (B, C_in, H, W) -> (B, H/p, W/p, C)."""
        return nchw_to_nhwc(self.stem(x.contiguous(memory_format=torch.channels_last)))


# ---------------------------------------------------------------------- original checkpoints
def is_original_layout(state_dict: dict) -> bool:
    """True for a state dict in the original sMLPNet layout (``token_mix.*`` / ``channel_mix.*``)."""
    return any(k.startswith("token_mix.") for k in state_dict)


_BLOCK_KEYS = [
    (re.compile(r"^token_mix\.(\d+)\.0\.conv_merge\.BN\.(.+)$"), "dw_norm"),
    (re.compile(r"^token_mix\.(\d+)\.0\.conv_merge\.Conv\.(.+)$"), "dw_conv"),
    (re.compile(r"^token_mix\.(\d+)\.1\.BN\.(.+)$"), "smlp_norm"),
    (re.compile(r"^token_mix\.(\d+)\.1\.((?:proj_h|proh_w|fuse)\..+)$"), "smlp"),
    (re.compile(r"^channel_mix\.(\d+)\.1\.(.+)$"), "norm"),
    (re.compile(r"^channel_mix\.(\d+)\.2\.net\.0\.(.+)$"), "mlp.fc1"),
    (re.compile(r"^channel_mix\.(\d+)\.2\.net\.3\.(.+)$"), "mlp.fc2"),
]


def _block_positions(state_dict: dict) -> list[tuple[int, int]]:
    # (stage, index in stage) of every flat block index: a new stage starts where the width changes
    widths = {}
    for k, v in state_dict.items():
        if m := re.match(r"^token_mix\.(\d+)\.0\.conv_merge\.Conv\.weight$", k):
            widths[int(m[1])] = v.shape[0]
    positions, stage, index = [], 0, 0
    for k in range(len(widths)):
        if k not in widths:
            raise ValueError(f"original sMLPNet state dict lacks token_mix.{k}.0.conv_merge.Conv.weight")
        if k > 0 and widths[k] != widths[k - 1]:
            stage, index = stage + 1, 0
        positions.append((stage, index))
        index += 1
    return positions


@original_layout_filter(is_original_layout)
def checkpoint_filter_fn(state_dict: dict, model: nn.Module | None = None) -> dict:
    """Map an original sMLPNet state dict (``{"model": sd}`` or ``sd``) to this layout.

    State dicts already in this layout pass through unchanged.
    """
    positions = _block_positions(state_dict)
    out = {}
    for key, value in state_dict.items():
        if m := re.match(r"^to_patch_embedding\.(\d+)\.0\.(.+)$", key):
            new = f"stem.{m[2]}" if m[1] == "0" else f"stages.{m[1]}.downsample.conv.{m[2]}"
        elif key.startswith("batch_norm."):
            new = "norm." + key[len("batch_norm."):]
        elif key.startswith("mlp_head.0."):
            new = "head." + key[len("mlp_head.0."):]
        else:
            for pattern, name in _BLOCK_KEYS:
                if m := pattern.match(key):
                    stage, index = positions[int(m[1])]
                    new = f"stages.{stage}.blocks.{index}.{name}.{m[2]}"
                    break
            else:
                new = key  # unknown keys are reported by the loader
        out[new] = value
    return out


sMLPNet = SMLPNet  # the original class name
