"""spach.analysis: properties of ERF, CKA, corruptions, Fourier basis, attention distance (tiny shapes)."""
import json
import math

import numpy as np
import pytest
import torch
import torch.nn as nn

from spach.analysis import (
    CORRUPTIONS,
    MinibatchCKA,
    band_filter,
    corrupt,
    erf_area_ratio,
    fourier_basis,
    input_gradient_map,
    linear_cka,
    mce,
    mean_distance,
    unbiased_hsic_matrix,
)
from spach.analysis.common import Subject
from spach.analysis.erf import stage_fn

torch.set_num_threads(1)


def _support(grad_map: np.ndarray) -> tuple[int, int, int]:
    """(rows, cols, count) of the nonzero entries' bounding box and their number."""
    ys, xs = np.nonzero(grad_map)
    return ys.max() - ys.min() + 1, xs.max() - xs.min() + 1, len(ys)


# ----------------------------------------------------------------------------------------- ERF

def test_erf_of_one_3x3_conv_is_its_3x3_support():
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, 3, padding=1)
    grad = input_gradient_map(conv, [torch.randn(2, 3, 15, 15)])
    assert _support(grad) == (3, 3, 9)
    assert np.nonzero(grad)[0].min() == 6 and np.nonzero(grad)[1].min() == 6  # centred on (7, 7)
    assert erf_area_ratio(grad, 1.0) == (3, 9 / 225)


def test_erf_of_two_stacked_3x3_convs_is_5x5():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1))
    grad = input_gradient_map(net, [torch.randn(2, 3, 15, 15), torch.randn(1, 3, 15, 15)])
    assert _support(grad) == (5, 5, 25)
    side, ratio = erf_area_ratio(grad, 0.99)
    assert side in (3, 5) and ratio == side * side / 225


def test_erf_area_ratio_of_known_maps():
    m = np.zeros((11, 11))
    m[5, 5] = 1.0
    assert erf_area_ratio(m, 0.5) == (1, 1 / 121)
    m[5, 5], m[3:8, 3:8] = 0, 1.0  # a uniform 5x5 square: 50% needs the 5x5 (the 3x3 holds 9/25)
    assert erf_area_ratio(m, 0.2) == (3, 9 / 121)
    assert erf_area_ratio(m, 0.5) == (5, 25 / 121)
    with pytest.raises(ValueError, match="threshold"):
        erf_area_ratio(m, 1.5)


def test_erf_of_a_spach_conv_stage_is_stem_times_3x3_cells():
    """Stage 1 of a conv MS model = 4x4/4 stem, one block (3x3 depthwise conv + pointwise MLP): 12x12 pixels."""
    from spach import create_model

    torch.manual_seed(0)
    model = create_model("spach_ms_xxs_patch4_224_conv", num_classes=10, img_size=32, hidden_dim=16,
                         net_arch=[[("conv", 1)], [("conv", 1)], [("conv", 1)], [("conv", 1)]]).eval()
    subject = Subject(model=model, label="conv", model_name="x", data=None, img_size=32)
    grad = input_gradient_map(stage_fn(subject, 0), [torch.rand(2, 3, 32, 32)])
    assert _support(grad) == (12, 12, 144)
    grad2 = input_gradient_map(stage_fn(subject, 1), [torch.rand(2, 3, 32, 32)])
    assert _support(grad2)[2] > 144  # the next stage sees further


# ----------------------------------------------------------------------------------------- CKA

def _naive_unbiased_hsic(K: torch.Tensor, L: torch.Tensor) -> float:
    n = K.shape[0]
    Kt, Lt = K.clone(), L.clone()
    Kt.fill_diagonal_(0)
    Lt.fill_diagonal_(0)
    one = torch.ones(n, 1, dtype=K.dtype)
    term = torch.trace(Kt @ Lt) + (one.T @ Kt @ one).item() * (one.T @ Lt @ one).item() / ((n - 1) * (n - 2)) \
        - 2.0 / (n - 2) * (one.T @ Kt @ Lt @ one).item()
    return float(term / (n * (n - 3)))


