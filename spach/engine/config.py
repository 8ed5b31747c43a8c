"""`TrainConfig`: every option of a training run, typed, validated, plain data.

    cfg = TrainConfig(model="spach_ms_xxs_patch4_224_conv", data="mnist5k", output="runs/x",
                      img_size=32, epochs=10, warmup_epochs=1, cooldown_epochs=1)
    cfg = TrainConfig.from_yaml("recipe.yaml")     # any field; unknown keys -> ValueError
    cfg.to_dict()                                  # plain data (stored in checkpoints, config.yaml)

Defaults are the paper's recipe (docs/design.md §5). Errors name the bad field:
`ValueError("TrainConfig.batch_size: must be >= 1 (got 0)")`.
The `spach train` flags are generated from the fields below (`--batch-size` for
`batch_size`, `--no-model-ema` for `model_ema=False`, ...), see `add_arguments`.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

# choices timm accepts (timm.data.transforms.str_to_interp_mode, timm.data.random_erasing.RandomErasing)
INTERPOLATIONS = ("nearest", "bilinear", "bicubic", "box", "hamming", "lanczos")
REMODES = ("const", "rand", "pixel")


def _opt(default: Any, help: str, **extra: Any) -> Any:
    """A dataclass field with a help text (shown by `spach train --help`)."""
    if isinstance(default, (dict, list)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help, **extra})
    return field(default=default, metadata={"help": help, **extra})


@dataclass
class TrainConfig:
    # --- what to train, on what, where -------------------------------------------------
    model: str = _opt("", "model name: a spach zoo name or any timm model")
    data: str = _opt("", "data SOURCE: 'mnist5k', an ImageFolder root with train/ and val/, "
                         "or NAME:ROOT for a torchvision dataset on disk (e.g. cifar10:~/data)")
    output: str = _opt("", "output directory (checkpoints, metrics.jsonl, config.yaml, tb/, model.safetensors)")
    model_kwargs: dict = _opt({}, "extra keyword arguments for create_model (e.g. hidden_dim=16)")
    img_size: Optional[int] = _opt(None, "input size (default: the model's pretrained_cfg input size)")
    num_classes: Optional[int] = _opt(None, "number of classes (default: from the data; a mismatch is an error)")
    init_checkpoint: Optional[str] = _opt(None, "initialise weights from this file (spach.load_checkpoint); with "
                                                "another class count the trunk loads and a new classifier starts")
    pretrained: bool = _opt(False, "start from the model's pretrained_cfg weights (timm's path: downloads its URL)")
    pretrained_file: Optional[str] = _opt(None, "with --pretrained: take the weights from this file or URL instead "
                                                "(an original release file, a state dict, .safetensors)")
    max_train_samples: Optional[int] = _opt(None, "use a deterministic class-balanced slice of the train split")
    max_val_samples: Optional[int] = _opt(None, "use a deterministic class-balanced slice of the val split")
    selection_fraction: Optional[float] = _opt(None, "model selection: hold out this fraction of each class of the "
                                                     "train split, train on the rest and evaluate on it; the val "
                                                     "split is not read (spach.data.selection_split)")
    selection_seed: int = _opt(0, "the seed that draws the held-out selection split")

    # --- schedule and optimiser ---------------------------------------------------------
    epochs: int = _opt(300, "number of epochs (cool-down epochs included)")
    batch_size: int = _opt(128, "batch size per process (global batch = batch_size x processes x accum_steps)")
    accum_steps: int = _opt(1, "gradient accumulation: micro-batches per optimizer step")
    lr: Optional[float] = _opt(None, "absolute peak learning rate (default: base_lr x global batch / 512)")
    base_lr: float = _opt(5e-4, "learning rate for a global batch of 512 (linear scaling rule)")
    opt: str = _opt("adamw", "optimizer name for timm.optim.create_optimizer_v2")
    opt_eps: float = _opt(1e-8, "optimizer epsilon")
    momentum: float = _opt(0.9, "momentum (SGD-type optimizers only)")
    weight_decay: float = _opt(0.05, "weight decay (not applied to norms, biases and model.no_weight_decay())")
    sched: str = _opt("cosine", "lr schedule for timm.scheduler.create_scheduler_v2; stepped per optimizer update")
    warmup_epochs: float = _opt(20, "linear warm-up epochs from warmup_lr")
    warmup_lr: float = _opt(1e-6, "learning rate at the start of the warm-up")
    min_lr: float = _opt(1e-5, "learning rate at the end of the cosine and during the cool-down")
    cooldown_epochs: float = _opt(10, "final epochs held at min_lr (warmup + cooldown must be < epochs)")
    clip_grad: Optional[float] = _opt(None, "clip gradients to this norm (or value, see clip_mode); None = off")
    clip_mode: str = _opt("norm", "gradient clipping mode: norm | value | agc")

    # --- regularisation and augmentation ------------------------------------------------
    smoothing: float = _opt(0.1, "label smoothing")
    mixup: float = _opt(0.8, "Mixup alpha (0 = off)")
    cutmix: float = _opt(1.0, "CutMix alpha (0 = off)")
    mixup_prob: float = _opt(1.0, "probability of applying Mixup or CutMix to a batch")
    mixup_switch_prob: float = _opt(0.5, "probability of CutMix instead of Mixup when both are on")
    mixup_mode: str = _opt("batch", "Mixup mode: batch | pair | elem")
    augment: bool = _opt(True, "train-time augmentation; off = the deterministic eval transform")
    auto_augment: Optional[str] = _opt("rand-m9-mstd0.5-inc1", "RandAugment policy (None = off)")
    reprob: float = _opt(0.25, "random erasing probability")
    remode: str = _opt("pixel", "random erasing mode")
    recount: int = _opt(1, "random erasing count")
    hflip: float = _opt(0.5, "horizontal flip probability")
    scale: tuple[float, float] = _opt((0.08, 1.0), "random-resized-crop area range")
    ratio: tuple[float, float] = _opt((3 / 4, 4 / 3), "random-resized-crop aspect ratio range")
    interpolation: str = _opt("bicubic", "resize interpolation")
    crop_pct: float = _opt(0.875, "eval centre crop fraction (resize to img_size/crop_pct, crop img_size)")
    repeated_aug: bool = _opt(True, "repeated augmentation (timm RepeatAugSampler)")
    aug_repeats: int = _opt(3, "repeats per sample for repeated augmentation")
    drop_path: Optional[float] = _opt(0.1, "stochastic depth rate (None = the model's default)")
    model_ema: bool = _opt(True, "keep an EMA of the weights (timm ModelEmaV3), evaluated every epoch")
    model_ema_decay: float = _opt(0.99996, "EMA decay")

    # --- speed and precision -----------------------------------------------------------
    amp: str = _opt("none", "mixed precision: none | bf16 (CPU and GPU) | fp16 (GPU, with loss scaling)")
    channels_last: bool = _opt(False, "use the channels_last memory format")
    compile: bool = _opt(False, "torch.compile the model")
    grad_checkpointing: bool = _opt(False, "activation checkpointing (model.set_grad_checkpointing)")
    workers: int = _opt(2, "data loader worker processes per training process")
    threads: Optional[int] = _opt(None, "torch.set_num_threads (CPU) for the run")
    device: Optional[str] = _opt(None, "device (default: cuda:LOCAL_RANK if available, else cpu)")
    matmul_precision: str = _opt("high", "CUDA fp32 matmuls: highest (fp32) | high (TF32, as cuDNN convs "
                                         "already are) | medium (bf16 passes); torch.set_float32_matmul_precision")
    cudnn_benchmark: bool = _opt(True, "CUDA: let cuDNN autotune convolution algorithms (torch.backends.cudnn.benchmark)")
    check_finite_every: int = _opt(1, "read the loss (one host sync) and stop on NaN/inf every N optimizer steps; "
                                      "0 = only before checkpoints and at the end of each epoch")

    # --- reproducibility and crash safety ----------------------------------------------
    seed: int = _opt(0, "random seed (data order, augmentation, init)")
    resume: Optional[str] = _opt(None, "'auto' (newest good checkpoint in output, if any) or a checkpoint path")
    checkpoint_every_steps: int = _opt(0, "also checkpoint every N optimizer steps (0 = only every epoch)")
    tensorboard: bool = _opt(True, "write TensorBoard scalars to OUTPUT/tb")

    # ------------------------------------------------------------------------------------
    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> "TrainConfig":
        """Check every field; raise ValueError('TrainConfig.<field>: ...') on the first bad one."""
        def bad(name: str, why: str) -> None:
            raise ValueError(f"TrainConfig.{name}: {why} (got {getattr(self, name)!r})")

        for f in dataclasses.fields(self):  # NaN passes every comparison below; inf breaks int()
            value = getattr(self, f.name)
            if any(isinstance(v, float) and not math.isfinite(v)
                   for v in (value if isinstance(value, (tuple, list)) else [value])):
                bad(f.name, "must be a finite number")
        for name in ("model", "data", "output"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                bad(name, "required")
        for name in ("epochs", "batch_size", "accum_steps", "aug_repeats", "recount"):
            if getattr(self, name) < 1:
                bad(name, "must be >= 1")
        for name in ("img_size", "num_classes", "max_train_samples", "max_val_samples", "threads"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                bad(name, "must be >= 1 or None")
        if self.workers < 0:
            bad("workers", "must be >= 0")
        if self.check_finite_every < 0:
            bad("check_finite_every", "must be >= 0 (0 = only at checkpoints and epoch ends)")
        if self.matmul_precision not in ("highest", "high", "medium"):
            bad("matmul_precision", "must be one of highest, high, medium")
        if self.checkpoint_every_steps < 0:
            bad("checkpoint_every_steps", "must be >= 0 (0 = off)")
        if self.lr is not None and not self.lr > 0:
            bad("lr", "must be > 0 or None")
        for name in ("base_lr", "opt_eps"):
            if not getattr(self, name) > 0:
                bad(name, "must be > 0")
        for name in ("weight_decay", "warmup_lr", "min_lr", "smoothing", "mixup", "cutmix",
                     "warmup_epochs", "cooldown_epochs"):
            if getattr(self, name) < 0:
                bad(name, "must be >= 0")
        for name in ("mixup_prob", "mixup_switch_prob", "reprob", "hflip"):
            if not 0 <= getattr(self, name) <= 1:
                bad(name, "must be in [0, 1]")
        if not self.smoothing < 1:
            bad("smoothing", "must be < 1")
        if not 0 < self.crop_pct <= 1:
            bad("crop_pct", "must be in (0, 1]")
        if self.drop_path is not None and not 0 <= self.drop_path < 1:
            bad("drop_path", "must be in [0, 1) or None")
        if not 0 < self.model_ema_decay < 1:
            bad("model_ema_decay", "must be in (0, 1)")
        if self.clip_grad is not None and not self.clip_grad > 0:
            bad("clip_grad", "must be > 0 or None")
        if self.clip_mode not in ("norm", "value", "agc"):
            bad("clip_mode", "must be one of norm, value, agc")
        if self.mixup_mode not in ("batch", "pair", "elem"):
            bad("mixup_mode", "must be one of batch, pair, elem")
        if self.amp not in ("none", "bf16", "fp16"):
            bad("amp", "must be one of none, bf16, fp16")
        if self.interpolation not in INTERPOLATIONS:
            bad("interpolation", f"must be one of {', '.join(INTERPOLATIONS)}")
        if self.remode not in REMODES:
            bad("remode", f"must be one of {', '.join(REMODES)}")
        if self.auto_augment and (why := auto_augment_error(self.auto_augment)):
            bad("auto_augment", f"{self.auto_augment!r} is not a timm augmentation policy ({why}); e.g. "
                                "'rand-m9-mstd0.5-inc1' (RandAugment), 'augmix-m5-w3', 'v0', or none")
        if not all(isinstance(k, str) and k.isidentifier() for k in self.model_kwargs):
            bad("model_kwargs", "keys must be keyword names of the model's constructor")
        if len(self.scale) != 2 or not 0 < self.scale[0] <= self.scale[1] <= 1:
            bad("scale", "must be two numbers 0 < lo <= hi <= 1")
        if len(self.ratio) != 2 or not 0 < self.ratio[0] <= self.ratio[1]:
            bad("ratio", "must be two numbers 0 < lo <= hi")
        if self.warmup_epochs + self.cooldown_epochs >= self.epochs:
            bad("warmup_epochs", f"warmup_epochs + cooldown_epochs ({self.cooldown_epochs}) must be < epochs "
                                 f"({self.epochs}); for a short run pass e.g. --warmup-epochs 1 --cooldown-epochs 0")
        if self.mixup_active and self.batch_size % 2:
            bad("batch_size", "must be even when mixup/cutmix is on (they pair samples)")
        if self.pretrained and self.init_checkpoint:
            bad("pretrained", "--pretrained and --init-checkpoint both set the initial weights: pass only one")
        if self.pretrained_file is not None and not self.pretrained:
            bad("pretrained_file", "needs --pretrained (or use --init-checkpoint FILE)")
        if self.resume is not None and not self.resume:
            bad("resume", "must be 'auto', a path, or None")
        return self.check_selection()

    def check_selection(self) -> "TrainConfig":
        """The selection split's option (part of `validate`): a fraction strictly between 0 and 1, or None."""
        if self.selection_fraction is not None and not 0 < self.selection_fraction < 1:
            raise ValueError(f"TrainConfig.selection_fraction: must be in (0, 1) or None "
                             f"(got {self.selection_fraction!r})")
        return self

    @property
    def mixup_active(self) -> bool:
        return self.mixup_prob > 0 and (self.mixup > 0 or self.cutmix > 0)

    # --- plain-data round trip ----------------------------------------------------------
    def to_dict(self) -> dict:
        """Plain data: str/int/float/bool/None, lists and dicts (YAML- and weights_only-safe)."""
        return {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        """Build from plain data; unknown keys or wrong types raise ValueError naming the field."""
        if not isinstance(d, dict):
            raise ValueError(f"TrainConfig: expected a mapping of options, got {type(d).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"TrainConfig: unknown option(s) {', '.join(unknown)}")
        hints = typing.get_type_hints(cls)
        return cls(**{k: coerce(k, v, hints[k]) for k, v in d.items()})

    @classmethod
    def from_yaml(cls, path: str | Path) -> "TrainConfig":
        return cls.from_dict(load_yaml(path))

    def to_yaml(self, path: str | Path) -> None:
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))

    def replace(self, **changes: Any) -> "TrainConfig":
        return TrainConfig.from_dict({**self.to_dict(), **changes})


