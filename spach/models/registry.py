"""The spatial-mixer registry: every mixer a SPACH block can use, by name — the single source of truth.

A mixer is an ``nn.Module`` class built as ``cls(dim, **context)`` that maps
``(B, H, W, C)`` tokens to ``(B, H, W, C)``. ``context`` is what the skeleton
knows about the block (see :data:`CONTEXT_KEYS`); a mixer's constructor takes
the keys it needs, by name, and is given only those (unless it takes ``**kwargs``)::

    import spach, torch.nn as nn

    @spach.register_mixer("identity_plus")
    class IdentityPlus(nn.Module):
        '''My mixer (Me et al., 2025).'''
        def __init__(self, dim, grid_size):
            super().__init__()
            self.scale = nn.Parameter(torch.ones(dim))
        def forward(self, x):             # (B, H, W, C) -> (B, H, W, C)
            return x * self.scale

    net = spach.SpachMS(hidden_dim=16, num_heads=1, net_arch=[[("conv", 1)], [("identity_plus", 1)], ...])

The built-ins ``conv`` (alias ``pass``: the block's depthwise conv is the mixer),
``attn`` and ``mlp`` are registered where they are defined, in :mod:`spach.models.layers`;
the post-paper contestants in :mod:`spach.models.mixers`. This module imports neither.
"""
from __future__ import annotations

import inspect
import re
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn as nn

# what the skeleton passes to a mixer's constructor (plus the per-mixer options of ``mixer_kwargs``)
CONTEXT_KEYS = ("num_heads", "grid_size", "token_ratio", "qkv_bias", "qk_scale", "attn_drop", "drop",
                "block_index", "stage_index", "stage_depth", "shared")
MIXER_ALIASES = {"pass": "conv"}  # the original release calls the conv family's mixer "pass"
RESERVED = {"hybrid"}  # a battle family (conv early, attention late), not a mixer
_NAME = re.compile(r"^[a-z][a-z0-9_]*$")


@dataclass(frozen=True)
class MixerInfo:
    """One registered mixer."""

    name: str
    cls: type
    fixed_input_size: bool   # its weights depend on the token grid: the model takes one input size
    source: str              # "built-in" or the module that registered it
    paper: str
    builder: Callable[[int, dict], nn.Module | None] | None = None
    cpe_is_mixer: bool = False  # the block's depthwise conv (CPE) is the mixer: no module of its own

    def build(self, dim: int, context: dict[str, Any], options: dict[str, Any] | None = None) -> nn.Module | None:
        """The mixer for one block: ``cls(dim, **context)`` restricted to what the constructor takes."""
        options = dict(options or {})
        if self.builder is not None:
            if options:
                raise ValueError(f"mixer {self.name!r} takes no options, got {sorted(options)}")
            return self.builder(dim, context)
        params = inspect.signature(self.cls.__init__).parameters
        takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
        unknown = [k for k in options if k not in params and not takes_any]
        if unknown:
            raise ValueError(f"mixer {self.name!r} does not take option(s) {unknown}; its constructor takes "
                             f"{[p for p in params if p not in ('self', 'dim')]}")
        kwargs = {k: v for k, v in context.items() if takes_any or k in params}
        kwargs.update(options)
        return self.cls(dim, **kwargs)


_REGISTRY: dict[str, MixerInfo] = {}


def _paper_of(cls: type) -> str:
    paper = getattr(cls, "paper", None)
    if isinstance(paper, str) and paper:
        return paper
    doc = inspect.getdoc(cls) or ""
    return doc.splitlines()[0] if doc else ""


def register_mixer(name: str, *, fixed_input_size: bool = False, paper: str | None = None,
                   builder: Callable[[int, dict], nn.Module | None] | None = None,
                   cpe_is_mixer: bool = False, source: str | None = None):
    """Class decorator: make an ``nn.Module`` a spatial mixer of the SPACH block under ``name``.

    - ``fixed_input_size``: the mixer's weights depend on the token grid (``grid_size``), so
      a model using it takes only the input size it was built for.
    - ``paper``: shown by ``spach mixers``; default: the class's ``paper`` attribute or the
      first line of its docstring.
    - ``builder(dim, context)``: for a class whose constructor is not ``cls(dim, **context)``.

    Names are lower-case identifiers (``[a-z][a-z0-9_]*``), unique; ``pass`` and ``hybrid`` are taken.
    """
    if not isinstance(name, str) or not _NAME.match(name):
        raise ValueError(f"register_mixer({name!r}): a mixer name is a lower-case identifier "
                         "([a-z][a-z0-9_]*, it becomes part of model and run names), e.g. 'my_mixer'")
    if name in MIXER_ALIASES or name in RESERVED:
        what = f"an alias of {MIXER_ALIASES[name]!r}" if name in MIXER_ALIASES else "a battle family"
        raise ValueError(f"register_mixer({name!r}): {name!r} is reserved ({what}); pick another name")

    def decorate(cls):
        if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
            raise TypeError(f"register_mixer({name!r}) decorates an nn.Module subclass, got {cls!r}")
        if name in _REGISTRY:
            old = _REGISTRY[name]
            raise ValueError(f"mixer {name!r} is already registered ({old.cls.__module__}.{old.cls.__qualname__}, "
                             f"{old.source}); pick another name for {cls.__module__}.{cls.__qualname__}")
        origin = source or ("built-in" if cls.__module__.startswith("spach.") else cls.__module__)
        _REGISTRY[name] = MixerInfo(name, cls, bool(fixed_input_size), origin,
                                    paper if paper is not None else _paper_of(cls), builder, cpe_is_mixer)
        return cls

    return decorate


