"""sMLPNet and ShiftViT of the original release: exact outputs, counts, layouts, loading, timm's face."""
import argparse
import math
import json
import os
import pickle
from pathlib import Path

import pytest
import timm
import torch

import spach
from spach.models import RELEASE_WEIGHTS, RELEASE_ZOO, SMLPNet, ShiftViT, count_macs, count_params, sMLPNet
from spach.models import shiftvit, smlpnet
from helpers import assert_checkpointing_keeps_gradients, getter_and_fx_maps

DATA = Path(__file__).parent / "data"
CASES = sorted((DATA / "release_cases").glob("*.pt"))
RELEASE = json.loads((DATA / "release_models.json").read_text())
CLASSES = {"sMLPNet": SMLPNet, "ShiftViT": ShiftViT}


def case(name):
    return torch.load(DATA / "release_cases" / f"{name}.pt", weights_only=True)


def tiny_smlp(**kw):
    return SMLPNet(dim=8, alpha=2, image_size=32, depths=[1, 1, 2, 1], num_classes=5, **kw)


def tiny_shift(**kw):
    return ShiftViT(embed_dim=8, n_div=4, depths=[1, 1, 2, 1], mlp_ratio=2, img_size=32, num_classes=5, **kw)


# ---------------------------------------------------------------- exactness
@pytest.mark.parametrize("path", CASES, ids=[c.stem for c in CASES])
def test_reference_case_reproduces_the_original_through_a_release_file(path, tmp_path):
    ref = torch.load(path, weights_only=True)
    model = CLASSES[ref["class"]](**ref["kwargs"]).eval()
    file = tmp_path / "release.pth"
    torch.save({"model": ref["state_dict"], "epoch": 299}, file)  # the original release's file layout
    spach.load_checkpoint(model, file)
    with torch.no_grad():
        features = model.forward_features(ref["input"])
        logits = model.forward_head(features)
    assert (logits - ref["logits"]).abs().max() <= 1e-5
    if ref["features"] is not None:  # ShiftViT's original forward_features is the pooled vector
        assert (model.forward_head(features, pre_logits=True) - ref["features"]).abs().max() <= 1e-5


@pytest.mark.parametrize("name", ["smlp_tiny", "shiftvit_gn"])
def test_plain_maths_and_fused_kernels_give_the_same_numbers(name):
    ref = case(name)
    model = spach.load_checkpoint(CLASSES[ref["class"]](**ref["kwargs"]).eval(), ref["state_dict"])
    with torch.no_grad():
        fused = model(ref["input"])
    plain = model(ref["input"])  # autograd on: the plain path
    assert (plain - ref["logits"]).abs().max() <= 1e-5 and (fused - plain).abs().max() <= 1e-5


def test_odd_size_case_runs_shiftvit_at_another_size_than_built():
    ref = case("shiftvit_odd_size")
    assert ref["kwargs"]["img_size"] == 64 and ref["input"].shape[-1] == 96


# ---------------------------------------------------------------- the zoo
def test_release_zoo_registered_in_timm():
    assert set(RELEASE_ZOO) == set(RELEASE) and len(RELEASE_ZOO) == 12
    assert set(RELEASE_ZOO) <= set(timm.list_models("smlpnet_*") + timm.list_models("shiftvit_*"))
    assert spach.models.list_release_models() == list(RELEASE_ZOO)


@pytest.mark.parametrize("name", list(RELEASE))
def test_params_and_original_state_dict_layout(name):
    entry = RELEASE[name]
    with torch.device("meta"):
        model = timm.create_model(name)
    assert type(model).__name__ == {"sMLPNet": "SMLPNet", "ShiftViT": "ShiftViT"}[entry["class"]]
    assert count_params(model) == entry["params"]
    # the original kwargs are our table's
    table = {k: v for k, v in RELEASE_ZOO[name].items() if k != "cls"}
    assert {k: table[k] for k in entry["kwargs"]} == entry["kwargs"]
    # every key of the original checkpoint maps onto this model with its shape, and nothing is left over
    original = {k: torch.empty(shape, device="meta") for k, shape in entry["state_dict"]}
    mapped = (smlpnet if entry["class"] == "sMLPNet" else shiftvit).checkpoint_filter_fn(original)
    ours = model.state_dict()
    assert set(mapped) == set(ours)
    for k, v in ours.items():
        assert tuple(mapped[k].shape) == tuple(v.shape), k