def test_unbiased_hsic_matches_the_formula():
    torch.manual_seed(0)
    x, y = torch.randn(9, 5).double(), torch.randn(9, 7).double()
    got = unbiased_hsic_matrix([x, y], [y])
    assert got[0, 0].item() == pytest.approx(_naive_unbiased_hsic(x @ x.T, y @ y.T), rel=1e-10)
    assert got[1, 0].item() == pytest.approx(_naive_unbiased_hsic(y @ y.T, y @ y.T), rel=1e-10)


def test_cka_self_orthogonal_and_scaling_invariance():
    torch.manual_seed(0)
    x = torch.randn(64, 20)
    assert linear_cka(x, x) == pytest.approx(1.0, abs=1e-12)
    q, _ = torch.linalg.qr(torch.randn(20, 20))
    y = x @ q
    assert linear_cka(x, y) == pytest.approx(1.0, abs=1e-6)
    assert linear_cka(x, 3.7 * x) == pytest.approx(1.0, abs=1e-12)
    # a non-orthogonal, non-isotropic map changes the value
    assert linear_cka(x, x * torch.linspace(0.1, 3, 20)) < 0.99


def test_cka_of_independent_features_is_near_zero_and_minibatch_accumulation():
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(1024, 32, generator=g), torch.randn(1024, 32, generator=g)
    acc = MinibatchCKA(2, 2)
    for i in range(0, 1024, 128):
        acc.update([a[i:i + 128], b[i:i + 128]], [a[i:i + 128], b[i:i + 128]])
    m = acc.compute()
    assert m[0, 0] == pytest.approx(1.0) and m[1, 1] == pytest.approx(1.0)
    assert abs(m[0, 1].item()) < 0.02 and m[0, 1] == pytest.approx(m[1, 0].item())
    with pytest.raises(ValueError, match="at least 4"):
        linear_cka(a[:3], b[:3])


# ----------------------------------------------------------------------------------------- corruptions

@pytest.mark.parametrize("name", list(CORRUPTIONS))
def test_corruptions_deterministic_identity_any_size(name):
    g = torch.Generator().manual_seed(0)
    for shape in ((2, 3, 32, 32), (1, 3, 17, 23)):
        x = torch.rand(shape, generator=g)
        assert torch.equal(corrupt(x, name, 0, seed=5), x)
        previous = 0.0
        for s in range(1, 6):
            a, b = corrupt(x, name, s, seed=5), corrupt(x, name, s, seed=5)
            assert a.shape == x.shape and torch.equal(a, b)
            assert a.min() >= 0 and a.max() <= 1
            change = (a - x).abs().mean().item()
            assert change > 0
            if name not in ("jpeg", "pixelate"):  # (quantisation steps need not grow monotonically at 17 px)
                assert change >= previous - 1e-6
            previous = change
    if name in ("gaussian_noise", "shot_noise"):
        assert not torch.equal(corrupt(x, name, 3, seed=5), corrupt(x, name, 3, seed=6))


def test_corrupt_rejects_bad_input():
    x = torch.rand(1, 3, 8, 8)
    with pytest.raises(ValueError, match="unknown corruption"):
        corrupt(x, "fog", 1)
    with pytest.raises(ValueError, match="severity"):
        corrupt(x, "contrast", 6)


def test_mce_relative_to_itself_is_100_and_scales_with_errors():
    base = {"clean": 90.0, "top1": {"a": [80, 70, 60, 50, 40], "b": [88, 86, 84, 82, 80]}}
    worse = {"clean": 90.0, "top1": {"a": [60, 40, 20, 0, 0], "b": [88, 86, 84, 82, 80]}}
    assert mce(base, base)["mce"] == pytest.approx(100.0)
    r = mce(worse, base)
    assert r["ce"]["a"] == pytest.approx(100 * 380 / 200) and r["ce"]["b"] == pytest.approx(100.0)
    assert r["mce"] == pytest.approx((190 + 100) / 2)
    assert r["relative_ce"]["a"] == pytest.approx(100 * (380 - 50) / (200 - 50))


# ----------------------------------------------------------------------------------------- Fourier

