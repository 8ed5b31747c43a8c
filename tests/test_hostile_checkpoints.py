"""What the project withstands (issue 11): careless and hostile checkpoints, and never losing a run's results."""
import warnings
from pathlib import Path

import pytest
import torch

import spach
from spach.cli.main import main as cli
from spach.engine import CheckpointError, NonFiniteLossError, TrainConfig, train
from spach.engine.checkpoint import find_resumable, load_checkpoint_file
from spach.models import save_safetensors

ARCH = [[["conv", 1]], [["conv", 1]], [["attn", 1]], [["attn", 1]]]
PLAIN = dict(model="spach_ms_xxs_patch4_224_conv", model_kwargs={"hidden_dim": 8, "num_heads": 1, "net_arch": ARCH},
             data="mnist5k", img_size=32, threads=1, workers=0, tensorboard=False, warmup_epochs=0,
             cooldown_epochs=0, batch_size=16, max_train_samples=64, max_val_samples=32, augment=False,
             mixup=0.0, cutmix=0.0, smoothing=0.0, repeated_aug=False, drop_path=0.0, model_ema=False, lr=2e-3)


def config(out: Path, **over) -> TrainConfig:
    return TrainConfig.from_dict({**PLAIN, "output": str(out), **over})


@pytest.fixture(scope="module")
def two_epochs(tmp_path_factory) -> Path:
    """A finished 2-epoch run (last.pt at epoch 2, last.prev.pt at epoch 1); tests copy it."""
    out = tmp_path_factory.mktemp("base") / "run"
    train(config(out, epochs=2))
    return out


def copy_run(src: Path, dst: Path) -> Path:
    import shutil
    shutil.copytree(src, dst)
    return dst


def test_a_text_file_over_last_pt_falls_back_to_last_prev_pt(two_epochs, tmp_path):
    out = copy_run(two_epochs, tmp_path / "run")
    (out / "last.pt").write_text("this is not a checkpoint\n" * 20)  # torch's unpickler: KeyError/IndexError
    with pytest.warns(UserWarning, match="last.pt is unreadable.*falling back"):
        state, path = find_resumable(out)
    assert path.name == "last.prev.pt" and state["position"]["epoch"] == 1


def test_after_falling_back_from_a_corrupt_last_pt_the_next_save_keeps_the_good_last_prev_pt(two_epochs, tmp_path):
    out = copy_run(two_epochs, tmp_path / "run")
    bad = b"this is not a checkpoint\n" * 20
    (out / "last.pt").write_bytes(bad)
    good = (out / "last.prev.pt").read_bytes()
    with pytest.warns(UserWarning, match=r"falling back.*kept as last\.unreadable-\d{8}-\d{6}\.pt"):
        r = train(config(out, epochs=2, resume="auto"))  # resumes from epoch 1, trains epoch 2, saves once
    assert [h["epoch"] for h in r["history"]] == [1, 2]
    assert (out / "last.prev.pt").read_bytes() == good  # the good checkpoint was not replaced by the corrupt one
    assert load_checkpoint_file(out / "last.pt")["position"]["epoch"] == 2
    aside = list(out.glob("last.unreadable-*.pt"))
    assert len(aside) == 1 and aside[0].read_bytes() == bad  # kept, byte for byte


def test_an_unreadable_last_prev_pt_is_set_aside_under_a_name_of_its_own(two_epochs, tmp_path):
    out = copy_run(two_epochs, tmp_path / "run")
    for content in (b"y" * 100, b"z" * 100):  # twice within the same second: two distinct names
        (out / "last.prev.pt").write_bytes(content)
        with pytest.warns(UserWarning, match="falling back"):
            state, path = find_resumable(out)
        assert path.name == "last.pt" and not (out / "last.prev.pt").exists()
    kept = sorted(p.read_bytes() for p in out.glob("last.prev.unreadable-*.pt"))
    assert kept == [b"y" * 100, b"z" * 100]


@pytest.mark.parametrize("content", [b"PK\x03\x04" + b"\x00" * 64, b"garbage" * 100, b"\x80\x02}q\x00."])
def test_any_unreadable_file_is_a_checkpoint_error_not_a_traceback(tmp_path, content):
    (tmp_path / "x.pt").write_bytes(content)
    with pytest.raises(CheckpointError):
        load_checkpoint_file(tmp_path / "x.pt")


def test_flipped_bytes_in_a_checkpoint_fail_its_checksum_and_fall_back(two_epochs, tmp_path):
    out = copy_run(two_epochs, tmp_path / "run")
    data = bytearray((out / "last.pt").read_bytes())
    state = torch.load(out / "last.pt", weights_only=True)
    assert isinstance(state.get("checksum"), str)  # every spach checkpoint carries one
    # flip bytes inside the model weights' storage (the pickle structure stays intact)
    weight = state["model"]["head.weight"].numpy().tobytes()
    at = bytes(data).find(weight[:64])
    assert at > 0
    data[at + 16: at + 24] = bytes(b ^ 0xFF for b in data[at + 16: at + 24])
    (out / "last.pt").write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="checksum"):
        load_checkpoint_file(out / "last.pt")
    with pytest.warns(UserWarning, match="checksum.*falling back"):
        state, path = find_resumable(out)
    assert path.name == "last.prev.pt"


