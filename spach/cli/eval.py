"""`spach eval`: top-1 / top-5 / loss of a checkpoint on a data SOURCE's val split.

    spach eval --model spach_ms_xxs_patch4_224_conv --checkpoint spach_ms_conv_xxs.pth --data /data/imagenet
    spach eval --model spach_ms_xxs_patch4_224_conv --checkpoint runs/mnist/last.pt --data mnist5k --ema
    torchrun --standalone --nproc_per_node 8 -m spach.cli.main eval --model ... --checkpoint ... --data ...
"""
from __future__ import annotations

import argparse
import json


def add_parser(subparsers) -> None:
    from spach.engine.config import INTERPOLATIONS, parse_key_value

    p = subparsers.add_parser(
        "eval", help="evaluate a checkpoint (original release or the project's own)",
        description="Evaluate a checkpoint: an original release file ({'model': state_dict}), a training "
                    "checkpoint of `spach train` (its model options and image size are reused), a state "
                    "dict or a .safetensors file.")
    p.add_argument("--model", required=True, help="model name (spach zoo or timm)")
    p.add_argument("--checkpoint", required=True, metavar="FILE", help="weights to evaluate")
    p.add_argument("--data", required=True, metavar="SOURCE",
                   help="mnist5k, an ImageFolder root with train/ and val/, or NAME:ROOT (torchvision)")
    p.add_argument("--img-size", type=int, help="input size (default: the run's, else the model's)")
    p.add_argument("--model-kwargs", nargs="+", metavar="KEY=VALUE", type=parse_key_value,
                   help="model constructor overrides (default: the run's for training checkpoints)")
    p.add_argument("--ema", action="store_true", help="evaluate the EMA weights of a training checkpoint")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--max-val-samples", type=int, help="a deterministic class-balanced slice of the val split")
    p.add_argument("--crop-pct", type=float, default=0.875)
    p.add_argument("--interpolation", default="bicubic", choices=INTERPOLATIONS)
    p.add_argument("--amp", choices=["none", "bf16", "fp16"], default="none")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--device", help="default: cuda if available, else cpu")
    p.add_argument("--threads", type=int, help="torch.set_num_threads")
    p.add_argument("--json", action="store_true", help="print the metrics as JSON")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from spach.engine.distributed import process_rank
    from spach.engine.evaluate import evaluate_checkpoint
    from spach.runtime import num_threads

    check_args(args)
    with num_threads(args.threads):
        m = evaluate_checkpoint(
            args.model, args.checkpoint, args.data, img_size=args.img_size, ema=args.ema,
            model_kwargs=dict(args.model_kwargs) if args.model_kwargs else None,
            batch_size=args.batch_size, max_samples=args.max_val_samples, crop_pct=args.crop_pct,
            interpolation=args.interpolation, amp=args.amp, workers=args.workers, device=args.device)
    if process_rank() != 0:  # under torchrun: rank 0 prints
        return 0
    if args.json:
        print(json.dumps(m))
    else:
        print(f"top-1 {m['top1']:.2f}%  top-5 {m['top5']:.2f}%  loss {m['loss']:.4f}  ({m['n']} images"
              + (f", {m['skipped']} unreadable skipped)" if m["skipped"] else ")"))
    return 0


def check_args(args: argparse.Namespace) -> None:
    """Refuse bad values before loading anything (ValueError naming the flag)."""
    if not 0 < args.crop_pct <= 1:  # also NaN
        raise ValueError(f"--crop-pct must be in (0, 1], got {args.crop_pct}")
    for name in ("batch_size", "img_size", "max_val_samples", "threads"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    if args.workers < 0:
        raise ValueError(f"--workers must be >= 0, got {args.workers}")
