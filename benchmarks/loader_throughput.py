"""Data-loader throughput on ImageNet-like JPEGs: images/s per worker process, and the workers a GPU needs.

    python benchmarks/loader_throughput.py --images 256 --json runs/loader.json
    python benchmarks/loader_throughput.py --gpu-bench runs/gpu-check-X/bench-bf16.json   # measured GPU speeds
    python benchmarks/loader_throughput.py --folder /tmp/cifar10k --img-size 32 --json runs/loader-32.json

It writes `--images` synthetic JPEGs shaped like ImageNet's (500x375 and 375x500, quality 90,
smooth natural-image-like content with grain: ~100 KB, like the real files), then times one
worker (this process, one thread) pushing them through the engine's own datasets: decode +
the recipe's train transform (random-resized crop 224, flip, RandAugment rand-m9-mstd0.5-inc1,
uint8 out; normalising and erasing happen on the GPU) and the eval transform (resize 256,
centre crop 224). Timed in CPU seconds: a worker is one process on one core of its own; images/s
scale with workers until the cores run out.

Workers per GPU = a model's training images/s per GPU / one worker's train images/s. The GPU
side comes from `spach bench --mode train` rows (`--gpu-bench`); without them it is estimated
from the model's MACs at an assumed MFU on an H100/H200 (`--assume-mfu`, bf16 dense peak 989
TFLOP/s; training = 3 x 2 x MACs FLOPs per image) and labelled as an estimate.

`--folder ROOT` times an existing ImageFolder of small images instead (e.g. a CIFAR-10 subset
from `../shared/data/cifar10_folder.py`): its train split read per item from the files (open +
decode for every item, as before `spach.data.memory`) against decoded once and kept in memory
(`build_dataset`'s path for splits under `MEMORY_LIMIT_BYTES`), through the train transform
(random-resized crop, flip, RandAugment; uint8 out) and through a decode-only transform
(uint8 tensor, no resizing), in images/s per CPU second; the one-time decoding is timed too.
"""
from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

MODELS = ["spach_ms_s_patch4_224_conv", "spach_ms_s_patch4_224_attn", "spach_ms_s_patch4_224_mlp",
          "spach_ms_s_patch4_224_hybrid", "spach_ms_xxs_patch4_224_conv", "spach_s_patch16_224_attn"]
H200_BF16_PEAK = 989e12


