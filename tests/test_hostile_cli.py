"""What the project withstands (issue 11): careless and hostile command lines and config files —
one clear line and exit 2 for bad input, exit 1 for a failure, never a traceback (unless --debug)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from spach.cli.main import main as cli
from spach.engine import TrainConfig

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--model", "spach_ms_xxs_patch4_224_conv", "--model-kwargs", "hidden_dim=8", "num_heads=1",
        "--data", "mnist5k", "--img-size", "32", "--epochs", "1", "--warmup-epochs", "0", "--cooldown-epochs", "0",
        "--batch-size", "16", "--max-train-samples", "32", "--max-val-samples", "16", "--threads", "1",
        "--workers", "0", "--no-tensorboard"]


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


@pytest.mark.parametrize("flags, says", [
    (["--epochs", "inf"], "TrainConfig.epochs: must be a finite number"),
    (["--min-lr", "nan"], "TrainConfig.min_lr: must be a finite number"),
    (["--mixup", "nan"], "TrainConfig.mixup: must be a finite number"),
    (["--crop-pct", "0"], "TrainConfig.crop_pct: must be in (0, 1]"),
    (["--crop-pct", "5"], "TrainConfig.crop_pct: must be in (0, 1]"),
    (["--auto-augment", "nope"], "TrainConfig.auto_augment: 'nope' is not a timm augmentation policy"),
    (["--auto-augment", "rand-m9-zz3"], "TrainConfig.auto_augment: 'rand-m9-zz3' is not a timm augmentation"),
    (["--remode", "nope"], "TrainConfig.remode: must be one of const, rand, pixel"),
    (["--interpolation", "nope"], "TrainConfig.interpolation: must be one of"),
    (["--model-kwargs", "foo=1"], "model_kwargs: spach_ms_xxs_patch4_224_conv does not take 'foo'"),
])
def test_a_bad_train_flag_is_one_clear_line_and_exit_2(tmp_path, capsys, flags, says):
    assert cli(["train", *TINY, "--output", str(tmp_path / "run"), *flags]) == 2
    assert says in one_line_error(capsys)
    assert not (tmp_path / "run").exists()  # refused before anything was written


@pytest.mark.parametrize("text, says", [
    ("epochs: .inf\n", "TrainConfig.epochs: must be a finite number"),
    ("epochs: 3\nlr: [1, 2\n", "c.yaml: not valid YAML"),
    ("epochs: !!python/object/apply:os.system ['touch pwned']\n", "c.yaml: not valid YAML"),
    ("- just\n- a list\n", "c.yaml: expected a mapping of options"),
])
def test_a_bad_config_file_is_one_clear_line_and_exit_2(tmp_path, capsys, monkeypatch, text, says):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "c.yaml").write_text(text)
    assert cli(["train", "--config", str(tmp_path / "c.yaml"), *TINY[:4], "--output", str(tmp_path / "r")]) == 2
    assert says in one_line_error(capsys)
    assert not (tmp_path / "pwned").exists()


def test_non_finite_values_are_refused_by_the_library_too():
    with pytest.raises(ValueError, match="TrainConfig.warmup_lr: must be a finite number"):
        TrainConfig.from_dict({"model": "m", "data": "d", "output": "o", "warmup_lr": float("nan")})
    with pytest.raises(ValueError, match="TrainConfig.clip_grad: must be a finite number"):
        TrainConfig(model="m", data="d", output="o", clip_grad=float("inf"))


@pytest.mark.parametrize("flags, says", [
    (["--crop-pct", "0"], "--crop-pct must be in (0, 1]"),
    (["--crop-pct", "nan"], "--crop-pct must be in (0, 1]"),
    (["--batch-size", "0"], "--batch-size must be >= 1"),
])
def test_a_bad_eval_flag_is_one_clear_line_and_exit_2(tmp_path, capsys, flags, says):
    (tmp_path / "w.pt").write_bytes(b"")
    assert cli(["eval", "--model", "spach_ms_xxs_patch4_224_conv", "--checkpoint", str(tmp_path / "w.pt"),
                "--data", "mnist5k", *flags]) == 2
    assert says in one_line_error(capsys)


def test_an_unknown_eval_interpolation_is_refused_by_argparse(capsys):
    with pytest.raises(SystemExit) as e:
        cli(["eval", "--model", "m", "--checkpoint", "c", "--data", "mnist5k", "--interpolation", "nope"])
    assert e.value.code == 2 and "invalid choice: 'nope'" in capsys.readouterr().err


def test_bench_json_pointing_at_a_directory_is_refused_before_measuring(tmp_path, capsys):
    assert cli(["bench", "--models", "spach_ms_xxs_patch4_224_conv", "--json", str(tmp_path)]) == 2
    assert "--json" in one_line_error(capsys)


def test_debug_shows_the_traceback(tmp_path, monkeypatch):
    args = ["train", *TINY, "--output", str(tmp_path / "r"), "--epochs", "inf"]
    with pytest.raises(ValueError, match="finite"):  # raised, so Python prints its traceback
        cli(["--debug", *args])
    monkeypatch.setenv("SPACH_DEBUG", "1")
    with pytest.raises(ValueError, match="finite"):
        cli(args)


def test_a_sub_command_whose_module_cannot_be_imported_is_a_bug_not_silently_left_out(monkeypatch):
    from spach.cli import main as cli_main
    monkeypatch.setitem(cli_main.COMMANDS, "missing", "spach.cli.no_such_command")
    with pytest.raises(ModuleNotFoundError, match="spach.cli.no_such_command"):
        cli(["models"])


# ---- read-only output directories: the directory is made unwritable for the process that runs the CLI
# (root ignores permission bits: as root the CLI runs with every capability dropped, through setpriv)

def run_unprivileged(args: list[str]) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    drop = ["setpriv", "--bounding-set=-all", "--inh-caps=-all"] if os.geteuid() == 0 else []
    return subprocess.run([*drop, sys.executable, "-m", "spach.cli.main", *args], capture_output=True, text=True,
                          env=env)


@pytest.fixture
def readonly_dir(tmp_path):
    made = []

    def make(name: str = "ro") -> Path:
        d = tmp_path / name
        d.mkdir(exist_ok=True)
        made.append(d)
        return d
    yield make
    for d in made:  # let pytest clean up
        os.chmod(d, 0o755)


@pytest.mark.slow
def test_train_into_a_read_only_directory_is_one_clear_line_and_exit_1(readonly_dir):
    out = readonly_dir()
    os.chmod(out, 0o555)
    proc = run_unprivileged(["train", *TINY, "--output", str(out / "run")])
    assert proc.returncode == 1, proc.stderr
    err = proc.stderr.strip().splitlines()
    assert "Traceback" not in proc.stderr and len(err) == 1 and "read-only" in err[0] and str(out) in err[0]


def command_that_runs(monkeypatch, work):
    """Register a sub-command `boom` whose body is `work()` (a module of its own, as the real commands are)."""
    import types

    from spach.cli import main as cli_main

    module = types.ModuleType("spach_test_boom")

    def add_parser(sub):
        sub.add_parser("boom").set_defaults(func=lambda args: work())

    module.add_parser = add_parser
    monkeypatch.setitem(sys.modules, "spach_test_boom", module)
    monkeypatch.setitem(cli_main.COMMANDS, "boom", "spach_test_boom")


def test_a_runtime_error_from_torch_keeps_its_traceback(monkeypatch, capsys):
    import torch

    command_that_runs(monkeypatch, lambda: torch.zeros(2, 3) @ torch.zeros(2, 3))  # a shape bug inside torch
    with pytest.raises(RuntimeError, match="cannot be multiplied"):  # not caught: Python prints its traceback
        cli(["boom"])
    assert "spach boom: error" not in capsys.readouterr().err


def test_a_spach_error_is_one_line(monkeypatch, capsys):
    from spach.engine.checkpoint import CheckpointError
    from spach.errors import SpachError

    def fail():
        raise CheckpointError("runs/x/last.pt is truncated\n(the previous checkpoint is kept)")

    command_that_runs(monkeypatch, fail)
    assert issubclass(CheckpointError, SpachError) and issubclass(SpachError, RuntimeError)
    assert cli(["boom"]) == 1
    assert one_line_error(capsys) == "spach boom: error: runs/x/last.pt is truncated (the previous checkpoint is kept)"
