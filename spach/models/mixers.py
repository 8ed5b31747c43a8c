"""The post-paper spatial mixers, registered: pool, shift, smlp, gfilter, window (each names its paper).

All map channels-last tokens ``(B, H, W, C)`` to ``(B, H, W, C)`` inside the SPACH
block (LN -> mixer -> layer scale, + CPE, + channel MLP); they run under
TorchScript, torch.fx, torch.export and torch.compile like the built-ins.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import register_notrace_function, trunc_normal_, use_fused_attn

from spach.errors import ArchitectureRefusal
from spach.models.kernels import use_sdpa
from spach.models.layers import nchw_to_nhwc, nhwc_to_nchw
from spach.models.ops import SparseMLP, check_grid, partial_shift
from spach.models.registry import register_mixer


@register_mixer("pool", paper="PoolFormer — MetaFormer Is Actually What You Need for Vision (Yu et al., CVPR 2022, "
                              "arXiv 2111.11418)")
class Pooling(nn.Module):
    """PoolFormer's token mixer (Yu et al., *MetaFormer Is Actually What You Need for Vision*, CVPR 2022):
    ``AvgPool(3x3, stride 1, padding not counted)(x) - x``. No weights."""

    def __init__(self, dim: int, pool_size: int = 3):
        super().__init__()
        if pool_size < 1 or pool_size % 2 == 0:
            raise ValueError(f"pool: pool_size must be a positive odd integer, got {pool_size}")
        self.pool = nn.AvgPool2d(pool_size, stride=1, padding=pool_size // 2, count_include_pad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # pooled on the channels_last (B, C, H, W) view of the tokens; no layout copy
        return nchw_to_nhwc(self.pool(nhwc_to_nchw(x))) - x


@register_notrace_function  # torch.fx: a leaf (the shift writes into slices of its output)
def shift_tokens(x: torch.Tensor, n_div: int) -> torch.Tensor:
    """:func:`spach.models.ops.partial_shift` on channels-last tokens."""
    return partial_shift(x, n_div, -1)


@register_mixer("shift", paper="ShiftViT — When Shift Operation Meets Vision Transformer (Wang et al., AAAI 2022, "
                               "arXiv 2201.10801)")
class Shift(nn.Module):
    """ShiftViT's partial shift (Wang et al., *When Shift Operation Meets Vision Transformer*, AAAI 2022):
    4 groups of ``C // 12`` channels move one pixel left / right / up / down, zero-filled; the rest stay.
    No weights."""

    def __init__(self, dim: int, n_div: int = 12):
        super().__init__()
        if n_div < 4 or dim // n_div < 1:
            raise ArchitectureRefusal(f"shift: moving 4 groups of C//{n_div} channels needs n_div >= 4 and a width "
                                      f"of at least {n_div}, got width {dim} (use hidden_dim >= {n_div}, or a "
                                      f"smaller n_div)")
        self.n_div = n_div

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return shift_tokens(x, self.n_div)


# sMLPNet's sparse MLP (implemented in spach.models.ops, where its original parameter layout lives)
register_mixer("smlp", fixed_input_size=True,
               paper="sMLPNet — Sparse MLP for Image Recognition: Is Self-Attention Really Necessary? "
                     "(Tang et al., AAAI 2022, arXiv 2109.05422)")(SparseMLP)


@register_mixer("gfilter", fixed_input_size=True,
                paper="GFNet — Global Filter Networks for Image Classification (Rao et al., NeurIPS 2021, "
                      "arXiv 2107.00645)")
class GlobalFilter(nn.Module):
    """GFNet's global filter (Rao et al., *Global Filter Networks for Image Classification*, NeurIPS 2021):
    ``irfft2(rfft2(x) * K)`` over the token grid with a learned complex filter ``K`` per channel —
    a circular convolution of every channel with a grid-sized kernel. The filter has the grid's
    shape: fixed input size. The transforms run in fp32 (as GFNet's)."""

    def __init__(self, dim: int, grid_size: tuple[int, int]):
        super().__init__()
        self.grid_size = (int(grid_size[0]), int(grid_size[1]))
        h, w = self.grid_size
        # (H, W//2+1, C, re/im), GFNet's layout and initialisation
        self.complex_weight = nn.Parameter(torch.randn(h, w // 2 + 1, dim, 2) * 0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = check_grid(x, self.grid_size, "global filter")
        dtype = x.dtype
        spectrum = torch.fft.rfft2(x.float(), dim=(1, 2), norm="ortho")
        spectrum = spectrum * torch.view_as_complex(self.complex_weight.float())
        return torch.fft.irfft2(spectrum, s=self.grid_size, dim=(1, 2), norm="ortho").to(dtype)


@register_notrace_function  # torch.fx: padded when the graph runs, from the input's shape
def pad_to_windows(x: torch.Tensor, window_size: int) -> torch.Tensor:
    """Zero-pad channels-last tokens ``(B, H, W, C)`` at the bottom and the right to whole windows (Swin's
    padding); ``x`` itself when the windows already tile the grid."""
    pad_h = (window_size - x.shape[1] % window_size) % window_size
    pad_w = (window_size - x.shape[2] % window_size) % window_size
    if pad_h == 0 and pad_w == 0:
        return x
    return F.pad(x, (0, 0, 0, pad_w, 0, pad_h))


@register_notrace_function  # torch.fx: built from the input's shape when the graph runs
def shifted_window_mask(height: int, width: int, window_size: int, shift: int, device: torch.device) -> torch.Tensor:
    """Swin's mask for shifted windows: ``(num_windows, N, N)`` additive, 0 within a region, -inf across.

    After the grid is rolled by ``-shift``, the last ``window_size`` rows/cols hold up to two
    regions that were not adjacent in the image (split at ``-shift``); tokens attend only within
    their region.
    """
    rows = (torch.arange(height, device=device) >= height - window_size).long() + \
        (torch.arange(height, device=device) >= height - shift).long()
    cols = (torch.arange(width, device=device) >= width - window_size).long() + \
        (torch.arange(width, device=device) >= width - shift).long()
    region = (rows[:, None] * 3 + cols[None, :]).float()                      # (H, W)
    region = region.view(height // window_size, window_size, width // window_size, window_size)
    region = region.permute(0, 2, 1, 3).reshape(-1, window_size * window_size)  # (nW, N)
    same = region[:, :, None] == region[:, None, :]
    return torch.zeros(same.shape, device=device).masked_fill(~same, float("-inf"))


@register_notrace_function  # torch.fx: a leaf, so the kernel is chosen when the graph runs
def biased_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor, scale: float,
                     dropout_p: float, fused: bool) -> torch.Tensor:
    """``softmax(q k^T * scale + bias) v`` on ``(B, heads, N, head_dim)``; fused kernel or plain maths."""
    if use_sdpa(q, fused):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=dropout_p, scale=scale)
    attn = ((q * scale) @ k.transpose(-2, -1) + bias).softmax(dim=-1)
    if dropout_p > 0.0:
        attn = F.dropout(attn, dropout_p)
    return attn @ v


def window_partition(x: torch.Tensor, window_size: int) -> torch.Tensor:
    """(B, H, W, C) -> (B * num_windows, window_size², C), windows in row-major order."""
    B, H, W, C = x.shape
    x = x.view(B, H // window_size, window_size, W // window_size, window_size, C)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, window_size * window_size, C)


def window_merge(windows: torch.Tensor, window_size: int, B: int, H: int, W: int) -> torch.Tensor:
    """The inverse of :func:`window_partition`: -> (B, H, W, C)."""
    C = windows.shape[-1]
    x = windows.view(B, H // window_size, W // window_size, window_size, window_size, C)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(B, H, W, C)


def real_tokens(height: int, width: int, padded_height: int, padded_width: int, window_size: int, shift: int,
                device: torch.device) -> torch.Tensor:
    """``(num_windows, N)`` bool: which window slots hold a token of the ``height x width`` grid (not
    padding), once the grid is padded to ``padded_height x padded_width`` and rolled by ``-shift``."""
    real = (torch.arange(padded_height, device=device) < height)[:, None] & \
        (torch.arange(padded_width, device=device) < width)[None, :]                     # (Hp, Wp)
    if shift > 0:
        real = torch.roll(real, shifts=(-shift, -shift), dims=(0, 1))
    return window_partition(real[None, :, :, None], window_size)[..., 0]


def padding_mask(height: int, width: int, padded_height: int, padded_width: int, window_size: int, shift: int,
                 device: torch.device) -> torch.Tensor:
    """``(num_windows, N, N)`` additive, ``-inf`` from a real token (query) to a padding token (key), else 0.

    Padding tokens (queries) may attend anything: their outputs are cropped, and so no row is ever
    all ``-inf`` (which would make NaNs, in the gradients too).
    """
    real = real_tokens(height, width, padded_height, padded_width, window_size, shift, device)
    blocked = real[:, :, None] & ~real[:, None, :]
    return torch.zeros(blocked.shape, device=device).masked_fill(blocked, float("-inf"))


@register_notrace_function  # torch.fx: built from the input's shape when the graph runs
def window_attention_bias(position_bias: torch.Tensor, batch: int, height: int, width: int, padded_height: int,
                          padded_width: int, window_size: int, shift: int) -> torch.Tensor:
    """The additive attention bias of every window, ``(B * nW, heads, N, N)``: the relative position bias
    ``(heads, N, N)``, plus Swin's mask between the regions of shifted windows, plus the padding mask
    (:func:`padding_mask`) when the grid was padded from ``height x width``."""
    device = position_bias.device
    bias = position_bias.unsqueeze(0)                                                    # (1, heads, N, N)
    if shift > 0:
        bias = bias + shifted_window_mask(padded_height, padded_width, window_size, shift, device).unsqueeze(1)
    if padded_height != height or padded_width != width:
        bias = bias + padding_mask(height, width, padded_height, padded_width, window_size, shift,
                                   device).unsqueeze(1)
    heads, n = position_bias.shape[0], position_bias.shape[1]
    nw = (padded_height // window_size) * (padded_width // window_size)
    return bias.expand(batch, nw, heads, n, n).reshape(batch * nw, heads, n, n)


@register_mixer("window", paper="Swin Transformer — Hierarchical Vision Transformer using Shifted Windows "
                                "(Liu et al., ICCV 2021, arXiv 2103.14030)")
class WindowAttention(nn.Module):
    """Swin's (shifted) window attention (Liu et al., *Swin Transformer*, ICCV 2021).

    Multi-head self-attention within non-overlapping ``window_size²`` windows, plus a learned
    relative position bias per head; in every other block of a stage (odd ``block_index``)
    the windows are shifted by ``window_size // 2`` (a cyclic roll with Swin's mask). As in
    Swin, a grid no larger than the window (at build) makes the window the grid and drops the shift.
    Any token grid works: one the windows do not tile is zero-padded at the bottom and the right to
    whole windows and cropped back after the attention (as Swin does); real tokens never attend the
    padding (the padding mask), so the padding does not change them. A grid the windows tile takes
    exactly the path it took before padding existed (no padding, no extra mask).
    """

    def __init__(self, dim: int, num_heads: int, grid_size: tuple[int, int], window_size: int = 7,
                 block_index: int = 0, shared: bool = False, qkv_bias: bool = True, qk_scale: float | None = None,
                 attn_drop: float = 0.0, drop: float = 0.0):
        super().__init__()
        if dim % num_heads:
            raise ArchitectureRefusal(f"window: num_heads={num_heads} does not divide the width {dim}")
        if shared:
            raise ArchitectureRefusal("window attention shifts its windows in every other block, so one module cannot "
                                      "serve a whole stage: weight sharing does not apply to the window mixer")
        grid = (int(grid_size[0]), int(grid_size[1]))
        if min(grid) <= window_size:  # Swin: the window covers the grid, nothing to shift
            window_size, shift = min(grid), 0
        else:
            shift = window_size // 2 if block_index % 2 else 0
        self.window_size = window_size
        self.shift_size = shift
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = qk_scale or self.head_dim ** -0.5
        self.fused_attn = use_fused_attn()
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(drop)
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window_size - 1) ** 2, num_heads))
        trunc_normal_(self.relative_position_bias_table, std=0.02)
        coords = torch.stack(torch.meshgrid(torch.arange(window_size), torch.arange(window_size), indexing="ij"))
        coords = coords.flatten(1)                                  # (2, N): (row, col) of each window token
        rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (window_size - 1)
        self.register_buffer("relative_position_index", rel[..., 0] * (2 * window_size - 1) + rel[..., 1],
                             persistent=False)
        self.register_buffer("window_coords", coords.t().float(), persistent=False)

    def relative_position_bias(self) -> torch.Tensor:
        """(heads, N, N) with N = window_size²."""
        n = self.window_size * self.window_size
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)]
        return bias.view(n, n, self.num_heads).permute(2, 0, 1)

    def attention_bias(self, B: int, H: int, W: int, Hp: int, Wp: int) -> torch.Tensor:
        """(B * nW, heads, N, N) for an ``H x W`` grid padded to ``Hp x Wp``: :func:`window_attention_bias`."""
        return window_attention_bias(self.relative_position_bias(), B, H, W, Hp, Wp, self.window_size,
                                     self.shift_size)

    def windowed_qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(B, H, W, C), a grid the windows tile -> q, k, v of shape (B * nW, heads, N, head_dim), the
        windows shifted if the block shifts."""
        if self.shift_size > 0:
            x = torch.roll(x, shifts=(-self.shift_size, -self.shift_size), dims=(1, 2))
        windows = window_partition(x, self.window_size)
        bn, n, _ = windows.shape
        qkv = self.qkv(windows).reshape(bn, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        return q, k, v

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, H, W, C = x.shape
        x = pad_to_windows(x, self.window_size)                                    # (B, Hp, Wp, C)
        Hp, Wp = x.shape[1], x.shape[2]
        q, k, v = self.windowed_qkv(x)
        bias = self.attention_bias(B, H, W, Hp, Wp).to(q.dtype)
        out = biased_attention(q, k, v, bias, self.scale, self.attn_drop.p if self.training else 0.0,
                               self.fused_attn)
        out = out.transpose(1, 2).reshape(-1, self.window_size * self.window_size, C)
        x = window_merge(out, self.window_size, B, Hp, Wp)
        if self.shift_size > 0:
            x = torch.roll(x, shifts=(self.shift_size, self.shift_size), dims=(1, 2))
        x = x[:, :H, :W]                                                           # crop the padding
        return self.proj_drop(self.proj(x))

    @torch.jit.unused
    def attention_probs(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The attention protocol: ``(probs, pos_q, pos_k)`` for the mixer input ``x`` ``(B, H, W, C)``.

        On a grid the windows tile, ``probs`` is ``(B, num_windows, heads, N, N)`` (rows sum to 1,
        masked entries exactly 0) and ``pos_q = pos_k`` ``(N, 2)`` are the (row, col) of the window's
        tokens, window-local, in grid units — within a shifted window, the tokens that may attend each
        other keep their image distances. On a padded grid only the real tokens are queries: ``probs``
        is ``(B, heads, Q, N)`` over the ``Q = H * W`` real tokens (window by window), ``pos_q`` ``(Q, 2)``
        their window-local coordinates and ``pos_k`` ``(N, 2)``; the padding's probabilities are 0.
        """
        B, H, W, C = x.shape
        x = pad_to_windows(x, self.window_size)
        Hp, Wp = x.shape[1], x.shape[2]
        q, k, _ = self.windowed_qkv(x)
        bias = self.attention_bias(B, H, W, Hp, Wp).to(q.dtype)
        probs = ((q * self.scale) @ k.transpose(-2, -1) + bias).softmax(dim=-1)
        nw = (Hp // self.window_size) * (Wp // self.window_size)
        probs = probs.view(B, nw, self.num_heads, probs.shape[-2], probs.shape[-1])
        pos = self.window_coords.to(x.device)
        if (Hp, Wp) == (H, W):
            return probs, pos, pos
        real = real_tokens(H, W, Hp, Wp, self.window_size, self.shift_size, x.device)  # (nW, N)
        probs = probs.permute(0, 2, 1, 3, 4)[:, :, real]                             # (B, heads, Q, N)
        return probs, pos.expand(nw, -1, -1)[real], pos
