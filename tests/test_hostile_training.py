"""Training errors whose advice fits the run (issue 24, defect 5): the settings it really uses, named where the
user sets them (`spach train` flags or a study's `recipe:`), and a loss that is non-finite from the first step."""
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
from timm.models import list_models, register_model

from spach.cli.main import main as cli
from spach.engine import NonFiniteLossError, TrainConfig, train
from spach.engine.config import settings_language
from spach.engine.train import non_finite_message
from test_engine import NanAfter

PLAIN = dict(data="mnist5k", img_size=16, threads=1, workers=0, tensorboard=False, epochs=1, warmup_epochs=0,
             cooldown_epochs=0, batch_size=16, max_train_samples=64, max_val_samples=16, augment=False, mixup=0.0,
             cutmix=0.0, smoothing=0.0, repeated_aug=False, model_ema=False, lr=2e-3)


def _register(name: str, n: int) -> str:
    def build(pretrained=False, num_classes=10, **_):
        return NanAfter(num_classes=num_classes, n=n)
    build.__name__ = name
    if name not in list_models(name):
        register_model(build)
    return name


NAN_FROM_START = _register("spach_test_hostile_nan_from_start", 0)
NAN_AFTER_2 = _register("spach_test_hostile_nan_after_2", 2)


def config(tmp_path: Path, model: str, **over) -> TrainConfig:
    return TrainConfig.from_dict({**PLAIN, "model": model, "output": str(tmp_path / "run"), **over})


def test_a_loss_non_finite_from_the_first_step_blames_the_model_not_the_learning_rate(tmp_path, capsys):
    cfg = config(tmp_path, NAN_FROM_START)
    cfg.to_yaml(tmp_path / "nan.yaml")
    assert cli(["train", "--config", str(tmp_path / "nan.yaml")]) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("spach train: error: non-finite loss (nan or inf) at epoch 1, step 1; training stopped.")
    assert "already non-finite at the first step, before the weights had changed: the model itself" in err
    assert "--lr" not in err and "amp" not in err
    assert not (tmp_path / "run" / "last.pt").exists()  # nothing was stored as if it were good


def test_spach_train_advice_names_its_flags_and_no_amp_advice_without_amp(tmp_path):
    with pytest.raises(NonFiniteLossError) as e:
        train(config(tmp_path, NAN_AFTER_2))
    msg = str(e.value)
    assert "at epoch 1, step 3;" in msg and "first step" not in msg
    assert "Try a lower learning rate (--lr 0.0002; it is 0.002), or gradient clipping (--clip-grad 1.0)." in msg
    assert "amp" not in msg and "fp16" not in msg


def test_a_study_runs_advice_names_the_recipe_keys(tmp_path):
    with settings_language("study"), pytest.raises(NonFiniteLossError) as e:
        train(config(tmp_path, NAN_AFTER_2, amp="bf16", clip_grad=5.0))
    msg = str(e.value)
    assert ("Try a lower learning rate (recipe: {lr: 0.0002}; it is 0.002), or full precision "
            "(recipe: {amp: none}) to rule bf16 out.") in msg
    assert "--" not in msg and "clip_grad" not in msg  # clipping is already on


def test_fp16_runs_are_advised_bf16_and_the_kept_checkpoint_is_named(tmp_path):
    (tmp_path / "last.pt").write_bytes(b"")
    run = SimpleNamespace(cfg=SimpleNamespace(check_finite_every=10, clip_grad=None, amp="fp16"), out=tmp_path,
                          resumed=False, optimizer=SimpleNamespace(param_groups=[{"lr": 1e-5, "initial_lr": 1e-3}]))
    msg = non_finite_message(run, epoch=3, step=19, from_first_step=False)
    assert msg == (f"non-finite loss (nan or inf) at epoch 4, step 20 (checked every 10 steps); training stopped. "
                   f"The last good checkpoint is kept in {tmp_path} (resume with --resume auto). Try a lower learning "
                   "rate (--lr 0.0001; it is 0.001), or gradient clipping (--clip-grad 1.0), or bf16 instead of fp16 "
                   "autocast (--amp bf16), whose range does not overflow.")
    with settings_language("study"):
        msg = non_finite_message(run, epoch=3, step=19, from_first_step=True)
    assert "(`spach battle ... --retry-failed` continues from it)" in msg
    assert "already non-finite at the first step, before" in msg
    run.resumed = True
    assert "at the first step after resuming" in non_finite_message(run, 3, 19, from_first_step=True)


def test_the_warm_up_error_shows_one_total_in_the_users_own_terms(tmp_path, capsys):
    from spach.battle import load_study

    with pytest.raises(ValueError) as e:
        load_study({"name": "x", "data": "mnist5k", "recipe": {"epochs": 2, "warmup_epochs": 2},
                    "grid": {"family": ["conv"], "layout": ["ms"], "size": ["xxs"]}})
    assert str(e.value) == ("study: recipe: TrainConfig.warmup_epochs: warmup_epochs + cooldown_epochs = 2 + 10 = 12 "
                            "must be less than epochs (2); for a short run set e.g. recipe: {warmup_epochs: 1, "
                            "cooldown_epochs: 0}")
    code = cli(["train", "--model", NAN_AFTER_2, "--data", "mnist5k", "--output", str(tmp_path / "o"),
                "--epochs", "5", "--warmup-epochs", "4"])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.endswith("warmup_epochs + cooldown_epochs = 4 + 10 = 14 must be less than epochs (5); for a short "
                        "run set e.g. --warmup-epochs 1 --cooldown-epochs 0")
    assert not (tmp_path / "o").exists()
