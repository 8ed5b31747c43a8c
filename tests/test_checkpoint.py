"""Checkpoint loading: original layout, own layout, safetensors, refusals and clear errors."""
import os
import pickle
from pathlib import Path

import pytest
import torch

import spach
from spach.models import SpachMS, save_safetensors

CASE = Path(__file__).parent / "data" / "cases" / "ms_mlp_shared.pt"


def reference():
    ref = torch.load(CASE, weights_only=True)
    return ref, lambda: SpachMS(**ref["kwargs"]).eval()


def outputs(model, x):
    with torch.no_grad():
        return model(x)


def test_original_release_file(tmp_path):
    ref, build = reference()
    path = tmp_path / "spach_ms_mlp_xxs.pth"
    torch.save({"model": ref["state_dict"], "optimizer": {}, "epoch": 299}, path)
    model = spach.load_checkpoint(build(), path)
    assert torch.allclose(outputs(model, ref["input"]), ref["logits"], atol=1e-5)


def test_own_layout_round_trip_and_ddp_prefix(tmp_path):
    ref, build = reference()
    model = spach.load_checkpoint(build(), ref["state_dict"])
    path = tmp_path / "ckpt.pt"
    torch.save({"model": {f"module.{k}": v for k, v in model.state_dict().items()}, "epoch": 3}, path)
    again = spach.load_checkpoint(build(), path)
    assert torch.equal(outputs(again, ref["input"]), outputs(model, ref["input"]))


def test_ema_key_selected(tmp_path):
    ref, build = reference()
    model = spach.load_checkpoint(build(), ref["state_dict"])
    other = build()
    path = tmp_path / "train.pt"
    torch.save({"model": other.state_dict(), "model_ema": model.state_dict()}, path)
    loaded = spach.load_checkpoint(build(), path, key="model_ema")
    assert torch.equal(outputs(loaded, ref["input"]), outputs(model, ref["input"]))
    with pytest.raises(KeyError, match="no entry 'nope'"):
        spach.load_checkpoint(build(), path, key="nope")


def test_safetensors_round_trip_with_shared_weights(tmp_path):
    ref, build = reference()
    model = spach.load_checkpoint(build(), ref["state_dict"])  # shared spatial MLPs
    path = save_safetensors(model, tmp_path / "model.safetensors")
    assert not list(tmp_path.glob(".*tmp*"))  # atomic write leaves no temporary file
    loaded = spach.load_checkpoint(build(), path)
    assert torch.equal(outputs(loaded, ref["input"]), outputs(model, ref["input"]))
    assert loaded.stages[1].blocks[0].token_mixer is loaded.stages[1].blocks[1].token_mixer


class _Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_refused_not_executed(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    with open(path, "wb") as f:
        pickle.dump({"model": _Exploit(marker)}, f)
    with pytest.raises(ValueError, match="refusing to load .*evil.pth.*weights_only"):
        spach.load_checkpoint(reference()[1](), path)
    assert not marker.exists()


def test_mismatch_names_keys_model_and_file(tmp_path):
    ref, build = reference()
    sd = dict(ref["state_dict"])
    sd.pop("head.weight")
    sd["head.bias"] = torch.zeros(3)
    sd["extra.weight"] = torch.zeros(1)
    path = tmp_path / "bad.pth"
    torch.save({"model": sd}, path)
    with pytest.raises(ValueError) as err:
        spach.load_checkpoint(build(), path)
    msg = str(err.value)
    for needle in ("bad.pth", "SpachMS", "head.weight", "extra.weight", "head.bias: checkpoint (3,) vs model (10,)"):
        assert needle in msg


def test_zoo_model_name_in_error():
    model = spach.create_model("spach_ms_xxs_patch4_224_conv", img_size=32, num_classes=3)
    with pytest.raises(ValueError, match="spach_ms_xxs_patch4_224_conv"):
        spach.load_checkpoint(model, {"head.weight": torch.zeros(3, 512)})


def test_missing_and_corrupt_files(tmp_path):
    build = reference()[1]
    with pytest.raises(FileNotFoundError, match="nowhere.pth"):
        spach.load_checkpoint(build(), tmp_path / "nowhere.pth")
    good = tmp_path / "good.pth"
    torch.save({"model": build().state_dict()}, good)
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(good.read_bytes()[:1000])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        spach.load_checkpoint(build(), truncated)
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"\x00garbage")
    with pytest.raises(ValueError, match="cannot read safetensors"):
        spach.load_checkpoint(build(), broken)
