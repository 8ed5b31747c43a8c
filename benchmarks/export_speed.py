"""Export and compile cost per format, and onnxruntime vs PyTorch inference speed on CPU.

    python benchmarks/export_speed.py --threads 2 1 --json benchmarks/results-export.json
    python benchmarks/export_speed.py --part ort --models spach_ms_xxs_patch4_224_conv --batch 4 --threads 2

Part ``export`` (MS-S models): for each format of ``spach.export`` the wall and CPU time of
the export and the size of what it writes; ``torch.compile`` (inductor, fullgraph) time to the
first inference result (minus one eager pass) and, with ``--compile-train``, to the first training step.
Part ``ort``: images/s of the same ONNX file under onnxruntime and of the PyTorch model
(eval, ``torch.inference_mode``, the CPU fast paths on), with the same thread count, measured
in alternation, pass by pass, so that load from other processes hits both alike; the ratio
is the median of the per-round ratios.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from spach.export import FORMATS, example_input, export_model  # noqa: E402
from spach.runtime import num_threads  # noqa: E402
from spach.timing import machine_info  # noqa: E402

MS_S = ["spach_ms_s_patch4_224_conv", "spach_ms_s_patch4_224_attn", "spach_ms_s_patch4_224_mlp",
        "spach_ms_s_patch4_224_hybrid"]


def _size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.is_dir() else path.stat().st_size


def _timed(fn) -> tuple[float, float, object]:
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn()
    return time.perf_counter() - wall, time.process_time() - cpu, out


def _model(name: str) -> torch.nn.Module:
    """The model at its default size, seeded; the head (zero-initialised by timm) made random so logits carry signal."""
    import spach

    torch.manual_seed(0)
    model = spach.create_model(name).eval()
    torch.nn.init.normal_(model.head.weight, std=0.02)
    return model


def export_costs(name: str, tmp: Path, compile_train: bool = False) -> list[dict]:
    """Wall/CPU seconds and output size of each export format, then torch.compile's first-call cost."""
    model = _model(name)
    rows = []
    for fmt in FORMATS:
        path = tmp / f"{name}.{fmt}"
        wall, cpu, _ = _timed(lambda: export_model(model, fmt, path))
        rows.append(dict(model=name, what=f"export {fmt}", wall_s=wall, cpu_s=cpu, mib=_size(path) / 2**20))
        print(rows[-1], flush=True)
    x = example_input(model, batch_size=2)
    with torch.inference_mode():
        eager_wall, eager_cpu, _ = _timed(lambda: model(x))
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True)
    with torch.no_grad():
        wall, cpu, _ = _timed(lambda: compiled(x))
    rows.append(dict(model=name, what="compile eval (inductor, fullgraph, 1st call - eager pass)",
                     wall_s=wall - eager_wall, cpu_s=cpu - eager_cpu))
    print(rows[-1], flush=True)
    if compile_train:
        model.train()
        wall, cpu, _ = _timed(lambda: compiled(x).logsumexp(1).mean().backward())
        rows.append(dict(model=name, what="compile train (inductor, fullgraph, 1st fwd+bwd)", wall_s=wall,
                         cpu_s=cpu))
        print(rows[-1], flush=True)
    torch._dynamo.reset()
    return rows


def ort_vs_torch(name: str, tmp: Path, batch: int, thread_counts: list[int], rounds: int) -> list[dict]:
    """ONNX export of ``name`` (the export part's file if there is one), then at each thread count:
    onnxruntime vs PyTorch images/s."""
    model = _model(name)
    path = tmp / f"{name}.onnx"
    if not path.exists():
        export_model(model, "onnx", path)
    rows = []
    for threads in thread_counts:
        with num_threads(threads):
            rows.append(_ort_vs_torch(model, name, path, batch, threads, rounds))
    return rows


def _ort_vs_torch(model, name: str, path: Path, batch: int, threads: int, rounds: int) -> dict:
    """Alternating timed passes of onnxruntime and PyTorch on the same batch; medians and ratio."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    # no busy-waiting after a run: spinning threads would steal the cores from the PyTorch pass that follows
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    x = example_input(model, batch_size=batch)
    feed = {"images": x.numpy()}
    with torch.inference_mode():
        diff = float(abs(session.run(None, feed)[0] - model(x).numpy()).max())
        for _ in range(2):  # warm-up
            session.run(None, feed)
            model(x)
        t_ort, t_torch = [], []
        for _ in range(rounds):
            t0 = time.perf_counter()
            session.run(None, feed)
            t1 = time.perf_counter()
            model(x)
            t2 = time.perf_counter()
            t_ort.append(t1 - t0)
            t_torch.append(t2 - t1)
    row = dict(model=name, batch=batch, threads=threads, rounds=rounds, max_abs_diff=diff,
               ort_img_s=batch / statistics.median(t_ort), torch_img_s=batch / statistics.median(t_torch),
               ort_over_torch=statistics.median(a / b for a, b in zip(t_torch, t_ort)))
    print(row, flush=True)
    return row


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--part", nargs="+", choices=["export", "ort"], default=["export", "ort"])
    p.add_argument("--models", nargs="+", default=MS_S)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--threads", type=int, nargs="+", default=[2],
                   help="thread counts: exports and compiles use the first, the ort part each in turn")
    p.add_argument("--compile-train", action="store_true", help="also time the first compiled training step")
    p.add_argument("--json", help="write the results here")
    args = p.parse_args(argv)
    result = {"machine": machine_info(), "threads": args.threads, "export": [], "ort": []}
    with num_threads(args.threads[0]), tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            if "export" in args.part:
                result["export"] += export_costs(name, Path(tmp), args.compile_train)
            if "ort" in args.part:
                result["ort"] += ort_vs_torch(name, Path(tmp), args.batch, args.threads, args.rounds)
            if args.json:  # after each model: a cut-short run keeps what it measured
                Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
