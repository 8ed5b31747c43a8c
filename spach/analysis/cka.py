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
from spach.errors import SpachError


def gram(features: torch.Tensor) -> torch.Tensor:
    """The linear-kernel Gram matrix (n, n), float64, of a representation (n, ...) flattened per example."""
    f = features.reshape(features.shape[0], -1).double()
    return f @ f.T


def hsic_from_grams(kxs: list[torch.Tensor], kys: list[torch.Tensor]) -> torch.Tensor:
    """HSIC_1 between every Gram matrix in kxs and every one in kys (all (n, n), n >= 4)."""
    n = kxs[0].shape[0]
    if n < 4:
        raise ValueError(f"the unbiased HSIC estimator needs at least 4 examples per batch, got {n}")
    if any(k.shape != (n, n) for k in (*kxs, *kys)):
        raise ValueError("all representations must have the same number of examples")

    def stats(grams):
        k = torch.stack(grams).clone()
        k.diagonal(dim1=1, dim2=2).zero_()
        rows = k.sum(dim=2)
        return k.flatten(1), rows, rows.sum(dim=1)

    kx, rx, sx = stats(kxs)
    ky, ry, sy = stats(kys)
    return (kx @ ky.T + torch.outer(sx, sy) / ((n - 1) * (n - 2)) - 2.0 / (n - 2) * (rx @ ry.T)) / (n * (n - 3))


def unbiased_hsic_matrix(xs: list[torch.Tensor], ys: list[torch.Tensor]) -> torch.Tensor:
    """HSIC_1 between every representation in xs and every one in ys on one batch of n >= 4 examples."""
    return hsic_from_grams([gram(x) for x in xs], [gram(y) for y in ys])


class MinibatchCKA:
    """Accumulates HSIC(X_i, Y_j), HSIC(X_i, X_i) and HSIC(Y_j, Y_j) over minibatches."""

    def __init__(self, num_x: int, num_y: int):
        self.xy = torch.zeros(num_x, num_y, dtype=torch.float64)
        self.xx = torch.zeros(num_x, dtype=torch.float64)
        self.yy = torch.zeros(num_y, dtype=torch.float64)
        self.batches = 0

    def update(self, xs: list[torch.Tensor], ys: list[torch.Tensor]) -> None:
        """Add one minibatch of representations (each (n, ...), the same n examples)."""
        self.update_grams([gram(x) for x in xs], [gram(y) for y in ys])

    def update_grams(self, kxs: list[torch.Tensor], kys: list[torch.Tensor]) -> None:
        """Add one minibatch given as Gram matrices (see `gram`)."""
        if len(kxs) != self.xx.numel() or len(kys) != self.yy.numel():
            raise ValueError(f"expected {self.xx.numel()} and {self.yy.numel()} representations, "
                             f"got {len(kxs)} and {len(kys)}")
        self.xy += hsic_from_grams(kxs, kys).cpu()
        self.xx += torch.stack([hsic_from_grams([k], [k])[0, 0] for k in kxs]).cpu()
        self.yy += torch.stack([hsic_from_grams([k], [k])[0, 0] for k in kys]).cpu()
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
    """Forward hooks that keep the Gram matrices of a model's block outputs (see `block_modules`) for one
    forward: O(batch²) memory per block whatever the feature size."""

    def __init__(self, model: torch.nn.Module):
        self.blocks = block_modules(model)
        self.names = [n for n, _ in self.blocks]
        self.outputs: list[torch.Tensor] = []
        self.handles = []

    def __enter__(self) -> "BlockRecorder":
        for _, module in self.blocks:
            self.handles.append(module.register_forward_hook(lambda m, i, o: self.outputs.append(gram(o.detach()))))
        return self

    def __exit__(self, *_) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []

    def take(self) -> list[torch.Tensor]:
        out, self.outputs = self.outputs, []
        if len(out) != len(self.blocks):
            raise SpachError(f"expected {len(self.blocks)} block outputs, recorded {len(out)}")
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
            kxs = ra.take()
            kys = kxs
            if b is not None:
                b.logits(x)
                kys = rb.take()
            acc.update_grams(kxs, kys)
    return {"x": a.label, "y": (b or a).label, "x_blocks": ra.names, "y_blocks": rb.names,
            "matrix": acc.compute().tolist(), "n_images": images.n}


def cka_joint(subjects: list[Subject], n_images: int = 256, batch_size: int = 64,
              images: Optional[ImageSet] = None) -> dict:
    """Linear CKA between every pair of blocks of several models at once (one pass over the images).

    Returns {"labels", "blocks": {label: [block names]}, "offsets": {label: first row}, "matrix"}: the
    symmetric matrix over all blocks of all models, in order; slices give within- and cross-model maps.
    """
    if not subjects:
        raise ValueError("no models to compare")
    sizes = {s.img_size for s in subjects}
    if len(sizes) > 1:
        raise ValueError(f"the models take different image sizes {sorted(sizes)}: CKA compares the same images")
    images = images or ImageSet.for_subject(subjects[0], n_images)
    recorders = [BlockRecorder(s.model) for s in subjects]
    total = sum(len(r.blocks) for r in recorders)
    acc = MinibatchCKA(total, total)
    with contextlib.ExitStack() as stack, torch.no_grad():
        for r in recorders:
            stack.enter_context(r)
        for x, _ in images.batches(batch_size):
            if x.shape[0] < 4:
                continue
            grams = []
            for s, r in zip(subjects, recorders):
                s.logits(x)
                grams += r.take()
            acc.update_grams(grams, grams)
    offsets, k = {}, 0
    for s, r in zip(subjects, recorders):
        offsets[s.label] = k
        k += len(r.blocks)
    return {"labels": [s.label for s in subjects], "blocks": {s.label: r.names for s, r in zip(subjects, recorders)},
            "offsets": offsets, "matrix": acc.compute().tolist(), "n_images": images.n}
