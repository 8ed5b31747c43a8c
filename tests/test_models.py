"""The model library: exact to the original release, the timm face, clear errors."""
import json
from pathlib import Path

import pytest
import timm
import torch

import spach
from spach.models import ZOO, Spach, SpachMS, checkpoint_filter_fn, count_macs, count_params
from helpers import assert_checkpointing_keeps_gradients

DATA = Path(__file__).parent / "data"
CASES = sorted((DATA / "cases").glob("*.pt"))
OFFICIAL = json.loads((DATA / "official_models.json").read_text())


def official_entry(name):
    return OFFICIAL["spach_ms_s_patch4_224_hybrid+conv4_stem" if "plus" in name else name]


def tiny_ms(mixer="attn", **kw):
    arch = [[("conv", 1)], [(mixer, 1)], [(mixer, 2)], [(mixer, 1)]]
    return SpachMS(img_size=64, hidden_dim=8, num_heads=2, num_classes=5, net_arch=arch, **kw)


def tiny_ss(mixer="attn", **kw):
    return Spach(img_size=32, patch_size=8, hidden_dim=16, num_heads=2, num_classes=5, net_arch=[(mixer, 2)], **kw)


# ---------------------------------------------------------------- exactness
@pytest.mark.parametrize("case", CASES, ids=[c.stem for c in CASES])
def test_reference_case_reproduces_original_outputs(case):
    ref = torch.load(case, weights_only=True)
    cls = {"Spach": Spach, "SpachMS": SpachMS}[ref["class"]]
    model = cls(**ref["kwargs"]).eval()
    spach.load_checkpoint(model, {"model": ref["state_dict"]})
    with torch.no_grad():
        features = model.forward_features(ref["input"])
        logits = model.forward_head(features)
    assert features.flatten(1, 2).shape == ref["features"].shape
    assert (features.flatten(1, 2) - ref["features"]).abs().max() <= 1e-5
    assert (logits - ref["logits"]).abs().max() <= 1e-5


def test_reference_case_through_timm_pretrained_file(tmp_path):
    ref = torch.load(DATA / "cases" / "ms_hybrid_conv4.pt", weights_only=True)
    path = tmp_path / "spach_ms_hybrid_s+.pth"
    torch.save({"model": ref["state_dict"], "epoch": 299}, path)  # the original release's file layout
    kw = {k: v for k, v in ref["kwargs"].items()}
    model = timm.create_model("spach_ms_s_plus_patch4_224_hybrid", pretrained=True,
                              pretrained_cfg_overlay=dict(file=str(path), num_classes=10), **kw).eval()
    with torch.no_grad():
        assert (model(ref["input"]) - ref["logits"]).abs().max() <= 1e-5


@pytest.mark.parametrize("name", list(ZOO))
def test_zoo_params_and_original_layout(name):
    entry = official_entry(name)
    with torch.device("meta"):
        model = timm.create_model(name)
    assert count_params(model) == entry["params"]
    # every key of the original checkpoint maps onto this model with its shape, and nothing is left over
    original = {k: torch.empty(shape, device="meta") for k, shape in entry["state_dict"]}
    mapped = checkpoint_filter_fn(original)
    ours = model.state_dict()
    assert set(mapped) == set(ours)
    for k, v in ours.items():
        assert tuple(mapped[k].shape) == tuple(v.shape), k


@pytest.mark.parametrize("name", ["spach_xs_patch16_224_attn", "spach_ms_xxs_patch4_224_mlp",
                                  "spach_ms_s_patch4_224_hybrid", "spach_ms_s_plus_patch4_224_hybrid"])
def test_zoo_macs_match_original(name):
    with torch.device("meta"):
        model = timm.create_model(name)
    macs = count_macs(model, 224)
    assert abs(macs / official_entry(name)["macs_224"] - 1) < 0.01


def test_macs_counted_on_real_model_equal_meta():
    model = tiny_ms("attn")
    with torch.device("meta"):
        meta = tiny_ms("attn")
    assert count_macs(model, 64) == count_macs(meta, 64) > 0


