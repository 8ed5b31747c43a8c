"""The mixer registry: registration errors, the context a mixer gets, plugins in a study, `spach mixers`."""
import copy
import textwrap

import pytest
import yaml
import torch
import torch.nn as nn

import spach
from spach.battle import load_study, run_study
from spach.battle.spec import parse_study
from spach.cli.main import main as cli
from spach.models import SpachMS, layers, registry


def ms(mixer, **kw):
    return SpachMS(hidden_dim=8, num_heads=1, img_size=16, patch_size=1, num_classes=3,
                   net_arch=[[("conv", 1)], [(mixer, 1)], [(mixer, 1)], [(mixer, 1)]], **kw)


@pytest.fixture
def scale_mixer():
    """A plugin-style mixer registered for one test (and removed after it)."""

    @spach.register_mixer("test_scale", paper="Scaling Is All You Need (Nobody, 2026)")
    class Scale(nn.Module):
        def __init__(self, dim, grid_size, block_index):
            super().__init__()
            self.grid_size, self.block_index = grid_size, block_index
            self.weight = nn.Parameter(torch.full((dim,), 2.0))

        def forward(self, x):
            return x * self.weight

    yield Scale
    registry.unregister_mixer("test_scale")


def test_builtins_and_aliases_read_the_registry(scale_mixer):
    assert layers.MIXERS[:3] == ("conv", "attn", "mlp") and "test_scale" in layers.MIXERS  # read when accessed
    assert "window" in spach.mixer_names() and layers.canonical_mixer("pass") == "conv"
    assert registry.get_mixer("pass").cpe_is_mixer
    with pytest.raises(ValueError, match=r"unknown mixer 'transformer': registered mixers are conv, attn, mlp"):
        ms("transformer")


def test_a_registered_mixer_gets_what_its_constructor_takes_and_trains(scale_mixer):
    net = ms("test_scale")
    mixers = [b.token_mixer for s in net.stages[1:] for b in s.blocks]
    assert all(isinstance(m, scale_mixer) for m in mixers)
    assert [m.grid_size for m in mixers] == [(8, 8), (4, 4), (2, 2)] and mixers[0].block_index == 0
    assert registry.get_mixer("test_scale").source == __name__ and "Nobody" in registry.get_mixer("test_scale").paper
    net(torch.randn(2, 3, 16, 16)).sum().backward()
    assert mixers[0].weight.grad is not None
    shared = ms("test_scale", shared_spatial_func=True)  # it has weights: sharing applies
    assert shared.stages[1].blocks[0].token_mixer is shared.stages[1].blocks[0].token_mixer


def test_mixer_options_reach_the_constructor_and_unknown_ones_are_refused():
    net = SpachMS(hidden_dim=24, num_heads=1, img_size=32, patch_size=2, mixer_kwargs={"shift": {"n_div": 6}},
                  net_arch=[[("conv", 1)], [("shift", 1)], [("shift", 1)], [("shift", 1)]])
    assert net.stages[1].blocks[0].token_mixer.n_div == 6
    with pytest.raises(ValueError, match=r"mixer 'pool' does not take option\(s\) \['size'\]"):
        ms("pool", mixer_kwargs={"pool": {"size": 5}})
    with pytest.raises(ValueError, match="unknown mixer 'windw'"):
        ms("pool", mixer_kwargs={"windw": {"window_size": 2}})


def test_registration_errors_name_the_mixer():
    with pytest.raises(ValueError, match="mixer 'attn' is already registered .*spach.models.layers.Attention"):
        spach.register_mixer("attn")(type("Other", (nn.Module,), {}))
    with pytest.raises(TypeError, match=r"register_mixer\('fn'\) decorates an nn.Module subclass"):
        spach.register_mixer("fn")(lambda x: x)
    with pytest.raises(ValueError, match="lower-case identifier"):
        spach.register_mixer("My-Mixer")
    with pytest.raises(ValueError, match="'pass' is reserved"):
        spach.register_mixer("pass")
    with pytest.raises(ValueError, match="'hybrid' is reserved"):
        spach.register_mixer("hybrid")
    with pytest.raises(ValueError, match="built in and cannot be unregistered"):
        registry.unregister_mixer("conv")


def test_a_mixer_with_the_wrong_output_shape_is_refused_when_the_model_is_built():
    @spach.register_mixer("test_flatten")
    class Flatten(nn.Module):
        def __init__(self, dim):
            super().__init__()
            self.proj = nn.Linear(dim, dim)

        def forward(self, x):
            return self.proj(x).flatten(1, 2)  # (B, N, C): wrong

    try:
        with pytest.raises(ValueError, match=r"mixer 'test_flatten' \(.*Flatten\) maps a \(1, 8, 8, 16\) input to "
                                             r"\(1, 64, 16\): a spatial mixer must return its input's shape"):
            ms("test_flatten")
        with torch.device("meta"), pytest.raises(ValueError, match="test_flatten"):  # also on the meta device
            ms("test_flatten")
    finally:
        registry.unregister_mixer("test_flatten")


