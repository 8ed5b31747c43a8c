"""`spach battle [STUDY] [--out DIR] [--workers N] [--retry-failed] [--data SOURCE]`: run a study, then report.

STUDY is a YAML file or a preset name (default: cpu-mini); see docs/battle.md. On a Slurm cluster
(docs/cluster.md): `--launcher slurm`, `--detach`, and the sub-commands
`spach battle status OUT` and `spach battle cancel OUT [RUN ...]`.
"""
from __future__ import annotations

import argparse

from spach.battle import list_presets, load_study, run_study
from spach.battle.launchers import KINDS
from spach.battle.spec import MAX_RUNS, summary


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "battle", help="run a study of architectures (resumable) and write its report",
        description="Train and measure every architecture of a study under identical conditions, record the "
                    "results in OUT/battle.db and write OUT/report.md. Re-running the same command resumes: done "
                    "runs are skipped, interrupted runs continue from their checkpoints.",
        epilog=f"presets: {', '.join(list_presets())}. Study file reference: docs/battle.md")
    p.add_argument("study", nargs="*", default=[], metavar="STUDY",
                   help="study YAML file or preset name (default: cpu-mini); or `status OUT` (one line per run: "
                        "state, Slurm job, node, epoch, elapsed) or `cancel OUT [RUN ...]` (scancel the study's jobs)")
    p.add_argument("--preset", default=None, help="a built-in study (same as giving its name as STUDY)")
    p.add_argument("--out", default=None, help="output directory (default: runs/<study name>)")
    p.add_argument("--workers", type=int, default=None,
                   help="runs at a time on this machine (threads are split); default: what the cores allow at "
                        "the study's `threads` per run (1 when the study does not set it)")
    p.add_argument("--threads", type=int, default=None, help="total CPU threads, split between the workers (default: the study's "
                                                                  "`threads` per run, else all available)")
    p.add_argument("--retry-failed", action="store_true", help="run failed runs again")
    p.add_argument("--max-runs", type=int, default=MAX_RUNS, metavar="N",
                   help=f"refuse a study that declares more than N runs (default: {MAX_RUNS:,})")
    p.add_argument("--launcher", choices=list(KINDS), default=None,
                   help="run with this launcher instead of the study's (the study's other launcher settings apply)")
    p.add_argument("--detach", action="store_true",
                   help="cluster launchers (slurm, ray): submit the jobs of the runs not done and return "
                        "(re-run to collect)")
    p.add_argument("--mlflow", default=None, metavar="URI",
                   help="also log every run to this MLflow tracking store, e.g. sqlite:///runs/mlflow.db "
                        "(needs pip install 'spach[mlflow]'; the study's `tracking:` section does the same)")
    p.add_argument("--until-decisive", action="store_true",
                   help="after the study's runs, add seeds only to the architectures of unresolved comparisons, "
                        "re-testing after each round (alpha spent over the looks; docs/battle.md)")
    p.add_argument("--max-seeds", type=int, default=None, metavar="N",
                   help="--until-decisive: at most N seeds per architecture (default: the study's seeds + 3)")
    p.add_argument("--data", default=None, metavar="SOURCE",
                   help="train on this data instead of the study's `data:` (an ImageFolder root, mnist5k, "
                        "fashion-mnist, NAME:ROOT)")
    p.add_argument("--accept-changed-data", action="store_true",
                   help="keep done runs although their data changed since they were trained (the report says "
                        "so); without it such a study is refused")
    p.add_argument("--dry-run", action="store_true", help="validate the study and list its runs; train nothing")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.study and args.study[0] in ("status", "cancel"):
        return status(args.study[1:]) if args.study[0] == "status" else cancel(args.study[1:])
    if len(args.study) > 1:
        raise ValueError(f"one study at a time, got {args.study} (sub-commands: status OUT, cancel OUT [RUN ...])")
    if args.study and args.preset:
        raise ValueError("give a study file or --preset, not both")
    study = load_study(args.preset or (args.study[0] if args.study else "cpu-mini"), max_runs=args.max_runs,
                       data=args.data)
    if args.dry_run:
        print(summary(study))
        for r in study.runs:
            print(f"  {r.key}  {r.name:32s} {r.model} {r.model_kwargs}")
        for name, reason in study.skipped:
            print(f"  skipped {name}: {reason}")
        return 0
    out = args.out or f"runs/{study.name}"
    if args.max_seeds is not None and not args.until_decisive:
        raise ValueError("--max-seeds goes with --until-decisive")
    if args.until_decisive:
        from spach.battle.adaptive import run_until_decisive

        if args.detach:
            raise ValueError("--until-decisive decides after each round: it cannot --detach")
        result = run_until_decisive(study, out, args.max_seeds, workers=args.workers,
                                    retry_failed=args.retry_failed, threads=args.threads, quiet=args.quiet,
                                    launcher=args.launcher, accept_changed_data=args.accept_changed_data)
        return 1 if result["failed"] else 0
    result = run_study(study, out, workers=args.workers, retry_failed=args.retry_failed, threads=args.threads,
                       quiet=args.quiet, launcher=args.launcher, detach=args.detach,
                       accept_changed_data=args.accept_changed_data, mlflow=args.mlflow)
    return 1 if result["failed"] else 0


def status(rest: list[str]) -> int:
    """`spach battle status OUT`: the study's runs, one line each (reads only)."""
    from spach.battle.launchers.status import format_status, study_status

    if len(rest) != 1:
        raise ValueError("usage: spach battle status OUT (the study's output directory)")
    print(format_status(study_status(rest[0])))
    return 0


def cancel(rest: list[str]) -> int:
    """`spach battle cancel OUT [RUN ...]`: cancel the jobs of the study (all, or the named runs)."""
    from spach.battle.launchers.status import cancel_runs

    if not rest:
        raise ValueError("usage: spach battle cancel OUT [RUN ...]")
    cancelled = cancel_runs(rest[0], rest[1:] or None)
    for name, job_id in cancelled:
        print(f"cancelled {name} (job {job_id})")
    if not cancelled:
        print("no queued or running job to cancel")
    else:
        print("the coordinator records them as failed; `spach battle ... --retry-failed` continues them "
              "from their checkpoints")
    return 0
