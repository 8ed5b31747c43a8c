"""Released weights and fine-tuning: pretrained_cfg URLs, timm's download path (a local server), new classifiers."""
import functools
import http.server
import threading
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import load_file
from timm.models import get_pretrained_cfg

import spach
from spach.cli.main import main as cli
from spach.engine.build import build_model
from spach.models import ZOO, load_for_finetuning

CASES = Path(__file__).parent / "data" / "cases"
RELEASE = "https://github.com/microsoft/SPACH/releases/download/v1.0/"
# SPEC §8: the v1.0 release files and their ImageNet-1k top-1
RELEASED = {
    "spach_ms_xxs_patch4_224_conv": ("spach_ms_conv_xxs.pth", 73.1),
    "spach_ms_xxs_patch4_224_attn": ("spach_ms_trans_xxs.pth", 65.4),
    "spach_ms_xxs_patch4_224_mlp": ("spach_ms_mlp_xxs.pth", 74.5),
    "spach_ms_s_patch4_224_conv": ("spach_ms_conv_s.pth", 81.6),
    "spach_ms_s_patch4_224_attn": ("spach_ms_trans_s.pth", 82.9),
    "spach_ms_s_patch4_224_mlp": ("spach_ms_mlp_s.pth", 82.1),
    "spach_ms_s_patch4_224_hybrid": ("spach_ms_hybrid_s.pth", 83.7),
    "spach_ms_s_plus_patch4_224_hybrid": ("spach_ms_hybrid_s+.pth", 83.9),
}
# the conv case: a tiny model made with the original code, its state dict in the original layout
CONV_CASE = torch.load(CASES / "ms_conv.pt", weights_only=True)
TINY_KW = {"hidden_dim": 16, "num_heads": 2, "net_arch": CONV_CASE["kwargs"]["net_arch"]}


def test_pretrained_cfg_names_the_released_files_their_urls_and_top1():
    assert sorted(timm.list_models("spach*", pretrained=True)) == sorted(RELEASED)
    for name in ZOO:
        cfg = get_pretrained_cfg(name)
        if name in RELEASED:
            file, top1 = RELEASED[name]
            assert cfg.url == RELEASE + file
            assert cfg.notes == (f"original release weights: {file} (ImageNet-1k top-1 {top1})",)
        else:
            assert cfg.url == "" and not cfg.file and not cfg.hf_hub_id
    assert get_pretrained_cfg("spach_ms_xs_patch4_224_hybrid").notes == (
        "ImageNet-1k top-1 82.4 published; no weights were released",)
    with pytest.raises(ValueError, match="has no pretrained weights"):
        build_model("spach_ms_xs_patch4_224_hybrid", num_classes=10, pretrained=True)


class _Server:
    """A static file server on 127.0.0.1 that counts its requests."""

    def __init__(self, root: Path):
        self.requests = []
        server = self

        class Handler(http.server.SimpleHTTPRequestHandler):
            def log_message(self, *args):
                server.requests.append(self.path)

        self.httpd = http.server.ThreadingHTTPServer(
            ("127.0.0.1", 0), functools.partial(Handler, directory=str(root)))
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def release_server(tmp_path, monkeypatch):
    """Serves original-format release files from tmp_path/release; torch's hub cache is in tmp_path."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    (tmp_path / "release").mkdir()
    server = _Server(tmp_path / "release")
    yield server, tmp_path / "release"
    server.close()


def test_pretrained_true_downloads_an_original_release_file_through_timm(release_server, tmp_path):
    server, root = release_server
    ref = torch.load(CASES / "ms_hybrid_conv4.pt", weights_only=True)
    torch.save({"model": ref["state_dict"], "epoch": 299}, root / "spach_ms_hybrid_s+.pth")  # the release layout
    kw = {k: v for k, v in ref["kwargs"].items() if k != "patch_size"}
    url = server.url + "spach_ms_hybrid_s+.pth"
    for _ in range(2):  # the second build reads the hub cache
        model = timm.create_model("spach_ms_s_plus_patch4_224_hybrid", pretrained=True,
                                  pretrained_cfg_overlay=dict(url=url, num_classes=10), **kw).eval()
        with torch.no_grad():
            assert (model(ref["input"]) - ref["logits"]).abs().max() <= 1e-5
    assert server.requests == ["/spach_ms_hybrid_s+.pth"]
    assert (tmp_path / "torch_home" / "hub" / "checkpoints" / "spach_ms_hybrid_s+.pth").is_file()


def _release_file_with_1000_classes(path: Path) -> dict:
    """The conv case's weights, original layout, with a 1000-class head as in the ImageNet release."""
    state = dict(CONV_CASE["state_dict"])
    generator = torch.Generator().manual_seed(1)
    state["head.weight"] = torch.randn(1000, state["head.weight"].shape[1], generator=generator)
    state["head.bias"] = torch.randn(1000, generator=generator)
    torch.save({"model": state, "epoch": 299}, path)
    return spach.models.checkpoint_filter_fn(state)


