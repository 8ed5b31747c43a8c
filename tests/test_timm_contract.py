"""What timm's own model tests (tests/test_models.py) ask of a model, over every model spach registers.

Each registered architecture (its layout, mixers, stem) at a reduced width and depth and a small input:
forward, backward, ``forward_features``, TorchScript, torch.fx (timm's tracer settings), fx then
TorchScript (timm's ``test_model_forward_fx_torchscript``), ``features_only`` (timm's getter and its fx
extractor), and timm's factory placement (``device``, ``dtype``) with ``reset_classifier``. Models whose
weights do not fix the input size run at another size than they were built for (96 for 64), so window
attention pads its grids. The zoo's sizes of one architecture are the same network once reduced, so
the compiling checks (TorchScript, fx) run once per distinct reduced architecture (``ARCHITECTURES``:
every layout, mixer sequence, stem and release variant), the others once per registered name.
``tools/timm-model-tests.sh`` (``make timm-tests``) runs timm's file itself on the full-size models.
"""
import json

import pytest
import timm
import torch
from timm import set_scriptable
from timm.models import get_notrace_functions, get_notrace_modules
from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names

import spach
from spach.models import ALL_MODELS, RELEASE_ZOO, SMLPNet, SpachMS

pytestmark = pytest.mark.usefixtures("one_thread")

REGISTERED = spach.list_models(newcomers=True) + spach.models.list_release_models()
BUILD_SIZE = 64
FX_TRACER = dict(leaf_modules=get_notrace_modules(), autowrap_functions=get_notrace_functions(),
                 param_shapes_constant=True)


def tiny_kwargs(name: str) -> dict:
    """The architecture of ``name`` (mixers per stage, stem) with one block per stage entry, narrow, at 64x64."""
    if name in RELEASE_ZOO:
        if RELEASE_ZOO[name]["cls"] is SMLPNet:
            return dict(dim=16, depths=[1, 1, 1, 1], img_size=BUILD_SIZE)
        return dict(embed_dim=24, depths=[1, 1, 1, 1], img_size=BUILD_SIZE)
    entry = ALL_MODELS[name]
    if entry["cls"] is SpachMS:
        arch = [[(mixer, 1) for mixer, _ in stage] for stage in entry["net_arch"]]
    else:  # single-stage: four blocks, the four feature maps of features_only
        arch = [(mixer, 4) for mixer, _ in entry["net_arch"]]
    return dict(hidden_dim=16, num_heads=2, net_arch=arch, img_size=BUILD_SIZE)


def architecture(name: str) -> str:
    """What tells two reduced models apart: class, reduced keywords and the entry's non-size options."""
    entry = {**(RELEASE_ZOO.get(name) or ALL_MODELS[name])}
    options = {k: entry.get(k) for k in ("stem_type", "n_div", "mlp_ratio", "alpha")}
    return json.dumps([entry["cls"].__name__, tiny_kwargs(name), options], sort_keys=True)


# one registered name per distinct reduced architecture (the first, in the registry's order)
ARCHITECTURES = list({architecture(n): n for n in reversed(REGISTERED)}.values())[::-1]


def build(name: str, randomise: bool = True, **kwargs) -> torch.nn.Module:
    """The reduced model, its initial weights drawn from seed 0; with ``randomise`` then every weight from
    N(0, 0.2) (timm zero-inits some heads: every branch non-negligible)."""
    torch.manual_seed(0)
    model = timm.create_model(name, **{**tiny_kwargs(name), **kwargs})
    if randomise:
        for p in model.parameters():
            torch.nn.init.normal_(p, std=0.2)
    return model.eval()


def run_size(model: torch.nn.Module) -> int:
    return BUILD_SIZE if model.pretrained_cfg.get("fixed_input_size") else 96


def images(model: torch.nn.Module, batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, 3, run_size(model), run_size(model), generator=torch.Generator().manual_seed(1))


