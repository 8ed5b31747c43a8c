"""Execute runs of a study database in this process.

    python -m spach.battle.worker OUT KEY [--threads N]     # one run
    python -m spach.battle.worker OUT --serve [--threads N]  # the keys read from stdin, one per line

`spach battle --workers N` starts one `--serve` process per worker slot and hands
it runs one after another, so only a slot's first run pays for importing torch
and timm; the torchrun launcher starts one process per run. Each run is trained,
counted (params, MACs) and recorded by `spach.battle.execute.execute_run`; its
inference throughput is measured after all training by `spach battle` itself.
With `--serve`, a run's output goes to its own RUN_DIR/worker.log.
Exit status: one run, 0 if it is done and 1 if it failed (the error is in the
database); `--serve`, 0 at the end of its input.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
from pathlib import Path
from typing import Iterator

from spach.battle import db
from spach.battle.execute import execute_run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m spach.battle.worker", description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", help="the study's output directory (holds battle.db)")
    parser.add_argument("key", nargs="?", help="the run's key in the database (not with --serve)")
    parser.add_argument("--serve", action="store_true",
                        help="execute the keys read from standard input, one per line, until its end")
    parser.add_argument("--threads", type=int, default=None, help="torch threads for each run")
    args = parser.parse_args(argv)
    if args.serve == (args.key is not None):
        parser.error("give either a run KEY or --serve")
    if args.serve:
        return serve(args.out_dir, sys.stdin, threads=args.threads)
    return 0 if execute_run(args.out_dir, args.key, threads=args.threads) else 1


def serve(out_dir: str | Path, keys, threads: int | None = None) -> int:
    """Execute each key of the line iterable `keys` in turn, its output (Python's and the C libraries')
    in the run's worker.log; a failing run is recorded and the next one runs."""
    for line in keys:
        key = line.strip()
        if key:
            with output_to(run_log(out_dir, key)):
                execute_run(out_dir, key, threads=threads)
    return 0


def run_log(out_dir: str | Path, key: str) -> Path:
    """RUN_DIR/worker.log of a run of the database."""
    conn = db.connect(out_dir)
    try:
        return Path(db.get_run(conn, key)["output_dir"]) / "worker.log"
    finally:
        conn.close()


@contextlib.contextmanager
def output_to(path: Path) -> Iterator[None]:
    """Send this process's stdout and stderr (file descriptors 1 and 2) to `path` (appended) for the block."""
    path.parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with open(path, "a") as log:
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
        try:
            yield
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])


if __name__ == "__main__":
    sys.exit(main())
