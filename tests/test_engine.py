"""spach.engine: config, training, evaluation, crash safety and clear errors (tiny models, mnist5k)."""
import json
import math
import signal
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

import spach
from spach.cli.main import main as cli
from spach.engine import CheckpointError, NonFiniteLossError, TrainConfig, evaluate, train

ROOT = Path(__file__).resolve().parents[1]
ARCH = [[["conv", 1]], [["conv", 1]], [["attn", 1]], [["attn", 1]]]
TINY = dict(model="spach_ms_xxs_patch4_224_conv",
            model_kwargs={"hidden_dim": 8, "num_heads": 1, "net_arch": ARCH},
            data="mnist5k", img_size=32, threads=1, workers=0, tensorboard=False,
            warmup_epochs=0, cooldown_epochs=0, batch_size=16, max_train_samples=128, max_val_samples=50)
# no randomness and a useful lr: for tests of the loop itself
PLAIN = dict(TINY, augment=False, mixup=0.0, cutmix=0.0, smoothing=0.0, repeated_aug=False, drop_path=0.0,
             model_ema=False, lr=2e-3)


def tiny(tmp_path, **over) -> TrainConfig:
    return TrainConfig.from_dict({**TINY, "output": str(tmp_path / "run"), **over})


# ---- config -----------------------------------------------------------------------------------

def test_config_defaults_are_the_paper_recipe():
    c = TrainConfig(model="m", data="d", output="o")
    assert (c.opt, c.opt_eps, c.weight_decay, c.base_lr) == ("adamw", 1e-8, 0.05, 5e-4)
    assert (c.warmup_epochs, c.warmup_lr, c.min_lr, c.cooldown_epochs, c.epochs) == (20, 1e-6, 1e-5, 10, 300)
    assert (c.smoothing, c.mixup, c.cutmix, c.mixup_switch_prob) == (0.1, 0.8, 1.0, 0.5)
    assert (c.auto_augment, c.reprob, c.remode, c.interpolation) == ("rand-m9-mstd0.5-inc1", 0.25, "pixel", "bicubic")
    assert (c.repeated_aug, c.model_ema, c.model_ema_decay, c.drop_path, c.crop_pct) == (True, True, 0.99996, 0.1, 0.875)


def test_config_errors_name_the_field():
    with pytest.raises(ValueError, match="unknown option.*batchsize"):
        TrainConfig.from_dict({**TINY, "output": "o", "batchsize": 3})
    with pytest.raises(ValueError, match="TrainConfig.batch_size: must be >= 1"):
        TrainConfig.from_dict({**TINY, "output": "o", "batch_size": 0})
    with pytest.raises(ValueError, match="TrainConfig.lr: expected float"):
        TrainConfig.from_dict({**TINY, "output": "o", "lr": "fast"})
    with pytest.raises(ValueError, match="TrainConfig.warmup_epochs: warmup_epochs \\+ cooldown_epochs"):
        TrainConfig(model="m", data="d", output="o", epochs=5)  # default warm-up 20 + cool-down 10
    with pytest.raises(ValueError, match="TrainConfig.batch_size: must be even when mixup"):
        TrainConfig(model="m", data="d", output="o", epochs=50, batch_size=15)
    with pytest.raises(ValueError, match="TrainConfig.model: required"):
        TrainConfig(data="d", output="o")


def test_config_yaml_round_trip_and_cli_flags_override_yaml(tmp_path):
    from spach.cli.main import build_parser
    from spach.engine.config import config_from_args

    cfg = tiny(tmp_path, epochs=4)
    cfg.to_yaml(tmp_path / "c.yaml")
    assert TrainConfig.from_yaml(tmp_path / "c.yaml") == cfg
    args = build_parser().parse_args(["train", "--config", str(tmp_path / "c.yaml"), "--epochs", "7",
                                      "--no-model-ema", "--lr", "none", "--model-kwargs", "hidden_dim=4",
                                      "--scale", "0.5", "1"])
    got = config_from_args(args, args.config)
    assert got.epochs == 7 and got.model_ema is False and got.lr is None and got.scale == (0.5, 1.0)
    assert got.model_kwargs == {**TINY["model_kwargs"], "hidden_dim": 4}  # merged with the YAML's
    assert got.batch_size == 16  # from the YAML