def fx_model(model: torch.nn.Module, train: bool = False) -> torch.nn.Module:
    """timm's ``_create_fx_model``: torchvision's extractor of the output node, with timm's leaves."""
    train_nodes, eval_nodes = get_graph_node_names(model, tracer_kwargs=FX_TRACER)
    return create_feature_extractor(model, train_return_nodes=[train_nodes[-1]], eval_return_nodes=[eval_nodes[-1]],
                                    tracer_kwargs=FX_TRACER).train(train)


def test_every_registered_model_is_covered():
    assert len(REGISTERED) == len(ALL_MODELS) + len(RELEASE_ZOO) == 48
    assert set(REGISTERED) <= set(timm.list_models())
    assert {architecture(n) for n in ARCHITECTURES} == {architecture(n) for n in REGISTERED}
    assert len(ARCHITECTURES) >= 19  # 3 single-stage, 8 multi-stage mixers, 3 hybrids, sMLPNet, 4 ShiftViTs


@pytest.mark.parametrize("name", REGISTERED)
def test_forward_backward_and_forward_features(name):
    model = build(name, num_classes=5)
    x = images(model)
    with torch.no_grad():
        out = model(x)
        features = model.forward_features(x)
    assert out.shape == (2, 5) and torch.isfinite(out).all()
    assert features.shape[0] == 2 and features.shape[-1] == model.num_features  # NHWC
    torch.testing.assert_close(model.forward_head(features), out)
    model.train()
    model(x).mean().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing, f"no gradient for {missing}"


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_torchscript_gives_the_eager_logits(name):
    model = build(name)
    x = images(model, 1)
    with set_scriptable(True):
        scripted = torch.jit.script(build(name))
    with torch.no_grad():
        torch.testing.assert_close(scripted(x), model(x), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_fx_forward_backward_and_fx_then_torchscript(name):
    model = build(name)
    x = images(model, 1)
    with torch.no_grad():
        expected = model(x)
        torch.testing.assert_close(next(iter(fx_model(model)(x).values())), expected, rtol=1e-4, atol=1e-5)
    graph = fx_model(build(name), train=True)
    next(iter(graph(images(model)).values())).mean().backward()
    assert all(p.grad is not None for p in graph.parameters())
    with set_scriptable(True):
        source = build(name)
    scripted = torch.jit.script(fx_model(source))  # timm's test_model_forward_fx_torchscript
    with torch.inference_mode():
        torch.testing.assert_close(next(iter(scripted(x).values())), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_features_only_getter_and_fx_maps(name):
    # the same initial weights (the wrappers hold different parameter sets: no re-draw after building)
    getter = build(name, randomise=False, features_only=True)
    fx = build(name, randomise=False, features_only=True, feature_cls="fx")
    x = images(getter, 1)
    with torch.no_grad():
        maps, fx_maps = getter(x), fx(x)
    assert len(maps) == len(getter.feature_info.channels()) >= 3
    assert fx.output_fmt.name == "NHWC"  # timm's convention for models with NHWC outputs (as Swin)
    for m, f, channels, reduction in zip(maps, fx_maps, getter.feature_info.channels(),
                                         getter.feature_info.reduction()):
        assert m.shape == (1, channels, -(-x.shape[-2] // reduction), -(-x.shape[-1] // reduction))
        torch.testing.assert_close(f.permute(0, 3, 1, 2), m)


@pytest.mark.parametrize("name", REGISTERED)
def test_factory_placement_and_a_new_classifier_stay_where_the_model_is(name):
    model = timm.create_model(name, device="meta", dtype=torch.float64)
    tensors = [*model.parameters(), *model.buffers()]
    assert all(t.device.type == "meta" for t in tensors)
    assert all(t.dtype == torch.float64 for t in model.parameters())
    assert model.in_chans == model.pretrained_cfg["input_size"][0]
    model.eval().reset_classifier(3)
    head = model.get_classifier()
    assert head.weight.device.type == "meta" and head.weight.dtype == torch.float64 and not head.training
    with pytest.raises(TypeError):
        timm.create_model(name, device="meta", not_a_model_arg=1)
