"""Common corruptions (Hendrycks & Dietterich 2019) for any input size, and the mean corruption error.

Each corruption maps a batch (B, 3, H, W) in [0, 1] to a corrupted batch in [0, 1] at a
severity 1..5 (0 is the identity), deterministically for a seed. Severities follow ImageNet-C;
sizes in pixels (blur sigma) are ImageNet-C's at 224 px scaled to the image's side, but never below
CIFAR-10-C's sigmas (so a 32 px image is blurred as CIFAR-10-C does); pixelation is a fraction of the side.

    x_c = corrupt(x01, "gaussian_blur", severity=3, seed=0)
    result = corruption_analysis(subject, n_images=500)       # top-1 per corruption and severity
    mce(result, baseline_result)                               # mCE (%) relative to a baseline model
"""
from __future__ import annotations

import io
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F

from spach.analysis.common import ImageSet, Subject

SEVERITIES = (1, 2, 3, 4, 5)
GAUSSIAN_NOISE = (0.08, 0.12, 0.18, 0.26, 0.38)       # std, on [0, 1]
SHOT_NOISE = (60, 25, 12, 5, 3)                        # photons per unit intensity
BLUR_SIGMA_224 = (1, 2, 3, 4, 6)                       # pixels at 224 px (ImageNet-C)
BLUR_SIGMA_MIN = (0.4, 0.6, 0.7, 0.8, 1.0)             # pixels, the floor for small images (CIFAR-10-C)
CONTRAST = (0.4, 0.3, 0.2, 0.1, 0.05)                  # remaining contrast
BRIGHTNESS = (0.1, 0.2, 0.3, 0.4, 0.5)                 # added to the HSV value
JPEG_QUALITY = (25, 18, 15, 10, 7)
PIXELATE = (0.6, 0.5, 0.4, 0.3, 0.25)                  # fraction of the side kept


def _noise_generator(x: torch.Tensor, seed: int) -> torch.Generator:
    g = torch.Generator(device=x.device)
    g.manual_seed(int(seed))
    return g


def gaussian_noise(x: torch.Tensor, severity: int, seed: int) -> torch.Tensor:
    noise = torch.randn(x.shape, generator=_noise_generator(x, seed), device=x.device, dtype=x.dtype)
    return (x + noise * GAUSSIAN_NOISE[severity - 1]).clamp(0, 1)


def shot_noise(x: torch.Tensor, severity: int, seed: int) -> torch.Tensor:
    c = SHOT_NOISE[severity - 1]
    return (torch.poisson(x.clamp(0, 1) * c, generator=_noise_generator(x, seed)) / c).clamp(0, 1)


def gaussian_kernel1d(sigma: float) -> torch.Tensor:
    radius = max(1, int(np.ceil(3 * sigma)))
    t = torch.arange(-radius, radius + 1, dtype=torch.float64)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    return k / k.sum()


def gaussian_blur(x: torch.Tensor, severity: int, seed: int) -> torch.Tensor:
    sigma = max(BLUR_SIGMA_224[severity - 1] * min(x.shape[-2:]) / 224, BLUR_SIGMA_MIN[severity - 1])
    k = gaussian_kernel1d(sigma).to(x)
    r = k.numel() // 2
    C = x.shape[1]
    y = F.pad(x, (r, r, r, r), mode="reflect" if r < min(x.shape[-2:]) else "replicate")
    y = F.conv2d(y, k.view(1, 1, 1, -1).expand(C, 1, 1, -1), groups=C)
    y = F.conv2d(y, k.view(1, 1, -1, 1).expand(C, 1, -1, 1), groups=C)
    return y.clamp(0, 1)


def contrast(x: torch.Tensor, severity: int, seed: int) -> torch.Tensor:
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    return ((x - mean) * CONTRAST[severity - 1] + mean).clamp(0, 1)


def brightness(x: torch.Tensor, severity: int, seed: int) -> torch.Tensor:
    """V += c in HSV with hue and saturation kept: for a fixed H and S, RGB is proportional to V."""
    v = x.amax(dim=1, keepdim=True)
    v_new = (v + BRIGHTNESS[severity - 1]).clamp(max=1.0)
    scaled = x * (v_new / v.clamp_min(1e-12))
    return torch.where(v > 0, scaled, v_new.expand_as(x)).clamp(0, 1)


def jpeg(x: torch.Tensor, severity: int, seed: int) -> torch.Tensor:
    from PIL import Image

    q = JPEG_QUALITY[severity - 1]
    out = []
    for img in (x.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy():
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format="JPEG", quality=q)
        buf.seek(0)
        out.append(torch.from_numpy(np.asarray(Image.open(buf).convert("RGB")).copy()))
    return (torch.stack(out).permute(0, 3, 1, 2).to(x.dtype) / 255).to(x.device)


