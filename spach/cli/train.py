"""`spach train`: train a model with the paper's recipe (thin layer over spach.engine.train).

    spach train --model spach_ms_xxs_patch4_224_conv --data mnist5k --output runs/mnist \\
        --img-size 32 --epochs 10 --warmup-epochs 1 --cooldown-epochs 1 --batch-size 64 --threads 2
    spach train --config recipe.yaml --output runs/x --resume auto      # flags override the YAML
    torchrun --standalone --nproc_per_node 8 -m spach.cli.main train --config recipe.yaml
"""
from __future__ import annotations

import argparse


def add_parser(subparsers) -> None:
    from spach.engine.config import add_arguments

    p = subparsers.add_parser(
        "train", help="train a model (paper recipe; single process or torchrun)",
        description="Train a model with the paper's recipe (docs/design.md §5). Every option can also be set in a "
                    "YAML file (--config, keys = option names with underscores); flags override it. "
                    "The resolved config is saved as OUTPUT/config.yaml.")
    p.add_argument("--config", metavar="YAML", help="YAML file of options")
    add_arguments(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from spach.engine import train
    from spach.engine.config import config_from_args
    from spach.engine.distributed import process_rank
    from spach.io import check_writable_dir

    cfg = config_from_args(args, args.config)
    check_writable_dir(cfg.output, "--output")  # before the data and the model are loaded
    result = train(cfg)
    if process_rank() == 0:  # under torchrun: rank 0 prints
        print(f"best top-1 {result['best_top1']:.2f}%  final top-1 {result['final_top1']:.2f}%  "
              f"weights {result['weights']}")
    return 0
