"""Kernel choice: the fast CPU paths give the plain path's numbers and never break a tool."""
import pytest
import timm
import torch
from timm.layers import set_scriptable
from timm.models._features_fx import create_feature_extractor

import spach  # noqa: F401  (registers the zoo)
from spach.models import kernels
from helpers import getter_and_fx_maps, randomised

pytestmark = pytest.mark.usefixtures("one_thread")

# one model per code path: conv, attention, token MLP, single-stage, hybrid with the conv4 stem
NAMES = ["spach_ms_xxs_patch4_224_conv", "spach_ms_xxs_patch4_224_attn", "spach_ms_xxs_patch4_224_mlp",
         "spach_xxs_patch16_224_attn", "spach_ms_s_plus_patch4_224_hybrid"]
TINY = dict(hidden_dim=16, num_heads=2, img_size=64)


def tiny(name, **kw):
    torch.manual_seed(0)
    return randomised(timm.create_model(name, **{**TINY, **kw}))


def plain(model, x):
    kernels.set_fused_kernels(False)
    try:
        with torch.no_grad():
            return model(x)
    finally:
        kernels.set_fused_kernels(True)


@pytest.mark.parametrize("name", NAMES)
def test_fused_and_plain_paths_give_the_same_logits_in_fp32(name):
    model, x = tiny(name), torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        fused = model(x)
    torch.testing.assert_close(fused, plain(model, x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", NAMES)
def test_fused_and_plain_paths_agree_in_bf16(name):
    model, x = tiny(name).to(torch.bfloat16), torch.randn(2, 3, 64, 64, dtype=torch.bfloat16)
    with torch.no_grad():
        fused = model(x).float()
    ref = plain(model, x).float()
    # bf16 keeps 8 bits of mantissa: compare relative to the logits' scale
    assert (fused - ref).abs().max() <= 0.02 * ref.abs().max() + 1e-3


@pytest.mark.parametrize("name", NAMES[:3])
def test_fused_and_plain_paths_agree_under_bf16_autocast(name):
    model, x = tiny(name), torch.randn(2, 3, 64, 64)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        fused = model(x).float()
    kernels.set_fused_kernels(False)
    try:
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            ref = model(x).float()
    finally:
        kernels.set_fused_kernels(True)
    torch.testing.assert_close(fused, ref)


def test_fast_paths_are_off_while_a_tool_reads_the_model():
    x = torch.randn(1, 4, 4, 8)
    with torch.no_grad():
        assert kernels.use_fused_mlp(x, training=False) == kernels.HAS_ONEDNN_LINEAR
        assert not kernels.use_fused_mlp(x, training=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert not kernels.use_fused_mlp(x, training=False)
        with set_scriptable(True):
            assert not kernels.use_fused_mlp(x, training=False)
        kernels.set_fused_kernels(False)
        try:
            assert not kernels.use_fused_mlp(x, training=False)
        finally:
            kernels.set_fused_kernels(True)
    assert not kernels.use_fused_mlp(x, training=False)  # autograd on: plain path


def test_bf16_attention_on_cpu_takes_the_plain_matmuls():
    q = torch.randn(1, 2, 4, 8)
    assert kernels.use_sdpa(q, True) and not kernels.use_sdpa(q, False)
    assert not kernels.use_sdpa(q.bfloat16(), True)


@pytest.mark.parametrize("name", NAMES)
def test_torchscript_gives_the_eager_logits(name):
    model, x = tiny(name), torch.randn(2, 3, 64, 64)
    with set_scriptable(True):
        scripted_src = timm.create_model(name, **TINY).eval()
    scripted_src.load_state_dict(model.state_dict())
    scripted = torch.jit.script(scripted_src)
    with torch.no_grad():
        torch.testing.assert_close(scripted(x), model(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", NAMES)
def test_fx_graph_runs_forward_and_backward(name):
    model, x = tiny(name), torch.randn(2, 3, 64, 64)
    graph = create_feature_extractor(model, return_nodes={"head": "logits"})
    with torch.no_grad():
        torch.testing.assert_close(graph(x)["logits"], model(x), rtol=1e-5, atol=1e-5)
    graph.train()
    graph(x)["logits"].sum().backward()
    assert all(p.grad is not None for p in graph.parameters() if p.requires_grad)


@pytest.mark.parametrize("name", NAMES)
def test_fx_feature_extraction_gives_the_getter_maps(name):
    maps, fx_maps, fx = getter_and_fx_maps(name, torch.randn(2, 3, 64, 64), **TINY)
    assert fx.output_fmt.name == "NHWC"  # timm's convention for models with NHWC outputs (as Swin)
    assert len(fx_maps) == len(maps) == 4
    for m, f in zip(maps, fx_maps):
        torch.testing.assert_close(f.permute(0, 3, 1, 2), m, rtol=1e-5, atol=1e-5)


def test_fx_graph_still_refuses_a_wrong_input_size():
    model = tiny("spach_ms_xxs_patch4_224_mlp")
    graph = create_feature_extractor(model, return_nodes={"head": "logits"})
    with pytest.raises(ValueError, match="built for 64x64"):
        graph(torch.randn(1, 3, 96, 96))


@pytest.mark.parametrize("name", ["spach_ms_xxs_patch4_224_attn", "spach_ms_xxs_patch4_224_mlp"])
def test_torch_export_under_no_grad_gives_the_eager_logits(name):
    model, x = tiny(name), torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        program = torch.export.export(model, (x,))
        torch.testing.assert_close(program.module()(x), model(x), rtol=1e-5, atol=1e-5)


def grads(model, x, fused, autocast=False):
    """Logits and every parameter's gradient of one training forward/backward."""
    kernels.set_fused_kernels(fused)
    try:
        model.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = model(x)
        out.float().square().mean().backward()
    finally:
        kernels.set_fused_kernels(True)
    return out.detach().float(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("name", NAMES)
def test_training_kernels_give_the_plain_logits_and_gradients(name):
    model, x = tiny(name).train(), torch.randn(2, 3, 64, 64)
    out, g = grads(model, x, fused=True)
    ref_out, ref_g = grads(model, x, fused=False)
    torch.testing.assert_close(out, ref_out, rtol=1e-4, atol=1e-4)
    assert g.keys() == ref_g.keys() and len(g) == len(list(model.parameters()))
    for n in g:
        scale = ref_g[n].abs().max().item() + 1e-6
        torch.testing.assert_close(g[n] / scale, ref_g[n] / scale, rtol=1e-4, atol=1e-4, msg=n)


@pytest.mark.parametrize("name", NAMES[:3])
def test_training_kernels_agree_with_the_plain_path_under_bf16_autocast(name):
    model, x = tiny(name).train(), torch.randn(2, 3, 64, 64)
    out, g = grads(model, x, fused=True, autocast=True)
    ref_out, ref_g = grads(model, x, fused=False, autocast=True)
    assert (out - ref_out).abs().max() <= 0.02 * ref_out.abs().max() + 1e-3
    for n in g:
        assert g[n].dtype == ref_g[n].dtype == torch.float32, n
        assert (g[n] - ref_g[n]).abs().max() <= 0.05 * ref_g[n].abs().max() + 1e-4, n


@pytest.mark.parametrize("threads", [1, 2])  # GEMM kernels split work differently per thread count
def test_onednn_linear_and_token_matmul_match_the_plain_maths(threads):
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    lin = kernels.Linear(8, 5)
    x = torch.randn(2, 3, 4, 8, requires_grad=True)
    out = lin(x)
    assert kernels.use_onednn_linear(x) == kernels.HAS_ONEDNN_LINEAR
    ref = torch.nn.functional.linear(x, lin.weight, lin.bias)
    torch.testing.assert_close(out, ref)
    g = torch.randn_like(out)
    got = torch.autograd.grad(out, (x, lin.weight, lin.bias), g)
    want = torch.autograd.grad(ref, (x, lin.weight, lin.bias), g)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    w = torch.randn(6, 12, requires_grad=True)
    t = torch.randn(3, 12, 5, requires_grad=True)
    out = kernels.token_matmul(w, t)
    ref = torch.matmul(w, t)
    torch.testing.assert_close(out, ref)
    g = torch.randn_like(out)
    for a, b in zip(torch.autograd.grad(out, (w, t), g), torch.autograd.grad(ref, (w, t), g)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    with torch.no_grad():  # inference: the batched GEMM without autograd
        torch.testing.assert_close(kernels.token_matmul(w, t), torch.matmul(w, t))
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast: bf16 product, as torch.matmul's
        out, ref = kernels.token_matmul(w, t), torch.matmul(w, t)
    assert out.dtype == ref.dtype == torch.bfloat16
    torch.testing.assert_close(out, ref)


def test_training_kernels_are_off_while_a_tool_reads_the_model():
    x = torch.randn(2, 4, 8)
    with set_scriptable(True):
        assert not kernels.use_onednn_linear(x) and not kernels.use_token_matmul(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not kernels.use_onednn_linear(x)
    assert not kernels.use_onednn_linear(x.bfloat16())
    kernels.set_fused_kernels(False)
    try:
        assert not kernels.use_onednn_linear(x) and not kernels.use_token_matmul(x)
    finally:
        kernels.set_fused_kernels(True)


def test_compiled_training_step_matches_eager():
    model, x = tiny("spach_ms_xxs_patch4_224_mlp").train(), torch.randn(2, 3, 64, 64)
    ref_out, ref_g = grads(model, x, fused=True)
    compiled = torch.compile(model, fullgraph=True, backend="eager")
    model.zero_grad(set_to_none=True)
    out = compiled(x)
    out.square().mean().backward()
    torch.testing.assert_close(out.detach(), ref_out, rtol=1e-4, atol=1e-4)
    for n, p in model.named_parameters():
        scale = ref_g[n].abs().max().item() + 1e-6
        torch.testing.assert_close(p.grad / scale, ref_g[n] / scale, rtol=1e-4, atol=1e-4, msg=n)
