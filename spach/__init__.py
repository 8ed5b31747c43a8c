"""SPACH: one skeleton, swappable spatial mixers — conv, attention, MLP and hybrids.

``import spach`` registers the model zoo in ``timm``::

    import spach, timm
    model = timm.create_model("spach_ms_s_patch4_224_hybrid", num_classes=10)
    spach.load_checkpoint(model, "spach_ms_hybrid_s.pth")   # an original release file
"""
from spach.errors import ArchitectureRefusal, SpachError  # noqa: F401
from spach.models import (  # noqa: F401
    SMLPNet,
    ShiftViT,
    Spach,
    SpachMS,
    count_macs,
    count_params,
    create_model,
    list_models,
    get_mixer,
    load_checkpoint,
    mixer_names,
    register_mixer,
    save_safetensors,
)

__version__ = "0.1.0"
