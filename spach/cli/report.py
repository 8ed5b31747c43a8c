"""`spach report DIR`: (re)write DIR/report.md and DIR/figures/ from the study database DIR/battle.db."""
from __future__ import annotations

import argparse

from spach.battle import write_report


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("report", help="write the report of a study directory",
                              description="Regenerate report.md and the PNG figures of a `spach battle` output "
                                          "directory from its database (safe while the study is running).")
    p.add_argument("out_dir", metavar="DIR", help="output directory of `spach battle`")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    print(write_report(args.out_dir))
    return 0