@pytest.mark.parametrize("name", ["smlpnet_tiny", "smlpnet_base", "shiftvit_light_tiny", "shiftvit_r2_base"])
def test_macs_within_one_percent_of_the_original(name):
    with torch.device("meta"):
        model = timm.create_model(name)
    assert abs(count_macs(model, 224) / RELEASE[name]["macs_224"] - 1) < 0.01


def test_pretrained_cfg_names_release_files_urls_and_top1():
    url = "https://github.com/microsoft/SPACH/releases/download/v1.0/"
    files = {"smlpnet_small": "smlp_s.pth", "smlpnet_base": "smlp_b.pth",
             "shiftvit_light_tiny": "shiftvit_tiny_light.pth",
             "shiftvit_r2_tiny": "shiftvit_tiny_r2.pth", "shiftvit_light_small": "shiftvit_small_light.pth",
             "shiftvit_r2_small": "shiftvit_small_r2.pth"}
    for name in RELEASE_ZOO:
        cfg = timm.get_pretrained_cfg(name)
        assert cfg.url == (url + files[name] if name in files else ""), name
        assert (cfg.crop_pct, cfg.interpolation, cfg.classifier) == (0.875, "bicubic", "head")
        assert cfg.fixed_input_size == name.startswith("smlpnet")
        assert RELEASE[name]["release_file"] == files.get(name)
    top1 = {n: t for n, (_, t) in RELEASE_WEIGHTS.items()}
    assert top1 == {"smlpnet_tiny": 81.9, "smlpnet_small": 83.1, "smlpnet_base": 83.4, "shiftvit_light_tiny": 79.4,
                    "shiftvit_r2_tiny": 81.7, "shiftvit_light_small": 81.6, "shiftvit_r2_small": 82.8}
    assert "83.1" in timm.get_pretrained_cfg("smlpnet_small").notes[0]


# ---------------------------------------------------------------- constructor keywords and overrides
def test_original_constructor_keywords_and_positions():
    pos = sMLPNet(3, 8, 2, 7, 4, 32, [1, 1, 1, 1], 0.2)
    assert pos.img_size == (32, 32) and pos.num_classes == 7 and pos.drop_path_rate == 0.2
    kw = ShiftViT(n_div=4, img_size=32, patch_size=4, embed_dim=8, depths=(1, 1, 1, 1), mlp_ratio=2., drop_rate=0.1,
                  drop_path_rate=0.2, norm_layer="BN", act_layer="RELU", num_classes=3)
    assert isinstance(kw.norm, torch.nn.BatchNorm2d) and isinstance(kw.stages[0].blocks[0].mlp.act, torch.nn.ReLU)
    assert kw(torch.randn(2, 3, 32, 32)).shape == (2, 3)
    with pytest.raises(ValueError, match="unknown norm_layer 'LN'"):
        ShiftViT(norm_layer="LN")
    with pytest.raises(ValueError, match="dp_rate=0.1 and drop_path_rate=0.2"):
        SMLPNet(dp_rate=0.1, drop_path_rate=0.2)


@pytest.mark.parametrize("name", ["smlpnet_small", "shiftvit_r2_small"])
def test_timm_overrides_reach_the_model(name):
    img = 64
    model = timm.create_model(name, num_classes=3, drop_path_rate=0.05, img_size=img, in_chans=1,
                              depths=[1, 1, 2, 1])
    first_conv = model.stem if name.startswith("smlp") else model.stem.proj
    assert first_conv.weight.shape[1] == 1
    rates = [getattr(b.drop_path, "drop_prob", 0.0) for s in model.stages for b in s.blocks]
    assert rates[0] == 0.0 and rates[-1] == pytest.approx(0.05)
    assert model(torch.randn(2, 1, img, img)).shape == (2, 3)
    assert timm.create_model("smlpnet_tiny", image_size=64).img_size == (64, 64)  # the original's spelling


def test_factories_keep_the_original_drop_path_rates():
    with torch.device("meta"):
        rates = {n: max(getattr(b.drop_path, "drop_prob", 0.0) for s in timm.create_model(n).stages for b in s.blocks)
                 for n in ("smlpnet_tiny", "smlpnet_base", "shiftvit_light_small", "shiftvit_r2_base")}
    assert rates == pytest.approx({"smlpnet_tiny": 0.0, "smlpnet_base": 0.3, "shiftvit_light_small": 0.4,
                                   "shiftvit_r2_base": 0.6})


