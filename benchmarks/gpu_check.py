"""`make gpu-check`: the GPU path end to end on this machine, as a user runs it, into one JSON of results.

    python benchmarks/gpu_check.py [--out runs/gpu-check]      # needs CUDA; without it: a message, exit 0
    python benchmarks/gpu_check.py --device cpu --out /tmp/x   # the same steps at toy sizes on the CPU

Steps, each a `spach` command in a subprocess (its output in OUT/logs/STEP.log):

1. train   a tiny multi-stage model on the bundled mnist5k, bf16 autocast, channels_last, --compile,
           DDP over every visible GPU (torchrun), first epoch;
2. resume  the same run continued to epoch 2 (--resume auto);
3. eval    its checkpoint with `spach eval`;
4. battle  a 2-run study (conv vs attention) with the throughput measurement on the GPU;
5. bench   the MS-S models at batch 256: bf16 inference and training, fp32 (TF32) inference, with
           the 8192^2 GEMM reference timed by CUDA events and MFU against the device's dense peak.

OUT/gpu-check.json holds the machine, each step's command, wall time, status and figures.
The exit status is 0 when every step passed (or when there is no CUDA), 1 otherwise.
Target: under 5 minutes on one H100/H200 node.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TINY_ARCH = "[[[conv,1]],[[conv,1]],[[attn,1]],[[attn,1]]]"

# per device: the sizes of each step (the CPU's are toys: they exercise the script, not the machine)
SETTINGS = {
    "cuda": dict(hidden_dim=32, img_size=32, batch=128, train_samples=4000, val_samples=1000, workers=4,
                 amp="bf16", compile=True, channels_last=True,
                 bench_models=["spach_ms_s_patch4_224_conv", "spach_ms_s_patch4_224_attn",
                               "spach_ms_s_patch4_224_mlp", "spach_ms_s_patch4_224_hybrid"],
                 bench_batch=256, bench_img=224, bench_runs=[("bf16", "infer train"), ("fp32", "infer")],
                 measure_batch=256),
    "cpu": dict(hidden_dim=8, img_size=32, batch=16, train_samples=64, val_samples=32, workers=0,
                amp="bf16", compile=False, channels_last=True,
                bench_models=["spach_ms_xxs_patch4_224_conv"], bench_batch=2, bench_img=64,
                bench_runs=[("bf16", "infer")], measure_batch=4),
}


def cuda_devices() -> int:
    """Visible CUDA devices (0 without CUDA), asked in a subprocess so this one holds no CUDA context."""
    code = "import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    return int(out.stdout.strip() or 0) if out.returncode == 0 else 0


def spach_cmd(*args: str, nproc: int = 1) -> list[str]:
    if nproc > 1:
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                "-m", "spach.cli.main", *args]
    return [sys.executable, "-m", "spach.cli.main", *args]


def train_args(s: dict, device: str, out: Path, epochs: int) -> list[str]:
    args = ["train", "--model", "spach_ms_xxs_patch4_224_conv", "--model-kwargs", f"hidden_dim={s['hidden_dim']}",
            "num_heads=1", f"net_arch={TINY_ARCH}", "--data", "mnist5k", "--img-size", str(s["img_size"]),
            "--output", str(out), "--epochs", str(epochs), "--warmup-epochs", "0", "--cooldown-epochs", "0",
            "--batch-size", str(s["batch"]), "--max-train-samples", str(s["train_samples"]),
            "--max-val-samples", str(s["val_samples"]), "--workers", str(s["workers"]), "--amp", s["amp"],
            "--lr", "2e-3", "--no-tensorboard", "--device", device, "--checkpoint-every-steps", "0"]
    args += ["--channels-last"] if s["channels_last"] else []
    args += ["--compile"] if s["compile"] else []
    return args + (["--threads", "1"] if device == "cpu" else [])


def battle_study(s: dict, device: str) -> dict:
    recipe = {"epochs": 1, "batch_size": s["batch"], "lr": 2e-3, "warmup_epochs": 0, "cooldown_epochs": 0,
              "max_train_samples": s["train_samples"], "max_val_samples": s["val_samples"], "amp": s["amp"],
              "channels_last": s["channels_last"], "workers": s["workers"], "tensorboard": False,
              "model_ema": False, "device": device}
    return {"name": "gpu-check", "data": "mnist5k", "img_size": s["img_size"], "recipe": recipe,
            "measure": {"batch_size": s["measure_batch"], "dtype": "bf16", "device": device},
            "grid": {"family": ["conv", "attn"], "layout": ["ms"], "size": ["tiny"]},
            "sizes": {"tiny": {"ms": {"hidden_dim": s["hidden_dim"], "num_heads": 1, "depths": [1, 1, 1, 1],
                                      "patch_size": 2}}}}


def plan(device: str, n_gpus: int, out: Path) -> list[tuple[str, list[str]]]:
    """The steps as (name, command)."""
    s = SETTINGS[device]
    run, nproc = out / "train", max(1, n_gpus)
    study = out / "study.json"  # YAML is a superset of JSON
    study.write_text(json.dumps(battle_study(s, device)))
    steps = [("train", spach_cmd(*train_args(s, device, run, 1), nproc=nproc)),
             ("resume", spach_cmd(*train_args(s, device, run, 2), "--resume", "auto", nproc=nproc)),
             ("eval", spach_cmd("eval", "--model", "spach_ms_xxs_patch4_224_conv", "--checkpoint",
                                str(run / "last.pt"), "--data", "mnist5k", "--max-val-samples", str(s["val_samples"]),
                                "--amp", s["amp"], "--device", device, "--json", *(["--threads", "1"] if device == "cpu" else [])))]
    battle = ["battle", str(study), "--out", str(out / "battle")] + (["--workers", "2"] if n_gpus >= 2 else [])
    steps.append(("battle", spach_cmd(*battle, *(["--threads", "1"] if device == "cpu" else []))))
    for dtype, modes in s["bench_runs"]:
        steps.append((f"bench-{dtype}", spach_cmd(
            "bench", "--models", *s["bench_models"], "--batch", str(s["bench_batch"]), "--img-size",
            str(s["bench_img"]), "--dtype", dtype, "--mode", *modes.split(), "--device", device,
            "--json", str(out / f"bench-{dtype}.json"), *(["--threads", "1"] if device == "cpu" else []))))
    return steps


def figures(name: str, out: Path, stdout: str) -> dict:
    """The numbers a step produced (read from its files or its output)."""
    if name in ("train", "resume"):
        history = [json.loads(x) for x in (out / "train" / "metrics.jsonl").read_text().splitlines()]
        return {"history": history}
    if name == "eval":
        return json.loads(stdout.strip().splitlines()[-1])
    if name == "battle":
        conn = sqlite3.connect(out / "battle" / "battle.db")
        conn.row_factory = sqlite3.Row
        runs = [dict(r) for r in conn.execute("SELECT name, status, final_top1, params, images_per_s, "
                                              "train_time_s FROM runs ORDER BY name")]
        conn.close()
        return {"runs": runs}
    return json.loads((out / f"{name}.json").read_text())


def verify(name: str, got: dict) -> str | None:
    """Why a step's figures are wrong, or None."""
    if name == "train" and [r["epoch"] for r in got["history"]] != [1]:
        return "expected epoch 1 in metrics.jsonl"
    if name == "resume" and [r["epoch"] for r in got["history"]] != [1, 2]:
        return "expected epochs 1 and 2 after the resume"
    if name == "battle" and (len(got["runs"]) != 2 or any(r["status"] != "done" for r in got["runs"])):
        return f"expected 2 done runs, got {[(r['name'], r['status']) for r in got['runs']]}"
    if name.startswith("bench") and not got.get("rows"):
        return "no bench rows"
    return None