PLUGIN = textwrap.dedent('''
    """A user's mixer: a learned per-channel blend of each token with its row mean."""
    import torch
    import torch.nn as nn
    import spach


    @spach.register_mixer("rowmix", paper="Row Mixing (Doe, 2026)")
    class RowMix(nn.Module):
        def __init__(self, dim):
            super().__init__()
            self.alpha = nn.Parameter(torch.zeros(dim))

        def forward(self, x):
            return x + self.alpha * (x.mean(dim=2, keepdim=True) - x)
''')

STUDY = {
    "name": "plug",
    "data": "mnist5k",
    "img_size": 16,
    "threads": 1,
    "recipe": {"epochs": 1, "batch_size": 128, "warmup_epochs": 0, "cooldown_epochs": 0, "mixup": 0.0,
               "cutmix": 0.0, "augment": False, "model_ema": False, "workers": 0, "tensorboard": False,
               "repeated_aug": False},
    "measure": {"batch_size": 8, "warmup": 1, "repeats": 1},
    "grid": {"family": ["rowmix", "pool"], "layout": ["ms"], "size": ["nano"], "shared": [False, True]},
    "sizes": {"nano": {"ms": {"hidden_dim": 8, "num_heads": 1, "depths": [1, 1, 1, 1], "patch_size": 1}}},
}


@pytest.fixture
def plugin_study(tmp_path):
    (tmp_path / "plugins").mkdir()
    (tmp_path / "plugins" / "rowmix.py").write_text(PLUGIN)
    study = copy.deepcopy(STUDY)
    study["plugins"] = ["plugins/rowmix.py"]
    (tmp_path / "study.yaml").write_text(yaml.safe_dump(study))
    yield tmp_path / "study.yaml"
    if "rowmix" in registry.mixer_names():
        registry.unregister_mixer("rowmix")


def test_plugins_are_imported_relative_to_the_study_and_cells_are_checked_by_the_model(plugin_study, capsys):
    study = load_study(plugin_study)
    assert registry.get_mixer("rowmix").paper == "Row Mixing (Doe, 2026)"
    assert sorted(r.group for r in study.runs) == ["pool-ms-nano", "rowmix-ms-nano", "rowmix-ms-nano-shared"]
    assert "mixer 'pool' has no weights" in dict(study.skipped)["pool-ms-nano-shared"]
    assert study.runs[0].resolved()["plugins"] == [{"file": str(plugin_study.parent / "plugins" / "rowmix.py")}]
    assert load_study(plugin_study).runs[0].key == study.runs[0].key  # importing again is a no-op
    assert cli(["mixers", "--dim", "16", "--grid", "8"]) == 0
    out = capsys.readouterr().out
    assert "rowmix" in out and "Row Mixing (Doe, 2026)" in out and "window" in out


def test_plugin_and_extra_errors(tmp_path):
    with pytest.raises(ValueError, match=r"study: plugins: no file 'nope.py'.*relative to the study file"):
        parse_study(dict(STUDY, plugins=["nope.py"]), base_dir=tmp_path)
    (tmp_path / "broken.py").write_text("raise RuntimeError('boom')\n")
    with pytest.raises(ValueError, match="importing .*broken.py failed: RuntimeError: boom"):
        parse_study(dict(STUDY, plugins=["broken.py"]), base_dir=tmp_path)
    with pytest.raises(ValueError, match="unknown family 'rowmix'"):
        parse_study(STUDY)
    bad = dict(STUDY, grid={"family": ["pool"], "layout": ["ms"], "size": ["nano"]},
               extra=[{"name": "x", "layout": "ms", "shared": True, "hidden_dim": 8, "num_heads": 1, "patch_size": 1,
                       "net_arch": [[["conv", 1]], [["shift", 1]], [["shift", 1]], [["shift", 1]]]}])
    with pytest.raises(ValueError, match="extra.0.: the model refuses this entry: .*mixer 'shift' has no weights"):
        parse_study(bad)


@pytest.mark.slow
def test_a_plugin_mixer_goes_through_a_one_epoch_battle_in_a_worker_process(plugin_study, tmp_path):
    out = tmp_path / "out"
    study = load_study(plugin_study)
    study.runs = [r for r in study.runs if r.group == "rowmix-ms-nano"]
    result = run_study(study, out, workers=2, quiet=True)  # workers: a fresh process imports the plugin itself
    assert result["done"] == 1 and result["failed"] == 0
    report = (out / "report.md").read_text()
    assert "| rowmix | MS | nano |" in report and "## Ranking" in report


def test_cpu_arena_preset_dry_run(capsys):
    assert cli(["battle", "cpu-arena", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "16 runs (8 architectures x seeds [0, 1])" in out
    study = load_study("cpu-arena")
    assert {r.family for r in study.runs} == {"conv", "attn", "mlp", "pool", "shift", "smlp", "gfilter", "window"}
    window = next(r for r in study.runs if r.family == "window")
    assert window.model_kwargs["mixer_kwargs"] == {"window": {"window_size": 4}}
    assert "mixer_kwargs" not in next(r for r in study.runs if r.family == "conv").model_kwargs
