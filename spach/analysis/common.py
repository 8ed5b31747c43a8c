"""What every analysis shares: the model under study with its data settings, images in [0, 1], block lists.

    subject = load_subject(run_dir="runs/cpu-mini/runs/conv-ms-tiny-s0-1a2b3c4d")      # a `spach train` run
    subject = load_subject("spach_ms_xxs_patch4_224_conv", "spach_ms_conv_xxs.pth", data="/data/imagenet")
    images = ImageSet(subject.data, subject.img_size, n=256)       # the val split, class-balanced, in [0, 1]
    for x01, y in images.batches(64):
        logits = subject.logits(x01)                                # normalised as in training

Analyses perturb images in pixel space ([0, 1]) and normalise them afterwards, so
corruptions and Fourier noise mean the same thing for every model.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional

import torch
from torch import nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CACHE_LIMIT_BYTES = 512 * 2 ** 20   # image sets up to this size are decoded once and kept in memory


@dataclass
class Subject:
    """A model ready for analysis (eval mode) and how its inputs are prepared."""

    model: nn.Module
    label: str                       # how figures and tables name it
    model_name: str
    data: Optional[str]
    img_size: int
    family: Optional[str] = None
    mean: tuple = IMAGENET_MEAN
    std: tuple = IMAGENET_STD
    crop_pct: float = 0.875
    interpolation: str = "bicubic"
    info: dict = field(default_factory=dict)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def normalize(self, x01: torch.Tensor) -> torch.Tensor:
        """[0, 1] images (on any device) -> the model's input, on the model's device (differentiable)."""
        x01 = x01.to(self.device)
        mean = torch.tensor(self.mean, dtype=x01.dtype, device=x01.device).view(1, -1, 1, 1)
        std = torch.tensor(self.std, dtype=x01.dtype, device=x01.device).view(1, -1, 1, 1)
        return (x01 - mean) / std

    @torch.no_grad()
    def logits(self, x01: torch.Tensor) -> torch.Tensor:
        """The model's logits for [0, 1] images, as float32 on the CPU."""
        return self.model(self.normalize(x01)).float().cpu()


def family_of(model_name: str, model_kwargs: dict | None = None) -> Optional[str]:
    """conv / attn / mlp / hybrid from a spach name and its net_arch override (None for other models)."""
    arch = (model_kwargs or {}).get("net_arch")
    if arch:
        flat = arch if isinstance(arch[0][0], str) else [p for stage in arch[1:] for p in stage] or arch[0]
        kinds = {("conv" if m == "pass" else m) for m, _ in flat}
        return kinds.pop() if len(kinds) == 1 else "hybrid"
    m = re.match(r"^spach_.*_(conv|attn|mlp|hybrid)$", model_name)
    return m.group(1) if m else None


def _run_files(run_dir: Path) -> tuple[dict, Path]:
    """(training config, weights file) of a `spach train` output directory."""
    from spach.models import read_state_file

    last = run_dir / "last.pt"
    if not last.is_file():
        raise FileNotFoundError(f"{run_dir} is not a training run directory (no last.pt); pass a run of "
                                "`spach train` / `spach battle`, or --model with --checkpoint")
    config = read_state_file(last).get("config")
    if not isinstance(config, dict):
        raise ValueError(f"{last} holds no training config; pass --model and --checkpoint instead")
    weights = run_dir / "model.safetensors"
    return config, weights if weights.is_file() else last