def test_zoo_registered_in_timm():
    names = set(timm.list_models("spach*"))
    assert set(ZOO) <= names and len(ZOO) == 21
    assert spach.list_models() == list(ZOO)


# ---------------------------------------------------------------- forward / backward
@pytest.mark.parametrize("builder", [tiny_ms, tiny_ss])
@pytest.mark.parametrize("mixer", ["conv", "attn", "mlp", "pass"])
def test_forward_backward_every_mixer(builder, mixer):
    model = builder(mixer, drop_path_rate=0.1, drop_rate=0.1)
    size = model.img_size[0]
    out = model(torch.randn(2, 3, size, size))
    assert out.shape == (2, 5)
    out.logsumexp(-1).sum().backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


def test_hybrid_and_overrides_through_timm():
    model = timm.create_model("spach_ms_xs_patch4_224_hybrid", img_size=64, hidden_dim=8, num_heads=2,
                              num_classes=3, in_chans=1, drop_path_rate=0.2, cpe=False)
    assert model(torch.randn(1, 1, 64, 64)).shape == (1, 3)
    assert all(b.cpe is None for s in model.stages for b in s.blocks)


def test_drop_path_schedules():
    ms = tiny_ms("attn", drop_path_rate=0.3)
    rates = [getattr(b.drop_path, "drop_prob", 0.0) for s in ms.stages for b in s.blocks]
    assert rates[0] == 0.0 and rates[-1] == pytest.approx(0.3)
    assert all(a < b for a, b in zip(rates, rates[1:]))
    ss = tiny_ss("attn", drop_path_rate=0.3)
    assert [b.drop_path.drop_prob for b in ss.stages[0].blocks] == [0.3, 0.3]


def test_initialisation():
    model = tiny_ms("attn")
    assert torch.all(model.head.weight == 0) and torch.all(model.head.bias == 0)
    block = model.stages[1].blocks[0]
    assert torch.allclose(block.gamma, torch.full_like(block.gamma, 1e-4))
    assert torch.all(block.mlp.fc1.bias == 0) and torch.all(block.norm1.weight == 1)
    unscaled = tiny_ms("attn", scaled=False)
    assert unscaled.stages[1].blocks[0].gamma is None


def test_weight_sharing_shares_one_module_per_stage():
    shared, separate = tiny_ms("mlp", shared_spatial_func=True), tiny_ms("mlp")
    blocks = shared.stages[2].blocks
    assert blocks[0].token_mixer is blocks[1].token_mixer
    assert count_params(shared) < count_params(separate)
    ss = tiny_ss("attn", shared_spatial_func=True)
    assert ss.stages[0].blocks[0].token_mixer is ss.stages[0].blocks[1].token_mixer


# ---------------------------------------------------------------- timm face
def test_timm_interface():
    model = tiny_ms("attn")
    x = torch.randn(2, 3, 32, 32)
    feats = model.forward_features(x)
    assert feats.shape == (2, 1, 1, 64) and model.output_fmt == "NHWC"
    assert model.forward_head(feats, pre_logits=True).shape == (2, model.num_features)
    assert model.num_features == model.head_hidden_size == 64
    assert model.get_classifier() is model.head
    model.reset_classifier(7)
    assert model(x).shape == (2, 7)
    model.reset_classifier(0, global_pool="")
    assert model(x).shape == (2, 1, 1, 64)
    assert model.no_weight_decay() == {n for n, _ in model.named_parameters() if n.endswith("gamma")}
    assert len(model.no_weight_decay()) == 4
    cfg = timm.create_model("spach_ms_xxs_patch4_224_mlp", pretrained=False).pretrained_cfg
    assert cfg["fixed_input_size"] and cfg["crop_pct"] == 0.875 and cfg["interpolation"] == "bicubic"


def test_grad_checkpointing_gives_same_gradients():
    torch.manual_seed(0)
    assert_checkpointing_keeps_gradients(tiny_ms("attn"), torch.randn(2, 3, 32, 32))


