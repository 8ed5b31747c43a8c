"""The building blocks of SPACH: stems, spatial mixers, the mixing block, downsampling.

All token tensors are kept channels-last, ``(B, H, W, C)``: linear layers and
LayerNorm act on the last dim without copies, the depthwise convolutions read
the same memory as a ``channels_last`` ``(B, C, H, W)`` view, and attention /
token-MLP mixers see ``(B, N, C)`` with ``N = H * W`` in row-major order, as in
the original release.

The three mixers of the paper defined here (``conv``, ``attn``, ``mlp``) are registered in the mixer
registry (:mod:`spach.models.registry`) at the bottom of this module.
"""
from __future__ import annotations

from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import DropPath, register_notrace_function, use_fused_attn

from spach.errors import ArchitectureRefusal
from spach.models import registry
from spach.models.kernels import Linear, token_matmul, use_fused_mlp, use_sdpa, use_token_matmul
from spach.models.ops import check_grid
from spach.models.registry import register_mixer

LayerNorm = partial(nn.LayerNorm, eps=1e-6)


def __getattr__(name: str):
    # MIXERS, MIXER_ALIASES and canonical_mixer are read from the mixer registry (spach.models.registry)
    # on access, so plugin mixers are included
    if name in ("MIXERS", "MIXER_ALIASES", "canonical_mixer"):
        return {"MIXERS": registry.mixer_names, "MIXER_ALIASES": lambda: dict(registry.MIXER_ALIASES),
                "canonical_mixer": lambda: registry.canonical_mixer}[name]()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def nhwc_to_nchw(x: torch.Tensor) -> torch.Tensor:
    # (B, H, W, C) -> (B, C, H, W): a view with channels_last strides, no copy
    return x.permute(0, 3, 1, 2)


def nchw_to_nhwc(x: torch.Tensor) -> torch.Tensor:
    # (B, C, H, W) -> (B, H, W, C): a view, contiguous when x is channels_last
    return x.permute(0, 2, 3, 1)


