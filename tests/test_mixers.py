"""The arena's five newcomers (pool, shift, smlp, gfilter, window) against plain reference implementations,
their fixed-size errors, the attention protocol, TorchScript / fx / export, and the zoo's sizing."""
import pytest
import timm
import torch
from timm.layers import set_scriptable
from timm.models._features_fx import create_feature_extractor

import spach  # noqa: F401  (registers the zoo and the mixers)
from spach.models import ALL_MODELS, NEWCOMERS, SpachMS, count_params, get_mixer
from spach.models import mixers
from spach.models.mixers import GlobalFilter, Pooling, Shift, WindowAttention, pad_to_windows, window_merge
from spach.models.ops import SparseMLP

pytestmark = pytest.mark.usefixtures("one_thread")

NEWCOMER_MIXERS = ["pool", "shift", "smlp", "gfilter", "window"]
CONTEXT = dict(num_heads=2, grid_size=(8, 8), token_ratio=0.5, qkv_bias=True, qk_scale=None, attn_drop=0.0,
               drop=0.0, block_index=0, stage_index=1, stage_depth=2, shared=False)


def build(name, dim=24, **context):
    torch.manual_seed(0)
    return get_mixer(name).build(dim, dict(CONTEXT, **context), {"window_size": 4} if name == "window" else None)


# ---------------------------------------------------------------- shape and gradients

@pytest.mark.parametrize("name", NEWCOMER_MIXERS)
def test_output_shape_and_gradients(name):
    mixer = build(name)
    x = torch.randn(2, 8, 8, 24, requires_grad=True)
    out = mixer(x)
    assert out.shape == x.shape
    (out * torch.randn_like(out)).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in mixer.parameters())
    assert (sum(p.numel() for p in mixer.parameters()) == 0) == (name in ("pool", "shift"))


@pytest.mark.parametrize("name", NEWCOMER_MIXERS)
def test_in_the_multi_stage_model_forward_backward_and_registry_metadata(name):
    net = SpachMS(hidden_dim=12, num_heads=1, img_size=32, patch_size=2, num_classes=5,
                  net_arch=[[("conv", 1)], [(name, 2)], [(name, 1)], [(name, 1)]],
                  mixer_kwargs={"window": {"window_size": 4}})
    out = net(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 5)
    out.sum().backward()
    assert net.fixed_input_size == (name in ("smlp", "gfilter")) == get_mixer(name).fixed_input_size
    assert get_mixer(name).source == "built-in" and "arXiv" in get_mixer(name).paper
    assert "arXiv" in (get_mixer(name).cls.__doc__ + (spach.models.ops.partial_shift.__doc__ or ""))


# ---------------------------------------------------------------- numerics against plain references

def test_pool_is_average_of_the_valid_3x3_neighbours_minus_the_input():
    x = torch.randn(2, 5, 6, 3)
    ref = torch.empty_like(x)
    for i in range(5):
        for j in range(6):
            patch = x[:, max(i - 1, 0):i + 2, max(j - 1, 0):j + 2, :]
            ref[:, i, j] = patch.mean(dim=(1, 2)) - x[:, i, j]
    torch.testing.assert_close(Pooling(3)(x), ref)


def test_shift_equals_explicit_slicing_of_four_groups():
    x = torch.randn(2, 4, 5, 26)
    g = 26 // 12  # 2 channels per group
    ref = x.clone()
    ref[..., 0:g] = 0
    ref[:, :, :-1, 0:g] = x[:, :, 1:, 0:g]                 # left: out[w] = x[w + 1]
    ref[..., g:2 * g] = 0
    ref[:, :, 1:, g:2 * g] = x[:, :, :-1, g:2 * g]         # right
    ref[..., 2 * g:3 * g] = 0
    ref[:, :-1, :, 2 * g:3 * g] = x[:, 1:, :, 2 * g:3 * g]  # up: out[h] = x[h + 1]
    ref[..., 3 * g:4 * g] = 0
    ref[:, 1:, :, 3 * g:4 * g] = x[:, :-1, :, 3 * g:4 * g]  # down
    assert torch.equal(Shift(26)(x), ref)


def test_smlp_is_the_registered_sparse_mlp_mixing_each_axis():
    assert get_mixer("smlp").cls is SparseMLP
    m = build("smlp", dim=3, grid_size=(4, 6))
    x = torch.randn(2, 4, 6, 3)
    wh, ww, f = m.proj_h.weight[:, :, 0, 0], m.proh_w.weight[:, :, 0, 0], m.fuse.weight[:, :, 0, 0]
    ref = torch.zeros_like(x)
    for b in range(2):
        for h in range(4):
            for w in range(6):
                along_w = (wh[w] @ x[b, h, :, :]) + m.proj_h.bias[w]     # mixes the row h along W
                along_h = (ww[h] @ x[b, :, w, :]) + m.proh_w.bias[h]     # mixes the column w along H
                ref[b, h, w] = f @ torch.cat([x[b, h, w], along_w, along_h])
    torch.testing.assert_close(m(x), ref, rtol=1e-5, atol=1e-5)


