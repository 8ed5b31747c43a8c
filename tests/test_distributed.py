"""torchrun: 2 CPU processes (gloo) end with identical weights equal to one process with the same global batch."""
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from spach.engine import TrainConfig, train
from spach.engine.distributed import ShardSampler

ROOT = Path(__file__).resolve().parents[1]
ARCH = [[["conv", 1]], [["conv", 1]], [["attn", 1]], [["attn", 1]]]
# everything that depends on per-rank data order or per-rank RNG is off: the runs must agree exactly
BASE = dict(model="spach_ms_xxs_patch4_224_conv", model_kwargs={"hidden_dim": 8, "num_heads": 1, "net_arch": ARCH},
            data="mnist5k", img_size=32, threads=1, workers=0, tensorboard=False, epochs=1, warmup_epochs=0,
            cooldown_epochs=0, lr=2e-3, augment=False, mixup=0.0, cutmix=0.0, smoothing=0.1, repeated_aug=False,
            drop_path=0.0, model_ema=False, clip_grad=1.0, max_train_samples=64, max_val_samples=45)

# runs train() under torchrun and saves every rank's final weights (only rank 0 writes the run's files)
DRIVER = textwrap.dedent("""
    import importlib, os, sys, torch, yaml
    T = importlib.import_module("spach.engine.train")  # the module (spach.engine.train is the function)
    built = []
    _build = T.build_model
    T.build_model = lambda *a, **k: built.append(_build(*a, **k)) or built[-1]
    cfg = T.TrainConfig.from_dict(yaml.safe_load(open(sys.argv[1])))
    T.train(cfg)
    torch.save(built[-1].state_dict(), os.path.join(cfg.output, f"rank{os.environ['RANK']}.pt"))
""")


def _weights(path):
    return torch.load(path, weights_only=True)


def _max_diff(a, b):
    return max((a[k] - b[k]).abs().max().item() for k in a)


def test_shard_sampler_covers_every_item_once():
    shards = [list(ShardSampler(45, r, 4)) for r in range(4)]
    assert sorted(sum(shards, [])) == list(range(45))


@pytest.mark.slow
def test_torchrun_two_cpu_processes_match_one_process_with_the_same_global_batch(tmp_path):
    cfg = TrainConfig.from_dict({**BASE, "output": str(tmp_path / "ddp"), "batch_size": 8})
    cfg.to_yaml(tmp_path / "ddp.yaml")
    (tmp_path / "driver.py").write_text(DRIVER)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(tmp_path / "driver.py"), str(tmp_path / "ddp.yaml")],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    r0, r1 = _weights(tmp_path / "ddp/rank0.pt"), _weights(tmp_path / "ddp/rank1.pt")
    assert all(torch.equal(r0[k], r1[k]) for k in r0), "ranks diverged"
    assert torch.equal(_weights(tmp_path / "ddp/last.pt")["model"]["head.weight"], r0["head.weight"])

    # one process, global batch 16 = 2 x 8: the same data per optimizer step, the same gradient
    one = train(TrainConfig.from_dict({**BASE, "output": str(tmp_path / "one"), "batch_size": 16}))
    w1 = _weights(one["checkpoint"])["model"]
    assert _max_diff(r0, w1) < 1e-5
    # ... and with gradient accumulation 2 x 8 in one process
    acc = train(TrainConfig.from_dict({**BASE, "output": str(tmp_path / "acc"), "batch_size": 8, "accum_steps": 2}))
    assert _max_diff(_weights(acc["checkpoint"])["model"], w1) < 1e-5
    # the comparison can fail: a global batch of 8 (other data per step, more steps) ends elsewhere
    half = train(TrainConfig.from_dict({**BASE, "output": str(tmp_path / "half"), "batch_size": 8}))
    assert _max_diff(_weights(half["checkpoint"])["model"], w1) > 1e-3

    # distributed evaluation counts each of the 45 (odd) val images once: same loss and accuracy
    ddp_rec = json.loads((tmp_path / "ddp/metrics.jsonl").read_text().splitlines()[-1])
    one_rec = one["history"][-1]
    assert ddp_rec["val_loss"] == pytest.approx(one_rec["val_loss"], abs=1e-5)
    assert ddp_rec["val_top1"] == pytest.approx(one_rec["val_top1"])
    assert ddp_rec["train_loss"] == pytest.approx(one_rec["train_loss"], abs=1e-5)