def load_subject(model: Optional[str] = None, checkpoint: Optional[str | Path] = None, *,
                 run_dir: Optional[str | Path] = None, data: Optional[str] = None, img_size: Optional[int] = None,
                 model_kwargs: Optional[dict] = None, label: Optional[str] = None, ema: bool = False,
                 device: str | torch.device = "cpu") -> Subject:
    """Build a model for analysis: a zoo/timm name with a checkpoint, or a training run directory.

    Without a checkpoint the model keeps its initial weights (useful for tests and for the
    "at initialisation" baseline). Data, image size and model options default to the run's.
    """
    from spach import load_checkpoint
    from spach.data import open_source
    from spach.engine.build import build_model, check_model_input
    from spach.models import read_state_file

    run_cfg: dict = {}
    source = None
    if run_dir is not None:
        run_cfg, weights = _run_files(Path(run_dir))
        checkpoint = checkpoint or weights
        model = model or run_cfg.get("model")
    elif checkpoint is not None:
        source = read_state_file(Path(checkpoint))
        run_cfg = source["config"] if isinstance(source.get("config"), dict) else {}
    if not model:
        raise ValueError("no model to analyse: give a model name (with --checkpoint) or a run directory")
    data = data or run_cfg.get("data")
    if not data:
        raise ValueError("no data source: pass --data (mnist5k, an ImageFolder root or NAME:ROOT)")
    kwargs = model_kwargs if model_kwargs is not None else (run_cfg.get("model_kwargs") or {})
    img_size = img_size or run_cfg.get("img_size")
    num_classes = len(open_source(data, "val").classes)
    net = build_model(model, num_classes=num_classes, img_size=img_size, model_kwargs=kwargs)
    img_size = int(img_size or net.pretrained_cfg.get("input_size", (3, 224, 224))[-1])
    check_model_input(net, img_size, num_classes)
    if checkpoint is not None:
        if source is None:
            source = read_state_file(Path(checkpoint))
        load_checkpoint(net, source, key="model_ema" if ema else None)
    net.eval().to(device)
    cfg = getattr(net, "pretrained_cfg", None) or {}
    return Subject(model=net, label=label or (Path(run_dir).name if run_dir else model), model_name=model,
                   data=data, img_size=img_size, family=family_of(model, kwargs),
                   mean=tuple(cfg.get("mean", IMAGENET_MEAN)), std=tuple(cfg.get("std", IMAGENET_STD)),
                   crop_pct=float(run_cfg.get("crop_pct", 0.875)),
                   interpolation=str(run_cfg.get("interpolation", "bicubic")),
                   info={"checkpoint": str(checkpoint) if checkpoint else None, "model_kwargs": kwargs,
                         "run_dir": str(run_dir) if run_dir else None})


class ImageSet:
    """N images of a SOURCE's val split (a deterministic class-balanced slice), as [0, 1] tensors."""

    def __init__(self, source: str, img_size: int, n: int, *, crop_pct: float = 0.875,
                 interpolation: str = "bicubic"):
        from spach.data import build_dataset

        if not isinstance(n, int) or n < 1:
            raise ValueError(f"the number of images must be a positive integer, got {n!r}")
        self.dataset = build_dataset(source, "val", img_size, max_samples=n, crop_pct=crop_pct,
                                     interpolation=interpolation, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
        self.n = len(self.dataset)
        self.img_size = img_size
        self._cache: Optional[tuple[torch.Tensor, torch.Tensor]] = None
        if self.n * 3 * img_size * img_size * 4 <= CACHE_LIMIT_BYTES:
            xs, ys = zip(*self._read(256))
            self._cache = (torch.cat(xs), torch.cat(ys))

    @classmethod
    def for_subject(cls, subject: Subject, n: int) -> "ImageSet":
        return cls(subject.data, subject.img_size, n, crop_pct=subject.crop_pct, interpolation=subject.interpolation)

    def _read(self, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        from torch.utils.data import DataLoader

        from spach.data import collate_skip

        for images, targets, _ in DataLoader(self.dataset, batch_size=batch_size, collate_fn=collate_skip):
            if images is not None:
                yield images, targets

    def batches(self, batch_size: int = 64) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if self._cache is None:
            yield from self._read(batch_size)
            return
        x, y = self._cache
        for i in range(0, len(x), batch_size):
            yield x[i:i + batch_size], y[i:i + batch_size]


def block_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The model's residual blocks in forward order: SPACH mixing blocks, else `blocks.N` (ViT-like) or
    `layerK.N` (ResNet-like) modules."""
    from spach.models.layers import MixingBlock

    found = [(n, m) for n, m in model.named_modules() if isinstance(m, MixingBlock)]
    if not found:
        found = [(n, m) for n, m in model.named_modules() if re.search(r"(^|\.)(blocks|layer\d)\.\d+$", n)]
    if not found:
        raise ValueError(f"{type(model).__name__} has no recognisable blocks (SPACH MixingBlock, timm "
                         "'blocks.N' or ResNet 'layerK.N' modules) to compare")
    return found


def feature_stages(model: nn.Module) -> list[dict]:
    """The model's feature points (timm `feature_info`): index, module name and stride in input pixels."""
    info = getattr(model, "feature_info", None)
    if not info or not hasattr(model, "forward_intermediates"):
        raise ValueError(f"{type(model).__name__} has no feature_info / forward_intermediates: the ERF needs "
                         "stage outputs (any spach model and most timm models have them)")
    items = info if isinstance(info, list) else list(info)
    return [{"index": i, "module": d.get("module", str(i)), "stride": int(d.get("reduction", 1))}
            for i, d in enumerate(items)]


def pick(values: list, wanted: Optional[list[int]], what: str) -> list[int]:
    """Indices into `values` (negative ones count from the end), default all; a clear error when out of range."""
    if wanted is None:
        return list(range(len(values)))
    out = []
    for w in wanted:
        if not -len(values) <= w < len(values):
            raise ValueError(f"{what} {w} does not exist: the model has {len(values)} (0..{len(values) - 1})")
        out.append(w % len(values))
    return out