def test_global_filter_equals_a_direct_circular_convolution():
    torch.manual_seed(0)
    H, W, C = 5, 6, 3
    m = GlobalFilter(C, (H, W))
    x = torch.randn(2, H, W, C)
    # the filter's spatial kernel, then the circular convolution written as sums
    kernel = torch.fft.irfft2(torch.view_as_complex(m.complex_weight), s=(H, W), dim=(0, 1))  # (H, W, C)
    ref = torch.zeros_like(x)
    for h in range(H):
        for w in range(W):
            for i in range(H):
                for j in range(W):
                    ref[:, h, w] += x[:, (h - i) % H, (w - j) % W] * kernel[i, j]
    torch.testing.assert_close(m(x), ref, rtol=1e-4, atol=1e-5)


def reference_window_attention(m: WindowAttention, x: torch.Tensor) -> torch.Tensor:
    """Swin's shifted-window attention for one image batch, written with loops over windows and token pairs;
    a grid the windows do not tile is zero-padded to whole windows (bottom, right), real tokens never attend
    the padding, and the output is cropped back."""
    B, H0, W0, C = x.shape
    ws, s, heads = m.window_size, m.shift_size, m.num_heads
    hd = C // heads
    H, W = -(-H0 // ws) * ws, -(-W0 // ws) * ws
    padded = torch.zeros(B, H, W, C)
    padded[:, :H0, :W0] = x
    real = torch.zeros(H, W, dtype=torch.bool)
    real[:H0, :W0] = True
    rolled, real = torch.roll(padded, (-s, -s), (1, 2)), torch.roll(real, (-s, -s), (0, 1))
    # region label of every (rolled) position, as in Swin's mask construction with slices
    label = torch.zeros(H, W, dtype=torch.long)
    if s:
        cnt = 0
        for hs in (slice(0, -ws), slice(-ws, -s), slice(-s, None)):
            for wsl in (slice(0, -ws), slice(-ws, -s), slice(-s, None)):
                label[hs, wsl] = cnt
                cnt += 1
    out = torch.zeros_like(padded)
    table = m.relative_position_bias_table
    for r0 in range(0, H, ws):
        for c0 in range(0, W, ws):
            pos = [(r0 + i, c0 + j) for i in range(ws) for j in range(ws)]
            tok = torch.stack([rolled[:, r, c] for r, c in pos], 1)                  # (B, N, C)
            qkv = m.qkv(tok).reshape(B, len(pos), 3, heads, hd)
            q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]                       # (B, N, heads, hd)
            logits = torch.einsum("bnhd,bmhd->bhnm", q, k) * hd ** -0.5
            for a, (ra, ca) in enumerate(pos):
                for b_, (rb, cb) in enumerate(pos):
                    idx = (ra - rb + ws - 1) * (2 * ws - 1) + (ca - cb + ws - 1)
                    logits[:, :, a, b_] += table[idx]
                    if label[ra, ca] != label[rb, cb] or (real[ra, ca] and not real[rb, cb]):
                        logits[:, :, a, b_] = float("-inf")
            y = torch.einsum("bhnm,bmhd->bnhd", logits.softmax(-1), v).reshape(B, len(pos), C)
            for n, (r, c) in enumerate(pos):
                out[:, r, c] = y[:, n]
    return m.proj(torch.roll(out, (s, s), (1, 2))[:, :H0, :W0])


