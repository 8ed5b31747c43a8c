"""bf16 on CPU everywhere: training, evaluation, the benchmark and the battle (tiny, fast)."""
import json
import sqlite3

import pytest
import torch
import yaml

from spach.battle import run_study
from spach.cli.main import main as cli
from spach.engine import TrainConfig, train

ARCH = [[["conv", 1]], [["mlp", 1]], [["attn", 1]], [["attn", 1]]]  # every mixer's code path
TINY = dict(model="spach_ms_xxs_patch4_224_conv", model_kwargs={"hidden_dim": 8, "num_heads": 1, "net_arch": ARCH},
            data="mnist5k", img_size=32, threads=1, workers=0, tensorboard=False, warmup_epochs=0,
            cooldown_epochs=0, batch_size=16, max_train_samples=96, max_val_samples=32, augment=False, mixup=0.0,
            cutmix=0.0, smoothing=0.0, repeated_aug=False, drop_path=0.0, model_ema=False, lr=2e-3)


@pytest.fixture(scope="module")
def bf16_run(tmp_path_factory):
    """Two bf16-autocast epochs: training, the evaluation after each epoch, the checkpoint."""
    out = tmp_path_factory.mktemp("bf16") / "run"
    return train(TrainConfig.from_dict({**TINY, "epochs": 2, "amp": "bf16", "output": str(out)}))


def test_training_under_bf16_autocast_evaluates_and_saves(bf16_run):
    r = bf16_run
    assert [h["epoch"] for h in r["history"]] == [1, 2]
    assert all(torch.isfinite(torch.tensor(h["train_loss"])) for h in r["history"])
    assert 0.0 <= r["final_top1"] <= 100.0 and r["checkpoint"]
    state = torch.load(r["checkpoint"], weights_only=True)
    assert all(v.dtype != torch.bfloat16 for v in state["model"].values())  # autocast keeps fp32 weights


def test_eval_under_bf16_matches_fp32_closely(bf16_run, capsys):
    args = ["eval", "--model", TINY["model"], "--checkpoint", bf16_run["checkpoint"], "--data", "mnist5k",
            "--max-val-samples", "32", "--workers", "0", "--threads", "1", "--json"]
    assert cli(args + ["--amp", "bf16"]) == 0
    bf16 = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert cli(args) == 0
    fp32 = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert bf16["n"] == fp32["n"] == 32
    assert bf16["loss"] == pytest.approx(fp32["loss"], rel=0.05, abs=0.02)


def test_bench_cli_in_bf16_autocast_and_weights(tmp_path):
    out = tmp_path / "b.json"
    common = ["bench", "--models", "test_resnet", "--batch", "2", "--img-size", "32", "--threads", "1",
              "--warmup", "0", "--repeats", "1", "--limit-shapes", "32x32x32", "--dtype", "bf16", "--quiet"]
    assert cli(common + ["--mode", "infer", "train", "--bf16-impl", "autocast", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [(r["mode"], r["precision"]) for r in rows] == [("infer", "bf16-autocast"), ("train", "bf16-autocast")]
    assert all(r["images_per_s"] > 0 for r in rows)


@pytest.mark.slow
def test_battle_trains_and_measures_in_bf16(tmp_path):
    spec = {
        "name": "bf16", "data": "mnist5k", "img_size": 32, "threads": 1,
        "recipe": {"epochs": 1, "batch_size": 32, "amp": "bf16", "max_train_samples": 64, "max_val_samples": 32,
                   "warmup_epochs": 0, "cooldown_epochs": 0, "smoothing": 0.0, "mixup": 0.0, "cutmix": 0.0,
                   "augment": False, "repeated_aug": False, "model_ema": False, "drop_path": 0.0, "workers": 0,
                   "tensorboard": False},
        "measure": {"batch_size": 4, "dtype": "bf16", "warmup": 1, "repeats": 1},
        "grid": {"family": ["mlp"], "layout": ["ms"], "size": ["nano"], "seed": [0]},
        "sizes": {"nano": {"ms": {"hidden_dim": 8, "num_heads": 1, "depths": [1, 1, 1, 1], "patch_size": 2}}},
    }
    result = run_study(yaml.safe_load(yaml.safe_dump(spec)), tmp_path / "out", quiet=True, workers=1)
    assert result["done"] == 1 and result["failed"] == 0
    conn = sqlite3.connect(tmp_path / "out" / "battle.db")
    (images_per_s, top1), = conn.execute("SELECT images_per_s, final_top1 FROM runs").fetchall()
    conn.close()
    assert images_per_s > 0 and top1 is not None