class ConvStem(nn.Module):
    """Patch embedding. ``conv1``: one conv, kernel = stride = patch_size.

    ``conv4`` (deep patch embedding from LV-ViT, used by Hybrid-MS-S+): three
    convs with BatchNorm+ReLU (the first with stride 2), then a conv with
    kernel = stride = patch_size / 2. Module indices follow the original release.
    """

    def __init__(self, in_chans: int, dim: int, patch_size: int, stem_type: str = "conv1"):
        super().__init__()
        self.stem_type = stem_type
        self.patch_size = patch_size
        if stem_type == "conv1":
            self.proj = nn.Conv2d(in_chans, dim, kernel_size=patch_size, stride=patch_size)
        elif stem_type == "conv4":
            if patch_size % 2:
                raise ArchitectureRefusal(f"stem_type='conv4' needs an even patch_size, got {patch_size}")
            mid = 64
            self.proj = nn.Sequential(
                nn.Conv2d(in_chans, mid, 7, stride=2, padding=3, bias=False),
                nn.BatchNorm2d(mid),
                nn.ReLU(inplace=True),
                nn.Conv2d(mid, mid, 3, stride=1, padding=1, bias=False),
                nn.BatchNorm2d(mid),
                nn.ReLU(inplace=True),
                nn.Conv2d(mid, mid, 3, stride=1, padding=1, bias=False),
                nn.BatchNorm2d(mid),
                nn.ReLU(inplace=True),
                nn.Conv2d(mid, dim, kernel_size=patch_size // 2, stride=patch_size // 2),
            )
        else:
            raise ValueError(f"unknown stem_type {stem_type!r}: expected 'conv1' or 'conv4'")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # (B, C_in, H, W) -> (B, H/p, W/p, C); a channels_last input makes the output tokens contiguous
        return nchw_to_nhwc(self.proj(x.contiguous(memory_format=torch.channels_last)))


class Downsample(nn.Module):
    """Between stages: Conv2d(C -> C_out, 2x2, stride 2, no bias) + GroupNorm(1 group)."""

    def __init__(self, dim: int, out_dim: int):
        super().__init__()
        self.conv = nn.Conv2d(dim, out_dim, kernel_size=2, stride=2, bias=False)
        self.norm = nn.GroupNorm(1, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # (B, H, W, C) -> (B, H/2, W/2, C_out)
        x = self.norm(self.conv(nhwc_to_nchw(x)))
        return nchw_to_nhwc(x)


class DepthwiseConv(nn.Module):
    """The 3x3 depthwise conv (with bias): CPE, and the whole spatial mixer of the conv family."""

    def __init__(self, dim: int):
        super().__init__()
        self.conv = nn.Conv2d(dim, dim, kernel_size=3, padding=1, groups=dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # (B, H, W, C) read as a channels_last (B, C, H, W) view; no layout copy
        return nchw_to_nhwc(self.conv(nhwc_to_nchw(x)))


def attention_weights(q: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    """``softmax(q k^T * scale)`` on ``(B, heads, N, head_dim)``: the attention map, rows summing to 1."""
    return ((q * scale) @ k.transpose(-2, -1)).softmax(dim=-1)


@register_notrace_function  # torch.fx: a leaf, so the kernel is chosen when the graph runs
def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, dropout_p: float,
              fused: bool) -> torch.Tensor:
    """``softmax(q k^T * scale) v`` on ``(B, heads, N, head_dim)``; fused kernel or plain maths (same numbers)."""
    if use_sdpa(q, fused):
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, scale=scale)
    attn = attention_weights(q, k, scale)
    if dropout_p > 0.0:
        attn = F.dropout(attn, dropout_p)
    return attn @ v


class Attention(nn.Module):
    """Multi-head self-attention without class token or absolute position embedding.

    ``qkv`` output features are laid out as (3, heads, head_dim). ``fused_attn``
    (timm's ``use_fused_attn()`` at build time) selects
    ``F.scaled_dot_product_attention``; ``False`` selects the plain maths (same
    numbers), kept for export, debugging and FLOP counting.
    """

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, qk_scale: float | None = None,
                 attn_drop: float = 0.0, proj_drop: float = 0.0):
        super().__init__()
        if dim % num_heads:
            raise ArchitectureRefusal(f"num_heads={num_heads} does not divide the width {dim}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = qk_scale or self.head_dim ** -0.5
        self.fused_attn = use_fused_attn()
        self.qkv = Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, H, W, C = x.shape
        N = H * W
        # (B, N, 3C) -> (3, B, heads, N, head_dim)
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        x = attention(q, k, v, self.scale, self.attn_drop.p if self.training else 0.0, self.fused_attn)
        # (B, heads, N, head_dim) -> (B, H, W, C)
        x = x.transpose(1, 2).reshape(B, H, W, C)
        return self.proj_drop(self.proj(x))

    def attention_probs(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The attention weights for the mixer input ``x`` (B, H, W, C), for analysis (no dropout).

        Returns ``(probs, pos_q, pos_k)``: probs (B, heads, N, N) with rows summing to 1, and the
        (row, col) grid coordinates of the query and key tokens, (N, 2) each, in row-major order.
        """
        B, H, W, C = x.shape
        qkv = self.qkv(x).reshape(B, H * W, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, _ = qkv.unbind(0)
        probs = attention_weights(q, k, self.scale)
        rows, cols = torch.meshgrid(torch.arange(H, device=x.device), torch.arange(W, device=x.device),
                                    indexing="ij")
        pos = torch.stack([rows.reshape(-1), cols.reshape(-1)], dim=-1).to(probs.dtype)
        return probs, pos, pos


class TokenMlp(nn.Module):
    """MLP along the token axis: Linear(N -> tN) -> GELU -> Dropout -> Linear(tN -> N) -> Dropout.

    Its weights depend on N, so a model using it has a fixed input size.
    The token mixing runs as ``W @ x`` on ``(B, N, C)``: no transposes.
    """

    def __init__(self, grid_size: tuple[int, int], token_ratio: float = 0.5, drop: float = 0.0):
        super().__init__()
        self.grid_size = (int(grid_size[0]), int(grid_size[1]))
        num_tokens = self.grid_size[0] * self.grid_size[1]
        if int(num_tokens * token_ratio) < 1:
            raise ArchitectureRefusal(f"a token-mixing MLP over {num_tokens} tokens with token_ratio={token_ratio} "
                                      f"has no hidden units: use a larger img_size (or fewer stages) for MLP models")
        self.fc1 = nn.Linear(num_tokens, int(num_tokens * token_ratio))
        self.act = nn.GELU()
        self.drop1 = nn.Dropout(drop)
        self.fc2 = nn.Linear(int(num_tokens * token_ratio), num_tokens)
        self.drop2 = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = check_grid(x, self.grid_size, "token-mixing MLP")
        B, H, W, C = x.shape
        x = x.reshape(B, H * W, C)
        # (tN, N) @ (B, N, C) -> (B, tN, C); the bias in the product's dtype (bf16 under autocast)
        x = self.mix(self.fc1.weight, x)
        x = x + self.fc1.bias[:, None].to(x.dtype)
        x = self.drop1(self.act(x))
        x = self.mix(self.fc2.weight, x)
        x = x + self.fc2.bias[:, None].to(x.dtype)
        return self.drop2(x).reshape(B, H, W, C)

    def mix(self, weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        # weight @ x; the kernel of spach.models.kernels where it may run (no copies, cheaper weight gradient)
        if not torch.jit.is_scripting() and use_token_matmul(x):
            return token_matmul(weight, x)
        return torch.matmul(weight, x)


class ChannelMlp(nn.Module):
    """Linear(C -> rC) -> GELU -> Dropout -> Linear(rC -> C) -> Dropout, on the channel axis."""

    def __init__(self, dim: int, hidden_dim: int, drop: float = 0.0):
        super().__init__()
        self.fc1 = Linear(dim, hidden_dim)
        self.act = nn.GELU()
        self.drop1 = nn.Dropout(drop)
        self.fc2 = Linear(hidden_dim, dim)
        self.drop2 = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop2(self.fc2(self.drop1(self.act(self.fc1(x)))))

    @torch.jit.unused
    def fused_residual(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        """``residual + self(x)`` in inference, with bias, GELU and the sum fused into oneDNN's matmuls.

        Only called where :func:`spach.models.kernels.use_fused_mlp` allows it.
        """
        h = torch.ops.mkldnn._linear_pointwise(x, self.fc1.weight, self.fc1.bias, "gelu", [], "none")
        return torch.ops.mkldnn._linear_pointwise.binary(h, residual, self.fc2.weight, self.fc2.bias, "add")


class MixingBlock(nn.Module):
    """The SPACH block; only ``token_mixer`` differs between the families::

        y   = x + DropPath(gamma * Spatial(LN1(x))) + CPE(x)    # no Spatial term for conv
        out = y + DropPath(ChannelMLP(LN2(y)))

    For the conv family the depthwise conv (``cpe``) *is* the spatial mixer
    (``token_mixer=None``); any other registered mixer (:mod:`spach.models.registry`)
    maps ``(B, H, W, C)`` to ``(B, H, W, C)``.
    ``token_mixer`` may be a module shared with other blocks (weight sharing).
    Where :mod:`spach.models.kernels` allows it (CPU inference), the channel MLP
    and its residual sum run through fused kernels (same numbers).
    """

    def __init__(self, dim: int, mixer: str, token_mixer: nn.Module | None, channel_ratio: float = 2.0,
                 cpe: bool = True, scaled: bool = True, init_values: float = 1e-4,
                 drop: float = 0.0, drop_path: float = 0.0):
        super().__init__()
        self.mixer = mixer
        if token_mixer is None:
            # the conv family: the depthwise conv is the mixer (registry: cpe_is_mixer);
            # with cpe=False a conv block keeps only its channel MLP (as in the original release)
            self.norm1 = None
            self.token_mixer = None
            self.gamma = None
        else:
            self.norm1 = LayerNorm(dim)
            self.token_mixer = token_mixer
            # layer scale on the spatial branch only; gamma = 1 (no parameter) when not scaled
            self.gamma = nn.Parameter(init_values * torch.ones(dim)) if scaled else None
        self.cpe = DepthwiseConv(dim) if cpe else None
        self.norm2 = LayerNorm(dim)
        self.mlp = ChannelMlp(dim, int(dim * channel_ratio), drop=drop)
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (B, H, W, C)
        y = x
        if self.token_mixer is not None and self.norm1 is not None:
            s = self.token_mixer(self.norm1(x))
            if self.gamma is not None:
                s = self.gamma * s
            y = y + self.drop_path(s)
        if self.cpe is not None:
            y = y + self.cpe(x)  # CPE reads the block input x
        if not torch.jit.is_scripting() and use_fused_mlp(y, self.training):
            return self.mlp.fused_residual(self.norm2(y), y)
        return y + self.drop_path(self.mlp(self.norm2(y)))


# ---------------------------------------------------------------------- the paper's mixers, registered
register_mixer("conv", cpe_is_mixer=True, builder=lambda dim, ctx: None,
               paper="depthwise 3x3 conv — A Battle of Network Structures (Zhao et al., arXiv 2108.13002)")(
    DepthwiseConv)
register_mixer("attn", paper="multi-head self-attention — Attention Is All You Need (Vaswani et al., "
                             "NeurIPS 2017); ViT (Dosovitskiy et al., ICLR 2021)",
               builder=lambda dim, ctx: Attention(
                   dim, ctx["num_heads"], qkv_bias=ctx["qkv_bias"], qk_scale=ctx["qk_scale"],
                   attn_drop=ctx["attn_drop"], proj_drop=ctx["drop"]))(Attention)
register_mixer("mlp", fixed_input_size=True,
               paper="token-mixing MLP — MLP-Mixer (Tolstikhin et al., NeurIPS 2021)",
               builder=lambda dim, ctx: TokenMlp(ctx["grid_size"], token_ratio=ctx["token_ratio"],
                                                 drop=ctx["drop"]))(TokenMlp)