@pytest.mark.parametrize("i,j", [(0, 1), (3, 5), (-4, 7), (16, 16), (0, 0)])
def test_fourier_basis_unit_norm_at_requested_frequency(i, j):
    H = W = 32
    u = fourier_basis(H, W, i, j, dtype=torch.float64)
    assert u.norm().item() == pytest.approx(1.0, abs=1e-12)
    spectrum = torch.fft.fft2(u).abs()
    support = {(int(a), int(b)) for a, b in torch.nonzero(spectrum > 1e-9).tolist()}
    assert support == {(i % H, j % W), ((-i) % H, (-j) % W)}


def test_band_filters_split_the_image():
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    low, high = band_filter(x, 8, "low"), band_filter(x, 8, "high")
    assert torch.allclose(low + high, x, atol=1e-5)
    assert torch.allclose(band_filter(x, 64, "low"), x, atol=1e-5)


# ----------------------------------------------------------------------------------------- attention distance

def test_uniform_attention_distance_is_mean_pairwise_distance():
    H, W = 4, 5
    pos = torch.tensor([(r, c) for r in range(H) for c in range(W)], dtype=torch.float64)
    probs = torch.full((2, 3, H * W, H * W), 1.0 / (H * W))
    expected = np.mean([math.dist(p, q) for p in pos.tolist() for q in pos.tolist()])
    assert torch.allclose(mean_distance(probs, pos, pos), torch.full((3,), expected, dtype=torch.float64))
    # attention on oneself only: distance 0
    eye = torch.eye(H * W).expand(1, 2, -1, -1)
    assert torch.allclose(mean_distance(eye, pos, pos), torch.zeros(2, dtype=torch.float64))


def test_attention_probs_reproduce_the_forward():
    from spach.models.layers import Attention

    torch.manual_seed(0)
    attn = Attention(16, 2).eval()
    x = torch.randn(2, 3, 4, 16)
    probs, pos_q, pos_k = attn.attention_probs(x)
    assert probs.shape == (2, 2, 12, 12) and torch.allclose(probs.sum(-1), torch.ones(2, 2, 12))
    assert pos_q.tolist()[:5] == [[0, 0], [0, 1], [0, 2], [0, 3], [1, 0]]
    v = attn.qkv(x).reshape(2, 12, 3, 2, 8).permute(2, 0, 3, 1, 4)[2]
    out = attn.proj((probs @ v).transpose(1, 2).reshape(2, 3, 4, 16))
    assert torch.allclose(out, attn(x), atol=1e-5)


# ----------------------------------------------------------------------------------------- the command

def test_analyze_command_writes_json_and_figures_and_never_overwrites(tmp_path):
    from spach import create_model
    from spach.cli.main import main

    torch.manual_seed(0)
    ckpts = []
    for fam in ("conv", "attn"):
        model = create_model(f"spach_ms_xxs_patch4_224_{fam}", num_classes=10, img_size=32, hidden_dim=16,
                             num_heads=2)
        path = tmp_path / f"{fam}.pt"
        torch.save({"model": model.state_dict(),
                    "config": {"model_kwargs": {"hidden_dim": 16, "num_heads": 2}, "img_size": 32}}, path)
        ckpts += ["--model", f"spach_ms_xxs_patch4_224_{fam}", "--checkpoint", str(path)]
    out = tmp_path / "out"
    common = [*ckpts, "--data", "mnist5k", "--out", str(out), "--images", "8", "--threads", "1"]
    assert main(["analyze", "attn-distance", *common]) == 0
    result = json.loads((out / "attn_distance.json").read_text())
    assert result["models"]["spach_ms_xxs_patch4_224_conv"]["layers"] == []
    layers = result["models"]["spach_ms_xxs_patch4_224_attn"]["layers"]
    assert len(layers) == 10 and all(len(layer["heads"]) == 2 for layer in layers)
    assert layers[0]["stride"] == 8 and 0 < layers[0]["mean"] < 32 * math.sqrt(2)
    assert (out / "attn_distance.png").stat().st_size > 0
    assert main(["analyze", "attn-distance", *common]) == 2        # refuses to overwrite
    assert main(["analyze", "cka", *common, "--eps", "2"]) == 2   # an option of another analysis
    assert main(["analyze", "cka", *common]) == 0
    cka = json.loads((out / "cka.json").read_text())
    self_m = np.array(cka["models"]["spach_ms_xxs_patch4_224_conv"]["matrix"])
    assert np.allclose(np.diag(self_m), 1.0) and np.allclose(self_m, self_m.T)
    assert np.array(cka["pairs"][0]["matrix"]).shape == (12, 12)