def write_jpegs(root: Path, n: int, seed: int = 0) -> float:
    """n JPEGs in root/{train,val}/c0/; returns their mean size in KB."""
    rng = np.random.default_rng(seed)
    sizes = []
    for split in ("train", "val"):
        (root / split / "c0").mkdir(parents=True)
        (root / split / "c1").mkdir(parents=True)
    for i in range(n):
        w, h = (500, 375) if i % 3 else (375, 500)
        low = rng.uniform(0, 255, (h // 25 + 2, w // 25 + 2, 3)).astype(np.uint8)  # smooth colour fields
        img = np.asarray(Image.fromarray(low).resize((w, h), Image.BICUBIC), dtype=np.float32)
        img += rng.normal(0, 12, img.shape)  # grain / texture
        path = root / ("train" if i % 2 == 0 else "val") / f"c{i % 4 // 2}" / f"{i}.jpg"
        Image.fromarray(img.clip(0, 255).astype(np.uint8)).save(path, quality=90)
        sizes.append(path.stat().st_size)
    # every split needs both class folders filled for ImageFolder: copies are cheap
    return sum(sizes) / len(sizes) / 1024


def images_per_s(dataset, seconds_min: float = 5.0) -> float:
    """Items of `dataset` per CPU second of this (single-threaded) process: what one worker on a core
    of its own delivers, whatever else the machine runs (whole passes, at least `seconds_min`)."""
    t0, n = time.process_time(), 0
    while True:
        for i in range(len(dataset)):
            dataset[(0, i)]
            n += 1
        if time.process_time() - t0 >= seconds_min:
            return n / (time.process_time() - t0)


def folder_rates(root: str, img_size: int, seconds: float) -> dict:
    """Images/s per CPU second of ROOT's train split: per item from the files vs decoded once in memory."""
    import spach.data as data
    from spach.data import SafeDataset, build_dataset, load_in_memory, open_source

    def to_tensor(img):
        return torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1)

    base = open_source(root, "train")
    indices = list(range(len(base)))
    t0 = time.process_time()
    in_memory = load_in_memory(base, indices, data.MEMORY_LIMIT_BYTES)
    load_s = time.process_time() - t0
    train = build_dataset(root, "train", img_size, train=True, seed=0, uint8=True)
    limit, data.MEMORY_LIMIT_BYTES = data.MEMORY_LIMIT_BYTES, 0
    try:
        train_files = build_dataset(root, "train", img_size, train=True, seed=0, uint8=True)
    finally:
        data.MEMORY_LIMIT_BYTES = limit
    rates = {"images": len(base), "decoded_mb": in_memory.nbytes / 1e6, "load_once_s": load_s,
             "train_files": images_per_s(train_files, seconds), "train_memory": images_per_s(train, seconds),
             "decode_files": images_per_s(SafeDataset(base, to_tensor), seconds),
             "decode_memory": images_per_s(SafeDataset(in_memory, to_tensor), seconds)}
    print(f"{root}: {rates['images']} train images, {rates['decoded_mb']:.0f} MB decoded, decoded once in "
          f"{load_s:.1f} CPU s; images/s per core:")
    print("| transform | per item from the files | decoded once, in memory | speed-up |\n|---|---|---|---|")
    for kind, label in (("train", f"train ({img_size}px crop, flip, RandAugment)"), ("decode", "decode only")):
        files, memory = rates[f"{kind}_files"], rates[f"{kind}_memory"]
        print(f"| {label} | {files:,.0f} | {memory:,.0f} | {memory / files:.2f}x |")
    return rates


def gpu_train_rates(path: str | None, assume_mfu: float) -> dict[str, tuple[float, str]]:
    """{model: (training images/s per GPU, where the figure comes from)}."""
    if path:
        rows = json.loads(Path(path).read_text())["rows"]
        return {r["model"]: (r["images_per_s"], f"measured ({r['precision']}, batch {r['batch']})")
                for r in rows if r["mode"] == "train"}
    import spach  # noqa: F401  (registers the zoo)
    from spach.models import count_macs, create_model

    rates = {}
    for name in MODELS:
        macs = count_macs(create_model(name), 224)
        rates[name] = (assume_mfu * H200_BF16_PEAK / (6 * macs), f"estimate: {assume_mfu:.0%} MFU bf16 on H100/H200")
    return rates


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=256)
    p.add_argument("--seconds", type=float, default=5.0, help="minimum timing per transform")
    p.add_argument("--gpu-bench", default=None, help="a `spach bench --mode train --json` file from a GPU")
    p.add_argument("--assume-mfu", type=float, default=0.4)
    p.add_argument("--json", default=None)
    p.add_argument("--folder", default=None, help="time this ImageFolder of small images (see above) instead")
    p.add_argument("--img-size", type=int, default=32, help="--folder: the train transform's crop size")
    args = p.parse_args()
    torch.set_num_threads(1)
    if args.folder:
        rates = folder_rates(args.folder, args.img_size, args.seconds)
        if args.json:
            Path(args.json).write_text(json.dumps(rates, indent=2) + "\n")
        return

    from spach.data import build_dataset

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        kb = write_jpegs(root, args.images)
        train = build_dataset(str(root), "train", 224, train=True, seed=0, uint8=True)
        val = build_dataset(str(root), "val", 224, uint8=True)
        rate = {"train": images_per_s(train, args.seconds), "eval": images_per_s(val, args.seconds)}
    print(f"one worker, {args.images} JPEGs of ~{kb:.0f} KB (500x375): train transform {rate['train']:.0f} images/s, "
          f"eval transform {rate['eval']:.0f} images/s")
    print("\n| model | training images/s per GPU | source | workers per GPU (train) |")
    print("|---|---|---|---|")
    needs = {}
    for model, (gpu_rate, source) in gpu_train_rates(args.gpu_bench, args.assume_mfu).items():
        needs[model] = math.ceil(gpu_rate / rate["train"])
        print(f"| {model} | {gpu_rate:,.0f} | {source} | {needs[model]} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"jpeg_kb": kb, "images_per_s_per_worker": rate,
                                               "workers_per_gpu": needs}, indent=2) + "\n")


if __name__ == "__main__":
    main()
