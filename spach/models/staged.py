"""timm's face for every channels-last network of the package (SPACH, sMLPNet, ShiftViT): one base class.

No ``from __future__ import annotations`` here: torch.fx copies the annotations of the traced root's
``forward`` (``StagedNet.forward``) into the code it generates, and a string annotation there becomes a
name TorchScript cannot resolve (``Unknown type name '_torch_Tensor_'`` when an fx graph is scripted).
"""
import contextlib
import functools

import torch
import torch.nn as nn
from timm.models._features import feature_take_indices
from timm.models._manipulate import checkpoint_seq

from timm.layers import register_notrace_function

from spach.models.layers import nhwc_to_nchw


@register_notrace_function  # torch.fx: checked when the graph runs, not while tracing
def check_input_size(x: torch.Tensor, img_size: tuple[int, int], stride: int, fixed: bool) -> torch.Tensor:
    """Refuse an input the network cannot take, naming the size it needs; returns ``x`` (a graph node)."""
    H, W = x.shape[-2], x.shape[-1]
    if fixed and (H != img_size[0] or W != img_size[1]):
        raise ValueError(
            f"this model has fixed-size mixers (weights shaped by the token grid) built for "
            f"{img_size[0]}x{img_size[1]} input "
            f"and got {H}x{W}; build it with img_size=({H}, {W}) to use that size")
    if H % stride or W % stride:
        raise ValueError(f"input size {H}x{W} is not divisible by the network's total stride {stride}")
    return x


class StagedStage(nn.Module):
    """Optional downsampling module, then a sequence of blocks; tokens ``(B, H, W, C)`` in and out."""

    def __init__(self, downsample: nn.Module | None, blocks: list[nn.Module]):
        super().__init__()
        self.downsample = downsample
        self.blocks = nn.Sequential(*blocks)
        self.grad_checkpointing = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.downsample is not None:
            x = self.downsample(x)
        if self.grad_checkpointing and not torch.jit.is_scripting():
            return checkpoint_seq(self.blocks, x)
        return self.blocks(x)