def test_load_for_finetuning_keeps_the_trunk_and_starts_a_new_classifier(tmp_path):
    release = _release_file_with_1000_classes(tmp_path / "spach_ms_conv_xxs.pth")
    torch.manual_seed(0)
    model = timm.create_model("spach_ms_xxs_patch4_224_conv", num_classes=10, img_size=64, **TINY_KW)
    head = {k: v.clone() for k, v in model.head.state_dict().items()}
    note = load_for_finetuning(model, tmp_path / "spach_ms_conv_xxs.pth")
    assert note == (f"{tmp_path / 'spach_ms_conv_xxs.pth'}: loaded the trunk; its 1000-class classifier "
                    f"(head.weight, head.bias) does not fit the model's 10 classes, so a new classifier starts "
                    f"from scratch")
    state = model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in release.items() if not k.startswith("head."))
    assert all(torch.equal(model.head.state_dict()[k], v) for k, v in head.items())
    # the same class count loads everything; anything else that does not fit is still an error
    assert load_for_finetuning(timm.create_model("spach_ms_xxs_patch4_224_conv", num_classes=1000, img_size=64,
                                                 **TINY_KW), tmp_path / "spach_ms_conv_xxs.pth") is None
    with pytest.raises(ValueError, match="shape mismatch"):
        load_for_finetuning(timm.create_model("spach_ms_xxs_patch4_224_conv", num_classes=10, img_size=64,
                                              **{**TINY_KW, "hidden_dim": 8}), tmp_path / "spach_ms_conv_xxs.pth")


RUN = ["--model", "spach_ms_xxs_patch4_224_conv", "--data", "mnist5k", "--img-size", "64", "--epochs", "1",
       "--warmup-epochs", "0", "--cooldown-epochs", "0", "--batch-size", "16", "--max-train-samples", "16",
       "--max-val-samples", "20", "--threads", "1", "--workers", "0", "--no-tensorboard", "--no-model-ema",
       "--no-augment", "--mixup", "0", "--cutmix", "0", "--no-repeated-aug", "--lr", "1e-12", "--min-lr", "0",
       "--model-kwargs", "hidden_dim=16", "num_heads=2", "net_arch=[[[pass, 1]], [[pass, 1]], [[pass, 2]], [[pass, 1]]]"]


def _trunk_matches(weights: Path, release: dict) -> bool:
    """With lr 1e-12 one step leaves the weights as they started: compare them with the release's trunk."""
    trained = load_file(str(weights))
    return all(torch.allclose(trained[k], v, atol=1e-6) for k, v in release.items() if not k.startswith("head."))


@pytest.mark.slow
def test_train_init_checkpoint_of_a_1000_class_file_on_10_classes(tmp_path, capsys):
    release = _release_file_with_1000_classes(tmp_path / "spach_ms_conv_xxs.pth")
    assert cli(["train", *RUN, "--output", str(tmp_path / "run"),
                "--init-checkpoint", str(tmp_path / "spach_ms_conv_xxs.pth")]) == 0
    out = capsys.readouterr().out
    assert "its 1000-class classifier (head.weight, head.bias) does not fit the model's 10 classes" in out
    assert _trunk_matches(tmp_path / "run" / "model.safetensors", release)


@pytest.mark.slow
def test_train_pretrained_downloads_through_timm_and_starts_a_new_classifier(release_server, tmp_path, capsys):
    server, root = release_server
    release = _release_file_with_1000_classes(root / "spach_ms_conv_xxs.pth")
    url = server.url + "spach_ms_conv_xxs.pth"
    assert cli(["train", *RUN, "--output", str(tmp_path / "run"), "--pretrained", "--pretrained-file", url]) == 0
    out = capsys.readouterr().out
    assert (f"pretrained weights from {url}: loaded the trunk; their 1000-class classifier (head) does not fit "
            f"the 10 classes, so a new classifier starts from scratch") in out
    assert server.requests == ["/spach_ms_conv_xxs.pth"]
    assert _trunk_matches(tmp_path / "run" / "model.safetensors", release)
    # the flags that contradict each other stop before any work
    assert cli(["train", *RUN, "--output", str(tmp_path / "run2"), "--pretrained-file", url]) == 2
    assert "pretrained_file: needs --pretrained" in capsys.readouterr().err
