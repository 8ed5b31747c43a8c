"""The operators of ShiftViT and sMLPNet: shift, sparse axial MLP, and norms for channels-last tokens."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import register_notrace_function


def _channel_dim(ndim: int, channel_dim: int) -> int:
    # the channel dim of a 4-d tensor laid out NCHW (channel_dim 1) or NHWC (channel_dim 3 / -1)
    if ndim != 4:
        raise ValueError(f"partial_shift takes a 4-d image tensor (NCHW or NHWC), got {ndim} dims")
    if channel_dim % 4 not in (1, 3):
        raise ValueError(f"channel_dim={channel_dim}: use 1 for NCHW tensors or -1 (3) for channels-last NHWC tensors")
    return channel_dim % 4


@register_notrace_function  # torch.fx (timm's feature extraction): one node, shapes read when the graph runs
def partial_shift(x: torch.Tensor, n_div: int = 12, channel_dim: int = 1) -> torch.Tensor:
    """ShiftViT's shift (Wang et al., *When Shift Operation Meets Vision Transformer*, AAAI 2022,
    arXiv 2201.10801): four groups of ``C // n_div`` channels move one pixel, the rest stay.

    With ``g = C // n_div``: channels ``[0, g)`` move left (``out[.., w] = x[.., w + 1]``),
    ``[g, 2g)`` right, ``[2g, 3g)`` up (``out[h] = x[h + 1]``), ``[3g, 4g)`` down; the pixel
    line a group leaves behind is zero; channels ``[4g, C)`` are copied unchanged.
    ``channel_dim`` is 1 for ``(B, C, H, W)`` tensors and -1 (or 3) for ``(B, H, W, C)``.
    The result keeps ``x``'s memory format. Only shapes steer the code (scriptable, traceable).
    """
    cd = _channel_dim(x.dim(), channel_dim)
    g = x.shape[cd] // n_div
    out = torch.empty_like(x)
    # both layouts seen as (C, B, H, W) views; slices clip at C like the original's (n_div < 4)
    xc, oc = x.movedim(cd, 0), out.movedim(cd, 0)
    oc[4 * g:] = xc[4 * g:]
    oc[0:g, :, :, :-1] = xc[0:g, :, :, 1:]  # left
    oc[0:g, :, :, -1:] = 0
    oc[g:2 * g, :, :, 1:] = xc[g:2 * g, :, :, :-1]  # right
    oc[g:2 * g, :, :, :1] = 0
    oc[2 * g:3 * g, :, :-1] = xc[2 * g:3 * g, :, 1:]  # up
    oc[2 * g:3 * g, :, -1:] = 0
    oc[3 * g:4 * g, :, 1:] = xc[3 * g:4 * g, :, :-1]  # down
    oc[3 * g:4 * g, :, :1] = 0
    return out


@register_notrace_function  # torch.fx: one node, the grid checked when the graph runs
def sparse_mix(x: torch.Tensor, w_h: torch.Tensor, b_h: torch.Tensor, w_w: torch.Tensor, b_w: torch.Tensor,
               grid_size: tuple[int, int]) -> torch.Tensor:
    """``cat([x, x_h, x_w], -1)`` for channels-last tokens: ``x_h`` mixes along W with ``(w_h, b_h)``,
    ``x_w`` along H with ``(w_w, b_w)`` (1x1-conv or matrix weights); ``(B, H, W, C) -> (B, H, W, 3C)``."""
    B, H, W, C = x.shape
    if H != grid_size[0] or W != grid_size[1]:
        raise ValueError(
            f"the sparse MLP was built for a {grid_size[0]}x{grid_size[1]} token grid and got {H}x{W}: its "
            f"weights depend on the grid, so feed the input size the model was built for "
            f"(or rebuild it with that img_size)")
    # both mixes as batched matmuls on views of the contiguous tokens, bias added in the product:
    # along W, per row: (W, W) @ (W, C) for each of the B*H rows
    x_h = torch.baddbmm(b_h.view(1, W, 1), w_h.view(W, W).expand(B * H, W, W), x.reshape(B * H, W, C))
    # along H, per image: (H, H) @ (H, W*C)
    x_w = torch.baddbmm(b_w.view(1, H, 1), w_w.view(H, H).expand(B, H, H), x.reshape(B, H, W * C))
    return torch.cat([x, x_h.view(B, H, W, C), x_w.view(B, H, W, C)], dim=-1)


@register_notrace_function  # torch.fx: checked when the graph runs, not while tracing
def check_grid(x: torch.Tensor, grid_size: tuple[int, int], what: str) -> torch.Tensor:
    """Refuse channels-last tokens ``(B, H, W, C)`` whose grid differs from the one ``what``'s weights were
    built for; returns ``x`` (so the check stays a graph node under torch.fx)."""
    if x.shape[1] != grid_size[0] or x.shape[2] != grid_size[1]:
        raise ValueError(
            f"the {what} was built for a {grid_size[0]}x{grid_size[1]} token grid and got "
            f"{x.shape[1]}x{x.shape[2]}: its weights depend on the grid, so feed the input size the model was "
            f"built for (or rebuild it with that img_size)")
    return x


class SparseMLP(nn.Module):
    """sMLPNet's sparse token mixing (without its BN + GELU), on channels-last tokens.

    Paper: Tang et al., *Sparse MLP for Image Recognition: Is Self-Attention Really
    Necessary?*, AAAI 2022 (arXiv 2109.05422). The ``smlp`` mixer of the registry.

    ``(B, H, W, C) -> (B, H, W, C)``::

        x_h = mix along W with proj_h     (an S_w x S_w matrix + bias, the same for every row and channel)
        x_w = mix along H with proh_w     (an S_h x S_h matrix + bias)
        out = fuse(cat([x, x_h, x_w]))    (3C -> C, no bias)

    Parameter names and shapes are the original release's: ``proj_h``, ``proh_w``
    (sic) and ``fuse`` are 1x1 ``Conv2d`` weights, so its checkpoints load as they are;
    they are applied here as matrices on the channels-last tensor. ``grid_size`` is
    the token grid ``S`` or ``(H, W)`` the weights are built for; another size is an error.
    """

    def __init__(self, dim: int, grid_size: int | tuple[int, int]):
        super().__init__()
        gh, gw = (grid_size, grid_size) if isinstance(grid_size, int) else tuple(grid_size)
        self.dim = dim
        self.grid_size = (int(gh), int(gw))
        self.proj_h = nn.Conv2d(gw, gw, 1)  # mixes along W (the original moves W to the channel axis)
        self.proh_w = nn.Conv2d(gh, gh, 1)  # mixes along H
        self.fuse = nn.Conv2d(dim * 3, dim, 1, bias=False)

    def mix(self, x: torch.Tensor) -> torch.Tensor:
        """``cat([x, x_h, x_w], -1)``: the tokens and their two axial mixes, ``(B, H, W, 3C)``."""
        b_h, b_w = self.proj_h.bias, self.proh_w.bias
        assert b_h is not None and b_w is not None  # built with biases (a TorchScript type refinement)
        return sparse_mix(x, self.proj_h.weight, b_h, self.proh_w.weight, b_w, self.grid_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self.mix(x), self.fuse.weight.flatten(1))

    def fused_residual(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        """``residual + self(x)`` in inference, the sum fused into oneDNN's matmul (same numbers).

        Only called where :func:`spach.models.kernels.use_fused_mlp` allows it.
        """
        return torch.ops.mkldnn._linear_pointwise.binary(self.mix(x), residual, self.fuse.weight.flatten(1), None,
                                                         "add")


class BatchNormNhwc(nn.BatchNorm2d):
    """``BatchNorm2d`` on channels-last tokens ``(B, H, W, C)`` (run on the channels_last NCHW view, no copy)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # BatchNorm2d's own forward, on the (B, C, H, W) view (written out: TorchScript has no super())
        momentum = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:
                momentum = 1.0 / float(self.num_batches_tracked)
        use_batch_stats = self.training or (self.running_mean is None and self.running_var is None)
        keep = not self.training or self.track_running_stats
        y = F.batch_norm(x.permute(0, 3, 1, 2), self.running_mean if keep else None,
                         self.running_var if keep else None, self.weight, self.bias, use_batch_stats, momentum,
                         self.eps)
        return y.permute(0, 2, 3, 1)


class GroupNorm1Nhwc(nn.GroupNorm):
    """``GroupNorm(1, C)`` on channels-last tokens ``(B, H, W, C)``: statistics over H, W and C per image,
    a per-channel affine (ShiftViT's ``GN1``)."""

    def __init__(self, num_channels: int, eps: float = 1e-5):
        super().__init__(1, num_channels, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.group_norm(x.permute(0, 3, 1, 2), 1, self.weight, self.bias, self.eps).permute(0, 2, 3, 1)
