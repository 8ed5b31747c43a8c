"""`spach models`: the zoo, the arena's newcomers and the release's sMLPNet/ShiftViT (family, layout, params,
GMACs, top-1, released weights file), counted on the meta device."""
from __future__ import annotations

import json

import torch


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("models", help="list the model zoo with parameter and MAC counts")
    p.add_argument("--img-size", type=int, default=224, help="input resolution for the MAC count (default 224)")
    p.add_argument("--filter", default="", help="only names containing this text")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=run)


def zoo_table(img_size: int = 224, name_filter: str = "") -> list[dict]:
    from spach.models import (ALL_MODELS, ORIGINAL_WEIGHTS, RELEASE_WEIGHTS, RELEASE_ZOO, count_macs, count_params,
                              create_model, family, layout, release_family)

    # the SPACH zoo and the arena's newcomers, then sMLPNet and ShiftViT (multi-stage networks of their own families)
    entries = [(n, family(n), layout(n), *ORIGINAL_WEIGHTS.get(n, (None, None))) for n in ALL_MODELS]
    entries += [(n, release_family(n), "ms", *RELEASE_WEIGHTS.get(n, (None, None))) for n in RELEASE_ZOO]
    rows = []
    for name, fam, lay, file, top1 in entries:
        if name_filter not in name:
            continue
        kw = {"img_size": img_size} if img_size != 224 else {}
        with torch.device("meta"):
            model = create_model(name, **kw)
        rows.append(dict(name=name, family=fam, layout=lay, params=count_params(model),
                         gmacs=count_macs(model, img_size) / 1e9, top1=top1, weights=file))
    return rows


def run(args) -> int:
    rows = zoo_table(args.img_size, args.filter)
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(f"{'name':<36} {'family':<9} {'layout':<6} {'params':>8} {'GMACs':>7} {'top-1':>6}  released weights"
          f"   (at {args.img_size}x{args.img_size})")
    for r in rows:
        top1 = f"{r['top1']:.1f}" if r["top1"] is not None else "-"
        print(f"{r['name']:<36} {r['family']:<9} {r['layout']:<6} {r['params'] / 1e6:>7.2f}M {r['gmacs']:>7.2f} "
              f"{top1:>6}  {r['weights'] or '-'}")
    return 0