# ----------------------------------------------------------------------------------------- in a study

STUDY = {
    "name": "micro-analysis", "data": "mnist5k", "img_size": 16,
    "recipe": {"epochs": 1, "batch_size": 32, "lr": 3e-3, "warmup_epochs": 0, "cooldown_epochs": 0,
               "max_train_samples": 128, "max_val_samples": 32, "smoothing": 0.0, "mixup": 0.0, "cutmix": 0.0,
               "augment": False, "repeated_aug": False, "model_ema": False, "drop_path": 0.0, "workers": 0,
               "tensorboard": False},
    "measure": {"batch_size": 8, "warmup": 1, "repeats": 1},
    "grid": {"family": ["conv", "attn"], "layout": ["ms"], "size": ["nano"], "cpe": [True, False], "seed": [0]},
    "sizes": {"nano": {"ms": {"hidden_dim": 8, "num_heads": 2, "depths": [1, 1, 1, 1], "patch_size": 2}}},
    "analysis": {"erf": {"images": 8}, "cka": {"images": 16, "batch_size": 8},
                 "corruption": {"images": 16, "corruptions": ["contrast", "jpeg"]},
                 "fourier": {"images": 8, "step": 4, "bandwidths": [4, 16]}, "attn-distance": {"images": 4}},
}


def test_study_analysis_spec_errors():
    from spach.battle import load_study

    assert list(load_study(dict(STUDY, analysis=["erf", "cka"])).analysis) == ["erf", "cka"]
    for bad, msg in ((["erf", "erf"], "twice"), (["saliency"], "unknown analysis"),
                     ({"erf": {"imgs": 3}}, "unknown setting"), ({"corruption": {"baseline": "nope"}}, "not a group"),
                     ({"cka": {"batch_size": 2}}, ">= 4"), ("erf", "must be a list"),
                     ({"corruption": {"corruptions": ["fog"]}}, "unknown"), ({"erf": {"stages": "last"}}, "list"),
                     ({"fourier": {"eps": 0}}, "positive")):
        with pytest.raises(ValueError, match=msg):
            load_study(dict(STUDY, analysis=bad))


@pytest.mark.slow
def test_study_runs_analyses_stores_them_and_reports(tmp_path):
    import sqlite3

    from spach.battle.analysis_runs import analyze_study
    from spach.battle import load_study, run_study

    result = run_study(STUDY, tmp_path, quiet=True, threads=1)
    assert result["done"] == 3 and result["analyses"] == 3 * 4 + 1
    conn = sqlite3.connect(tmp_path / "battle.db")
    kinds = sorted(r[0] for r in conn.execute("SELECT kind FROM analysis WHERE subject != 'study'"))
    conn.close()
    assert kinds == sorted(["attn-distance", "corruption", "erf", "fourier"] * 3)
    for run_dir in (tmp_path / "runs").iterdir():
        assert sorted(p.name for p in (run_dir / "analysis").iterdir()) == [
            "attn_distance.json", "corruption.json", "erf.json", "fourier.json"]
    report = (tmp_path / "report.md").read_text()
    for title in ("## Analysis", "### Effective receptive fields", "### Representation similarity",
                  "### Corruption robustness", "### Fourier sensitivity", "### Mean attention distance"):
        assert title in report
    assert "against `conv-ms-nano`" in report
    conv_row = next(line for line in report.splitlines() if line.startswith("| conv-ms-nano |") and "100.0" in line)
    assert conv_row.count("100.0") >= 1  # the baseline's mCE is 100 by definition
    assert "analysis: 50% ERF area by stage (stride /2, /4, /8, /16), attn-ms-nano [" in report
    assert (tmp_path / "figures" / "analysis" / "erf.png").stat().st_size > 0
    # nothing new to measure on a second pass; changed settings measure again
    study = load_study(STUDY)
    assert analyze_study(tmp_path, study.analysis, say=lambda s: None) == 0
    changed = dict(study.analysis, erf=dict(study.analysis["erf"], images=4))
    assert analyze_study(tmp_path, {"erf": changed["erf"]}, say=lambda s: None) == 3
    # `spach analyze` on the study directory: the first seed of each architecture, labelled by group
    from spach.cli.main import main

    out = tmp_path / "an"
    assert main(["analyze", "corruption", "--run", str(tmp_path), "--images", "8", "--corruptions", "contrast",
                 "--baseline", "conv-ms-nano", "--out", str(out), "--threads", "1"]) == 0
    result = json.loads((out / "corruption.json").read_text())
    assert sorted(result["models"]) == ["attn-ms-nano", "attn-ms-nano-nocpe", "conv-ms-nano"]
    assert result["models"]["conv-ms-nano"]["mce"] == pytest.approx(100.0)


