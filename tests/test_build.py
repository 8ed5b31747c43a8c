"""engine/build.py: a model from a name, the user's mistakes told apart from bugs by structure, not message text."""
import re

import pytest
import torch
from timm.models import register_model
from torch import nn

from spach.engine.build import build_model

ARCH = [[["conv", 1]], [["conv", 1]], [["attn", 1]], [["attn", 1]]]
TINY = {"hidden_dim": 8, "num_heads": 1, "net_arch": ARCH}


class _Buggy(nn.Module):
    """A model whose constructor has a bug that raises a TypeError reading like a user's mistake."""

    def __init__(self, num_classes: int = 1000, width: int = 4, img_size: int = 224, drop_path_rate: float = 0.0):
        super().__init__()
        torch.nn.Linear(3, num_classes, bias=False, img_size=img_size)  # bug: unexpected keyword argument 'img_size'


@register_model
def spach_test_buggy_model(pretrained=False, pretrained_cfg=None, pretrained_cfg_overlay=None, cache_dir=None,
                           **kwargs):
    return _Buggy(**kwargs)


def test_a_spach_model_gets_the_run_classes_size_and_drop_path():
    model = build_model("spach_ms_xxs_patch4_224_conv", num_classes=7, img_size=32, model_kwargs=TINY, drop_path=0.1)
    assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 7)
    assert max(m.drop_prob for m in model.modules() if hasattr(m, "drop_prob")) == pytest.approx(0.1)


def test_a_model_without_img_size_is_built_at_its_own_size():
    model = build_model("resnet18", num_classes=3, img_size=32).eval()
    assert model(torch.zeros(1, 3, 32, 32)).shape == (1, 3)


@pytest.mark.parametrize("name, kwargs, error", [
    ("no_such_model", None, "unknown model 'no_such_model'"),
    ("spach_ms_xxs_patch4_224_cnov", None, "unknown model 'spach_ms_xxs_patch4_224_cnov'"),
    ("some/path", None, "looks like a Hugging Face Hub repo id or a local path"),
    ("spach_ms_xxs_patch4_224_conv", dict(TINY, fo=1, bar=2), "spach_ms_xxs_patch4_224_conv does not take 'fo', 'bar'"),
    ("resnet18", {"widht": 2}, "model_kwargs: resnet18 does not take 'widht'"),
    ("resnet18", {"layers": "2222"}, "model_kwargs {'layers': '2222'} do not fit resnet18: TypeError"),
])
def test_a_users_mistake_is_a_value_error_naming_it(name, kwargs, error):
    with pytest.raises(ValueError, match=re.escape(error)):
        build_model(name, num_classes=3, img_size=32, model_kwargs=kwargs)


def test_a_type_error_inside_a_constructor_is_a_bug_not_the_users_mistake():
    # the message reads "unexpected keyword argument 'img_size'", but the user passed nothing wrong
    with pytest.raises(TypeError, match="unexpected keyword argument 'img_size'"):
        build_model("spach_test_buggy_model", num_classes=3, img_size=32)
    with pytest.raises(TypeError, match="unexpected keyword argument 'img_size'"):
        build_model("spach_test_buggy_model", num_classes=3, img_size=32, model_kwargs={"width": 2})
