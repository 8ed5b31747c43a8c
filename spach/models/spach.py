"""SPACH networks: single-stage (``Spach``) and multi-stage (``SpachMS``).

One skeleton; the spatial mixer of each block is data: any name of the mixer
registry (:mod:`spach.models.registry` — ``conv``, ``attn``, ``mlp``, the
newcomers of :mod:`spach.models.mixers`, or your own). A model is described
by ``net_arch``: for a single-stage network a list
of ``(mixer, depth)``; for a multi-stage network one such list per stage::

    Spach(hidden_dim=192, num_heads=6, net_arch=[("attn", 12)])
    SpachMS(hidden_dim=96, num_heads=3,
            net_arch=[[("conv", 3)], [("conv", 4)], [("conv", 2), ("attn", 10)], [("conv", 1), ("attn", 2)]])

Both accept the original release's constructor keywords. Tokens flow
channels-last, ``(B, H, W, C)``; ``forward_features`` returns that map (so
``output_fmt = "NHWC"``); ``forward_intermediates`` / ``features_only`` give
``(B, C, H, W)`` maps.
"""
from __future__ import annotations

import re
from typing import Sequence

import torch
import torch.nn as nn
from timm.layers import to_2tuple
from timm.models._features import feature_take_indices
from timm.models._manipulate import checkpoint_seq

from spach.errors import ArchitectureRefusal
from spach.models.layers import ConvStem, Downsample, LayerNorm, MixingBlock
from spach.models.registry import canonical_mixer, check_mixer_output, get_mixer
from spach.models.staged import (StagedNet, check_global_pool, linear_drop_path_rates, original_layout_filter,
                                 stage_shapes)

Arch = Sequence[tuple[str, int]]


def parse_stage_arch(arch, where: str) -> list[str]:
    """``[("attn", 2), ("mlp", 1)]`` -> ``["attn", "attn", "mlp"]`` with clear errors."""
    if isinstance(arch, (str, bytes)) or not isinstance(arch, Sequence) or len(arch) == 0:
        raise ValueError(f"{where}: expected a non-empty list of (mixer, depth) pairs, got {arch!r}")
    mixers = []
    for item in arch:
        if (not isinstance(item, Sequence) or isinstance(item, str) or len(item) != 2
                or not isinstance(item[1], int) or isinstance(item[1], bool) or item[1] < 0):
            raise ValueError(f"{where}: each entry must be a (mixer, depth) pair with depth >= 0, got {item!r}")
        mixers += [canonical_mixer(item[0])] * item[1]
    if not mixers:
        raise ValueError(f"{where}: the stage has no blocks")
    return mixers


