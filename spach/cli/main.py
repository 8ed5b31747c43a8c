"""`spach` command line: a thin layer over the library.

Each sub-command lives in its own module of this package and exposes
`add_parser(subparsers)` (which sets `func` on its parser) — see `COMMANDS`.
"""
from __future__ import annotations

import argparse
import importlib
import sys

from spach.runtime import tune_cpu_allocator

# sub-command name -> module in spach.cli
COMMANDS = {
    "models": "spach.cli.models",
    "bench": "spach.cli.bench",
    "train": "spach.cli.train",
    "eval": "spach.cli.eval",
    "battle": "spach.cli.battle",
    "report": "spach.cli.report",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="spach",
        description="SPACH: a fair battle of network structures (conv vs attention vs MLP vs hybrids).",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module_name in COMMANDS.values():
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as e:  # a sub-command still being written
            if e.name != module_name:
                raise
            continue
        module.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    tune_cpu_allocator()
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        # library errors are written to be read by people: no traceback needed
        print(f"spach {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"spach {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