def test_findings_cite_the_measurements_without_changing_verdicts():
    from spach.battle.findings import Group, Stat, analysis_evidence, evaluate_findings
    from spach.battle.schema import Arch

    def group(family, cpe=True, top1=(90.0, 91.0)):
        name = f"{family}-ms-tiny" + ("" if cpe else "-nocpe")
        return Group(name=name, arch=Arch(family, "ms", "tiny", cpe), seeds=[0, 1],
                     params=1e5, macs=1e6, images_per_s=Stat.of([1.0]), top1=Stat.of(list(top1)),
                     best_top1=Stat.of(list(top1)), train_loss=Stat.of([0.1, 0.1]), val_loss=Stat.of([0.2, 0.2]),
                     gap=Stat.of([0.1, 0.1]))

    groups = [group("conv"), group("attn"), group("attn", cpe=False, top1=(80.0, 81.0)), group("mlp")]
    summary = {"groups": {"attn-ms-tiny": {"erf50": [Stat.of([2.0, 2.2]), Stat.of([20.0, 22.0])],
                                           "erf_strides": [4, 8], "attn_dist": Stat.of([5.0, 5.2]), "mce": Stat.of([120.0, 122.0])},
                          "attn-ms-tiny-nocpe": {"erf50": [Stat.of([2.0, 2.1]), Stat.of([50.0, 52.0])],
                                                 "attn_dist": Stat.of([9.0, 9.1])},
                          "conv-ms-tiny": {"mce": Stat.of([100.0, 101.0])},
                          "mlp-ms-tiny": {"mce": Stat.of([110.0, 111.0])}},
               "cka_final": {("conv-ms-tiny", "attn-ms-tiny"): 0.42}}
    before = [f.verdict for f in evaluate_findings(groups)]
    evidence = analysis_evidence(groups, summary)
    assert sorted(evidence) == [2, 3, 4]
    assert evidence[2][0] == ("analysis: 50% ERF area by stage (stride /4, /8), attn-ms-tiny [2.1, 21.0]% vs "
                              "attn-ms-tiny-nocpe [2.0, 51.0]%: with CPE larger at 0, smaller at 1 of 2 stages (Welch p < 0.05 per "
                              "stage, unadjusted)")
    assert "mean attention distance attn-ms-tiny 5.10 ± 0.14 px (sd, 2 seeds)" in evidence[2][1]
    assert "Welch p = " in evidence[2][1] and "(across seeds, unadjusted)" in evidence[2][1]
    assert "mCE conv 100.5 ± 0.7% (sd, 2 seeds) vs attn 121.0 ± 1.4% (sd, 2 seeds)" in evidence[4][0]
    assert "CKA of the final blocks 0.42" in evidence[4][0]
    assert "conv vs mlp" in evidence[3][0]
    assert [f.verdict for f in evaluate_findings(groups)] == before