def auto_augment_error(policy: str) -> Optional[str]:
    """Why timm cannot build the auto-augment `policy` (as timm.data.create_transform would), or None."""
    from timm.data.auto_augment import augment_and_mix_transform, auto_augment_transform, rand_augment_transform

    hparams = dict(translate_const=100, img_mean=(124, 116, 104))
    build = (rand_augment_transform if policy.startswith("rand") else
             augment_and_mix_transform if policy.startswith("augmix") else auto_augment_transform)
    try:
        build(policy, hparams)
    except Exception as e:  # noqa: BLE001 — timm asserts, or fails on parsing, in several ways
        return " ".join(str(e).split()) or type(e).__name__
    return None


def load_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    try:
        d = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:  # syntax errors, and tags such as !!python/object (safe_load never runs them)
        raise ValueError(f"{path}: not valid YAML: {' '.join(str(e).split())}") from None
    if not isinstance(d, dict):
        raise ValueError(f"{path}: expected a mapping of options at the top level")
    return d


def _plain(v: Any) -> Any:
    if isinstance(v, (tuple, list)):
        return [_plain(x) for x in v]
    if isinstance(v, dict):
        return {str(k): _plain(x) for k, x in v.items()}
    return v


def coerce(name: str, value: Any, tp: Any, strict: bool = False, owner: str = "TrainConfig") -> Any:
    """Check (and gently convert: int->float, list->tuple, numeric strings) a value for a field of type `tp`.

    ``strict`` (the study file's sections): no conversion from strings, an int stays an int where a float is
    allowed, and a union accepts any of its members. Raises ValueError naming ``owner.name``.
    """
    def bad() -> ValueError:
        return ValueError(f"{owner}.{name}: expected {_type_name(tp)}, got {value!r}")

    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None or (not strict and isinstance(value, str) and value.lower() in ("none", "null")
                             and type(None) in args):
            if type(None) in args:
                return None
            raise bad()
        inner = [a for a in args if a is not type(None)]
        for a in inner if strict else inner[:1]:
            try:
                return coerce(name, value, a, strict, owner)
            except ValueError:
                if a is inner[-1] or not strict:
                    raise
    if tp is bool:
        if isinstance(value, bool):
            return value
        if not strict and isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        raise bad()
    if tp in (int, float):
        if isinstance(value, str) and not strict:
            try:
                value = float(value)
            except ValueError:
                raise bad() from None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (tp is int and strict
                                                                              and not isinstance(value, int)):
            raise bad()
        if not math.isfinite(value):
            raise ValueError(f"{owner}.{name}: must be a finite number (got {value!r})")
        if tp is int and int(value) != value:
            raise bad()
        return value if strict else int(value) if tp is int else float(value)
    if tp is str:
        if not isinstance(value, str):
            raise bad()
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise bad()
        return tuple(coerce(name, v, a, strict, owner) for v, a in zip(value, args))
    if tp is list or origin is list:
        if not isinstance(value, list):
            raise bad()
        return [coerce(name, v, args[0], strict, owner) for v in value] if args else list(value)
    if tp is dict or origin is dict:
        if not isinstance(value, dict):
            raise bad()
        if args:
            return {coerce(name, k, args[0], strict, owner): coerce(name, v, args[1], strict, owner)
                    for k, v in value.items()}
        return dict(value)
    return value


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


