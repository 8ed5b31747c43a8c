"""spach.export and `spach export`: every format reloads and gives the model's logits (tiny models)."""
import json

import pytest
import timm
import torch

import spach  # noqa: F401  (registers the zoo)
from spach.cli.main import main as cli
from spach.export import check_export, export_hf, export_model, export_onnx, load_for_export, run_exported
from helpers import randomised

pytestmark = pytest.mark.usefixtures("one_thread")

# one tiny model per family (one block per stage keeps the exports fast)
FAMILY_ARCH = {
    "conv": [[("conv", 1)], [("conv", 1)], [("conv", 1)], [("conv", 1)]],
    "attn": [[("conv", 1)], [("attn", 1)], [("attn", 1)], [("attn", 1)]],
    "mlp": [[("conv", 1)], [("mlp", 1)], [("mlp", 1)], [("mlp", 1)]],
    "hybrid": [[("conv", 1)], [("conv", 1), ("attn", 1)], [("conv", 1), ("attn", 1)], [("attn", 1)]],
}
TINY = dict(hidden_dim=16, num_heads=2, img_size=64, num_classes=7)


def tiny(family="attn", name=None, **kw):
    torch.manual_seed(0)
    name = name or f"spach_ms_xxs_patch4_224_{'conv' if family == 'hybrid' else family}"
    return randomised(timm.create_model(name, **{**TINY, "net_arch": FAMILY_ARCH[family], **kw}))


@pytest.mark.slow
@pytest.mark.parametrize("family", list(FAMILY_ARCH))
def test_onnx_in_onnxruntime_gives_the_pytorch_logits_at_any_batch_size(family, tmp_path):
    import onnx

    model = tiny(family)
    path = export_onnx(model, tmp_path / "m.onnx")
    graph_input = onnx.load(str(path)).graph.input[0]
    assert graph_input.name == "images"
    assert graph_input.type.tensor_type.shape.dim[0].dim_param  # a named (dynamic) batch dimension
    for batch in (1, 5):
        x = torch.randn(batch, 3, 64, 64)
        with torch.no_grad():
            expected = model(x)
        got = run_exported("onnx", path, x)
        assert got.shape == (batch, 7)
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_pt2_round_trip_with_a_dynamic_batch(tmp_path):
    model = tiny("mlp")
    path = export_model(model, "pt2", tmp_path / "m.pt2")
    program = torch.export.load(str(path))
    for batch in (1, 4):
        x = torch.randn(batch, 3, 64, 64)
        with torch.no_grad():
            torch.testing.assert_close(program.module()(x), model(x), rtol=1e-5, atol=1e-5)


def test_torchscript_file_round_trip(tmp_path):
    model = tiny("hybrid", name="spach_ms_s_plus_patch4_224_hybrid")  # conv4 stem too
    path = export_model(model, "torchscript", tmp_path / "m.pt")
    assert check_export(model, "torchscript", path) < 1e-5
    loaded = torch.jit.load(str(path))
    x = torch.randn(2, 3, 96, 96)  # a conv/attention model takes other sizes, scripted too
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), rtol=1e-5, atol=1e-5)


