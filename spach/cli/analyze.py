"""`spach analyze {erf,cka,corruption,fourier,attn-distance}`: why the families differ, measured on a user's data.

    spach analyze erf --run runs/x/runs/conv-ms-tiny-s0-1a2b3c4d --run runs/x/runs/attn-ms-tiny-s0-5e6f7a8b --out erf/
    spach analyze cka --model spach_ms_s_patch4_224_conv --checkpoint conv.pth \\
                      --model spach_ms_s_patch4_224_attn --checkpoint attn.pth --data /data/imagenet --out cka/
    spach analyze corruption --run A --run B --baseline 0 --images 1000 --out robustness/

Models are run directories (`--run`; a `spach battle` output directory stands for the first seed
of each of its architectures) or `--model NAME --checkpoint FILE` pairs (in order);
`--data` defaults to the runs' own data. OUT receives KIND.json and PNG figures.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from spach.analysis.suite import KINDS


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "analyze", help="ERF, CKA, corruption / Fourier robustness, attention distance of trained models",
        description="Measure why architectures differ: effective receptive fields, representation similarity "
                    "(linear CKA), common-corruption robustness with mCE, Fourier sensitivity and mean "
                    "attention distance. Writes OUT/KIND.json and PNG figures.")
    p.add_argument("kind", choices=KINDS, help="the measurement")
    p.add_argument("--run", action="append", default=[], metavar="DIR",
                   help="a `spach train` run directory, or a `spach battle` output directory (its architectures' "
                        "first seeds) (repeatable)")
    p.add_argument("--model", action="append", default=[], metavar="NAME", help="model name (repeatable)")
    p.add_argument("--checkpoint", action="append", default=[], metavar="FILE",
                   help="weights for the --model of the same position (repeatable)")
    p.add_argument("--label", action="append", default=[], help="names for the models in figures (in order)")
    p.add_argument("--data", metavar="SOURCE", help="mnist5k, an ImageFolder root or NAME:ROOT (default: the run's)")
    p.add_argument("--out", required=True, metavar="DIR", help="where KIND.json and the figures go")
    p.add_argument("--images", type=int, help="number of val images (class-balanced slice)")
    p.add_argument("--img-size", type=int, help="input size (default: the run's, else the model's)")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--stages", type=int, nargs="+", help="erf: feature points to analyse (default: all)")
    p.add_argument("--corruptions", nargs="+", help="corruption: a subset (default: all)")
    p.add_argument("--baseline", help="corruption: the model whose errors normalise the mCE (label or index; "
                                      "default: the first)")
    p.add_argument("--eps", type=float, help="fourier: L2 norm of the basis noise on [0, 1] images (default 4)")
    p.add_argument("--step", type=int, help="fourier: measure every STEP-th frequency (default 1)")
    p.add_argument("--seed", type=int, help="corruption / fourier: noise seed (default 0)")
    p.add_argument("--ema", action="store_true", help="use the EMA weights of training checkpoints")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, help="torch.set_num_threads")
    p.add_argument("--overwrite", action="store_true", help="replace an existing OUT/KIND.json")
    p.set_defaults(func=run)


def _settings(args: argparse.Namespace) -> dict:
    keys = {"images": "images", "batch_size": "batch_size", "stages": "stages", "corruptions": "corruptions",
            "eps": "eps", "step": "step", "seed": "seed"}
    from spach.analysis.suite import DEFAULTS

    out = {k: getattr(args, a) for k, a in keys.items() if getattr(args, a) is not None and k in DEFAULTS[args.kind]}
    wrong = [f"--{a.replace('_', '-')}" for k, a in keys.items()
             if getattr(args, a) is not None and k not in DEFAULTS[args.kind]]
    if wrong:
        raise ValueError(f"{', '.join(wrong)} do(es) not apply to `analyze {args.kind}`")
    if args.baseline is not None:
        if args.kind != "corruption":
            raise ValueError(f"--baseline applies to `analyze corruption`, not {args.kind}")
        out["baseline"] = int(args.baseline) if args.baseline.lstrip("-").isdigit() else args.baseline
    return out


def _run_specs(directory: str) -> list[dict]:
    """A training run directory, or a `spach battle` output (the first seed of each architecture)."""
    if not (Path(directory) / "battle.db").is_file():
        return [dict(run_dir=directory)]
    from spach.battle.analysis_runs import representatives
    from spach.battle import db

    conn = db.connect(directory)
    reps = representatives(db.runs(conn, db.study_keys(conn)))
    conn.close()
    if not reps:
        raise ValueError(f"the study in {directory} has no finished run to analyse yet")
    return [dict(run_dir=r["output_dir"], label=r["grp"]) for r in reps]


def run(args: argparse.Namespace) -> int:
    import torch

    from spach.analysis.common import load_subject
    from spach.analysis.suite import run_analysis, write_analysis
    from spach.io import check_writable_dir

    if args.threads:
        torch.set_num_threads(args.threads)
    if len(args.checkpoint) > len(args.model):
        raise ValueError("each --checkpoint needs a --model before it (pairs in order)")
    if not args.run and not args.model:
        raise ValueError("nothing to analyse: give --run DIR or --model NAME [--checkpoint FILE]")
    settings = _settings(args)  # validate before loading anything
    check_writable_dir(args.out, "--out")
    specs = [spec for d in args.run for spec in _run_specs(d)]
    specs += [dict(model=m, checkpoint=args.checkpoint[i] if i < len(args.checkpoint) else None)
              for i, m in enumerate(args.model)]
    if args.label and len(args.label) != len(specs):
        raise ValueError(f"{len(args.label)} --label for {len(specs)} models: give one per model or none")
    subjects = []
    for i, spec in enumerate(specs):
        own = spec.pop("label", None)
        label = args.label[i] if args.label else own
        if label is None and spec.get("checkpoint") and sum(s.get("model") == spec.get("model") for s in specs) > 1:
            label = f"{spec['model']}:{Path(spec['checkpoint']).stem}"
        subjects.append(load_subject(**spec, data=args.data, img_size=args.img_size, label=label, ema=args.ema,
                                     device=args.device))
    result = run_analysis(args.kind, subjects, settings)
    for path in write_analysis(args.kind, result, args.out, overwrite=args.overwrite):
        print(path)
    if args.kind == "corruption":
        for label, r in result["models"].items():
            print(f"{label}: clean top-1 {r['clean']:.2f}%, mCE {r['mce']:.1f}% "
                  f"(relative {r['relative_mce']:.1f}%) vs {result['baseline']}")
    return 0
