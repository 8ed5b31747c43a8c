"""The study schema (spach.battle.schema) and the coercion it shares with TrainConfig."""
import pytest

from spach.battle import schema
from spach.battle.spec import parse_study
from spach.engine.config import coerce


def test_coerce_strict_refuses_what_train_config_converts():
    assert coerce("epochs", "3", int) == 3 and coerce("lr", 1, float) == 1.0
    assert coerce("lr", "none", float | None) is None
    for value, tp in (("3", int), ("yes", bool), (2.5, int), (True, int), ("none", int | None)):
        with pytest.raises(ValueError, match=r"^Launcher\.x: expected"):
            coerce("x", value, tp, strict=True, owner="Launcher")
    assert coerce("x", 30, float, strict=True) == 30 and type(coerce("x", 30, float, strict=True)) is int
    assert coerce("x", {"a": True, "b": 2}, dict[str, str | int | bool], strict=True) == {"a": True, "b": 2}
    with pytest.raises(ValueError):
        coerce("x", {"a": [1]}, dict[str, str | int | bool], strict=True)
    with pytest.raises(ValueError):
        coerce("x", ["a", 1], list[str], strict=True)


def test_read_section_completes_defaults_and_names_the_bad_key():
    out = schema.read_section(schema.Measure, {"batch_size": 8}, "measure")
    assert out == dict(schema.defaults(schema.Measure), batch_size=8) and out["warmup"] == 50
    cases = [
        ({"batch_size": 0}, "measure.batch_size must be a positive integer, got 0"),
        ({"warmup": -1}, "measure.warmup must be a non-negative integer, got -1"),
        ({"threads": "4"}, "measure.threads must be a positive integer or null, got '4'"),
        ({"device": "tpu"}, "measure.device must be one of ['cpu', 'cuda'], got 'tpu'"),
        ({"size": 3}, "measure: unknown key(s) ['size']; allowed: "),
    ]
    for value, message in cases:
        with pytest.raises(ValueError) as info:
            schema.read_section(schema.Measure, value, "measure")
        assert str(info.value).startswith(message)
    with pytest.raises(ValueError, match="measure must be a mapping"):
        schema.read_section(schema.Measure, [1], "measure")


@pytest.mark.parametrize("launcher, message", [
    ({"mem_gb": 0}, "launcher.mem_gb must be a positive number or null"),
    ({"poll_s": float("nan")}, "launcher.poll_s must be a positive number"),
    ({"partition": ""}, "launcher.partition must be a non-empty string or null"),
    ({"sbatch": {"exclusive": [1]}}, "launcher.sbatch must be a mapping"),
    ({"args": ["--x", 2]}, "launcher.args must be a list of strings"),
    ({"gpus_per_node": -1}, "launcher.gpus_per_node must be a non-negative integer"),
])
def test_launcher_errors_in_a_study(launcher, message):
    study = {"name": "s", "data": "mnist5k", "img_size": 32, "launcher": launcher,
             "grid": {"family": ["conv"], "layout": ["ms"], "size": ["xxs"]}}
    with pytest.raises(ValueError) as info:
        parse_study(study, where="bad.yaml")
    assert str(info.value).startswith(f"bad.yaml: {message}")


def test_launcher_accepts_ints_for_numbers_and_keeps_them():
    out = schema.read_section(schema.Launcher, {"kind": "slurm", "mem_gb": 16, "poll_s": 1,
                                                "sbatch": {"exclusive": True}}, "launcher")
    assert out["mem_gb"] == 16 and out["poll_s"] == 1 and out["sbatch"] == {"exclusive": True}
    assert set(out) == schema.keys(schema.Launcher)


def test_key_sets_come_from_the_sections():
    assert schema.required(schema.Grid) == {"family", "layout", "size"}
    assert schema.required(schema.SingleStageSize) == {"hidden_dim", "num_heads", "depth"}
    assert schema.required(schema.MultiStageSize) == {"hidden_dim", "num_heads", "depths"}
    assert schema.required(schema.StudyFile) == {"name", "data"}
    assert "hybrid_attn" in schema.keys(schema.MultiStageSize) and "hybrid_attn" not in schema.keys(
        schema.SingleStageSize)
