"""Study files: validation errors, grid expansion, skipped combinations, run keys (no training)."""
from __future__ import annotations

import copy

import pytest

from spach.battle import list_presets, load_study
from spach.battle.launchers.processes import worker_command
from spach.battle.launchers.torchrun import TorchrunLauncher
from spach.battle.spec import parse_study

BASE = {
    "name": "t",
    "data": "mnist5k",
    "img_size": 16,
    "recipe": {"epochs": 2, "warmup_epochs": 0, "cooldown_epochs": 0},
    "grid": {"family": ["conv", "attn"], "layout": ["ss", "ms"], "size": ["nano"], "seed": [0, 1]},
    "sizes": {"nano": {"ss": {"hidden_dim": 16, "num_heads": 1, "depth": 1, "patch_size": 4},
                       "ms": {"hidden_dim": 8, "num_heads": 1, "depths": [1, 1, 1, 1], "patch_size": 1}}},
}


def spec(**changes):
    d = copy.deepcopy(BASE)
    for path, value in changes.items():
        *parents, leaf = path.split("__")
        node = d
        for p in parents:
            node = node[p]
        if value is None:
            node.pop(leaf, None)
        else:
            node[leaf] = value
    return d


def test_presets_load_and_expand():
    assert {"cpu-mini", "cpu-ablations", "paper"} <= set(list_presets())
    mini = load_study("cpu-mini")
    assert {(r.family, r.layout) for r in mini.runs} == {(f, l) for f in ("conv", "attn", "mlp") for l in ("ss", "ms")}
    assert len({r.seed for r in mini.runs}) >= 2
    paper = load_study("paper")
    assert paper.launcher["kind"] == "torchrun" and paper.recipe["epochs"] == 300
    assert "spach_ms_s_plus_patch4_224_hybrid" in {r.model for r in paper.runs}
    assert len(paper.runs) == 21  # 18 family x layout x size + hybrid XS, S, S+
    ablations = load_study("cpu-ablations")
    assert {(r.cpe, r.shared) for r in ablations.runs if r.family == "mlp"} == {
        (True, False), (False, False), (True, True), (False, True)}


def test_grid_expansion_keys_and_names():
    study = parse_study(spec())
    assert [r.name for r in study.runs] == ["conv-ss-nano-s0", "conv-ss-nano-s1", "conv-ms-nano-s0",
                                            "conv-ms-nano-s1", "attn-ss-nano-s0", "attn-ss-nano-s1",
                                            "attn-ms-nano-s0", "attn-ms-nano-s1"]
    assert len({r.key for r in study.runs}) == 8
    again = parse_study(spec())
    assert [r.key for r in again.runs] == [r.key for r in study.runs]  # keys are stable
    changed = parse_study(spec(recipe__epochs=3))
    assert not {r.key for r in changed.runs} & {r.key for r in study.runs}  # ... and depend on the recipe
    ms_attn = next(r for r in study.runs if r.name == "attn-ms-nano-s0")
    assert ms_attn.model_kwargs["net_arch"] == [[["conv", 1]], [["attn", 1]], [["attn", 1]], [["attn", 1]]]
    assert ms_attn.train["seed"] == 0 and ms_attn.train["img_size"] == 16 and ms_attn.train["data"] == "mnist5k"