class SpachStage(nn.Module):
    """Optional downsampling, then the stage's blocks (whose token mixer may be one shared module).

    Each block's mixer comes from the registry, built as ``cls(dim, **context)`` with the
    context the stage knows (heads, token grid, dropout, the block's index, ...) plus
    ``mixer_kwargs[name]``, the options given for that mixer.
    """

    def __init__(self, dim: int, mixers: list[str], grid_size: tuple[int, int], num_heads: int,
                 in_dim: int | None = None, shared: bool = False, token_ratio: float = 0.5,
                 channel_ratio: float = 2.0, cpe: bool = True, scaled: bool = True, init_values: float = 1e-4,
                 qkv_bias: bool = True, qk_scale: float | None = None, drop: float = 0.0,
                 attn_drop: float = 0.0, drop_path: Sequence[float] = (), stage_index: int = 0,
                 mixer_kwargs: dict | None = None):
        super().__init__()
        self.downsample = Downsample(in_dim, dim) if in_dim is not None else nn.Identity()
        self.grad_checkpointing = False
        context = dict(num_heads=num_heads, grid_size=tuple(grid_size), token_ratio=token_ratio, qkv_bias=qkv_bias,
                       qk_scale=qk_scale, attn_drop=attn_drop, drop=drop, stage_index=stage_index,
                       stage_depth=len(mixers), shared=shared)

        def make_mixer(kind: str, block_index: int) -> nn.Module | None:
            info = get_mixer(kind)
            try:
                return info.build(dim, dict(context, block_index=block_index), (mixer_kwargs or {}).get(kind))
            except TypeError as e:  # a constructor that wants a key the skeleton does not know
                raise ValueError(f"mixer {kind!r} cannot be built from the block context "
                                 f"{sorted(context) + ['block_index']}: {e}") from None

        shared_mixer = make_mixer(mixers[0], 0) if shared else None
        if shared and shared_mixer is not None and not any(True for _ in shared_mixer.parameters()):
            raise ArchitectureRefusal(f"shared_spatial_func=True: stage {stage_index + 1}'s mixer {mixers[0]!r} has no "
                                      "weights, so there is nothing to share")
        self.blocks = nn.Sequential(*[
            MixingBlock(dim, kind, shared_mixer if shared else make_mixer(kind, i), channel_ratio=channel_ratio,
                        cpe=cpe, scaled=scaled, init_values=init_values, drop=drop, drop_path=drop_path[i])
            for i, kind in enumerate(mixers)
        ])
        checked = set()
        for block in self.blocks:  # one probe per mixer kind: the output must have the input's shape
            if block.token_mixer is not None and block.mixer not in checked:
                checked.add(block.mixer)
                check_mixer_output(block.mixer, block.token_mixer, dim, tuple(grid_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.downsample(x)
        if self.grad_checkpointing and not torch.jit.is_scripting():
            return checkpoint_seq(self.blocks, x)
        return self.blocks(x)


class SpachNet(StagedNet):
    """The common skeleton: stem -> LayerNorm -> stages -> LayerNorm -> mean over tokens -> Linear.

    ``stage_mixers[i]`` lists the mixer of every block of stage ``i``; stage
    ``i > 0`` starts with a 2x downsampling and doubles the width; every stage
    uses ``num_heads`` heads (as in the original release: the head width grows).
    Use :class:`Spach` or :class:`SpachMS`, which take the original keywords.
    """

    stem_pattern = r"^stem|^norm_pre"

    def __init__(self, stage_mixers: list[list[str]], hidden_dim: int, num_heads: int, patch_size: int,
                 img_size=224, in_chans: int = 3, num_classes: int = 1000, global_pool: str = "avg",
                 stem_type: str = "conv1", cpe: bool = True, shared_stages: Sequence[int] = (),
                 scaled: bool = True, init_values: float = 1e-4, token_ratio: float = 0.5,
                 channel_ratio: float = 2.0, qkv_bias: bool = True, qk_scale: float | None = None,
                 drop_rate: float = 0.0, attn_drop_rate: float = 0.0, drop_path_rate: float = 0.0,
                 drop_path_rates: Sequence[float] | None = None, mixer_kwargs: dict | None = None):
        super().__init__()
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.global_pool = check_global_pool(global_pool)
        self.img_size = tuple(int(s) for s in to_2tuple(img_size))
        self.patch_size = patch_size
        self.stride = patch_size * 2 ** (len(stage_mixers) - 1)
        all_mixers = [k for m in stage_mixers for k in m]
        if mixer_kwargs is not None:
            if not isinstance(mixer_kwargs, dict) or not all(isinstance(v, dict) for v in mixer_kwargs.values()):
                raise ValueError(f"mixer_kwargs maps mixer names to option mappings, e.g. "
                                 f"{{'window': {{'window_size': 4}}}}; got {mixer_kwargs!r}")
            mixer_kwargs = {canonical_mixer(k): v for k, v in mixer_kwargs.items()}
        self.fixed_input_size = any(get_mixer(k).fixed_input_size for k in all_mixers)
        cpe_mixers = {k for k in all_mixers if get_mixer(k).cpe_is_mixer}
        if not cpe and set(all_mixers) <= cpe_mixers:
            raise ArchitectureRefusal("cpe=False on a conv-only network: the depthwise conv is the conv family's "
                                      "spatial mixer, so CPE cannot be removed (it would leave no spatial mixing "
                                      "at all)")
        if "attn" in all_mixers and hidden_dim % num_heads:
            raise ArchitectureRefusal(f"num_heads={num_heads} does not divide hidden_dim={hidden_dim}")
        if self.fixed_input_size and any(s % self.stride for s in self.img_size):
            raise ArchitectureRefusal(f"img_size={img_size} is not divisible by the network's total stride "
                                      f"{self.stride}")
        for i in shared_stages:
            kinds = sorted(set(stage_mixers[i]))
            if len(kinds) > 1 or kinds[0] in cpe_mixers:
                why = ("weight sharing needs one mixer per shared stage" if len(kinds) > 1 else
                       f"{kinds[0]} has no spatial module to share: its mixer is the block's depthwise conv")
                raise ArchitectureRefusal(f"shared_spatial_func=True needs every shared stage to use one non-conv "
                                          f"mixer; stage {i + 1} uses {'+'.join(kinds)} ({why})")
        if drop_path_rates is None:
            drop_path_rates = [drop_path_rate] * len(all_mixers)

        self.stem = ConvStem(in_chans, hidden_dim, patch_size, stem_type)
        self.norm_pre = LayerNorm(hidden_dim)
        stages, feature_info, self._feature_points = [], [], []
        dpr = list(drop_path_rates)
        grid = (self.img_size[0] // patch_size, self.img_size[1] // patch_size)
        for i, (mixers, (in_dim, dim, grid)) in enumerate(
                zip(stage_mixers, stage_shapes(hidden_dim, grid, len(stage_mixers)))):
            stages.append(SpachStage(
                dim, mixers, grid, num_heads, in_dim=in_dim, shared=i in shared_stages,
                token_ratio=token_ratio, channel_ratio=channel_ratio, cpe=cpe, scaled=scaled,
                init_values=init_values, qkv_bias=qkv_bias, qk_scale=qk_scale, drop=drop_rate,
                attn_drop=attn_drop_rate, drop_path=dpr[:len(mixers)], stage_index=i, mixer_kwargs=mixer_kwargs))
            dpr = dpr[len(mixers):]
            # feature points: the end of each stage (multi-stage) or of each block (single-stage)
            ends = [len(mixers) - 1] if len(stage_mixers) > 1 else range(len(mixers))
            for b in ends:
                self._feature_points.append((i, b))
                feature_info.append(dict(num_chs=dim, reduction=patch_size * 2 ** i,
                                         module=f"stages.{i}" if len(stage_mixers) > 1 else f"stages.0.blocks.{b}"))
        self.stages = nn.Sequential(*stages)
        self.feature_info = feature_info
        self.num_features = self.head_hidden_size = dim
        self.norm = LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes) if num_classes > 0 else nn.Identity()
        self.apply(_init_weights)
        if isinstance(self.head, nn.Linear):
            nn.init.zeros_(self.head.weight)
            nn.init.zeros_(self.head.bias)

    # ------------------------------------------------------------------ timm face
    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        # layer scales (1-D, so timm's optimizer factory skips them anyway)
        return {n for n, _ in self.named_parameters() if n.endswith(".gamma")}

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Stem and its LayerNorm: (B, C_in, H, W) -> (B, H/p, W/p, C)."""
        return self.norm_pre(self.stem(x))

    def forward_intermediates(self, x: torch.Tensor, indices: int | list[int] | None = None, norm: bool = False,
                              stop_early: bool = False, output_fmt: str = "NCHW",
                              intermediates_only: bool = False):
        """Feature maps at the end of each stage (multi-stage) or each block (single-stage).

        ``norm=True`` applies the final LayerNorm to the maps that have its width.
        Returns ``(final_features, [maps])`` or only the maps.
        """
        if output_fmt not in ("NCHW", "NHWC"):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NHWC', got {output_fmt!r}")
        take_indices, max_index = feature_take_indices(len(self._feature_points), indices)
        take = {self._feature_points[i] for i in take_indices}
        last = self._feature_points[max_index]
        x = self.embed(self.check_input_size(x))
        intermediates = []
        for si, stage in enumerate(self.stages):
            x = stage.downsample(x)
            for bi, block in enumerate(stage.blocks):
                x = block(x)
                if (si, bi) in take:
                    y = self.norm(x) if norm and x.shape[-1] == self.num_features else x
                    intermediates.append(y.permute(0, 3, 1, 2) if output_fmt == "NCHW" else y)
                if stop_early and (si, bi) == last:
                    break
            else:
                continue
            break
        if intermediates_only:
            return intermediates
        return self.norm(x), intermediates

    def prune_intermediate_layers(self, indices: int | list[int] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> list[int]:
        """Drop the layers after the last requested feature map (for ``features_only`` backbones)."""
        take_indices, max_index = feature_take_indices(len(self._feature_points), indices)
        si, bi = self._feature_points[max_index]
        self.stages = self.stages[:si + 1]
        self.stages[si].blocks = self.stages[si].blocks[:bi + 1]
        if prune_norm:
            self.norm = nn.Identity()
        if prune_head:
            self.reset_classifier(0, "")
        return take_indices


def _init_weights(m: nn.Module) -> None:
    if isinstance(m, nn.Linear):
        nn.init.xavier_uniform_(m.weight)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.Conv2d):
        nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, (nn.LayerNorm, nn.GroupNorm, nn.BatchNorm2d)):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)


class Spach(SpachNet):
    """Single-stage SPACH: all blocks at stride ``patch_size`` (16), width ``hidden_dim``.

    Keywords are the original release's; ``net_arch`` is a list of ``(mixer, depth)``.
    ``shared_spatial_func=True`` makes all blocks share one spatial module.
    Stochastic depth uses the same rate in every block.
    """

    def __init__(self, num_classes: int = 1000, img_size=224, in_chans: int = 3, hidden_dim: int = 384,
                 patch_size: int = 16, net_arch: Arch | None = None, num_heads: int = 12,
                 token_ratio: float = 0.5, channel_ratio: float = 2.0, stem_type: str = "conv1",
                 cpe: bool = True, shared_spatial_func: bool = False, scaled: bool = True,
                 init_values: float = 1e-4, qkv_bias: bool = True, qk_scale: float | None = None,
                 drop_rate: float = 0.0, attn_drop_rate: float = 0.0, drop_path_rate: float = 0.0,
                 global_pool: str = "avg", mixer_kwargs: dict | None = None):
        if net_arch is None:
            raise ValueError("Spach needs net_arch, a list of (mixer, depth), e.g. [('attn', 12)]")
        mixers = parse_stage_arch(net_arch, "net_arch")
        super().__init__(
            [mixers], hidden_dim, num_heads, patch_size, img_size=img_size, in_chans=in_chans,
            num_classes=num_classes, global_pool=global_pool, stem_type=stem_type, cpe=cpe,
            shared_stages=(0,) if shared_spatial_func else (), scaled=scaled, init_values=init_values,
            token_ratio=token_ratio, channel_ratio=channel_ratio, qkv_bias=qkv_bias, qk_scale=qk_scale,
            drop_rate=drop_rate, attn_drop_rate=attn_drop_rate, drop_path_rate=drop_path_rate,
            mixer_kwargs=mixer_kwargs)


class SpachMS(SpachNet):
    """Multi-stage SPACH: stages at strides 4, 8, 16, 32 with widths C, 2C, 4C, 8C.

    ``net_arch`` has one list of ``(mixer, depth)`` per stage (four in the paper).
    ``shared_spatial_func=True`` shares one spatial module within each of stages 2..
    Stochastic depth rises linearly from 0 to ``drop_path_rate`` over all blocks.
    """

    def __init__(self, num_classes: int = 1000, img_size=224, in_chans: int = 3, hidden_dim: int = 96,
                 patch_size: int = 4, net_arch: Sequence[Arch] | None = None, num_heads: int = 3,
                 token_ratio: float = 0.5, channel_ratio: float = 2.0, stem_type: str = "conv1",
                 cpe: bool = True, shared_spatial_func: bool = False, scaled: bool = True,
                 init_values: float = 1e-4, qkv_bias: bool = True, qk_scale: float | None = None,
                 drop_rate: float = 0.0, attn_drop_rate: float = 0.0, drop_path_rate: float = 0.0,
                 global_pool: str = "avg", mixer_kwargs: dict | None = None):
        if net_arch is None or isinstance(net_arch, str) or not isinstance(net_arch, Sequence) or not net_arch:
            raise ValueError("SpachMS needs net_arch, one list of (mixer, depth) per stage, "
                             "e.g. [[('conv', 2)], [('attn', 2)], [('attn', 6)], [('attn', 2)]]")
        stage_mixers = [parse_stage_arch(a, f"net_arch stage {i + 1}") for i, a in enumerate(net_arch)]
        dpr = [r for rates in linear_drop_path_rates(drop_path_rate, [len(m) for m in stage_mixers]) for r in rates]
        super().__init__(
            stage_mixers, hidden_dim, num_heads, patch_size, img_size=img_size, in_chans=in_chans,
            num_classes=num_classes, global_pool=global_pool, stem_type=stem_type, cpe=cpe,
            shared_stages=tuple(range(1, len(stage_mixers))) if shared_spatial_func else (),
            scaled=scaled, init_values=init_values, token_ratio=token_ratio, channel_ratio=channel_ratio,
            qkv_bias=qkv_bias, qk_scale=qk_scale, drop_rate=drop_rate, attn_drop_rate=attn_drop_rate,
            drop_path_rates=dpr, mixer_kwargs=mixer_kwargs)


# ---------------------------------------------------------------------- original checkpoints
_ORIGINAL_BLOCK_KEYS = [
    (re.compile(r"^spatial_func\."), "token_mixer."),
    (re.compile(r"^channel_func\."), "mlp."),
    (re.compile(r"^cpe_net\.net\.1\."), "cpe.conv."),
    (re.compile(r"^gamma_1$"), "gamma"),
]


def is_original_layout(state_dict: dict) -> bool:
    """True for a state dict in the original SPACH release's layout (blocks with ``channel_func``)."""
    return any(k.startswith(("layer1.", "blocks.")) and ".channel_func." in k for k in state_dict)


def _map_block_key(rest: str) -> str:
    for pattern, new in _ORIGINAL_BLOCK_KEYS:
        if pattern.match(rest):
            return pattern.sub(new, rest)
    return rest  # norm1.*, norm2.*


@original_layout_filter(is_original_layout)
def checkpoint_filter_fn(state_dict: dict, model: nn.Module | None = None) -> dict:
    """Map a state dict of the original release (``{"model": sd}`` or ``sd``) to this layout.

    State dicts already in this layout pass through unchanged. Used by
    :func:`spach.load_checkpoint` and by ``timm.create_model(..., pretrained=True)``.
    """
    out = {}
    for key, value in state_dict.items():
        if key.startswith("norm1."):
            new = "norm_pre." + key[len("norm1."):]
        elif key.startswith("norm2."):
            new = "norm." + key[len("norm2."):]
        elif m := re.match(r"^blocks\.(\d+)\.(.+)$", key):  # single-stage
            new = f"stages.0.blocks.{m[1]}.{_map_block_key(m[2])}"
        elif m := re.match(r"^layer(\d+)\.0\.net\.1\.([01])\.(.+)$", key):  # downsampling of stages 2..
            new = f"stages.{int(m[1]) - 1}.downsample.{'conv' if m[2] == '0' else 'norm'}.{m[3]}"
        elif m := re.match(r"^layer(\d+)\.(\d+)\.(.+)$", key):  # blocks; stages 2.. start with the downsampling
            stage, index = int(m[1]) - 1, int(m[2]) - (1 if int(m[1]) > 1 else 0)
            new = f"stages.{stage}.blocks.{index}.{_map_block_key(m[3])}"
        else:
            new = key  # stem.proj.*, head.*
        if new.endswith(".gamma") and value.ndim == 3:
            value = value.reshape(-1)  # (1, 1, C) -> (C,)
        out[new] = value
    return out
