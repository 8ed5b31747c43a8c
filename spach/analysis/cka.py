"""Representation similarity: linear CKA with the unbiased HSIC estimator, accumulated over minibatches.

Kornblith et al. (2019) define CKA(K, L) = HSIC(K, L) / sqrt(HSIC(K, K) HSIC(L, L)) for the Gram
matrices K = X Xᵀ, L = Y Yᵀ of two representations of the same examples. Nguyen et al. (2021)
estimate it over minibatches: HSIC is averaged over batches with the unbiased estimator of
Song et al. (2012), so the value does not depend on the batch size's bias and memory stays O(batch²)::

    HSIC_1(K, L) = [tr(K̃L̃) + 1ᵀK̃1 · 1ᵀL̃1 / ((n-1)(n-2)) - 2/(n-2) · 1ᵀK̃L̃1] / (n(n-3))

with K̃, L̃ the Gram matrices with their diagonals set to zero.

    acc = MinibatchCKA(num_x=3, num_y=3)
    for xs, ys in batches: acc.update(xs, ys)     # lists of (B, ...) features per layer
    acc.compute()                                 # (3, 3) CKA matrix
"""
from __future__ import annotations

import contextlib

from typing import Optional

import torch

from spach.analysis.common import ImageSet, Subject, block_modules


def _centred_stats(features: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per layer: the zero-diagonal Gram matrix flattened (L, n²), its row sums (L, n), its total (L,)."""
    grams = []
    for f in features:
        f = f.reshape(f.shape[0], -1).double()
        k = f @ f.T
        k.fill_diagonal_(0.0)
        grams.append(k)
    k = torch.stack(grams)
    rows = k.sum(dim=2)
    return k.flatten(1), rows, rows.sum(dim=1)


def unbiased_hsic_matrix(xs: list[torch.Tensor], ys: list[torch.Tensor]) -> torch.Tensor:
    """HSIC_1 between every representation in xs and every one in ys on one batch of n >= 4 examples."""
    n = xs[0].shape[0]
    if n < 4:
        raise ValueError(f"the unbiased HSIC estimator needs at least 4 examples per batch, got {n}")
    if any(f.shape[0] != n for f in (*xs, *ys)):
        raise ValueError("all representations must have the same number of examples")
    kx, rx, sx = _centred_stats(xs)
    ky, ry, sy = _centred_stats(ys)
    trace = kx @ ky.T
    return (trace + torch.outer(sx, sy) / ((n - 1) * (n - 2)) - 2.0 / (n - 2) * (rx @ ry.T)) / (n * (n - 3))


class MinibatchCKA:
    """Accumulates HSIC(X_i, Y_j), HSIC(X_i, X_i) and HSIC(Y_j, Y_j) over minibatches."""

    def __init__(self, num_x: int, num_y: int):
        self.xy = torch.zeros(num_x, num_y, dtype=torch.float64)
        self.xx = torch.zeros(num_x, dtype=torch.float64)
        self.yy = torch.zeros(num_y, dtype=torch.float64)
        self.batches = 0

    def update(self, xs: list[torch.Tensor], ys: list[torch.Tensor]) -> None:
        if len(xs) != self.xx.numel() or len(ys) != self.yy.numel():
            raise ValueError(f"expected {self.xx.numel()} and {self.yy.numel()} representations, "
                             f"got {len(xs)} and {len(ys)}")
        self.xy += unbiased_hsic_matrix(xs, ys).cpu()
        self.xx += torch.stack([unbiased_hsic_matrix([x], [x])[0, 0] for x in xs]).cpu()
        self.yy += torch.stack([unbiased_hsic_matrix([y], [y])[0, 0] for y in ys]).cpu()
        self.batches += 1

    def compute(self) -> torch.Tensor:
        if not self.batches:
            raise ValueError("no minibatches accumulated")
        denom = torch.sqrt(self.xx.clamp_min(0)[:, None] * self.yy.clamp_min(0)[None, :])
        return torch.where(denom > 0, self.xy / denom.clamp_min(1e-300), torch.zeros_like(self.xy))


def linear_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    """Linear CKA of two representations (n, ...) of the same n >= 4 examples (one batch)."""
    acc = MinibatchCKA(1, 1)
    acc.update([x], [y])
    return float(acc.compute()[0, 0])


class BlockRecorder:
    """Forward hooks that keep the outputs of a model's blocks (see `block_modules`) for one forward."""

    def __init__(self, model: torch.nn.Module):
        self.blocks = block_modules(model)
        self.names = [n for n, _ in self.blocks]
        self.outputs: list[torch.Tensor] = []
        self.handles = []

    def __enter__(self) -> "BlockRecorder":
        for _, module in self.blocks:
            self.handles.append(module.register_forward_hook(lambda m, i, o: self.outputs.append(o.detach())))
        return self

    def __exit__(self, *_) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []

    def take(self) -> list[torch.Tensor]:
        out, self.outputs = self.outputs, []
        if len(out) != len(self.blocks):
            raise RuntimeError(f"expected {len(self.blocks)} block outputs, recorded {len(out)}")
        return out


def cka_analysis(a: Subject, b: Optional[Subject] = None, n_images: int = 256, batch_size: int = 64,
                 images: Optional[ImageSet] = None) -> dict:
    """Block × block linear CKA of model `a` with itself, or with model `b` (same images for both).

    Both models must accept the same image size. Returns {"x": label, "y": label, "x_blocks", "y_blocks",
    "matrix": [[...]], "n_images"}; matrix[i][j] compares block i of x with block j of y.
    """
    if b is not None and b.img_size != a.img_size:
        raise ValueError(f"{a.label} takes {a.img_size}px and {b.label} {b.img_size}px: CKA compares the same "
                         "images, pass --img-size to build both at one size")
    images = images or ImageSet.for_subject(a, n_images)
    if batch_size < 4:
        raise ValueError(f"the CKA batch size must be at least 4 (unbiased HSIC), got {batch_size}")
    ra = BlockRecorder(a.model)
    rb = BlockRecorder(b.model) if b is not None else ra
    acc = MinibatchCKA(len(ra.blocks), len(rb.blocks))
    with ra, (rb if b is not None else contextlib.nullcontext()), torch.no_grad():
        for x, _ in images.batches(batch_size):
            if x.shape[0] < 4:
                continue  # a short last batch: the unbiased estimator needs 4 examples
            a.logits(x)
            xs = ra.take()
            ys = xs
            if b is not None:
                b.logits(x)
                ys = rb.take()
            acc.update(xs, ys)
    return {"x": a.label, "y": (b or a).label, "x_blocks": ra.names, "y_blocks": rb.names,
            "matrix": acc.compute().tolist(), "n_images": images.n}
