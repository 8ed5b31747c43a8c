"""`spach report DIR [--to DEST]`: (re)write report.md and figures/ from the study database DIR/battle.db."""
from __future__ import annotations

import argparse

from spach.battle import write_report


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("report", help="write the report of a study directory",
                              description="Regenerate report.md and the PNG figures of a `spach battle` output "
                                          "directory from its database (safe while the study is running; the "
                                          "database is only read).")
    p.add_argument("out_dir", metavar="DIR", help="output directory of `spach battle`")
    p.add_argument("--to", metavar="DEST", default=None,
                   help="write report.md and figures/ into DEST instead of DIR (e.g. DIR is read-only)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from spach.battle.db import connect_readonly
    from spach.io import check_writable_dir

    connect_readonly(args.out_dir).close()  # a missing or broken database is named first
    dest = args.to if args.to is not None else args.out_dir
    try:
        check_writable_dir(dest, "--to" if args.to is not None else "DIR")
    except PermissionError as e:
        hint = "" if args.to is not None else \
            "; the database can still be read: write the report elsewhere with --to DEST"
        raise PermissionError(e.errno, f"{e.strerror}{hint}") from None
    print(write_report(args.out_dir, to=args.to))
    return 0