# --- command-line flags generated from the fields -----------------------------------------

def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add one flag per field (defaults suppressed, so only flags actually given override YAML)."""
    hints = typing.get_type_hints(TrainConfig)
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        tp, help = hints[f.name], f.metadata.get("help", "")
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        help = f"{help} [default: {_plain(default)!r}]" if default not in ("", {}) else help
        kw: dict[str, Any] = dict(dest=f.name, default=argparse.SUPPRESS, help=help)
        if tp is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, **kw)
        elif f.name == "model_kwargs":
            parser.add_argument(flag, nargs="+", metavar="KEY=VALUE", type=parse_key_value, **kw)
        elif typing.get_origin(tp) is tuple:
            parser.add_argument(flag, nargs=len(typing.get_args(tp)), type=float, metavar="X", **kw)
        else:  # parsed by coerce ('none' allowed for optional fields)
            inner = [a for a in typing.get_args(tp) if a is not type(None)] or [tp]
            parser.add_argument(flag, metavar={int: "N", float: "X"}.get(inner[0], "TEXT"), **kw)


def parse_key_value(text: str) -> tuple[str, Any]:
    """argparse type of a KEY=VALUE flag (--model-kwargs): (key, value), the value read as YAML."""
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    key, value = text.split("=", 1)
    return key, yaml.safe_load(value)  # numbers, lists, booleans as YAML


def config_from_args(args: argparse.Namespace, config_file: Optional[str] = None) -> TrainConfig:
    """Resolve YAML file (if any) < command-line flags into a validated TrainConfig."""
    d = load_yaml(config_file) if config_file else {}
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig) if hasattr(args, f.name)}
    if "model_kwargs" in given:
        given["model_kwargs"] = {**d.get("model_kwargs", {}), **dict(given["model_kwargs"])}
    return TrainConfig.from_dict({**d, **given})
