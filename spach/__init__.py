"""SPACH: one skeleton, swappable spatial mixers — conv, attention, MLP and hybrids.

`import spach` registers the model zoo in `timm`.
"""
from spach.models import Spach, SpachMS, create_model, load_checkpoint, list_models  # noqa: F401

__version__ = "0.1.0"
