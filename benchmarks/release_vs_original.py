#!/usr/bin/env python
"""sMLPNet and ShiftViT: `spach`'s models against the original code's forward, on the same weights.

The original forward is written out below as a plain reference (NCHW tensors,
the original's modules, state-dict keys and order of operations, SPEC §7-8);
it is not part of the library. For each model the reference is built with
random weights, its state dict (original layout) is loaded into the `spach`
model with `spach.load_checkpoint`, the outputs are compared, and both are
timed with `spach.bench.measure_throughput` — alternately, several rounds, so
both see the same load on the machine. Reported: the median of the rounds'
images/s (each a median of timed passes) and, less disturbed on a busy
machine, images/s of the fastest single pass of each.

    python benchmarks/release_vs_original.py --models smlpnet_tiny shiftvit_light_tiny --threads 2
    python benchmarks/release_vs_original.py --models release --batch 16 --rounds 3 --json out.json
    python benchmarks/release_vs_original.py --models shiftvit_light_tiny --mode train --batch 8
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys

import timm
import torch
import torch.nn as nn

import spach
from spach.bench import machine_info, measure_throughput
from spach.io import atomic_write
from spach.models import RELEASE_ZOO
from spach.runtime import tune_cpu_allocator


# ---------------------------------------------------------------- the original sMLPNet, NCHW
class Permute(nn.Module):
    def __init__(self, *dims):
        super().__init__()
        self.dims = dims

    def forward(self, x):
        return x.permute(*self.dims)


class BN_Activ_Conv(nn.Module):
    def __init__(self, channels, groups):
        super().__init__()
        self.BN = nn.BatchNorm2d(channels)
        self.Activation = nn.GELU()
        self.Conv = nn.Conv2d(channels, channels, 3, padding=1, groups=groups, bias=False)

    def forward(self, x):
        return self.Conv(self.Activation(self.BN(x)))


class DWConvBlock(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.conv_merge = BN_Activ_Conv(channels, channels)

    def forward(self, x):
        return self.conv_merge(x)


class SMLPBlock(nn.Module):
    def __init__(self, side, channels):
        super().__init__()
        self.activation = nn.GELU()
        self.BN = nn.BatchNorm2d(channels)
        self.proj_h = nn.Conv2d(side, side, 1)
        self.proh_w = nn.Conv2d(side, side, 1)
        self.fuse = nn.Conv2d(channels * 3, channels, 1, bias=False)

    def forward(self, x):
        x = self.activation(self.BN(x))
        x_h = self.proj_h(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        x_w = self.proh_w(x.permute(0, 2, 1, 3)).permute(0, 2, 1, 3)
        return self.fuse(torch.cat([x, x_h, x_w], dim=1))


class FeedForward(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(0.0), nn.Linear(hidden, dim),
                                 nn.Dropout(0.0))

    def forward(self, x):
        return self.net(x)


class OriginalSMLPNet(nn.Module):
    def __init__(self, in_chans=3, dim=80, alpha=3, num_classes=1000, patch_size=4, image_size=224,
                 depths=(2, 8, 14, 2), dp_rate=0.0):
        super().__init__()
        self.to_patch_embedding = nn.ModuleList()
        self.token_mix = nn.ModuleList()
        self.channel_mix = nn.ModuleList()
        side = image_size // patch_size
        for i, depth in enumerate(depths):
            width = dim * 2 ** i
            conv = nn.Conv2d(in_chans, dim, patch_size, patch_size, bias=False) if i == 0 else \
                nn.Conv2d(width // 2, width, 2, 2, bias=False)
            self.to_patch_embedding.append(nn.Sequential(conv))
            s = side // 2 ** i
            for _ in range(depth):
                self.token_mix.append(nn.Sequential(DWConvBlock(width), SMLPBlock(s, width)))
                self.channel_mix.append(nn.Sequential(Permute(0, 2, 3, 1), nn.LayerNorm(width),
                                                      FeedForward(width, alpha * width), Permute(0, 3, 1, 2)))
        self.depths = depths
        self.batch_norm = nn.BatchNorm2d(dim * 2 ** (len(depths) - 1))
        self.mlp_head = nn.Sequential(nn.Linear(dim * 2 ** (len(depths) - 1), num_classes))

    def forward(self, x):
        k = 0
        for i, depth in enumerate(self.depths):
            x = self.to_patch_embedding[i](x)
            for _ in range(depth):
                x = x + self.token_mix[k](x)
                x = x + self.channel_mix[k](x)
                k += 1
        x = self.batch_norm(x)
        return self.mlp_head(x.mean(dim=[-1, -2]))


# ---------------------------------------------------------------- the original ShiftViT, NCHW
def original_shift(x, n_div):
    B, C, H, W = x.shape
    g = C // n_div
    out = torch.zeros_like(x)
    out[:, g * 0:g * 1, :, :-1] = x[:, g * 0:g * 1, :, 1:]
    out[:, g * 1:g * 2, :, 1:] = x[:, g * 1:g * 2, :, :-1]
    out[:, g * 2:g * 3, :-1, :] = x[:, g * 2:g * 3, 1:, :]
    out[:, g * 3:g * 4, 1:, :] = x[:, g * 3:g * 4, :-1, :]
    out[:, g * 4:, :, :] = x[:, g * 4:, :, :]
    return out


def gn1(dim):
    return nn.GroupNorm(1, dim)


class ConvMlp(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1 = nn.Conv2d(dim, hidden, 1)
        self.act = nn.GELU()
        self.fc2 = nn.Conv2d(hidden, dim, 1)
        self.drop = nn.Dropout(0.0)

    def forward(self, x):
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class ShiftViTBlock(nn.Module):
    def __init__(self, dim, n_div, mlp_ratio):
        super().__init__()
        self.n_div = n_div
        self.norm2 = gn1(dim)
        self.mlp = ConvMlp(dim, int(dim * mlp_ratio))

    def forward(self, x):
        x = original_shift(x, self.n_div)
        return x + self.mlp(self.norm2(x))


class PatchMerging(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.reduction = nn.Conv2d(dim, dim * 2, 2, 2, bias=False)
        self.norm = gn1(dim)

    def forward(self, x):
        return self.reduction(self.norm(x))


class BasicLayer(nn.Module):
    def __init__(self, dim, depth, n_div, mlp_ratio, downsample):
        super().__init__()
        self.blocks = nn.ModuleList([ShiftViTBlock(dim, n_div, mlp_ratio) for _ in range(depth)])
        self.downsample = PatchMerging(dim) if downsample else None

    def forward(self, x):
        for blk in self.blocks:
            x = blk(x)
        return self.downsample(x) if self.downsample is not None else x


class PatchEmbed(nn.Module):
    def __init__(self, patch_size, in_chans, dim):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, dim, patch_size, patch_size)
        self.norm = gn1(dim)

    def forward(self, x):
        return self.norm(self.proj(x))


class OriginalShiftViT(nn.Module):
    def __init__(self, n_div=12, patch_size=4, in_chans=3, num_classes=1000, embed_dim=96, depths=(2, 2, 6, 2),
                 mlp_ratio=4.0, **unused):
        super().__init__()
        self.patch_embed = PatchEmbed(patch_size, in_chans, embed_dim)
        self.pos_drop = nn.Dropout(0.0)
        n = len(depths)
        self.layers = nn.ModuleList([BasicLayer(embed_dim * 2 ** i, d, n_div, mlp_ratio, i < n - 1)
                                     for i, d in enumerate(depths)])
        self.num_features = embed_dim * 2 ** (n - 1)
        self.norm = gn1(self.num_features)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(self.num_features, num_classes)

    def forward(self, x):
        x = self.pos_drop(self.patch_embed(x))
        for layer in self.layers:
            x = layer(x)
        x = torch.flatten(self.avgpool(self.norm(x)), 1)
        return self.head(x)


# ---------------------------------------------------------------- side by side
def original_model(name: str) -> nn.Module:
    kw = {k: v for k, v in RELEASE_ZOO[name].items() if k != "cls"}
    return OriginalSMLPNet(**kw) if name.startswith("smlpnet") else OriginalShiftViT(**kw)


def randomise(model: nn.Module) -> None:
    """Non-trivial weights and BN statistics, so that no branch is negligible."""
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if t.dtype.is_floating_point:
                if name.endswith("running_var"):
                    t.copy_(torch.rand(t.shape, generator=gen) + 0.5)
                elif t.ndim == 1:
                    t.copy_(torch.randn(t.shape, generator=gen) * 0.1 + (1.0 if name.endswith("weight") else 0.0))
                else:
                    t.copy_(torch.randn(t.shape, generator=gen) * (t[0].numel() ** -0.5))


def compare(name: str, batch: int, threads: int, rounds: int, repeats: int, dtype: str, mode: str = "infer",
            warmup: int = 2) -> dict:
    ref = original_model(name).eval()
    randomise(ref)
    ours = spach.load_checkpoint(timm.create_model(name), {"model": ref.state_dict()}).eval()
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a, b = ref(x), ours(x)
    diff = (a - b).abs().max().item() / max(a.abs().max().item(), 1e-12)
    ips = {"spach": [], "original": []}
    best = {"spach": [], "original": []}  # from the fastest pass: the least disturbed by other load
    for _ in range(rounds):  # alternate, so both see the same machine load
        for key, model in (("spach", ours), ("original", ref)):
            r = measure_throughput(model, batch_size=batch, img_size=224, dtype=dtype, threads=threads,
                                   mode=mode, warmup=warmup, repeats=repeats)
            ips[key].append(r["images_per_s"])
            best[key].append(batch / r["min_s"])
    med = {k: statistics.median(v) for k, v in ips.items()}
    top = {k: max(v) for k, v in best.items()}
    return {"model": name, "dtype": dtype, "mode": mode, "batch": batch, "threads": threads,
            "max_rel_diff": diff, "spach_ips": med["spach"], "original_ips": med["original"],
            "speedup": med["spach"] / med["original"], "spach_best_ips": top["spach"],
            "original_best_ips": top["original"], "best_speedup": top["spach"] / top["original"],
            "rounds": ips, "rounds_best": best}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["release"], help="release names, or 'release' for all 12")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=3, help="alternating measurements of each model")
    p.add_argument("--repeats", type=int, default=5, help="timed passes per measurement (median)")
    p.add_argument("--warmup", type=int, default=2, help="untimed passes before each measurement")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--mode", default="infer", choices=["infer", "train"],
                   help="infer (eval, no grad) or train (forward, backward, AdamW step)")
    p.add_argument("--json", default=None, help="also write the rows as JSON (atomically)")
    args = p.parse_args(argv)
    tune_cpu_allocator()
    names = [n for m in args.models for n in (list(RELEASE_ZOO) if m == "release" else [m])]
    for n in names:
        if n not in RELEASE_ZOO:
            p.error(f"unknown model {n!r}; choose from {', '.join(RELEASE_ZOO)} or 'release'")
    rows = []
    print(f"{'model':<22} {'spach img/s':>12} {'original img/s':>15} {'speed-up':>9} "
          f"{'best: spach':>12} {'original':>9} {'speed-up':>9} {'max rel diff':>13}")
    for n in names:
        r = compare(n, args.batch, args.threads, args.rounds, args.repeats, args.dtype, args.mode, args.warmup)
        rows.append(r)
        print(f"{n:<22} {r['spach_ips']:>12.2f} {r['original_ips']:>15.2f} {r['speedup']:>8.2f}x "
              f"{r['spach_best_ips']:>12.2f} {r['original_best_ips']:>9.2f} {r['best_speedup']:>8.2f}x "
              f"{r['max_rel_diff']:>13.1e}", flush=True)
    if args.json:
        with atomic_write(args.json) as f:
            f.write(json.dumps({"meta": machine_info(), "args": vars(args), "rows": rows}, indent=2).encode())
    return 0


if __name__ == "__main__":
    sys.exit(main())