def unregister_mixer(name: str) -> None:
    """Remove a plugin mixer (built-ins stay); for tests and interactive sessions."""
    info = get_mixer(name)
    if info.source == "built-in":
        raise ValueError(f"mixer {name!r} is built in and cannot be unregistered")
    del _REGISTRY[info.name]


def canonical_mixer(name: str) -> str:
    """A registered mixer's canonical name (``pass`` -> ``conv``); ValueError listing the registered ones."""
    key = MIXER_ALIASES.get(name, name) if isinstance(name, str) else name
    if key not in _REGISTRY:
        raise ValueError(f"unknown mixer {name!r}: registered mixers are {', '.join(_REGISTRY)} (or 'pass' for "
                         "conv); register your own with spach.register_mixer")
    return key


def get_mixer(name: str) -> MixerInfo:
    """The registry entry of a mixer (aliases accepted)."""
    return _REGISTRY[canonical_mixer(name)]


def mixer_names() -> tuple[str, ...]:
    """Every registered mixer, built-ins first, in registration order."""
    return tuple(_REGISTRY)


def check_mixer_output(name: str, module: nn.Module, dim: int, grid_size: tuple[int, int]) -> None:
    """Run ``module`` once on a ``(1, H, W, dim)`` input (meta device for meta models); ValueError naming the
    mixer if it does not return that shape. Leaves the RNG, the autograd state and train/eval mode as they were."""
    try:
        p = next(module.parameters())
        device, dtype = p.device, p.dtype
    except StopIteration:
        device, dtype = torch.device("cpu"), torch.get_default_dtype()
    shape = (1, int(grid_size[0]), int(grid_size[1]), dim)
    was_training = module.training
    module.eval()
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            out = module(torch.zeros(shape, device=device, dtype=dtype))
    except NotImplementedError:
        if device.type == "meta":
            return  # an operator without a meta kernel: the check runs when the model is built for real
        raise
    finally:
        module.train(was_training)
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != shape:
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(f"mixer {name!r} ({type(module).__module__}.{type(module).__qualname__}) maps a {shape} "
                         f"input to {got}: a spatial mixer must return its input's shape (B, H, W, C)")


# --------------------------------------------------------------------------- plugins

def resolve_plugins(entries, base_dir) -> list[dict[str, str]]:
    """Study-file ``plugins:`` entries -> ``{"file": absolute path}`` (an entry ending in ``.py``,
    relative to ``base_dir``) or ``{"module": dotted name, "path": base_dir}``; clear errors for bad entries."""
    from pathlib import Path

    if not isinstance(entries, list) or not all(isinstance(e, str) and e.strip() for e in entries):
        raise ValueError(f"plugins must be a list of module names or .py paths, got {entries!r}")
    base = Path(base_dir).resolve()
    out = []
    for entry in entries:
        if entry.endswith(".py") or "/" in entry:
            path = (base / entry).resolve()
            if not path.is_file():
                raise ValueError(f"plugins: no file {entry!r} (looked for {path}; paths are relative to the "
                                 "study file)")
            out.append({"file": str(path)})
        elif re.match(r"^[A-Za-z_][\w.]*$", entry):
            out.append({"module": entry, "path": str(base)})
        else:
            raise ValueError(f"plugins: {entry!r} is neither a module name (my_mixers, pkg.mixers) nor a .py path")
    return out


def import_plugins(resolved: list[dict[str, str]]) -> None:
    """Import resolved plugin entries (see :func:`resolve_plugins`) once per process. This RUNS their code:
    they register their mixers with :func:`register_mixer` as they are imported."""
    import hashlib
    import importlib
    import importlib.util
    import sys

    for entry in resolved:
        try:
            if "file" in entry:
                path = entry["file"]
                stem = re.sub(r"[^0-9A-Za-z_]", "_", path.rsplit("/", 1)[-1][:-3])
                name = f"spach_plugin_{hashlib.sha256(path.encode()).hexdigest()[:8]}_{stem}"
                if name in sys.modules:
                    continue
                spec = importlib.util.spec_from_file_location(name, path)
                if spec is None or spec.loader is None:
                    raise ImportError(f"cannot load {path} as a Python module")
                module = importlib.util.module_from_spec(spec)
                sys.modules[name] = module
                try:
                    spec.loader.exec_module(module)
                except BaseException:
                    del sys.modules[name]
                    raise
            else:
                if entry["path"] not in sys.path:
                    sys.path.append(entry["path"])
                importlib.import_module(entry["module"])
        except ValueError:
            raise
        except Exception as e:  # noqa: BLE001 — the user's code: report what it raised
            what = entry.get("file") or entry.get("module")
            raise ValueError(f"plugins: importing {what} failed: {type(e).__name__}: {e}") from None