def pixelate(x: torch.Tensor, severity: int, seed: int) -> torch.Tensor:
    H, W = x.shape[-2:]
    c = PIXELATE[severity - 1]
    small = F.interpolate(x, size=(max(1, int(H * c)), max(1, int(W * c))), mode="area")
    return F.interpolate(small, size=(H, W), mode="nearest").clamp(0, 1)


CORRUPTIONS: dict[str, Callable[[torch.Tensor, int, int], torch.Tensor]] = {
    "gaussian_noise": gaussian_noise,
    "shot_noise": shot_noise,
    "gaussian_blur": gaussian_blur,
    "contrast": contrast,
    "brightness": brightness,
    "jpeg": jpeg,
    "pixelate": pixelate,
}


def corrupt(x: torch.Tensor, name: str, severity: int, seed: int = 0) -> torch.Tensor:
    """Corrupt a batch (B, 3, H, W) in [0, 1]; severity 0 returns an unchanged copy."""
    if name not in CORRUPTIONS:
        raise ValueError(f"unknown corruption {name!r}; choose from {', '.join(CORRUPTIONS)}")
    if not isinstance(severity, int) or isinstance(severity, bool) or not 0 <= severity <= 5:
        raise ValueError(f"severity must be an integer 0..5 (0 = clean), got {severity!r}")
    if x.dim() != 4 or x.shape[1] != 3:
        raise ValueError(f"expected a (B, 3, H, W) batch in [0, 1], got shape {tuple(x.shape)}")
    if severity == 0:
        return x.clone()
    return CORRUPTIONS[name](x, severity, seed)


def _batch_seed(seed: int, name: str, severity: int, batch: int) -> int:
    return (seed * 1_000_003 + list(CORRUPTIONS).index(name) * 10_007 + severity * 101 + batch) % 2 ** 63


def corruption_analysis(subject: Subject, n_images: int = 500, corruptions: Optional[list[str]] = None,
                        seed: int = 0, batch_size: int = 64, images: Optional[ImageSet] = None) -> dict:
    """Top-1 (%) on clean images and under every corruption at severities 1..5.

    Returns {"clean": top1, "top1": {corruption: [top1 at severity 1..5]}, "n_images", "seed"}.
    """
    names = list(corruptions or CORRUPTIONS)
    for name in names:
        if name not in CORRUPTIONS:
            raise ValueError(f"unknown corruption {name!r}; choose from {', '.join(CORRUPTIONS)}")
    images = images or ImageSet.for_subject(subject, n_images)
    hits = {(name, s): 0 for name in names for s in SEVERITIES}
    clean = n = 0
    for b, (x, y) in enumerate(images.batches(batch_size)):
        clean += int((subject.logits(x).argmax(-1) == y).sum())
        n += len(y)
        for name in names:
            for s in SEVERITIES:
                xc = corrupt(x, name, s, _batch_seed(seed, name, s, b))
                hits[(name, s)] += int((subject.logits(xc).argmax(-1) == y).sum())
    return {"clean": 100.0 * clean / n, "n_images": n, "seed": seed,
            "top1": {name: [100.0 * hits[(name, s)] / n for s in SEVERITIES] for name in names}}


def mce(result: dict, baseline: dict) -> dict:
    """Corruption errors relative to a baseline model (Hendrycks & Dietterich), in %.

    CE_c = Σ_s err_{s,c} / Σ_s err^base_{s,c};  mCE = mean_c CE_c.  The relative CE subtracts each
    model's clean error first: (Σ_s err_{s,c} - 5 err_clean) / (Σ_s err^base_{s,c} - 5 err^base_clean).
    """
    common = [c for c in result["top1"] if c in baseline["top1"]]
    if not common:
        raise ValueError("the model and the baseline share no corruption")
    ce, rel = {}, {}
    clean, base_clean = 100.0 - result["clean"], 100.0 - baseline["clean"]
    for c in common:
        err = sum(100.0 - a for a in result["top1"][c])
        base = sum(100.0 - a for a in baseline["top1"][c])
        ce[c] = 100.0 * err / base if base > 0 else float("nan")
        base_rel = base - len(SEVERITIES) * base_clean
        rel[c] = 100.0 * (err - len(SEVERITIES) * clean) / base_rel if base_rel > 0 else float("nan")
    finite = [v for v in ce.values() if np.isfinite(v)]
    finite_rel = [v for v in rel.values() if np.isfinite(v)]
    return {"ce": ce, "mce": float(np.mean(finite)) if finite else float("nan"),
            "relative_ce": rel, "relative_mce": float(np.mean(finite_rel)) if finite_rel else float("nan")}