def test_meaningless_combinations_are_skipped_with_reasons():
    sizes = copy.deepcopy(BASE["sizes"])
    sizes["nano"]["ms"]["hybrid_attn"] = [0, 0, 1, 1]
    study = parse_study(spec(grid={"family": ["conv", "mlp", "hybrid"], "layout": ["ss", "ms"], "size": ["nano"],
                                   "cpe": [True, False], "shared": [False, True]}, sizes=sizes))
    skipped = dict(study.skipped)
    assert "depthwise conv" in skipped["conv-ms-nano-nocpe"]
    assert "no spatial module to share" in skipped["conv-ss-nano-shared"]
    assert "multi-stage layout only" in skipped["hybrid-ss-nano"]
    assert "hybrid-ms-nano" not in skipped
    hybrid = next(r for r in study.runs if r.group == "hybrid-ms-nano")
    assert hybrid.model_kwargs["net_arch"] == [[["conv", 1]], [["conv", 1]], [["attn", 1]], [["attn", 1]]]
    mlp_groups = {r.group for r in study.runs if r.family == "mlp"}
    assert mlp_groups == {"mlp-ss-nano", "mlp-ss-nano-nocpe", "mlp-ss-nano-shared", "mlp-ss-nano-nocpe-shared",
                          "mlp-ms-nano", "mlp-ms-nano-nocpe", "mlp-ms-nano-shared", "mlp-ms-nano-nocpe-shared"}
    nocpe = next(r for r in study.runs if r.group == "mlp-ms-nano-nocpe-shared")
    assert nocpe.model_kwargs["cpe"] is False and nocpe.model_kwargs["shared_spatial_func"] is True


def test_zoo_sizes_and_extra_entries():
    study = parse_study(spec(grid={"family": ["hybrid", "attn"], "layout": ["ms"], "size": ["xxs", "xs"]},
                             extra=["spach_ms_s_plus_patch4_224_hybrid",
                                    {"name": "mine", "layout": "ms", "hidden_dim": 8, "num_heads": 1, "patch_size": 1,
                                     "net_arch": [[["pass", 1]], [["attn", 1]], [["mlp", 1]], [["attn", 1]]],
                                     "seeds": [3]}]))
    models = {r.name: r.model for r in study.runs}
    assert models["hybrid-ms-xs-s0"] == "spach_ms_xs_patch4_224_hybrid"
    assert models["attn-ms-xxs-s0"] == "spach_ms_xxs_patch4_224_attn"
    assert "zoo has no XXS hybrid" in dict(study.skipped)["hybrid-ms-xxs"]
    plus = next(r for r in study.runs if r.model == "spach_ms_s_plus_patch4_224_hybrid")
    assert (plus.family, plus.layout, plus.size) == ("hybrid", "ms", "s_plus")
    mine = next(r for r in study.runs if r.name == "mine-s3")
    assert mine.family == "hybrid" and mine.model_kwargs["net_arch"][0] == [["conv", 1]]


