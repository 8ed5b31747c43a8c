"""`spach mixers`: the registered spatial mixers — origin, params and MACs per block, input size, paper."""
from __future__ import annotations

import json

import torch


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("mixers", help="list the registered spatial mixers (built-in and plugins)")
    p.add_argument("--dim", type=int, default=64, help="reference block width C (default 64)")
    p.add_argument("--grid", type=int, default=14, help="reference token grid H = W (default 14)")
    p.add_argument("--heads", type=int, default=2, help="attention heads (default 2)")
    p.add_argument("--plugin", action="append", default=[], metavar="MODULE_OR_PY",
                   help="import a plugin module or .py file first (runs its code); repeatable")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=run)


def mixer_table(dim: int = 64, grid: int = 14, heads: int = 2) -> list[dict]:
    """One row per registered mixer: one SPACH block (LN, mixer, layer scale, CPE, channel MLP x2) at
    width ``dim`` on a ``grid x grid`` token grid, built on the meta device; the mixer's own share."""
    from spach.models import count_macs_on, count_params, get_mixer, mixer_names
    from spach.models.spach import SpachStage

    rows = []
    for name in mixer_names():
        info = get_mixer(name)
        row = dict(name=name, source=info.source, fixed_input_size=info.fixed_input_size, paper=info.paper)
        try:
            with torch.device("meta"):
                stage = SpachStage(dim, [name], (grid, grid), heads, drop_path=[0.0])
                x = torch.zeros(1, grid, grid, dim)
            block = stage.blocks[0]
            mixer = block.cpe if info.cpe_is_mixer else block.token_mixer
            row.update(block_params=count_params(block), block_macs=count_macs_on(block, x),
                       mixer_params=count_params(mixer), mixer_macs=count_macs_on(mixer, x), error=None)
        except Exception as e:  # noqa: BLE001 — a mixer that cannot take this width/grid says why
            row.update(block_params=None, block_macs=None, mixer_params=None, mixer_macs=None,
                       error=f"{type(e).__name__}: {e}")
        rows.append(row)
    return rows


def run(args) -> int:
    from spach.models.registry import import_plugins, resolve_plugins

    if args.plugin:
        import_plugins(resolve_plugins(args.plugin, "."))
    rows = mixer_table(args.dim, args.grid, args.heads)
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0

    def num(v, scale):
        return "-" if v is None else f"{v / scale:.1f}"

    print(f"one block at width {args.dim} on a {args.grid}x{args.grid} token grid ({args.heads} heads); "
          "K = thousands, M = millions; MACs: matmuls and convolutions")
    print(f"{'mixer':<10} {'source':<16} {'mixer K params':>14} {'block K params':>14} {'mixer M MACs':>12} "
          f"{'block M MACs':>12}  {'input size':<10}  paper")
    for r in rows:
        size = "fixed" if r["fixed_input_size"] else "any"
        print(f"{r['name']:<10} {r['source']:<16} {num(r['mixer_params'], 1e3):>14} {num(r['block_params'], 1e3):>14} "
              f"{num(r['mixer_macs'], 1e6):>12} {num(r['block_macs'], 1e6):>12}  {size:<10}  {r['paper']}")
        if r["error"]:
            print(f"{'':<10} cannot be built at this width/grid: {r['error']}")
    return 0