# ---- training and evaluation ----------------------------------------------------------------

def test_train_loss_decreases_and_writes_the_run(tmp_path):
    seen = []
    r = train(tiny(tmp_path, **{**PLAIN, "epochs": 3, "tensorboard": True}), on_epoch_end=seen.append)
    losses = [h["train_loss"] for h in r["history"]]
    assert losses[-1] < losses[0] - 0.05, losses
    assert [h["epoch"] for h in r["history"]] == [1, 2, 3] and seen == r["history"]
    keys = {"epoch", "train_loss", "val_loss", "val_top1", "val_top5", "lr", "images_per_s", "epoch_time_s",
            "peak_mem_mb", "skipped_images"}
    assert keys <= set(r["history"][0]) and r["history"][0]["skipped_images"] == 0
    assert r["final_top1"] == r["history"][-1]["val_top1"] and r["best_top1"] >= r["final_top1"]
    out = Path(r["output"])
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x) for x in lines] == r["history"]
    assert TrainConfig.from_yaml(out / "config.yaml").epochs == 3
    assert list((out / "tb").glob("events.out.tfevents.*"))
    # the exported weights load into a fresh model and reproduce the checkpoint's evaluation
    model = spach.create_model(TINY["model"], num_classes=10, img_size=32, **TINY["model_kwargs"])
    spach.load_checkpoint(model, r["weights"])
    m = evaluate(model, "mnist5k", img_size=32, max_samples=50)
    assert m["n"] == 50 and m["top1"] == pytest.approx(r["final_top1"]) and m["loss"] == pytest.approx(r["final_val_loss"], abs=1e-5)
    # and so does `spach eval` on the training checkpoint
    assert cli(["eval", "--model", TINY["model"], "--checkpoint", r["checkpoint"], "--data", "mnist5k",
                "--max-val-samples", "50", "--workers", "0", "--json"]) == 0


def test_eval_of_an_original_release_checkpoint_gives_the_known_accuracy(tmp_path, capsys):
    case = torch.load(ROOT / "tests/data/cases/ms_conv.pt", weights_only=True)
    sd = dict(case["state_dict"])
    # classifier: zero weights, distinct biases -> every image predicts class 7, top-5 = {7, 3, 1, 0, 9}
    bias = torch.tensor([2.0, 3.0, -1.0, 4.0, -2.0, -3.0, -4.0, 5.0, -5.0, 1.0])
    sd["head.weight"], sd["head.bias"] = torch.zeros_like(sd["head.weight"]), bias
    torch.save({"model": sd, "epoch": 299}, tmp_path / "spach_ms_conv_xxs.pth")  # original release layout
    kw = case["kwargs"]
    arch = json.dumps([[list(b) for b in stage] for stage in kw["net_arch"]])
    rc = cli(["eval", "--model", "spach_ms_xxs_patch4_224_conv", "--checkpoint", str(tmp_path / "spach_ms_conv_xxs.pth"),
              "--data", "mnist5k", "--img-size", str(kw["img_size"]), "--max-val-samples", "100", "--workers", "0",
              "--json", "--model-kwargs", f"hidden_dim={kw['hidden_dim']}", f"num_heads={kw['num_heads']}",
              f"net_arch={arch}"])
    assert rc == 0
    m = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    expected_loss = -torch.log_softmax(bias, 0).mean().item()  # 10 images of each class
    assert m["n"] == 100 and m["top1"] == pytest.approx(10.0) and m["top5"] == pytest.approx(50.0)
    assert m["loss"] == pytest.approx(expected_loss, rel=1e-5)


# ---- crash safety ---------------------------------------------------------------------------