@pytest.mark.parametrize("changes, message", [
    ({"colour": "red"}, "unknown key(s) ['colour']"),
    ({"grid__family": ["conv", "cnn"]}, "unknown family 'cnn'"),
    ({"grid__layout": ["multi"]}, "unknown layout 'multi'"),
    ({"grid__size": ["huge"]}, "unknown size 'huge'"),
    ({"grid__seed": [0, -1]}, "seeds must be non-negative integers"),
    ({"grid__seed": [0, 0]}, "repeated values"),
    ({"grid__family": []}, "grid.family is empty"),
    ({"grid__depth": [1]}, "unknown axis"),
    ({"grid__cpe": ["no"]}, "grid.cpe must be a list of true/false"),
    ({"grid__family": ["conv"], "grid__cpe": [False]}, "the study has no runs"),
    ({"recipe__lr_typo": 1.0}, "lr_typo"),
    ({"recipe__seed": 3}, "set by the study itself"),
    ({"recipe__epochs": 0}, "epochs"),
    ({"measure": {"dtype": "int8"}}, "measure.dtype"),
    ({"measure": {"batchsize": 8}}, "measure: unknown key(s) ['batchsize']"),
    ({"launcher": {"kind": "kubernetes"}}, "launcher.kind"),
    ({"launcher": {"kind": "slurm", "nodes": 0}}, "launcher.nodes"),
    ({"launcher": {"kind": "slurm", "sbatch": {"output": "x.log"}}}, "set by the slurm launcher"),
    ({"launcher": {"kind": "slurm", "setup": "module load cuda"}}, "launcher.setup"),
    ({"runs_dir": ""}, "runs_dir"),
    ({"threads": 0}, "threads must be a positive integer or null (torch threads per run"),
    ({"img_size": 4}, "img_size must be an integer >= 8 (the input size of every run, in pixels), got 4"),
    ({"runs_dir": "  "}, "runs_dir must be a non-empty string or null"),
    ({"sizes__nano__ms__depths": [1, 1]}, "depths must be 4 positive integers"),
    ({"sizes__nano__ss__width": 3}, "unknown key(s) ['width']"),
    ({"sizes__xs": {"ss": {"hidden_dim": 1}}}, "is a zoo size"),
    ({"data": None}, "missing required key(s) ['data']"),
    ({"grid": None}, "missing required key 'grid' (or give `extra:` entries)"),
    ({"extra": [{"model": "spach_ms_xxs_patch4_224_conv", "cpe": False}]}, "CPE cannot be removed"),
    ({"extra": [{"model": "spach_ms_xs_patch4_224_hybrid", "shared": True}]},
     "stage 2 uses conv (conv has no spatial module to share"),
    ({"extra": [{"name": "x", "layout": "ms", "net_arch": [[["attn", 1]], [["attn", 1]], [["attn", 1]],
                                                            [["attn", 1]]]}]}, "stage 1 of a multi-stage"),
    ({"extra": [{"name": "x", "layout": "ss", "net_arch": [["transformer", 2]]}]}, "unknown mixer"),
    ({"extra": [{"model": "resnet50"}]}, "spach zoo name"),
])
def test_validation_errors(changes, message):
    with pytest.raises(ValueError) as info:
        parse_study(spec(**changes), where="bad.yaml")
    assert message in str(info.value) and str(info.value).startswith("bad.yaml")


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(FileNotFoundError, match="no preset of that name"):
        load_study(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed\n")
    with pytest.raises(ValueError, match="not valid YAML"):
        load_study(bad)
    bad.write_text("- just\n- a list\n")
    with pytest.raises(ValueError, match="must be a YAML mapping"):
        load_study(bad)


def test_duplicate_configurations_rejected():
    with pytest.raises(ValueError, match="same configuration"):
        parse_study(spec(grid={"family": ["attn"], "layout": ["ms"], "size": ["xxs"]},
                         extra=[{"model": "spach_ms_xxs_patch4_224_attn", "name": "again"}]))


def test_worker_and_torchrun_commands(tmp_path):
    local = worker_command(tmp_path, "abc", 2)
    assert local[1:] == ["-m", "spach.battle.worker", str(tmp_path), "abc", "--threads", "2"]
    study = parse_study(dict(BASE, launcher={"kind": "torchrun", "nproc_per_node": 8, "args": ["--max-restarts=1"]}))
    prefix = TorchrunLauncher(study, tmp_path).command_prefix()
    tr = worker_command(tmp_path, "abc", None, prefix)
    assert tr[1:] == ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=8", "--max-restarts=1",
                      "-m", "spach.battle.worker", str(tmp_path), "abc"]


def test_the_statistics_section_is_checked_by_its_schema():
    from test_battle_run import micro

    assert load_study(micro()).statistics == {"alpha": 0.05, "margin": 1.0, "loss_margin": None, "power": 0.8,
                                              "min_effect": None}
    with pytest.raises(ValueError, match=r"statistics.alpha must be a positive number below 0.5 .*got 0.7"):
        load_study(micro(statistics={"alpha": 0.7}))
    with pytest.raises(ValueError, match=r"statistics.power must be a positive number below 1 .*got 1.0"):
        load_study(micro(statistics={"power": 1.0}))
    with pytest.raises(ValueError, match=r"statistics: unknown key\(s\) \['alpah'\]"):
        load_study(micro(statistics={"alpah": 0.01}))
