"""Effective receptive fields (Luo et al. 2016; RepLKNet's protocol): input gradients of a central output.

For a feature map ``f(x)`` of shape (B, C, h, w), the ERF map is
``sum_images sum_channels |d f(x)[:, :, h//2, w//2].sum() / d x|``: how much each
input pixel moves the central position, averaged over N validation images. The
*high-contribution area ratio* at threshold t is the area of the smallest square
around the centre holding a fraction t of the map's total, over the image area
(RepLKNet reports t = 20%, 50%, 99%).

    maps = erf_maps(subject, images, stages=[0, 3])          # {stage: (H, W) numpy map}
    erf_area_ratio(maps[3], 0.5)                              # -> (side in pixels, area ratio)
"""
from __future__ import annotations

from typing import Callable, Iterable, Optional

import numpy as np
import torch

from spach.analysis.common import ImageSet, Subject, feature_stages, pick

THRESHOLDS = (0.2, 0.5, 0.99)


def input_gradient_map(feature_fn: Callable[[torch.Tensor], torch.Tensor],
                       images: Iterable[torch.Tensor]) -> np.ndarray:
    """Sum over images of |d(central position of feature_fn(x), summed over channels) / dx|, summed over
    input channels. ``feature_fn`` maps (B, C_in, H, W) to (B, C, h, w); samples are independent."""
    total = None
    for x in images:
        x = x.detach().clone().requires_grad_(True)
        out = feature_fn(x)
        if out.dim() != 4:
            raise ValueError(f"the feature map must be (B, C, h, w), got shape {tuple(out.shape)}")
        h, w = out.shape[-2:]
        grad, = torch.autograd.grad(out[:, :, h // 2, w // 2].sum(), x)
        contribution = grad.abs().sum(dim=(0, 1)).double()
        total = contribution if total is None else total + contribution
    if total is None:
        raise ValueError("no images to compute the ERF from")
    return total.cpu().numpy()


def erf_area_ratio(grad_map: np.ndarray, threshold: float) -> tuple[int, float]:
    """(side, area / (H·W)) of the smallest square around the map's centre that holds `threshold` of its
    total (the square is clipped to the map; the centre is the map's centre of mass, rounded to a pixel,
    which is the input footprint of the central output position)."""
    if not 0 < threshold <= 1:
        raise ValueError(f"threshold must be in (0, 1], got {threshold}")
    data = np.asarray(grad_map, dtype=np.float64)
    H, W = data.shape
    total = data.sum()
    if total <= 0:
        return 0, 0.0
    # centre: the map's centre of mass (the input footprint of the central output position)
    cy = int(np.clip(np.round((data.sum(axis=1) * np.arange(H)).sum() / total), 0, H - 1))
    cx = int(np.clip(np.round((data.sum(axis=0) * np.arange(W)).sum() / total), 0, W - 1))
    for r in range(max(H, W)):
        window = data[max(cy - r, 0):cy + r + 1, max(cx - r, 0):cx + r + 1]
        if window.sum() >= threshold * total * (1 - 1e-12):
            return 2 * r + 1, window.size / (H * W)
    return max(H, W), 1.0


def stage_fn(subject: Subject, index: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """x01 -> the (B, C, h, w) output of feature point `index` (normalisation included)."""
    model = subject.model

    def fn(x01: torch.Tensor) -> torch.Tensor:
        maps = model.forward_intermediates(subject.normalize(x01), indices=[index], stop_early=True,
                                           intermediates_only=True, output_fmt="NCHW")
        return maps[0]
    return fn


def erf_analysis(subject: Subject, n_images: int = 32, stages: Optional[list[int]] = None,
                 batch_size: int = 16, images: Optional[ImageSet] = None) -> dict:
    """ERF maps and area ratios of the chosen stages (default: all feature points) over N val images.

    Returns {"stages": [{"index", "module", "stride", "map" (list of lists, mean over images),
    "area": {"20": ratio, ...}, "side": {"20": pixels, ...}}], "n_images": N}.
    """
    info = feature_stages(subject.model)
    chosen = pick(info, stages, "stage")
    images = images or ImageSet.for_subject(subject, n_images)
    out = []
    for i in chosen:
        grad = input_gradient_map(stage_fn(subject, i), (x for x, _ in images.batches(batch_size))) / images.n
        entry = dict(info[i], map=grad.astype(np.float32).tolist(), area={}, side={})
        for t in THRESHOLDS:
            side, ratio = erf_area_ratio(grad, t)
            entry["area"][f"{round(t * 100)}"] = ratio
            entry["side"][f"{round(t * 100)}"] = side
        out.append(entry)
    return {"n_images": images.n, "img_size": subject.img_size, "stages": out}
