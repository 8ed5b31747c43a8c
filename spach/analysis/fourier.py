"""Fourier sensitivity (Yin et al. 2019): error under Fourier-basis noise per frequency; low/high-pass accuracy.

The basis image U(i, j) of an H×W image is the real image whose 2-D DFT is nonzero only at
the frequencies (i, j) and (-i, -j), scaled to unit L2 norm. The *Fourier heat map* is the
error of the model on images ``clip(x + r·ε·U(i, j))``, with a random sign r per image and
channel and norm ε, for every frequency (i, j) (centred: the zero frequency in the middle).

    basis = fourier_basis(32, 32, 3, 5)                        # ||basis|| = 1
    result = fourier_analysis(subject, n_images=100, eps=4.0)  # heat map + low/high-pass accuracy
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch

from spach.analysis.common import ImageSet, Subject


def fourier_basis(H: int, W: int, i: int, j: int, dtype=torch.float32) -> torch.Tensor:
    """The unit-norm real image (H, W) with spectrum at (i, j) and (-i, -j) only (indices modulo H, W)."""
    spectrum = torch.zeros(H, W, dtype=torch.complex128)
    spectrum[i % H, j % W] = 1.0
    spectrum[(-i) % H, (-j) % W] = 1.0
    image = torch.fft.ifft2(spectrum).real
    return (image / image.norm()).to(dtype)


def frequency_grid(H: int, W: int, step: int = 1) -> tuple[list[int], list[int]]:
    """Centred frequencies -H//2 .. (H-1)//2 (and for W), every `step`-th one, always including 0."""
    if step < 1:
        raise ValueError(f"the frequency step must be >= 1, got {step}")
    rows = [f for f in range(-(H // 2), (H - 1) // 2 + 1) if f % step == 0]
    cols = [f for f in range(-(W // 2), (W - 1) // 2 + 1) if f % step == 0]
    return rows, cols


def band_filter(x: torch.Tensor, bandwidth: int, keep: str) -> torch.Tensor:
    """Keep (`keep="low"`) or remove (`"high"`) the centred square of frequencies |f_row|, |f_col| < bandwidth/2."""
    H, W = x.shape[-2:]
    fy = torch.fft.fftfreq(H, d=1.0 / H, device=x.device).abs()
    fx = torch.fft.fftfreq(W, d=1.0 / W, device=x.device).abs()
    low = (fy[:, None] < bandwidth / 2) & (fx[None, :] < bandwidth / 2)
    mask = low if keep == "low" else ~low
    return torch.fft.ifft2(torch.fft.fft2(x.double()) * mask).real.to(x.dtype)


@torch.no_grad()
def _accuracy(subject: Subject, images: ImageSet, batch_size: int, transform) -> float:
    hits = n = 0
    for b, (x, y) in enumerate(images.batches(batch_size)):
        hits += int((subject.logits(transform(x, b)).argmax(-1) == y).sum())
        n += len(y)
    return 100.0 * hits / n


def fourier_analysis(subject: Subject, n_images: int = 100, eps: float = 4.0, step: int = 1,
                     bandwidths: Optional[list[int]] = None, seed: int = 0, batch_size: int = 128,
                     images: Optional[ImageSet] = None) -> dict:
    """Fourier heat map (error %, frequencies every `step`) and accuracy under low/high-pass filtering.

    `eps` is the L2 norm of the perturbation per channel, on [0, 1] images (Yin et al.: 4 for CIFAR-10 at 32 px).
    U(i, j) equals U(-i, -j), so each pair is measured once and mirrored.
    """
    images = images or ImageSet.for_subject(subject, n_images)
    H = W = subject.img_size
    rows, cols = frequency_grid(H, W, step)
    error = np.full((len(rows), len(cols)), np.nan)
    measured: dict[tuple[int, int], float] = {}
    g = torch.Generator().manual_seed(seed)
    for a, i in enumerate(rows):
        for b, j in enumerate(cols):
            twin = ((-i) % H, (-j) % W)
            if twin in measured:
                error[a, b] = measured[twin]
                continue
            basis = fourier_basis(H, W, i, j)
            signs = {}

            def perturb(x, batch, basis=basis, signs=signs):
                if batch not in signs:
                    signs[batch] = torch.randint(0, 2, (x.shape[0], x.shape[1], 1, 1), generator=g) * 2.0 - 1.0
                return (x + signs[batch].to(x) * eps * basis.to(x)).clamp(0, 1)

            error[a, b] = 100.0 - _accuracy(subject, images, batch_size, perturb)
            measured[(i % H, j % W)] = error[a, b]
    bandwidths = bandwidths or sorted({max(2, H * k // 8) for k in range(1, 9)})
    low = {str(bw): _accuracy(subject, images, batch_size, lambda x, _, bw=bw: band_filter(x, bw, "low"))
           for bw in bandwidths}
    high = {str(bw): _accuracy(subject, images, batch_size, lambda x, _, bw=bw: band_filter(x, bw, "high"))
            for bw in bandwidths}
    clean = _accuracy(subject, images, batch_size, lambda x, _: x)
    return {"eps": eps, "n_images": images.n, "rows": rows, "cols": cols, "error": error.tolist(), "clean": clean,
            "lowpass": low, "highpass": high, "mean_error": float(np.nanmean(error)),
            "low_freq_error": _band_mean(error, rows, cols, H, inner=True),
            "high_freq_error": _band_mean(error, rows, cols, H, inner=False)}


def _band_mean(error: np.ndarray, rows: list[int], cols: list[int], H: int, inner: bool) -> float:
    """Mean error inside (|f| < H/4 on both axes) or outside that central square of the heat map."""
    r = np.abs(np.array(rows))[:, None] < H / 4
    c = np.abs(np.array(cols))[None, :] < H / 4
    mask = (r & c) if inner else ~(r & c)
    vals = error[mask]
    return float(np.nanmean(vals)) if vals.size else float("nan")