KILLER = textwrap.dedent("""
    import os, signal, sys, yaml
    from spach.engine import TrainConfig, train
    cfg = TrainConfig.from_dict(yaml.safe_load(open(sys.argv[1])))
    def on_step(epoch, step, steps_per_epoch):
        if (epoch, step) == (1, 5):
            os.kill(os.getpid(), signal.SIGKILL)   # no cleanup, no flush: a real crash
    train(cfg, on_step=on_step)
""")


def test_sigkill_mid_epoch_then_resume_auto_is_bit_identical(tmp_path):
    # the full recipe's randomness is on (augmentation, mixup/cutmix, repeated aug, drop path, EMA)
    over = dict(epochs=2, checkpoint_every_steps=3, model_ema_decay=0.9, max_train_samples=64, batch_size=8)
    ref = train(tiny(tmp_path / "ref", **over))

    cfg = tiny(tmp_path / "crash", **over)
    cfg.to_yaml(tmp_path / "crash.yaml")
    proc = subprocess.run([sys.executable, "-c", KILLER, str(tmp_path / "crash.yaml")], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    out = Path(cfg.output)
    saved = torch.load(out / "last.pt", weights_only=True)
    assert saved["position"]["epoch"] == 1 and saved["position"]["step"] == 3  # mid-epoch step checkpoint
    assert not (out / "model.safetensors").exists()

    assert cli(["train", "--config", str(out / "config.yaml"), "--resume", "auto"]) == 0
    a = torch.load(ref["checkpoint"], weights_only=True)
    b = torch.load(out / "last.pt", weights_only=True)
    for key in ("model", "model_ema"):
        assert a[key].keys() == b[key].keys()
        for k in a[key]:
            assert torch.equal(a[key][k], b[key][k]), (key, k)
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
    hist = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    timing = {"images_per_s", "epoch_time_s", "peak_mem_mb"}
    assert [{k: v for k, v in h.items() if k not in timing} for h in hist] == \
           [{k: v for k, v in h.items() if k not in timing} for h in ref["history"]]


def test_corrupt_checkpoint_falls_back_on_auto_and_errors_on_explicit_path(tmp_path, capsys):
    cfg = tiny(tmp_path, **{**PLAIN, "epochs": 2})
    train(cfg)
    out = Path(cfg.output)
    prev = torch.load(out / "last.prev.pt", weights_only=True)
    assert prev["position"] == {"epoch": 1, "step": 0, "global_step": 8, "steps_per_epoch": 8}
    data = (out / "last.pt").read_bytes()
    (out / "last.pt").write_bytes(data[: len(data) // 2])  # truncated, as by a crash mid-copy
    with pytest.warns(UserWarning, match="last.pt is unreadable .*falling back"):
        r = train(cfg.replace(resume="auto"))
    # epoch 2 was redone from last.prev.pt, and the history is not duplicated
    assert [h["epoch"] for h in r["history"]] == [1, 2]
    torch.load(out / "last.pt", weights_only=True)  # a good one again
    (out / "bad.pt").write_bytes(data[:1000])
    rc = cli(["train", "--config", str(out / "config.yaml"), "--resume", str(out / "bad.pt")])
    assert rc == 1  # a failure (corrupt file), not a usage error
    assert "bad.pt is unreadable (truncated or corrupt?)" in capsys.readouterr().err
    with pytest.raises(CheckpointError, match="not found"):
        train(cfg.replace(resume=str(out / "missing.pt")))
    with pytest.raises(ValueError, match="already holds a checkpoint"):
        train(cfg)


def test_checkpoint_loads_weights_only_and_holds_everything(tmp_path):
    r = train(tiny(tmp_path, epochs=1, model_ema_decay=0.9))
    state = torch.load(r["checkpoint"], weights_only=True)
    assert {"model", "model_ema", "optimizer", "scheduler", "scaler", "position", "rng", "config"} <= set(state)
    assert {"torch", "numpy", "python"} <= set(state["rng"][0])
    assert TrainConfig.from_dict(state["config"]).model == TINY["model"]


# ---- bad input: clear errors before training, NaN stops the run -------------------------------

class NanAfter(nn.Module):
    """A tiny classifier whose training output is NaN from its `n + 1`-th forward (n = 0: from the first)."""

    def __init__(self, num_classes=10, n=10, **_):
        super().__init__()
        self.fc, self.n, self.calls = nn.Linear(3, num_classes), n, 0

    def forward(self, x):
        self.calls += self.training
        out = self.fc(x.mean((2, 3)))
        return out * float("nan") if self.training and self.calls > self.n else out


@pytest.fixture(scope="module")
def nan_model_name():
    from timm.models import register_model

    def spach_test_nan_after_10(pretrained=False, **kw):
        return NanAfter(**{k: v for k, v in kw.items() if k == "num_classes"})
    if spach_test_nan_after_10.__name__ not in __import__("timm").list_models("spach_test_nan*"):
        register_model(spach_test_nan_after_10)
    return spach_test_nan_after_10.__name__


def test_nan_loss_stops_with_a_clear_error_and_keeps_the_last_good_checkpoint(tmp_path, capsys, nan_model_name):
    cfg = tiny(tmp_path, **{**PLAIN, "model": nan_model_name, "model_kwargs": {}, "epochs": 3})
    with pytest.raises(NonFiniteLossError, match="non-finite loss .* at epoch 2, step 3"):
        train(cfg)
    state = torch.load(Path(cfg.output) / "last.pt", weights_only=True)
    assert state["position"]["epoch"] == 1 and all(torch.isfinite(v).all() for v in state["model"].values())
    assert len((Path(cfg.output) / "metrics.jsonl").read_text().splitlines()) == 1
    cfg.replace(output=str(tmp_path / "cli")).to_yaml(tmp_path / "nan.yaml")
    assert cli(["train", "--config", str(tmp_path / "nan.yaml")]) == 1  # the run failed
    assert "non-finite loss" in capsys.readouterr().err


@pytest.mark.parametrize("over, error", [
    ({"data": "/no/such/dir"}, "data not found: /no/such/dir"),
    ({"num_classes": 5}, "num_classes: 5 but the data has 10 classes"),
    ({"model_kwargs": {**TINY["model_kwargs"], "num_classes": 1000}}, "num_classes=1000 does not match"),
    ({"model": "spach_ms_xxs_patch4_224_mlp", "img_size": 96,  # an MLP model built for 64x64
      "model_kwargs": {"hidden_dim": 8, "num_heads": 1, "img_size": 64,
                       "net_arch": [[["conv", 1]], [["mlp", 1]], [["mlp", 1]], [["mlp", 1]]]}},
     "cannot take 96x96 inputs"),
    ({"model": "no_such_model"}, "unknown model 'no_such_model'"),
    ({"amp": "fp16", "device": "cpu"}, "'fp16' needs a CUDA device"),
])
def test_bad_input_gives_a_clear_error_before_training(tmp_path, capsys, over, error):
    cfg = tiny(tmp_path, epochs=1, **over)
    cfg.to_yaml(tmp_path / "c.yaml")
    assert cli(["train", "--config", str(tmp_path / "c.yaml")]) == 2
    assert error in capsys.readouterr().err
    assert not (tmp_path / "run" / "last.pt").exists()


def test_init_checkpoint_with_another_class_count_keeps_the_trunk_and_says_so(tmp_path, capsys):
    other = spach.create_model(TINY["model"], num_classes=7, img_size=32, **TINY["model_kwargs"])
    torch.save({"model": other.state_dict()}, tmp_path / "seven.pth")
    train(tiny(tmp_path, **{**PLAIN, "epochs": 1, "lr": 1e-12, "min_lr": 0.0,
                            "init_checkpoint": str(tmp_path / "seven.pth")}))
    assert "its 7-class classifier (head.weight, head.bias) does not fit the model's 10 classes, so a new " \
           "classifier starts from scratch" in capsys.readouterr().out
    from safetensors.torch import load_file
    trained = load_file(str(tmp_path / "run" / "model.safetensors"))
    assert trained["head.weight"].shape == (10, other.head.weight.shape[1])
    assert all(torch.allclose(trained[k], v, atol=1e-6) for k, v in other.state_dict().items()
               if not k.startswith("head."))  # lr 1e-12: the trunk is still the checkpoint's
    # a trunk that does not fit is still a clear error
    wider = spach.create_model(TINY["model"], num_classes=10, img_size=32,
                               **{**TINY["model_kwargs"], "hidden_dim": 16})
    torch.save({"model": wider.state_dict()}, tmp_path / "wider.pth")
    with pytest.raises(ValueError, match="shape mismatch"):
        train(tiny(tmp_path, epochs=1, output=str(tmp_path / "run2"), init_checkpoint=str(tmp_path / "wider.pth")))


def test_unreadable_training_image_is_skipped_and_counted(tmp_path):
    from PIL import Image
    import numpy as np

    rng = np.random.RandomState(0)
    for split in ("train", "val"):
        for c in ("a", "b"):
            (tmp_path / "imgs" / split / c).mkdir(parents=True)
            for i in range(8):
                Image.fromarray(rng.randint(0, 255, (16, 16, 3), dtype=np.uint8)).save(
                    tmp_path / "imgs" / split / c / f"{i}.png")
    (tmp_path / "imgs" / "train" / "a" / "0.png").write_bytes(b"not a png at all")
    cfg = tiny(tmp_path, **{**PLAIN, "data": str(tmp_path / "imgs"), "epochs": 1, "batch_size": 16,
                            "max_train_samples": None, "max_val_samples": None})
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        r = train(cfg)
    assert r["history"][0]["skipped_images"] == 1
    assert any("skipping unreadable image" in str(x.message) and "0.png" in str(x.message) for x in w)


def test_results_do_not_depend_on_the_number_of_loader_workers(tmp_path):
    # each image's augmentation is seeded from (seed, epoch, index): worker processes change nothing
    over = dict(epochs=1, max_train_samples=32, batch_size=8, model_ema_decay=0.9)
    a = train(tiny(tmp_path / "w0", **over, workers=0))
    b = train(tiny(tmp_path / "w2", **over, workers=2))
    wa, wb = (torch.load(r["checkpoint"], weights_only=True)["model"] for r in (a, b))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_lr_schedule_linear_scaling_warmup_cosine_and_cooldown(tmp_path):
    # 2 updates/epoch: 1 warm-up epoch, cosine until the end of epoch 2, epoch 3 held at min_lr
    r = train(tiny(tmp_path, **{**PLAIN, "lr": None, "base_lr": 5e-4, "epochs": 3, "warmup_epochs": 1,
                                "cooldown_epochs": 1, "max_train_samples": 32, "min_lr": 1e-5}))
    peak = 5e-4 * 16 / 512  # linear scaling rule, global batch 16
    lrs = [h["lr"] for h in r["history"]]
    assert lrs[0] == pytest.approx(1e-5 + (peak - 1e-5) * 0.5 * (1 + math.cos(math.pi * 2 / 4)))
    assert lrs[1] == pytest.approx(1e-5) and lrs[2] == pytest.approx(1e-5)


def test_any_timm_model_trains_with_the_same_engine(tmp_path):
    # not only the spach zoo: a plain timm CNN goes through the same loop, checkpoint and export
    cfg = TrainConfig.from_dict({**PLAIN, "model": "resnet10t", "model_kwargs": {}, "epochs": 2,
                                 "output": str(tmp_path / "resnet")})
    result = train(cfg)
    losses = [r["train_loss"] for r in result["history"]]
    assert len(losses) == 2 and all(math.isfinite(x) for x in losses) and losses[1] < losses[0]
    model = spach.create_model("resnet10t", num_classes=10)
    spach.load_checkpoint(model, result["weights"])
