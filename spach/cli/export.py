"""`spach export`: write a model (and its weights) as ONNX, pt2 (torch.export), TorchScript or a timm/HF folder.

    spach export spach_ms_s_patch4_224_conv --checkpoint runs/x/last.pt --format onnx --output conv.onnx
    spach export spach_ms_xxs_patch4_224_mlp --checkpoint spach_ms_mlp_xxs.pth --format hf --output mlp-xxs/
    spach export spach_ms_s_patch4_224_hybrid --format pt2 --output hybrid.pt2 --img-size 256 --check
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path


def add_parser(subparsers) -> None:
    from spach.engine.config import parse_key_value
    from spach.export import FORMATS

    p = subparsers.add_parser(
        "export", help="export a model to ONNX, pt2 (torch.export), TorchScript or a timm/HF folder",
        description="Export a model with its weights. ONNX goes through torch.onnx.export(dynamo=True) and pt2 "
                    "through torch.export, both with a dynamic batch size; torchscript is torch.jit.script; hf "
                    "writes config.json + model.safetensors + README.md that timm.create_model('local-dir:PATH', "
                    "pretrained=True) loads. An existing output is never replaced.")
    p.add_argument("model", help="model name (spach zoo or timm)")
    p.add_argument("--checkpoint", metavar="FILE",
                   help="weights: an original release file, a `spach train` checkpoint or model.safetensors "
                        "(its model options and image size are reused), a state dict (default: random init)")
    p.add_argument("--format", required=True, choices=FORMATS, help="output format")
    p.add_argument("--output", required=True, metavar="PATH", help="output file (a folder for hf); must not exist")
    p.add_argument("--img-size", type=int, help="input size (default: the checkpoint's run, else the model's)")
    p.add_argument("--model-kwargs", nargs="+", metavar="KEY=VALUE", type=parse_key_value,
                   help="model constructor overrides (default: the run's for training checkpoints)")
    p.add_argument("--ema", action="store_true", help="export the EMA weights of a training checkpoint")
    p.add_argument("--check", action="store_true",
                   help="run the exported file (onnxruntime for ONNX) and compare its logits with PyTorch's")
    p.add_argument("--threads", type=int, help="torch.set_num_threads")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from spach.export import check_export, export_model, load_for_export

    if args.threads:
        torch.set_num_threads(args.threads)
    if Path(args.output).exists():  # before any work; the writers check again when publishing
        raise ValueError(f"{args.output} already exists: choose another --output or remove it first")
    model, summary = load_for_export(args.model, args.checkpoint, img_size=args.img_size, ema=args.ema,
                                     model_kwargs=dict(args.model_kwargs) if args.model_kwargs else None)
    extra = dict(summary=summary, source=args.checkpoint) if args.format == "hf" else {}
    t0 = time.perf_counter()
    try:
        path = export_model(model, args.format, args.output, img_size=args.img_size, **extra)
    except FileExistsError as e:
        raise ValueError(str(e)) from None
    seconds = time.perf_counter() - t0
    size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.is_dir() else path.stat().st_size
    print(f"wrote {path} ({args.format}, {size / 2**20:.1f} MiB, {seconds:.1f} s)")
    if args.check:
        diff = check_export(model, args.format, path, img_size=args.img_size)
        print(f"check: max |logits difference| vs PyTorch {diff:.2e}")
    return 0
