"""Loading weights safely: original release files, bare state dicts, our own checkpoints, safetensors.

Pickles are always read with ``torch.load(..., weights_only=True)``: a file that
would need to run code to load is refused, never executed.
"""
from __future__ import annotations

import os
import pickle
from pathlib import Path

import torch
import torch.nn as nn

from spach.io import atomic_write
from spach.models.spach import SpachNet, checkpoint_filter_fn

# prefixes added by wrappers: DistributedDataParallel, torch.compile
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def read_state_file(path: str | os.PathLike) -> dict:
    """Read a ``.safetensors`` file or a torch pickle (``weights_only=True``) into a dict."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu")
        except Exception as e:  # safetensors raises its own error types
            raise ValueError(f"cannot read safetensors file {path}: {e}") from e
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise ValueError(
            f"refusing to load {path}: it contains Python objects that loading with weights_only=True "
            f"does not allow (loading it would run code from the file). Details: {e}") from e
    except (RuntimeError, EOFError, OSError) as e:
        raise ValueError(f"checkpoint {path} is unreadable (truncated or corrupt?): {type(e).__name__}: {e}") from e
    if not isinstance(obj, dict):
        raise ValueError(f"checkpoint {path} holds a {type(obj).__name__}, not a state dict")
    return obj


def extract_state_dict(obj: dict, key: str | None = None, source: str = "checkpoint") -> dict:
    """Pick the model's state dict from a checkpoint dict and drop wrapper prefixes."""
    if key is not None:
        if key not in obj:
            raise KeyError(f"{source} has no entry {key!r}; it has: {', '.join(map(str, obj))}")
        obj = obj[key]
    else:
        for candidate in ("model", "state_dict"):
            if isinstance(obj.get(candidate), dict):
                obj = obj[candidate]
                break
    state_dict = {}
    for k, v in obj.items():
        for prefix in _WRAPPER_PREFIXES:
            if k.startswith(prefix):
                k = k[len(prefix):]
        state_dict[k] = v
    return state_dict


def load_checkpoint(model: nn.Module, source, key: str | None = None, strict: bool = True) -> nn.Module:
    """Load weights into ``model`` and return it.

    ``source`` is a path (``.pth``/``.pt`` pickle or ``.safetensors``) or a dict.
    Accepts an original release file (``{"model": state_dict, ...}`` in the
    original layout), a bare state dict, the project's own training checkpoints
    (``key="model_ema"`` picks the EMA weights) and safetensors exports.
    Missing or unexpected keys and shape mismatches raise one ``ValueError``
    naming them, the model and the source.
    """
    name = getattr(model, "pretrained_cfg", {}).get("architecture") or type(model).__name__
    where = str(source) if isinstance(source, (str, os.PathLike)) else "the given state dict"
    obj = read_state_file(source) if isinstance(source, (str, os.PathLike)) else source
    if not isinstance(obj, dict):
        raise TypeError(f"source must be a path or a dict, got {type(obj).__name__}")
    state_dict = extract_state_dict(obj, key, where)
    if isinstance(model, SpachNet):  # other (timm) models keep their own layout
        state_dict = checkpoint_filter_fn(state_dict, model)

    expected = model.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    mismatched = [f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(v.shape)}"
                  for k, v in expected.items() if k in state_dict and state_dict[k].shape != v.shape]
    problems = []
    if mismatched:
        problems.append(f"shape mismatch for {len(mismatched)} tensors: " + "; ".join(_head(mismatched)))
    if strict and missing:
        problems.append(f"{len(missing)} missing keys: " + ", ".join(_head(missing)))
    if strict and unexpected:
        problems.append(f"{len(unexpected)} unexpected keys: " + ", ".join(_head(unexpected)))
    if problems:
        raise ValueError(f"cannot load {where} into {name}: " + " | ".join(problems))
    model.load_state_dict(state_dict, strict=strict)
    return model


def _head(items: list[str], n: int = 8) -> list[str]:
    return items[:n] + ([f"... ({len(items) - n} more)"] if len(items) > n else [])


def save_safetensors(model: nn.Module, path: str | os.PathLike, metadata: dict | None = None) -> Path:
    """Write the model's weights as ``.safetensors``, atomically (temp file, fsync, rename).

    Tensors shared between modules (weight sharing) are stored under every name
    (safetensors refuses aliases), so the file loads strictly like any state dict.
    """
    from safetensors.torch import save

    path = Path(path)
    seen: set[tuple] = set()
    tensors = {}
    for k, v in model.state_dict().items():
        alias = (v.untyped_storage().data_ptr(), v.storage_offset(), tuple(v.stride()))
        v = v.detach().cpu()
        tensors[k] = v.clone().contiguous() if alias in seen else v.contiguous()
        seen.add(alias)
    metadata = {k: str(v) for k, v in (metadata or {}).items()}
    with atomic_write(path) as f:
        f.write(save(tensors, metadata=metadata))
    return path