def test_resume_auto_with_both_checkpoints_unreadable_refuses_and_keeps_every_result(two_epochs, tmp_path):
    out = copy_run(two_epochs, tmp_path / "run")
    (out / "last.pt").write_bytes(b"x" * 100)
    (out / "last.prev.pt").write_bytes(b"y" * 100)
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(CheckpointError, match="no checkpoint in .* can be read.*nothing was overwritten"):
            train(config(out, epochs=3, resume="auto"))
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before


def test_training_into_the_directory_of_another_run_moves_its_results_aside(two_epochs, tmp_path, capsys):
    out = copy_run(two_epochs, tmp_path / "run")
    (out / "last.pt").unlink()
    (out / "last.prev.pt").unlink()
    old = {n: (out / n).read_bytes() for n in ("model.safetensors", "config.yaml", "metrics.jsonl")}
    other = dict(PLAIN["model_kwargs"], hidden_dim=16)
    train(config(out, epochs=1, model_kwargs=other))
    aside = [p for p in out.iterdir() if p.is_dir() and p.name.startswith("earlier-")]
    assert len(aside) == 1
    assert {n: (aside[0] / n).read_bytes() for n in old} == old  # every earlier result kept, byte for byte
    assert f"moved the results of an earlier run to {aside[0]}" in capsys.readouterr().out
    assert (out / "model.safetensors").read_bytes() != old["model.safetensors"]


def test_weights_of_a_non_float_dtype_are_refused_not_cast(tmp_path):
    model = spach.create_model("spach_ms_xxs_patch4_224_conv", hidden_dim=8, num_heads=1, net_arch=ARCH,
                               num_classes=10, img_size=32)
    sd = {k: (v.long() if k == "head.weight" else v) for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"dtype.*head\.weight: checkpoint torch\.int64 vs model torch\.float32"):
        spach.load_checkpoint(model, sd)
    half = {k: v.half() if v.is_floating_point() else v for k, v in model.state_dict().items()}
    spach.load_checkpoint(model, half)  # float -> float (e.g. an fp16 release) is still fine


def test_a_safetensors_file_with_flipped_bytes_fails_its_checksum(tmp_path):
    model = spach.create_model("spach_ms_xxs_patch4_224_conv", hidden_dim=8, num_heads=1, net_arch=ARCH,
                               num_classes=10, img_size=32)
    path = save_safetensors(model, tmp_path / "m.safetensors")
    data = bytearray(path.read_bytes())
    data[-20:-12] = bytes(b ^ 0xFF for b in data[-20:-12])
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="checksum"):
        spach.load_checkpoint(model, path)


def test_train_time_counts_the_epochs_trained_before_a_resume(two_epochs, tmp_path):
    out = copy_run(two_epochs, tmp_path / "run")
    r = train(config(out, epochs=3, resume="auto"))
    assert [h["epoch"] for h in r["history"]] == [1, 2, 3]
    assert r["train_time_s"] == pytest.approx(sum(h["epoch_time_s"] for h in r["history"]))
    assert r["train_time_s"] > r["history"][-1]["epoch_time_s"]


def test_eval_ema_of_a_run_without_ema_is_a_clear_error(two_epochs, capsys):
    rc = cli(["eval", "--model", PLAIN["model"], "--checkpoint", str(two_epochs / "last.pt"), "--data", "mnist5k",
              "--max-val-samples", "16", "--workers", "0", "--ema"])
    assert rc == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no EMA weights" in err and "--no-model-ema" in err


def test_eval_ema_of_a_safetensors_file_is_a_clear_error(two_epochs, capsys):
    rc = cli(["eval", "--model", PLAIN["model"], "--checkpoint", str(two_epochs / "model.safetensors"),
              "--data", "mnist5k", "--max-val-samples", "16", "--workers", "0", "--ema", "--model-kwargs",
              "hidden_dim=8", "num_heads=1", f"net_arch={ARCH}", "--img-size", "32"])
    assert rc == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "model_ema.safetensors" in err


def test_eval_of_a_text_file_as_checkpoint_is_a_clear_error(tmp_path, capsys):
    (tmp_path / "notes.pt").write_text("hello\n" * 50)
    rc = cli(["eval", "--model", PLAIN["model"], "--checkpoint", str(tmp_path / "notes.pt"), "--data", "mnist5k"])
    assert rc == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "unreadable" in err


def test_eval_of_a_run_with_a_model_of_another_family_warns(two_epochs, capsys):
    with pytest.warns(UserWarning, match="trained as spach_ms_xxs_patch4_224_conv.*not spach_ms_xxs_patch4_224_mlp"):
        cli(["eval", "--model", "spach_ms_xxs_patch4_224_mlp", "--checkpoint", str(two_epochs / "last.pt"),
             "--data", "mnist5k", "--max-val-samples", "16", "--workers", "0"])


def test_a_nan_loss_before_the_first_checkpoint_does_not_claim_one_is_kept(tmp_path):
    with pytest.raises(NonFiniteLossError) as e:
        train(config(tmp_path / "run", epochs=1, lr=1e30, warmup_lr=1e30))
    assert "last good checkpoint is kept" not in str(e.value) and "No checkpoint was written" in str(e.value)