# ---------------------------------------------------------------- input sizes
def test_shiftvit_takes_any_size_the_strides_allow_and_names_the_stride_otherwise():
    model = tiny_shift().eval()
    assert model(torch.randn(1, 3, 64, 96)).shape == (1, 5)
    with pytest.raises(ValueError, match="input size 48x48 is not divisible by the network's total stride 32"):
        model(torch.randn(1, 3, 48, 48))


def test_smlpnet_names_the_size_it_was_built_for():
    with pytest.raises(ValueError, match="built for 32x32 input and got 64x64; build it with img_size=\\(64, 64\\)"):
        tiny_smlp()(torch.randn(1, 3, 64, 64))
    with pytest.raises(ValueError, match="leaves no tokens at stage 4"):
        SMLPNet(image_size=16, depths=[1, 1, 1, 1])


# ---------------------------------------------------------------- timm face
@pytest.mark.parametrize("build", [tiny_smlp, tiny_shift])
def test_timm_face(build):
    model = build().eval()
    x = torch.randn(2, 3, 32, 32)
    feats = model.forward_features(x)
    assert feats.shape == (2, 1, 1, 64) and model.output_fmt == "NHWC"
    assert model.forward_head(feats, pre_logits=True).shape == (2, 64) == (2, model.num_features)
    assert model.get_classifier() is model.head
    model.reset_classifier(7)
    assert model(x).shape == (2, 7)
    model.reset_classifier(0, global_pool="")
    assert model(x).shape == (2, 1, 1, 64)
    final, maps = build().eval().forward_intermediates(x)
    assert [tuple(m.shape) for m in maps] == [(2, 8, 8, 8), (2, 16, 4, 4), (2, 32, 2, 2), (2, 64, 1, 1)]


@pytest.mark.parametrize("build", [tiny_smlp, tiny_shift])
def test_forward_intermediates_match_forward(build):
    torch.manual_seed(0)
    model = build().eval()
    x = torch.randn(2, 3, 32, 32)
    final, maps = model.forward_intermediates(x)
    assert torch.allclose(final, model.forward_features(x), atol=1e-6)
    only = model.forward_intermediates(x, indices=[1], intermediates_only=True, stop_early=True)
    assert len(only) == 1 and torch.allclose(only[0], maps[1])


@pytest.mark.parametrize("name,channels", [("smlpnet_tiny", [80, 160, 320, 640]),
                                           ("shiftvit_light_tiny", [96, 192, 384, 768])])