def run_step(name: str, cmd: list[str], out: Path) -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    (out / "logs" / f"{name}.log").write_text(proc.stdout + "\n--- stderr ---\n" + proc.stderr)
    step = {"command": " ".join(cmd), "wall_s": round(wall, 1), "returncode": proc.returncode}
    if proc.returncode != 0:
        step["error"] = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
        return step
    try:
        step["figures"] = figures(name, out, proc.stdout)
        step["error"] = verify(name, step["figures"])
    except (OSError, ValueError, KeyError, sqlite3.Error) as e:
        step["error"] = f"could not read the step's results: {type(e).__name__}: {e}"
    return step


def machine(device: str, n_gpus: int) -> dict:
    code = ("import json, torch; print(json.dumps({'torch': torch.__version__, 'cuda': torch.version.cuda, "
            "'gpus': [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] "
            "if torch.cuda.is_available() else []}))")
    info = json.loads(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout)
    return {**info, "device": device, "processes": max(1, n_gpus), "python": sys.version.split()[0],
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="runs/gpu-check", help="output folder (default: runs/gpu-check)")
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                   help="cuda (default) or cpu: the same steps at toy sizes, to test this script")
    args = p.parse_args(argv)
    n_gpus = cuda_devices() if args.device == "cuda" else 0
    if args.device == "cuda" and n_gpus == 0:
        print("gpu-check: no CUDA device here (torch.cuda.is_available() is False); nothing to check. "
              "Run `make gpu-check` on a GPU machine (or `python benchmarks/gpu_check.py --device cpu` "
              "for a toy run of the same steps).")
        return 0
    out = Path(args.out).resolve()
    if out.exists() and any(out.iterdir()):
        raise SystemExit(f"gpu-check: {out} is not empty; pass another --out (results are never overwritten)")
    (out / "logs").mkdir(parents=True, exist_ok=True)
    result = {"meta": machine(args.device, n_gpus), "steps": {}}
    t0 = time.perf_counter()
    for name, cmd in plan(args.device, n_gpus, out):
        print(f"gpu-check: {name} ...", flush=True)
        step = result["steps"][name] = run_step(name, cmd, out)
        print(f"gpu-check: {name} {'ok' if not step['error'] else 'FAILED: ' + step['error']} "
              f"({step['wall_s']:.0f}s)", flush=True)
    result["total_s"] = round(time.perf_counter() - t0, 1)
    result["ok"] = all(not s["error"] for s in result["steps"].values())
    (out / "gpu-check.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"gpu-check: {'all steps passed' if result['ok'] else 'FAILED'} in {result['total_s']:.0f}s; "
          f"results in {out / 'gpu-check.json'}")
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
