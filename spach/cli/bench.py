"""`spach bench`: images/s and fraction of the machine's real GEMM limit, per model.

    spach bench --models zoo --batch 16 --img-size 224 --dtype fp32 bf16 --threads 2
    spach bench --models spach_ms_s_patch4_224_conv --mode infer train --json out.json
    spach bench --models ms --limit-shapes 2048x2048x2048 4096x256x1024   # the limit's GEMM shapes (MxKxN)
    spach bench --models ms --protocol swin          # Swin/SPACH: 50 warm-up, mean of 30
    spach bench --models release --threads 2         # sMLPNet and ShiftViT of the original release

A thin layer over `spach.bench`.
"""
from __future__ import annotations

import argparse
import sys

from spach import bench, timing
from spach.io import check_output_file


def gemm_shape(text: str) -> tuple[int, int, int]:
    """argparse type for `MxKxN`."""
    try:
        m, k, n = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected MxKxN (three positive integers, e.g. 2048x2048x2048), "
                                         f"got {text!r}") from None
    if min(m, k, n) < 1:
        raise argparse.ArgumentTypeError(f"GEMM sizes must be >= 1, got {text!r}")
    return m, k, n


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--models", nargs="+", default=["zoo"], metavar="NAME",
                        help="model names (SPACH or any timm model) or groups: "
                             "zoo (all SPACH models), ms (multi-stage), ss (single-stage), "
                             "release (sMLPNet and ShiftViT); default: zoo")
    parser.add_argument("--batch", type=int, default=16, help="batch size (default: 16)")
    parser.add_argument("--img-size", type=int, default=224, help="image side in pixels (default: 224)")
    parser.add_argument("--dtype", nargs="+", default=["fp32"], choices=list(bench.DTYPES),
                        help="one or more of fp32, bf16 (default: fp32)")
    parser.add_argument("--threads", type=int, default=None,
                        help="intra-op threads for models and the GEMM limit (default: torch's current setting)")
    parser.add_argument("--mode", nargs="+", default=["infer"], choices=list(bench.MODES),
                        help="infer (eval, no grad) and/or train (forward, backward, AdamW step)")
    parser.add_argument("--device", default="cpu", choices=list(bench.DEVICES))
    parser.add_argument("--protocol", default="default", choices=list(bench.PROTOCOLS),
                        help="default: warm-up then median of repeats; swin: 50 warm-up passes, "
                             "mean of 30 timed passes (inference only)")
    parser.add_argument("--warmup", type=int, default=None, help="warm-up passes (overrides the protocol's)")
    parser.add_argument("--repeats", type=int, default=None, help="timed passes (overrides the protocol's)")
    parser.add_argument("--bf16-impl", default=None, choices=list(bench.BF16_IMPLS),
                        help="bf16 inference: weights (model cast to bf16; default) or autocast (fp32 weights); "
                             "training always uses autocast")
    parser.add_argument("--limit-shapes", nargs="+", type=gemm_shape, default=None, metavar="MxKxN",
                        help="GEMM shapes whose best rate (BLAS or oneDNN) is the machine's limit (default: "
                             + " ".join("x".join(map(str, s)) for s in timing.GEMM_SHAPES) + ")")
    parser.add_argument("--channels-last", action="store_true", help="channels-last input and weights")
    parser.add_argument("--matmul-precision", default="high", choices=["highest", "high", "medium"],
                        help="CUDA only: fp32 matmuls as fp32 (highest) or TF32 (high, the default, as in "
                             "training); cuDNN autotuning is on")
    parser.add_argument("--json", metavar="FILE", default=None, help="also write the result as JSON (atomically)")
    parser.add_argument("--quiet", action="store_true", help="no per-model progress lines on stderr")


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "bench", help="measure images/s and the fraction of this machine's real GEMM limit",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace) -> int:
    for name in ("batch", "img_size", "threads", "repeats"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    if args.warmup is not None and args.warmup < 0:
        raise ValueError(f"--warmup must be >= 0, got {args.warmup}")
    if args.json:  # where the result goes is checked before any timing, not after it
        check_output_file(args.json, "--json")
    models = bench.resolve_models(args.models)  # unknown names fail here, before any timing
    log = None if args.quiet else (lambda line: print(line, file=sys.stderr, flush=True))
    from spach.engine.device import cuda_math

    with cuda_math(args.device, args.matmul_precision) as math_modes:  # the settings training uses
        result = bench.benchmark(
            models, batch_size=args.batch, img_size=args.img_size, dtypes=args.dtype, modes=args.mode,
            threads=args.threads, warmup=args.warmup, repeats=args.repeats, device=args.device,
            channels_last=args.channels_last, protocol=args.protocol, bf16_impl=args.bf16_impl,
            limit_shapes=args.limit_shapes, log=log)
    result["meta"].update(math_modes)
    result["meta"]["args"] = {k: v for k, v in vars(args).items() if k not in ("func", "command")}
    print(bench.format_table(result))
    if args.json:
        bench.write_json(result, args.json)
        print(f"wrote {args.json}")
    return 0
