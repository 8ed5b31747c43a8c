"""The SPACH model zoo and the release's sMLPNet and ShiftViT: networks, timm registration, loading, counts."""
from __future__ import annotations

import timm
import torch.nn as nn

from spach.models.checkpoint import (load_checkpoint, load_for_finetuning, read_state_file,  # noqa: F401
                                     save_safetensors, state_checksum, with_checksum)
from spach.models.complexity import count_macs, count_macs_on, count_params  # noqa: F401
from spach.models.registry import (  # noqa: F401
    MixerInfo,
    canonical_mixer,
    get_mixer,
    mixer_names,
    register_mixer,
    unregister_mixer,
)
from spach.models import mixers  # noqa: F401,E402  (registers pool, shift, smlp, gfilter, window)
from spach.models.spach import Spach, SpachMS, SpachNet, checkpoint_filter_fn  # noqa: F401
from spach.models.zoo import ALL_MODELS, NEWCOMERS, ORIGINAL_WEIGHTS, ZOO, family, layout  # noqa: F401  (in timm)
from spach.models.ops import SparseMLP, partial_shift  # noqa: F401
from spach.models.shiftvit import ShiftViT  # noqa: F401
from spach.models.smlpnet import SMLPNet, sMLPNet  # noqa: F401
from spach.models.release_zoo import RELEASE_WEIGHTS, RELEASE_ZOO, release_family  # noqa: F401  (registers in timm)


def __getattr__(name: str):
    if name == "MIXERS":  # read from the registry on access: includes plugin mixers
        return mixer_names()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def list_models(newcomers: bool = False) -> list[str]:
    """The zoo's names, in the paper's order (single-stage, multi-stage, hybrids); with ``newcomers=True``
    also the arena's post-paper mixers (``spach_ms_*_{pool,shift,smlp,gfilter,window}``)."""
    return list(ALL_MODELS if newcomers else ZOO)


def list_release_models() -> list[str]:
    """The names of the release's other two projects: sMLPNet, then ShiftViT."""
    return list(RELEASE_ZOO)


def create_model(name: str, pretrained: bool = False, checkpoint: str | None = None, **kwargs) -> nn.Module:
    """``timm.create_model`` with the zoo registered; ``checkpoint`` loads weights via :func:`load_checkpoint`.

    Any timm model name works too. Keyword overrides are the constructor's
    (``num_classes``, ``img_size``, ``hidden_dim``, ``net_arch``, ``cpe``, ...).
    """
    model = timm.create_model(name, pretrained=pretrained, **kwargs)
    if checkpoint is not None:
        load_checkpoint(model, checkpoint)
    return model
