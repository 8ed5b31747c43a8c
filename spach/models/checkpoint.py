"""Loading weights safely: original release files, bare state dicts, our own checkpoints, safetensors.

Pickles are always read with ``torch.load(..., weights_only=True)``: a file that
would need to run code to load is refused, never executed. The one class allowed
beyond tensors and plain containers is ``argparse.Namespace``, which the original
release's training checkpoints carry (the run's arguments): it only holds attributes.
"""
from __future__ import annotations

import argparse
import hashlib
import os
import pickle
from pathlib import Path

import torch
import torch.nn as nn

from spach.io import atomic_write
from spach.models import shiftvit, smlpnet
from spach.models.shiftvit import ShiftViT
from spach.models.smlpnet import SMLPNet
from spach.models.spach import SpachNet, checkpoint_filter_fn

# model class -> the function mapping its original release's state dicts onto it (the zoos' pretrained filters too)
ORIGINAL_LAYOUT_FILTERS = {SpachNet: checkpoint_filter_fn, SMLPNet: smlpnet.checkpoint_filter_fn,
                           ShiftViT: shiftvit.checkpoint_filter_fn}
# classes a checkpoint may contain besides tensors and containers (original training checkpoints' `args`)
SAFE_CLASSES = [argparse.Namespace]

# prefixes added by wrappers: DistributedDataParallel, torch.compile
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")
# the entry (pickles) / metadata key (safetensors) holding the content checksum of a file written by spach
CHECKSUM_KEY = "checksum"


class MissingEntryError(KeyError, ValueError):
    """A checkpoint lacks the requested entry (e.g. EMA weights); a ValueError too, for one clear message."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


def state_checksum(obj) -> str:
    """SHA-256 of a state's content: every tensor's dtype, shape and bytes, and the plain data around them."""
    h = hashlib.sha256()

    def feed(x) -> None:
        if isinstance(x, torch.Tensor):
            t = x.detach().cpu().contiguous()
            h.update(f"T{t.dtype}{tuple(t.shape)};".encode())
            if t.numel():
                h.update(t.reshape(-1).view(torch.uint8).numpy())
        elif isinstance(x, dict):
            h.update(f"D{len(x)};".encode())
            for k, v in x.items():
                feed(k)
                feed(v)
        elif isinstance(x, (list, tuple)):
            h.update(f"L{len(x)};".encode())
            for v in x:
                feed(v)
        else:
            h.update(f"{type(x).__name__}:{x!r};".encode())
    feed(obj)
    return h.hexdigest()


def with_checksum(state: dict) -> dict:
    """`state` plus its content checksum (verified by `read_state_file`)."""
    state = {k: v for k, v in state.items() if k != CHECKSUM_KEY}
    return {**state, CHECKSUM_KEY: state_checksum(state)}


def _verify(path: Path, state: dict, expected, sort: bool = False) -> dict:
    content = dict(sorted(state.items())) if sort else state  # safetensors stores tensors in its own order
    if expected is not None and state_checksum(content) != expected:
        raise ValueError(f"checkpoint {path} is corrupt: its content does not match the checksum written with it "
                         "(flipped bytes on disk or in transfer?)")
    return state


def read_state_file(path: str | os.PathLike) -> dict:
    """Read a ``.safetensors`` file or a torch pickle (``weights_only=True``) into a dict."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        from safetensors import safe_open

        try:
            tensors = load_file(str(path), device="cpu")
            with safe_open(str(path), framework="pt") as f:
                expected = (f.metadata() or {}).get(CHECKSUM_KEY)
        except Exception as e:  # noqa: BLE001 — safetensors raises its own error types
            raise ValueError(f"cannot read safetensors file {path}: {e}") from e
        return _verify(path, tensors, expected, sort=True)
    try:
        with torch.serialization.safe_globals(SAFE_CLASSES):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        detail = _unpickler_detail(e)
        if "global" not in detail.lower():  # an opcode it cannot read: garbage, or a pickle it does not support
            raise ValueError(f"refusing to load {path}: unreadable with weights_only=True (truncated or corrupt, "
                             f"or a pickle that needs more than plain tensors and data). Details: {detail}") from e
        raise ValueError(
            f"refusing to load {path}: it contains Python objects that loading with weights_only=True "
            f"does not allow (loading it would run code from the file). Details: {detail}") from e
    except MemoryError:
        raise
    except Exception as e:  # noqa: BLE001 — torch's reader fails on garbage in many ways (KeyError, IndexError, ...)
        raise ValueError(f"checkpoint {path} is unreadable (truncated or corrupt?): {type(e).__name__}: {e}") from e
    if not isinstance(obj, dict):
        raise ValueError(f"checkpoint {path} holds a {type(obj).__name__}, not a state dict")
    if isinstance(obj.get(CHECKSUM_KEY), str):
        expected = obj.pop(CHECKSUM_KEY)
        return _verify(path, obj, expected)
    return obj


