"""`spach battle [STUDY] [--out DIR] [--workers N] [--retry-failed]`: run a study, resumably, then report.

STUDY is a YAML file or a preset name (default: cpu-mini); see docs/battle.md.
"""
from __future__ import annotations

import argparse

from spach.battle import list_presets, load_study, run_study
from spach.battle.spec import MAX_RUNS, summary


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "battle", help="run a study of architectures (resumable) and write its report",
        description="Train and measure every architecture of a study under identical conditions, record the "
                    "results in OUT/battle.db and write OUT/report.md. Re-running the same command resumes: done "
                    "runs are skipped, interrupted runs continue from their checkpoints.",
        epilog=f"presets: {', '.join(list_presets())}. Study file reference: docs/battle.md")
    p.add_argument("study", nargs="?", default=None, help="study YAML file or preset name (default: cpu-mini)")
    p.add_argument("--preset", default=None, help="a built-in study (same as giving its name as STUDY)")
    p.add_argument("--out", default=None, help="output directory (default: runs/<study name>)")
    p.add_argument("--workers", type=int, default=1, help="runs at a time on this machine (threads are split)")
    p.add_argument("--threads", type=int, default=None, help="total CPU threads, split between the workers (default: the study's "
                                                                  "`threads` per run, else all available)")
    p.add_argument("--retry-failed", action="store_true", help="run failed runs again")
    p.add_argument("--max-runs", type=int, default=MAX_RUNS, metavar="N",
                   help=f"refuse a study that declares more than N runs (default: {MAX_RUNS:,})")
    p.add_argument("--dry-run", action="store_true", help="validate the study and list its runs; train nothing")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.study and args.preset:
        raise ValueError("give a study file or --preset, not both")
    study = load_study(args.preset or args.study or "cpu-mini", max_runs=args.max_runs)
    if args.dry_run:
        print(summary(study))
        for r in study.runs:
            print(f"  {r.key}  {r.name:32s} {r.model} {r.model_kwargs}")
        for name, reason in study.skipped:
            print(f"  skipped {name}: {reason}")
        return 0
    out = args.out or f"runs/{study.name}"
    result = run_study(study, out, workers=args.workers, retry_failed=args.retry_failed, threads=args.threads,
                       quiet=args.quiet)
    return 1 if result["failed"] else 0
