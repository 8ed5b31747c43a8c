"""`spach` command line: a thin layer over the library.

Each sub-command lives in its own module of this package and exposes
`add_parser(subparsers)` (which sets `func` on its parser) — see `COMMANDS`.

Errors: bad input (ValueError, a missing file) -> one line, exit 2; a failure of the
work (a SpachError such as a corrupt checkpoint or a NaN loss, an OS error such as a
read-only directory, a broken database) -> one line, exit 1. Any other exception — a
RuntimeError raised inside torch included — is a bug or an unexpected failure and keeps
its traceback. `spach --debug ...` or SPACH_DEBUG=1 shows every traceback.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sqlite3
import sys

from spach.errors import SpachError
from spach.runtime import tune_cpu_allocator

# what the CLI shows as one line: the user's input or work went wrong in a way the message explains
ONE_LINE_ERRORS = (SpachError, ValueError, FileNotFoundError, OSError, sqlite3.Error)

# sub-command name -> module in spach.cli
COMMANDS = {
    "models": "spach.cli.models",
    "mixers": "spach.cli.mixers",
    "bench": "spach.cli.bench",
    "train": "spach.cli.train",
    "eval": "spach.cli.eval",
    "export": "spach.cli.export",
    "battle": "spach.cli.battle",
    "report": "spach.cli.report",
    "analyze": "spach.cli.analyze",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="spach",
        description="SPACH: a fair battle of network structures (conv vs attention vs MLP vs hybrids).",
    )
    parser.add_argument("--debug", action="store_true",
                        help="show the full traceback of an error (also: environment SPACH_DEBUG=1)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module_name in COMMANDS.values():
        importlib.import_module(module_name).add_parser(sub)  # a module that fails to import is a bug: traceback
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    tune_cpu_allocator()
    debug = args.debug or os.environ.get("SPACH_DEBUG", "") not in ("", "0")
    try:
        return int(args.func(args) or 0)
    except ONE_LINE_ERRORS as e:
        if debug:
            raise
        # library errors are written to be read by people: no traceback needed
        print(f"spach {args.command}: error: {_one_line(e)}", file=sys.stderr)
        return 2 if isinstance(e, (ValueError, FileNotFoundError)) else 1
    except KeyboardInterrupt:
        print(f"spach {args.command}: interrupted", file=sys.stderr)
        return 130


def _one_line(e: BaseException) -> str:
    """The error as one line; an OS error without a library message says what to check."""
    text = " ".join(str(e).split())
    if "read-only" not in text and (isinstance(e, PermissionError) or getattr(e, "errno", None) == 30):  # EROFS
        return f"{text} (is the directory read-only? choose a writable location)"
    return text


if __name__ == "__main__":
    sys.exit(main())
