"""The shift and sparse-MLP operators against the original release's formulas (SPEC §7-8)."""
import pytest
import torch
import torch.nn as nn

from spach.models.ops import SparseMLP, partial_shift


def original_shift(x, n_div):
    # ShiftViT's shift written as in the original release: NCHW, explicit slices into zeros
    B, C, H, W = x.shape
    g = C // n_div
    out = torch.zeros_like(x)
    out[:, g * 0:g * 1, :, :-1] = x[:, g * 0:g * 1, :, 1:]
    out[:, g * 1:g * 2, :, 1:] = x[:, g * 1:g * 2, :, :-1]
    out[:, g * 2:g * 3, :-1, :] = x[:, g * 2:g * 3, 1:, :]
    out[:, g * 3:g * 4, 1:, :] = x[:, g * 3:g * 4, :-1, :]
    out[:, g * 4:, :, :] = x[:, g * 4:, :, :]
    return out


@pytest.mark.parametrize("shape,n_div", [((2, 24, 5, 7), 12), ((1, 13, 4, 4), 4), ((2, 8, 1, 3), 2), ((1, 5, 3, 3), 8)])
def test_shift_equals_the_original_slicing_for_nchw_and_nhwc(shape, n_div):
    x = torch.randn(shape)
    ref = original_shift(x, n_div)
    assert torch.equal(partial_shift(x, n_div, channel_dim=1), ref)
    nhwc = x.permute(0, 2, 3, 1).contiguous()
    assert torch.equal(partial_shift(nhwc, n_div, channel_dim=-1), ref.permute(0, 2, 3, 1))
    assert torch.equal(partial_shift(nhwc, n_div, channel_dim=3), ref.permute(0, 2, 3, 1))
    cl = x.contiguous(memory_format=torch.channels_last)
    out = partial_shift(cl, n_div, channel_dim=1)
    assert torch.equal(out, ref) and out.is_contiguous(memory_format=torch.channels_last)


def test_shift_moves_each_group_one_pixel_and_zero_fills():
    x = torch.arange(1.0, 1 + 4 * 3 * 3).reshape(1, 4, 3, 3)
    out = partial_shift(x, 4)
    assert out[0, 0, :, 2].eq(0).all() and torch.equal(out[0, 0, :, :2], x[0, 0, :, 1:])  # left
    assert out[0, 1, :, 0].eq(0).all() and torch.equal(out[0, 1, :, 1:], x[0, 1, :, :2])  # right
    assert out[0, 2, 2, :].eq(0).all() and torch.equal(out[0, 2, :2], x[0, 2, 1:])  # up
    assert out[0, 3, 0, :].eq(0).all() and torch.equal(out[0, 3, 1:], x[0, 3, :2])  # down


@pytest.mark.filterwarnings("error::torch.jit.TracerWarning")
def test_shift_scripts_traces_and_passes_gradients():
    x = torch.randn(2, 12, 4, 5, requires_grad=True)
    scripted = torch.jit.script(partial_shift)
    assert torch.equal(scripted(x, 3, -1), partial_shift(x, 3, -1))
    traced = torch.jit.trace(lambda t: partial_shift(t, 3, 1), (x,))
    assert torch.equal(traced(x), original_shift(x, 3))
    # a gradient flows to exactly the entries that reach the output: 4 groups of 3 channels each lose a line
    g = torch.autograd.grad(partial_shift(x, 4).sum(), x)[0]
    assert g.sum().item() == 12 * 4 * 5 * 2 - 2 * 3 * (4 + 4 + 5 + 5)
    assert torch.equal(g, torch.autograd.grad(original_shift(x, 4).sum(), x)[0])


def test_shift_rejects_bad_layouts():
    with pytest.raises(ValueError, match="channel_dim=2"):
        partial_shift(torch.randn(1, 4, 3, 3), 4, channel_dim=2)
    with pytest.raises(ValueError, match="4-d"):
        partial_shift(torch.randn(4, 3, 3), 4)


def original_smlp_mixing(x, proj_h, proh_w, fuse):
    # sMLPBlock's token mixing as in the original release (NCHW, without its BN + GELU)
    x_h = proj_h(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
    x_w = proh_w(x.permute(0, 2, 1, 3)).permute(0, 2, 1, 3)
    return fuse(torch.cat([x, x_h, x_w], dim=1))


def test_sparse_mlp_equals_the_original_nchw_formula_with_the_same_parameters():
    torch.manual_seed(0)
    C, S = 6, 5
    m = SparseMLP(C, S)
    assert {k: tuple(v.shape) for k, v in m.state_dict().items()} == {
        "proj_h.weight": (S, S, 1, 1), "proj_h.bias": (S,), "proh_w.weight": (S, S, 1, 1), "proh_w.bias": (S,),
        "fuse.weight": (C, 3 * C, 1, 1)}
    proj_h, proh_w, fuse = nn.Conv2d(S, S, 1), nn.Conv2d(S, S, 1), nn.Conv2d(3 * C, C, 1, bias=False)
    proj_h.load_state_dict({k[7:]: v for k, v in m.state_dict().items() if k.startswith("proj_h.")})
    proh_w.load_state_dict({k[7:]: v for k, v in m.state_dict().items() if k.startswith("proh_w.")})
    fuse.load_state_dict({"weight": m.fuse.weight})
    x = torch.randn(2, C, S, S)
    ref = original_smlp_mixing(x, proj_h, proh_w, fuse)
    out = m(x.permute(0, 2, 3, 1))
    torch.testing.assert_close(out.permute(0, 3, 1, 2), ref, rtol=0, atol=1e-5)


def test_sparse_mlp_mixes_w_with_proj_h_and_h_with_proh_w_on_rectangular_grids():
    torch.manual_seed(1)
    m = SparseMLP(3, (4, 6))
    assert m.proj_h.weight.shape[0] == 6 and m.proh_w.weight.shape[0] == 4
    x = torch.randn(2, 4, 6, 3)
    wh, ww, f = m.proj_h.weight[:, :, 0, 0], m.proh_w.weight[:, :, 0, 0], m.fuse.weight[:, :, 0, 0]
    x_h = torch.einsum("vw,bhwc->bhvc", wh, x) + m.proj_h.bias[None, None, :, None]
    x_w = torch.einsum("gh,bhwc->bgwc", ww, x) + m.proh_w.bias[None, :, None, None]
    ref = torch.cat([x, x_h, x_w], -1) @ f.T
    torch.testing.assert_close(m(x), ref, rtol=0, atol=1e-5)


def test_sparse_mlp_names_its_grid_when_the_input_differs():
    m = SparseMLP(4, 7)
    with pytest.raises(ValueError, match="built for a 7x7 token grid and got 8x8"):
        m(torch.randn(1, 8, 8, 4))
