"""Execute one run of a study database in this process: `python -m spach.battle.worker OUT KEY [--threads N]`.

`spach battle --workers N` and the torchrun launcher start this module; it
trains the run, counts its params and MACs and records it (see `spach.battle.runner.execute_run`;
its inference throughput is measured after all training by `spach battle` itself).
Exit status 0 if the run is done, 1 if it failed (the error is in the database).
"""
from __future__ import annotations

import argparse
import sys

from spach.battle.runner import execute_run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m spach.battle.worker", description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", help="the study's output directory (holds battle.db)")
    parser.add_argument("key", help="the run's key in the database")
    parser.add_argument("--threads", type=int, default=None, help="torch threads for this run")
    args = parser.parse_args(argv)
    return 0 if execute_run(args.out_dir, args.key, threads=args.threads) else 1


if __name__ == "__main__":
    sys.exit(main())