def _unpickler_detail(e: Exception) -> str:
    """The informative line of torch's weights-only error (its message is a page of advice)."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    for line in lines:
        if "global" in line.lower():  # "Unsupported global: ..." / "unsupported GLOBAL posix.system ..."
            return line
    for i, line in enumerate(lines):
        if line.startswith("WeightsUnpickler error"):
            return line.split(":", 1)[1].strip() or (lines[i + 1] if i + 1 < len(lines) else line)
    return lines[0] if lines else type(e).__name__


def extract_state_dict(obj: dict, key: str | None = None, source: str = "checkpoint") -> dict:
    """Pick the model's state dict from a checkpoint dict and drop wrapper prefixes."""
    if key is not None:
        if key not in obj:
            hint = ""
            if key == "model_ema" and "model" not in obj:  # a flat state dict (.safetensors export)
                hint = " (it is a bare set of weights; the EMA weights of a run are in its model_ema.safetensors)"
            entries = ", ".join(_head(list(map(str, obj))))
            raise MissingEntryError(f"{source} has no entry {key!r}{hint}; it has: {entries}")
        if not isinstance(obj[key], dict):
            if key == "model_ema":
                raise MissingEntryError(f"{source} has no EMA weights (trained with --no-model-ema?); evaluate "
                                        "its main weights instead (without --ema)")
            raise MissingEntryError(f"{source} has no weights under {key!r}")
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
    for cls, filter_fn in ORIGINAL_LAYOUT_FILTERS.items():  # other (timm) models keep their own layout
        if isinstance(model, cls):
            state_dict = filter_fn(state_dict, model)
            break

    expected = model.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    mismatched = [f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(v.shape)}"
                  for k, v in expected.items() if k in state_dict and state_dict[k].shape != v.shape]
    wrong_dtype = [f"{k}: checkpoint {state_dict[k].dtype} vs model {v.dtype}" for k, v in expected.items()
                   if isinstance(state_dict.get(k), torch.Tensor) and _kind(state_dict[k]) != _kind(v)]
    problems = []
    if mismatched:
        problems.append(f"shape mismatch for {len(mismatched)} tensors: " + "; ".join(_head(mismatched)))
    if wrong_dtype:  # load_state_dict would cast them silently (int64 weights -> garbage floats)
        problems.append(f"dtype mismatch for {len(wrong_dtype)} tensors: " + "; ".join(_head(wrong_dtype)))
    if strict and missing:
        problems.append(f"{len(missing)} missing keys: " + ", ".join(_head(missing)))
    if strict and unexpected:
        problems.append(f"{len(unexpected)} unexpected keys: " + ", ".join(_head(unexpected)))
    if problems:
        raise ValueError(f"cannot load {where} into {name}: " + " | ".join(problems))
    model.load_state_dict(state_dict, strict=strict)
    return model


def _kind(t: torch.Tensor) -> str:
    """float / complex / integer (bool included): a checkpoint may change precision, not kind."""
    return "float" if t.is_floating_point() else "complex" if t.is_complex() else "integer"


def load_for_finetuning(model: nn.Module, source, key: str | None = None) -> str | None:
    """Load ``source`` into ``model`` to fine-tune it: with another class count, the trunk loads and
    the model's new classifier is kept (as timm does for ``pretrained=True`` and a new ``num_classes``).

    Returns the one line that says so (None when the whole checkpoint loaded). Everything else
    must fit as in :func:`load_checkpoint`.
    """
    where = str(source) if isinstance(source, (str, os.PathLike)) else "the given state dict"
    obj = read_state_file(source) if isinstance(source, (str, os.PathLike)) else source
    state_dict = extract_state_dict(obj, key, where)
    if isinstance(model, SpachNet):
        state_dict = checkpoint_filter_fn(state_dict, model)
    classifier = getattr(model, "pretrained_cfg", {}).get("classifier") or "head"
    names = classifier if isinstance(classifier, (list, tuple)) else (classifier,)
    own = model.state_dict()
    replaced = [k for n in names for k in (f"{n}.weight", f"{n}.bias")
                if k in state_dict and k in own and state_dict[k].shape != own[k].shape]
    if not replaced:
        load_checkpoint(model, state_dict, strict=True)
        return None
    old_classes = state_dict[replaced[0]].shape[0]
    # the model's freshly initialised classifier stands in for the checkpoint's, so the rest loads strictly
    load_checkpoint(model, {**state_dict, **{k: own[k] for k in replaced}}, strict=True)
    return (f"{where}: loaded the trunk; its {old_classes}-class classifier ({', '.join(replaced)}) does not fit "
            f"the model's {getattr(model, 'num_classes', '?')} classes, so a new classifier starts from scratch")


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
    metadata[CHECKSUM_KEY] = state_checksum(dict(sorted(tensors.items())))
    with atomic_write(path) as f:
        f.write(save(tensors, metadata=metadata))
    return path