def test_features_only_gives_four_maps(name, channels):
    backbone = timm.create_model(name, features_only=True, img_size=64, depths=[1, 1, 1, 1])
    maps = backbone(torch.randn(1, 3, 64, 64))
    assert [tuple(m.shape) for m in maps] == [(1, c, 16 // 2 ** i, 16 // 2 ** i) for i, c in enumerate(channels)]
    assert backbone.feature_info.reduction() == [4, 8, 16, 32] and backbone.feature_info.channels() == channels


@pytest.mark.parametrize("build", [tiny_smlp, tiny_shift])
def test_grad_checkpointing_gives_same_gradients(build):
    torch.manual_seed(0)
    assert_checkpointing_keeps_gradients(build(), torch.randn(2, 3, 32, 32))


# ---------------------------------------------------------------- loading
def test_original_training_checkpoint_with_namespace_loads_weights_only(tmp_path):
    ref = case("shiftvit_gn")
    args = argparse.Namespace(model="shiftvit_tiny", lr=1e-3, aa="rand-m9-mstd0.5-inc1", epochs=300)
    path = tmp_path / "checkpoint.pth"
    torch.save({"model": ref["state_dict"], "optimizer": {}, "epoch": 299, "args": args}, path)
    model = spach.load_checkpoint(ShiftViT(**ref["kwargs"]).eval(), path)
    with torch.no_grad():
        assert (model(ref["input"]) - ref["logits"]).abs().max() <= 1e-5


class _Evil:
    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_malicious_checkpoint_is_refused_and_never_run(tmp_path):
    evil = _Evil()
    evil.marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    with open(path, "wb") as f:
        pickle.dump({"model": {}, "args": evil}, f, protocol=2)
    torch.save({"model": case("smlp_tiny")["state_dict"], "args": evil}, tmp_path / "evil2.pth")
    for p in (path, tmp_path / "evil2.pth"):
        with pytest.raises(ValueError, match="refusing to load"):
            spach.load_checkpoint(tiny_smlp(), p)
    assert not evil.marker.exists()


def test_bare_state_dict_safetensors_and_timm_pretrained_file(tmp_path):
    ref = case("smlp_tiny")
    model = spach.load_checkpoint(SMLPNet(**ref["kwargs"]).eval(), ref["state_dict"])  # bare, original layout
    spach.save_safetensors(model, tmp_path / "m.safetensors")
    again = spach.load_checkpoint(SMLPNet(**ref["kwargs"]).eval(), tmp_path / "m.safetensors")
    args = argparse.Namespace(model="smlp_s", dp_rate=0.2)  # as a training checkpoint of the original carries
    torch.save({"model": ref["state_dict"], "args": args}, tmp_path / "smlp_s.pth")
    kw = {k: v for k, v in ref["kwargs"].items() if k != "num_classes"}
    overlay = dict(file=str(tmp_path / "smlp_s.pth"), num_classes=10)  # else timm drops the classifier
    via_timm = timm.create_model("smlpnet_small", pretrained=True, num_classes=10, drop_path_rate=0.0,
                                 pretrained_cfg_overlay=overlay, **kw).eval()
    with torch.no_grad():
        for m in (again, via_timm):
            assert (m(ref["input"]) - ref["logits"]).abs().max() <= 1e-5


def test_mismatched_checkpoint_names_model_and_keys():
    ref = case("shiftvit_gn")
    with pytest.raises(ValueError, match="cannot load .*shiftvit_light_tiny.*shape mismatch"):
        spach.load_checkpoint(timm.create_model("shiftvit_light_tiny", img_size=64), {"model": ref["state_dict"]})


# ---------------------------------------------------------------- everywhere else
def test_spach_models_lists_them_with_family_params_macs_and_top1(capsys):
    from spach.cli.main import main as cli

    assert cli(["models", "--filter", "_tiny", "--json"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert set(rows) == {"smlpnet_tiny", "shiftvit_light_tiny", "shiftvit_r4_tiny", "shiftvit_r2_tiny"}
    assert rows["smlpnet_tiny"]["family"] == "smlp-net" and rows["shiftvit_r2_tiny"]["family"] == "shift-vit"
    assert rows["shiftvit_r2_tiny"]["params"] == RELEASE["shiftvit_r2_tiny"]["params"]
    assert rows["smlpnet_tiny"]["gmacs"] == pytest.approx(RELEASE["smlpnet_tiny"]["macs_224"] / 1e9, rel=0.01)
    assert (rows["smlpnet_tiny"]["top1"], rows["shiftvit_r4_tiny"]["top1"]) == (81.9, None)


def test_bench_knows_the_release_group():
    from spach.bench import create_model, resolve_models

    assert resolve_models(["release"]) == list(RELEASE_ZOO)
    assert create_model("smlpnet_tiny", img_size=64).img_size == (64, 64)  # fixed size: built for the bench size


def test_battle_accepts_them_as_extra_entries_by_name():
    from spach.battle.spec import parse_study

    recipe = {"epochs": 1, "warmup_epochs": 0, "cooldown_epochs": 0}
    study = parse_study({"name": "release", "data": "mnist5k", "img_size": 32, "recipe": recipe,
                         "extra": ["smlpnet_tiny", {"model": "shiftvit_r2_small", "seeds": [0, 1],
                                                    "model_kwargs": {"embed_dim": 16, "depths": [1, 1, 1, 1]}},
                                   "spach_ms_xxs_patch4_224_conv"]})
    runs = {(r.model, r.seed): r for r in study.runs}
    assert [(r.family, r.layout, r.size) for r in study.runs] == [
        ("smlp-net", "ms", "tiny"), ("shift-vit", "ms", "r2_small"), ("shift-vit", "ms", "r2_small"),
        ("conv", "ms", "xxs")]
    assert runs[("shiftvit_r2_small", 1)].model_kwargs == {"embed_dim": 16, "depths": [1, 1, 1, 1], "img_size": 32}
    with pytest.raises(ValueError, match=r"\['cpe'\] are SPACH settings; smlpnet_tiny"):
        parse_study({"name": "x", "data": "mnist5k", "img_size": 32, "recipe": recipe,
                     "extra": [{"model": "smlpnet_tiny", "cpe": False}]})


@pytest.mark.parametrize("model,kwargs", [
    ("smlpnet_tiny", {"dim": 8, "depths": [1, 1, 1, 1]}),
    ("shiftvit_light_tiny", {"embed_dim": 8, "n_div": 4, "depths": [1, 1, 1, 1]})])
def test_one_epoch_of_training_through_the_engine(tmp_path, model, kwargs):
    from spach.engine import TrainConfig, train

    cfg = TrainConfig.from_dict(dict(
        model=model, model_kwargs=kwargs, data="mnist5k", img_size=32, threads=1, workers=0, tensorboard=False,
        epochs=1, warmup_epochs=0, cooldown_epochs=0, batch_size=16, max_train_samples=64, max_val_samples=32,
        lr=2e-3, output=str(tmp_path / "run")))
    r = train(cfg)
    assert len(r["history"]) == 1 and math.isfinite(r["history"][0]["train_loss"])
    # the exported weights load into a fresh model and give the run's evaluation
    fresh = spach.create_model(model, num_classes=10, img_size=32, **kwargs)
    spach.load_checkpoint(fresh, r["weights"])
    from spach.engine import evaluate

    m = evaluate(fresh, "mnist5k", img_size=32, max_samples=32)
    assert m["top1"] == pytest.approx(r["final_top1"])


@pytest.mark.slow
def test_a_battle_puts_the_three_projects_side_by_side(tmp_path):
    import sqlite3

    from spach.battle import run_study

    recipe = {"epochs": 1, "batch_size": 16, "lr": 2e-3, "warmup_epochs": 0, "cooldown_epochs": 0,
              "max_train_samples": 64, "max_val_samples": 32, "mixup": 0.0, "cutmix": 0.0, "augment": False,
              "repeated_aug": False, "model_ema": False, "workers": 0, "tensorboard": False}
    study = {"name": "release", "data": "mnist5k", "img_size": 32, "recipe": recipe,
             "measure": {"batch_size": 4, "warmup": 1, "repeats": 1},
             "extra": [{"model": "spach_ms_xxs_patch4_224_conv", "model_kwargs": {"hidden_dim": 8}},
                       {"model": "smlpnet_tiny", "model_kwargs": {"dim": 8, "depths": [1, 1, 1, 1]}},
                       {"model": "shiftvit_light_tiny",
                        "model_kwargs": {"embed_dim": 8, "n_div": 4, "depths": [1, 1, 1, 1]}}]}
    result = run_study(study, tmp_path, quiet=True, threads=1)
    assert result["done"] == 3 and result["failed"] == 0
    conn = sqlite3.connect(tmp_path / "battle.db")
    families = {r[0]: (r[1], r[2]) for r in conn.execute("SELECT model, family, status FROM runs")}
    conn.close()
    assert families == {"spach_ms_xxs_patch4_224_conv": ("conv", "done"), "smlpnet_tiny": ("smlp-net", "done"),
                        "shiftvit_light_tiny": ("shift-vit", "done")}
    report = (tmp_path / "report.md").read_text()
    assert "| smlp-net | MS | tiny |" in report and "| shift-vit | MS | light_tiny |" in report


# ---------------------------------------------------------------- tools that read the model
@pytest.mark.parametrize("build", [tiny_smlp, tiny_shift])
def test_torchscript_fx_and_export_give_the_eager_logits(build):
    from timm.models import create_feature_extractor

    torch.manual_seed(0)
    model, x = build().eval(), torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        eager = model(x)
        torch.testing.assert_close(torch.jit.script(model)(x), eager, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(create_feature_extractor(model, {"head": "logits"})(x)["logits"], eager,
                                   rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(torch.export.export(model, (x,)).module()(x), eager, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["smlpnet_tiny", "shiftvit_light_tiny"])
def test_fx_feature_extraction_gives_the_getter_maps(name):
    maps, fx_maps, _ = getter_and_fx_maps(name, torch.randn(1, 3, 64, 64), img_size=64, depths=[1, 1, 1, 1])
    assert len(fx_maps) == len(maps) == 4
    for m, f in zip(maps, fx_maps):
        torch.testing.assert_close(f.permute(0, 3, 1, 2), m, rtol=1e-5, atol=1e-5)
