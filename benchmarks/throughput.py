#!/usr/bin/env python
"""Throughput of SPACH (or any timm) models against this machine's matmul rate.

The same options as `spach bench` (this script is a thin wrapper over `spach.bench`):

    python benchmarks/throughput.py --models zoo --batch 16 --img-size 224 --dtype fp32 bf16 --threads 2
    python benchmarks/throughput.py --models spach_ms_s_patch4_224_hybrid --mode infer train --json out.json
    python benchmarks/throughput.py --models ms --protocol swin
"""
import argparse
import sys

from spach.cli.bench import add_arguments, run
from spach.runtime import tune_cpu_allocator


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    args = parser.parse_args(argv)
    tune_cpu_allocator()  # as every `spach` command does
    try:
        return run(args)
    except (ValueError, RuntimeError) as e:
        print(f"throughput.py: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