class StagedNet(nn.Module):
    """``embed`` (stem) -> ``stages`` -> ``norm`` -> mean over tokens -> ``head``.

    A subclass builds ``stem``, ``stages`` (of :class:`StagedStage`), ``norm``,
    ``head``, ``num_features``, ``feature_info``, ``global_pool``, ``img_size``,
    ``stride`` and ``fixed_input_size`` (the input must be ``img_size``; else its
    sides must divide by ``stride``), and defines ``embed(x)``:
    ``(B, C_in, H, W) -> (B, H', W', C)``. Everything timm expects of a model follows.
    ``stem_pattern`` names the parameters :meth:`group_matcher` puts before the blocks.
    """

    output_fmt = "NHWC"
    stem_pattern = r"^stem"

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return set()  # norms and biases are 1-D: timm's optimizer factory skips them anyway

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict:
        return dict(stem=self.stem_pattern, blocks=r"^stages\.(\d+)" if coarse else [
            (r"^stages\.(\d+)\.downsample", (0,)), (r"^stages\.(\d+)\.blocks\.(\d+)", None), (r"^norm", (99999,))])

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        for stage in self.stages:
            stage.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        if global_pool is not None:
            check_global_pool(global_pool)
            self.global_pool = global_pool
        self.num_classes = num_classes
        # the new head where the model's weights are (device, dtype) and in its mode, as timm's models do
        ref = next(self.norm.parameters(), None) if isinstance(self.norm, nn.Module) else None
        ref = ref if ref is not None else next(self.parameters())
        self.head = (nn.Linear(self.num_features, num_classes, device=ref.device, dtype=ref.dtype)
                     if num_classes > 0 else nn.Identity())
        self.head.train(self.training)

    def check_input_size(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` if the network can take its size, else a ValueError naming the size it needs."""
        return check_input_size(x, self.img_size, self.stride, self.fixed_input_size)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C_in, H, W) -> (B, H/s, W/s, C) after the final norm (``output_fmt = 'NHWC'``)."""
        x = self.check_input_size(x)
        return self.norm(self.stages(self.embed(x)))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        if self.global_pool == "avg":
            x = x.mean(dim=(1, 2))  # mean over tokens
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def forward_intermediates(self, x: torch.Tensor, indices: int | list[int] | None = None, norm: bool = False,
                              stop_early: bool = False, output_fmt: str = "NCHW",
                              intermediates_only: bool = False):
        """The map at the end of each stage; ``norm=True`` applies the final norm to the last stage's.

        Returns ``(final_features, [maps])`` or, with ``intermediates_only``, the maps.
        """
        if output_fmt not in ("NCHW", "NHWC"):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NHWC', got {output_fmt!r}")
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        stages = self.stages[:max_index + 1] if stop_early else self.stages
        x = self.embed(self.check_input_size(x))
        intermediates = []
        for i, stage in enumerate(stages):
            x = stage(x)
            if i in take_indices:
                y = self.norm(x) if norm and i == len(self.stages) - 1 else x
                intermediates.append(nhwc_to_nchw(y) if output_fmt == "NCHW" else y)
        if intermediates_only:
            return intermediates
        return self.norm(x), intermediates

    def prune_intermediate_layers(self, indices: int | list[int] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> list[int]:
        """Drop the stages after the last requested feature map (for ``features_only`` backbones)."""
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        self.stages = self.stages[:max_index + 1]
        if prune_norm:
            self.norm = nn.Identity()
        if prune_head:
            self.reset_classifier(0, "")
        return take_indices


def build_placed(build, device=None, dtype=None) -> nn.Module:
    """``build()`` with timm's factory placement: every parameter and buffer made on ``device`` (a
    ``torch.device`` context, so ``device="meta"`` allocates nothing) and floating ones cast to ``dtype``."""
    with torch.device(device) if device is not None else contextlib.nullcontext():
        model = build()
    return model.to(dtype=dtype) if dtype is not None else model


def original_layout_filter(is_original):
    """Decorator making timm's ``pretrained_filter_fn(state_dict, model=None)`` from ``remap(state_dict)``.

    The filter unwraps a release file's ``{"model": state_dict}``, hands state dicts for which
    ``is_original(state_dict)`` holds to ``remap`` and passes any other through unchanged.
    """
    def wrap(remap):
        @functools.wraps(remap)
        def filter_fn(state_dict: dict, model: nn.Module | None = None) -> dict:
            if "model" in state_dict and isinstance(state_dict["model"], dict):
                state_dict = state_dict["model"]
            return remap(state_dict) if is_original(state_dict) else dict(state_dict)
        return filter_fn
    return wrap


def check_global_pool(global_pool: str) -> str:
    if global_pool not in ("avg", ""):
        raise ValueError(f"global_pool must be 'avg' (mean over tokens) or '' (unpooled), got {global_pool!r}")
    return global_pool


def stage_shapes(dim: int, grid: tuple[int, int], num_stages: int):
    """``(in_dim, dim, grid)`` of each stage: the first keeps ``dim`` and ``grid`` (``in_dim`` None, no
    downsampling); each later one downsamples its predecessor's ``in_dim`` tokens 2x and doubles the width."""
    in_dim = None
    for i in range(num_stages):
        if i > 0:
            in_dim, dim, grid = dim, dim * 2, (grid[0] // 2, grid[1] // 2)
        yield in_dim, dim, grid


def linear_drop_path_rates(rate: float, depths) -> list[list[float]]:
    """Stochastic depth rising linearly from 0 to ``rate`` over all blocks, split per stage."""
    n = sum(depths)
    flat = [rate * k / (n - 1) if n > 1 else 0.0 for k in range(n)]
    out = []
    for d in depths:
        out.append(flat[:d])
        flat = flat[d:]
    return out