def test_hf_folder_loads_through_timm_local_dir_with_the_same_weights(tmp_path):
    model = tiny("attn", cpe=False)  # a constructor option that must travel in config.json
    path = export_hf(model, tmp_path / "hf")
    assert sorted(p.name for p in path.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    config = json.loads((path / "config.json").read_text())
    assert config["architecture"] == "spach_ms_xxs_patch4_224_attn" and config["num_classes"] == 7
    assert config["pretrained_cfg"]["input_size"] == [3, 64, 64]
    loaded = timm.create_model(f"local-dir:{path}", pretrained=True).eval()
    assert loaded.num_classes == 7 and loaded.img_size == (64, 64)
    own, other = model.state_dict(), loaded.state_dict()
    assert own.keys() == other.keys() and all(torch.equal(own[k], other[k]) for k in own)
    card = (path / "README.md").read_text()
    assert "spach_ms_xxs_patch4_224_attn" in card and "Params (M):** 0." in card and "MACs (G):" in card


def test_hf_folder_of_a_weight_sharing_model(tmp_path):
    model = tiny("mlp", shared_spatial_func=True)
    path = export_hf(model, tmp_path / "hf")
    assert check_export(model, "hf", path) < 1e-6


def test_exports_never_replace_an_existing_output(tmp_path):
    model = tiny("conv")
    (tmp_path / "m.pt2").write_bytes(b"precious")
    (tmp_path / "hf").mkdir()
    with pytest.raises(FileExistsError, match="already exists"):
        export_model(model, "pt2", tmp_path / "m.pt2")
    with pytest.raises(FileExistsError, match="already exists"):
        export_model(model, "hf", tmp_path / "hf")
    assert (tmp_path / "m.pt2").read_bytes() == b"precious" and not any((tmp_path / "hf").iterdir())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf", "m.pt2"]  # no temporary left behind
    with pytest.raises(ValueError, match="unknown export format 'tflite'"):
        export_model(model, "tflite", tmp_path / "m.tflite")


def test_cli_export_of_a_training_checkpoint_writes_its_run_into_the_model_card(tmp_path, capsys):
    model = tiny("conv")
    state = {"model": model.state_dict(), "position": {"epoch": 3, "step": 0}, "best_top1": 87.5,
             "config": {"model": "spach_ms_xxs_patch4_224_conv", "data": "mnist5k", "img_size": 64, "epochs": 3,
                        "model_kwargs": {"hidden_dim": 16, "num_heads": 2, "net_arch": FAMILY_ARCH["conv"]},
                        "batch_size": 16, "opt": "adamw"}}
    torch.save(state, tmp_path / "last.pt")
    out = tmp_path / "export"
    assert cli(["export", "spach_ms_xxs_patch4_224_conv", "--checkpoint", str(tmp_path / "last.pt"),
                "--format", "hf", "--output", str(out), "--check"]) == 0
    printed = capsys.readouterr().out
    assert f"wrote {out} (hf," in printed and "check: max |logits difference| vs PyTorch 0.00e+00" in printed
    card = (out / "README.md").read_text()
    assert "## Training" in card and "**data:** mnist5k" in card and "**best_val_top1:** 87.5" in card
    assert "**epochs_done:** 3" in card and "**Classes:** 7" in card and "MACs (G):** 0.0" in card
    loaded = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), rtol=1e-5, atol=1e-5)
    # a second export to the same place is refused, with one line
    assert cli(["export", "spach_ms_xxs_patch4_224_conv", "--format", "pt2", "--output", str(out)]) == 2
    assert "already exists: choose another --output" in capsys.readouterr().err


def test_load_for_export_takes_the_class_count_and_options_from_the_checkpoint(tmp_path):
    model = tiny("attn")
    torch.save({"model": model.state_dict(), "epoch": 299}, tmp_path / "release.pth")  # original file layout
    loaded, summary = load_for_export("spach_ms_xxs_patch4_224_attn", tmp_path / "release.pth",
                                      img_size=64, model_kwargs={"hidden_dim": 16, "num_heads": 2,
                                                                 "net_arch": FAMILY_ARCH["attn"]})
    assert summary is None and loaded.num_classes == 7
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x))
    with pytest.raises(ValueError, match="holds no EMA weights"):
        load_for_export("spach_ms_xxs_patch4_224_attn", tmp_path / "release.pth", ema=True)


@pytest.mark.parametrize("fmt", ["torchscript", "pt2", "onnx", "hf"])
def test_cli_export_refuses_a_size_the_model_cannot_take_with_one_line_for_every_format(fmt, tmp_path, capsys):
    out = tmp_path / f"m.{fmt}"
    assert cli(["export", "spach_ms_xxs_patch4_224_conv", "--format", fmt, "--output", str(out),
                "--img-size", "112", "--model-kwargs", "hidden_dim=16", "num_heads=2"]) == 2
    err = capsys.readouterr().err
    assert err == ("spach export: error: input size 112x112 is not divisible by the network's total "
                   "stride 32\n")
    assert list(tmp_path.iterdir()) == []  # nothing written, no temporary left