@pytest.mark.parametrize("block_index", [0, 1])
def test_window_attention_equals_the_loop_reference_with_and_without_shift(block_index):
    m = build("window", dim=8, grid_size=(8, 8), block_index=block_index).eval()
    torch.nn.init.normal_(m.relative_position_bias_table, std=1.0)
    assert (m.window_size, m.shift_size) == (4, 2 if block_index else 0)
    x = torch.randn(2, 8, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(m(x), reference_window_attention(m, x), rtol=1e-5, atol=1e-5)
        m.fused_attn = not m.fused_attn  # the other kernel: same numbers
        torch.testing.assert_close(m(x), reference_window_attention(m, x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("block_index", [0, 1])
@pytest.mark.parametrize("grid", [(6, 7), (5, 12), (3, 3)])
def test_window_attention_pads_a_grid_the_windows_do_not_tile_and_crops_back(block_index, grid):
    m = build("window", dim=8, grid_size=(8, 8), block_index=block_index).eval()
    torch.nn.init.normal_(m.relative_position_bias_table, std=1.0)
    x = torch.randn(2, *grid, 8)
    with torch.no_grad():
        torch.testing.assert_close(m(x), reference_window_attention(m, x), rtol=1e-5, atol=1e-5)
        m.fused_attn = not m.fused_attn  # the other kernel: same numbers
        torch.testing.assert_close(m(x), reference_window_attention(m, x), rtol=1e-5, atol=1e-5)
    m.train()
    x.requires_grad_(True)
    out = m(x)
    assert out.shape == x.shape
    out.square().sum().backward()  # no NaN anywhere: no attention row is all -inf, padding rows included
    assert torch.isfinite(x.grad).all() and all(torch.isfinite(p.grad).all() for p in m.parameters())


def test_a_grid_the_windows_tile_takes_the_unpadded_path():
    x = torch.randn(2, 8, 12, 8)
    assert pad_to_windows(x, 4) is x  # no copy, no padding mask: the numbers of the model before padding
    assert pad_to_windows(x, 5).shape == (2, 10, 15, 8) and pad_to_windows(x, 5)[:, 8:].abs().sum() == 0


@pytest.mark.parametrize("block_index", [0, 1])
def test_padding_tokens_do_not_influence_real_ones(block_index, monkeypatch):
    m = build("window", dim=8, grid_size=(8, 8), block_index=block_index).eval()
    x = torch.randn(2, 6, 7, 8)
    with torch.no_grad():
        zero_padded = m(x)

        def pad_with_noise(t, window_size):  # the padding holds large random tokens instead of zeros
            padded = pad_to_windows(t, window_size)
            noise = 100 * torch.randn_like(padded)
            noise[:, :t.shape[1], :t.shape[2]] = 0
            return padded + noise

        monkeypatch.setattr(mixers, "pad_to_windows", pad_with_noise)
        for fused in (True, False):
            m.fused_attn = fused
            torch.testing.assert_close(m(x), zero_padded, rtol=0, atol=1e-6)


def test_window_covering_the_grid_drops_the_shift_like_swin():
    m = WindowAttention(8, 2, (4, 4), window_size=7, block_index=1)
    assert (m.window_size, m.shift_size) == (4, 0)


def test_window_attention_probs_protocol():
    m = build("window", dim=8, grid_size=(8, 8), block_index=1).eval()
    x = torch.randn(2, 8, 8, 8)
    with torch.no_grad():
        probs, pos_q, pos_k = m.attention_probs(x)
        assert probs.shape == (2, 4, 2, 16, 16) and pos_q.shape == pos_k.shape == (16, 2)
        torch.testing.assert_close(probs.sum(-1), torch.ones(2, 4, 2, 16))
        assert (probs == 0).any()  # shifted windows: tokens of different regions never attend each other
        assert pos_q[5].tolist() == [1.0, 1.0] and pos_q.max() == 3
        # the probabilities are the forward's: probs @ v, merged and rolled back, gives the output
        _, _, v = m.windowed_qkv(x)
        y = (probs.reshape(8, 2, 16, 16) @ v).transpose(1, 2).reshape(8, 16, 8)
        y = m.proj(torch.roll(window_merge(y, 4, 2, 8, 8), (2, 2), (1, 2)))
        torch.testing.assert_close(y, m(x), rtol=1e-5, atol=1e-5)
        # spach analyze attn-distance reads it: per head, within a 4x4 window (at most 3·sqrt(2) apart)
        from spach.analysis.attention import mean_distance
        d = mean_distance(probs, pos_q, pos_k)
        assert d.shape == (2,) and bool((d > 0).all()) and bool((d < 3 * 2 ** 0.5).all())


def test_window_attention_probs_on_a_padded_grid_cover_the_real_queries_only():
    from spach.analysis.attention import mean_distance

    m = build("window", dim=8, grid_size=(8, 8), block_index=1).eval()
    x = torch.randn(2, 6, 7, 8)  # padded to 8x8: 4 windows of 16 slots, 42 real tokens
    with torch.no_grad():
        probs, pos_q, pos_k = m.attention_probs(x)
        assert probs.shape == (2, 2, 42, 16) and pos_q.shape == (42, 2) and pos_k.shape == (16, 2)
        torch.testing.assert_close(probs.sum(-1), torch.ones(2, 2, 42))
        # the padding's probabilities are exactly 0: 42 real queries, each attending only real keys
        full = m.attention_probs(torch.randn(2, 8, 8, 8))[0]
        assert full.shape == (2, 4, 2, 16, 16)
        d = mean_distance(probs, pos_q, pos_k)
        assert d.shape == (2,) and bool((d > 0).all()) and bool((d < 3 * 2 ** 0.5).all())


# ---------------------------------------------------------------- fixed sizes and refusals

@pytest.mark.parametrize("name", ["smlp", "gfilter"])
def test_fixed_size_mixers_name_their_grid(name):
    m = build(name, grid_size=(8, 8))
    with pytest.raises(ValueError, match="built for a 8x8 token grid and got 6x8"):
        m(torch.randn(1, 6, 8, 24))
    model = timm.create_model(f"spach_ms_xxs_patch4_224_{name}", img_size=64, hidden_dim=16, num_heads=2)
    with pytest.raises(ValueError, match="built for 64x64"):
        model(torch.randn(1, 3, 96, 96))


def test_window_models_take_any_input_size_their_stride_allows():
    # 8x8, 4x4, 2x2 grids with 7x7 windows: built (as Swin, the window shrinks to a grid no larger than it)
    SpachMS(hidden_dim=12, num_heads=1, img_size=32, patch_size=2,
            net_arch=[[("conv", 1)], [("window", 2)], [("window", 1)], [("window", 1)]])
    model = timm.create_model("spach_ms_xxs_patch4_224_window", hidden_dim=16, num_heads=2, num_classes=3)
    for size in (128, 96, 160, 448):  # token grids 32/16/8/4, 24/12/6/3, ... : padded to whole 7x7 windows
        x = torch.randn(1, 3, size, size, requires_grad=True)
        out = model(x)
        assert out.shape == (1, 3) and torch.isfinite(out).all()
    out.sum().backward()
    assert torch.isfinite(x.grad).all()
    with pytest.raises(ValueError, match="not divisible by the network's total stride 32"):
        model(torch.randn(1, 3, 112, 112))


def test_weight_free_and_window_mixers_refuse_weight_sharing_with_the_reason():
    arch = [[("conv", 1)], [("pool", 2)], [("pool", 1)], [("pool", 1)]]
    with pytest.raises(ValueError, match="mixer 'pool' has no weights"):
        SpachMS(hidden_dim=12, num_heads=1, img_size=32, patch_size=2, net_arch=arch, shared_spatial_func=True)
    SpachMS(hidden_dim=12, num_heads=1, img_size=32, patch_size=2, net_arch=arch, cpe=False)  # CPE off: meaningful
    with pytest.raises(ValueError, match="weight sharing does not apply to the window mixer"):
        SpachMS(hidden_dim=12, num_heads=1, img_size=32, patch_size=2, shared_spatial_func=True,
                net_arch=[[("conv", 1)], [("window", 2)], [("window", 1)], [("window", 1)]],
                mixer_kwargs={"window": {"window_size": 4}})
    with pytest.raises(ValueError, match=r"shift: moving 4 groups of C//12 channels needs .* width of at least 12"):
        Shift(8)


# ---------------------------------------------------------------- TorchScript, torch.fx, torch.export

def tiny(name, **kw):
    torch.manual_seed(0)
    extra = {"mixer_kwargs": {"window": {"window_size": 4}}} if name.endswith("window") else {}
    model = timm.create_model(name, hidden_dim=16, num_heads=2, img_size=64, **extra, **kw)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.2)
    return model.eval()


@pytest.mark.parametrize("mixer", NEWCOMER_MIXERS)
def test_torchscript_fx_and_export_give_the_eager_logits(mixer):
    name = f"spach_ms_xxs_patch4_224_{mixer}"
    model, x = tiny(name), torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ref = model(x)
    with set_scriptable(True):
        src = tiny(name)
    scripted = torch.jit.script(src)
    graph = create_feature_extractor(model, return_nodes={"head": "logits"})
    with torch.no_grad():
        torch.testing.assert_close(scripted(x), ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(graph(x)["logits"], ref, rtol=1e-5, atol=1e-5)
        program = torch.export.export(model, (x,))
        torch.testing.assert_close(program.module()(x), ref, rtol=1e-5, atol=1e-5)
    graph.train()
    graph(x)["logits"].sum().backward()
    assert all(p.grad is not None for p in graph.parameters() if p.requires_grad)


# ---------------------------------------------------------------- the zoo

@pytest.mark.parametrize("name", list(NEWCOMERS))
def test_newcomer_zoo_models_have_the_conv_models_params_within_15_percent(name):
    size = name.split("_")[2]
    with torch.device("meta"):
        model = timm.create_model(name)
        conv = timm.create_model(f"spach_ms_{size}_patch4_224_conv")
    ratio = count_params(model) / count_params(conv)
    assert 0.85 <= ratio <= 1.15, f"{name}: {ratio:.3f}x the conv model's params"
    assert name in ALL_MODELS and model.pretrained_cfg["fixed_input_size"] == model.fixed_input_size
    assert spach.models.family(name) == name.rsplit("_", 1)[-1]