def test_features_only_multi_stage_backbone():
    backbone = timm.create_model("spach_ms_xxs_patch4_224_attn", features_only=True, img_size=64)
    maps = backbone(torch.randn(1, 3, 64, 64))
    assert [tuple(m.shape) for m in maps] == [(1, 32, 16, 16), (1, 64, 8, 8), (1, 128, 4, 4), (1, 256, 2, 2)]
    assert backbone.feature_info.reduction() == [4, 8, 16, 32]
    assert backbone.feature_info.channels() == [32, 64, 128, 256]
    two = timm.create_model("spach_ms_xxs_patch4_224_conv", features_only=True, out_indices=(1, 2))
    assert [m.shape[1] for m in two(torch.randn(1, 3, 64, 64))] == [128, 256]


def test_forward_intermediates_match_forward():
    model = tiny_ms("attn").eval()
    x = torch.randn(2, 3, 32, 32)
    final, maps = model.forward_intermediates(x)
    assert torch.allclose(final, model.forward_features(x), atol=1e-6)
    assert [m.shape[1] for m in maps] == [8, 16, 32, 64]
    only = model.forward_intermediates(x, indices=[1], intermediates_only=True, stop_early=True)
    assert len(only) == 1 and torch.allclose(only[0], maps[1])


# ---------------------------------------------------------------- input sizes
@pytest.mark.parametrize("mixer", ["conv", "attn"])
def test_conv_and_attention_accept_other_sizes(mixer):
    model = tiny_ms(mixer)  # built for 64x64
    assert model(torch.randn(1, 3, 32, 96)).shape == (1, 5)
    ss = tiny_ss(mixer)
    assert ss(torch.randn(1, 3, 48, 16)).shape == (1, 5)


def test_mlp_model_rejects_other_size_naming_its_size():
    model = tiny_ms("mlp")
    with pytest.raises(ValueError, match="64x64.*32x32"):
        model(torch.randn(1, 3, 32, 32))


def test_token_mlp_needs_at_least_one_hidden_unit():
    with pytest.raises(ValueError, match="1 tokens.*img_size"):
        SpachMS(img_size=32, hidden_dim=8, num_heads=2, net_arch=[[("conv", 1)]] + [[("mlp", 1)]] * 3)


def test_size_not_divisible_by_stride():
    with pytest.raises(ValueError, match="not divisible by the network's total stride 32"):
        tiny_ms("attn")(torch.randn(1, 3, 48, 48))


# ---------------------------------------------------------------- bad configurations
def test_unknown_mixer():
    with pytest.raises(ValueError, match="unknown mixer 'transformer'"):
        Spach(net_arch=[("transformer", 2)], img_size=32, hidden_dim=16, num_heads=2)


def test_heads_must_divide_width():
    with pytest.raises(ValueError, match="num_heads=3 does not divide hidden_dim=16"):
        Spach(net_arch=[("attn", 2)], img_size=32, hidden_dim=16, num_heads=3)


def test_weight_sharing_on_conv_stage_refused():
    with pytest.raises(ValueError, match="stage 1 uses conv"):
        tiny_ss("conv", shared_spatial_func=True)
    with pytest.raises(ValueError, match="stage 2 uses conv"):
        timm.create_model("spach_ms_xs_patch4_224_hybrid", shared_spatial_func=True)


def test_cpe_off_on_conv_only_network_refused():
    with pytest.raises(ValueError, match="cpe=False on a conv-only network"):
        tiny_ms("conv", cpe=False)


def test_malformed_net_arch():
    with pytest.raises(ValueError, match="net_arch stage 2"):
        SpachMS(net_arch=[[("conv", 1)], "attn"], img_size=32, hidden_dim=8, num_heads=2)
    with pytest.raises(ValueError, match="needs net_arch"):
        Spach()


def test_bf16_inference_close_to_fp32():
    torch.manual_seed(0)
    model = tiny_ms("attn").eval()
    for p in model.parameters():  # non-trivial weights: zero head and tiny layer scales hide errors
        p.data.normal_(0, 0.2)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ref = model.forward_features(x)
        out = model.to(torch.bfloat16).forward_features(x.bfloat16()).float()
    assert (out - ref).abs().max() < 0.1 * ref.abs().max()
