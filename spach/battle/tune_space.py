"""The study file's `tune:` section: its checks, and its search space as Optuna distributions.

    tune:
      trials: 3                                   # per architecture, the same for every family
      space:
        lr: {low: 1.0e-4, high: 1.0e-2, log: true}  # a range (integers for integer options)
        weight_decay: {choices: [0.0, 0.05]}         # or a list of values
      seed: 0                                     # sampler, selection split, trials' training seed
      selection: 0.2                              # held-out fraction of each class of the training data
      startup_trials: 10                          # TPE's random trials before it models the results

Every key of `space` must be a training option (`TrainConfig`) that changes how a model learns: not
one the study sets itself (data, seed, ...), not the data slices or the selection split, and not
`epochs` (the budget is trials x epochs, the same for every family). Each end of a range and each
choice is checked by the recipe itself (`TrainConfig.validate`, with the study's other recipe
keys), so a value the engine would refuse is rejected before any training, with its key named.
"""
from __future__ import annotations

import dataclasses
import typing
from typing import Any

from spach.battle import schema
from spach.engine.config import TrainConfig

# options that are not hyper-parameters of learning, or would make budgets or selection unequal
UNTUNABLE = {"epochs", "max_train_samples", "max_val_samples", "selection_fraction", "selection_seed",
             "num_classes", "init_checkpoint", "pretrained", "pretrained_file", "workers", "device",
             "tensorboard", "checkpoint_every_steps", "check_finite_every", "compile", "channels_last",
             "grad_checkpointing", "cudnn_benchmark", "matmul_precision"}
RANGE_KEYS = {"low", "high", "log"}


def _fail(where: str, msg: str) -> None:
    raise ValueError(f"{where}: {msg}")


def _number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def option_type(name: str) -> Any:
    """The TrainConfig option's type, None unwrapped (``Optional[float]`` -> float)."""
    tp = typing.get_type_hints(TrainConfig)[name]
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    return args[0] if typing.get_origin(tp) is typing.Union and len(args) == 1 else tp


def check_value(name: str, value: Any, recipe: dict, what: str, where: str) -> None:
    """`value` for option `name` must pass the engine's own checks together with the recipe."""
    try:
        TrainConfig.from_dict(dict(recipe, **{name: value}, model="tune-check", data="tune-check",
                                   output="tune-check"))
    except (TypeError, ValueError) as e:
        _fail(where, f"tune.space.{name}: {what} {value!r} is refused by the recipe: {e}")


def check_range(name: str, entry: dict, recipe: dict, where: str) -> dict:
    """A ``{low, high, log}`` entry -> ``{"low", "high", "log", "int"}``; an empty range is an error."""
    w = f"tune.space.{name}"
    unknown = set(entry) - RANGE_KEYS
    if unknown:
        _fail(where, f"{w}: unknown key(s) {sorted(unknown)}; a range is {{low, high, log}}, a list {{choices}}")
    if "low" not in entry or "high" not in entry:
        _fail(where, f"{w}: a range needs both low and high")
    low, high, log = entry["low"], entry["high"], entry.get("log", False)
    tp = option_type(name)
    if tp not in (int, float):
        _fail(where, f"{w}: {name} is not a number option; give {{choices: [...]}} instead of a range")
    if not (_number(low) and _number(high)):
        _fail(where, f"{w}: low and high must be numbers, got {low!r} and {high!r}")
    if tp is int and not (isinstance(low, int) and isinstance(high, int)):
        _fail(where, f"{w}: {name} is an integer option: low and high must be integers")
    if not low < high:
        _fail(where, f"{w}: empty range: low {low!r} must be below high {high!r}")
    if not isinstance(log, bool):
        _fail(where, f"{w}.log must be true or false, got {log!r}")
    if log and not low > 0:
        _fail(where, f"{w}: a log range needs low > 0, got {low!r}")
    for what, value in (("low", low), ("high", high)):
        check_value(name, value, recipe, what, where)
    return {"low": low, "high": high, "log": log, "int": tp is int}


def check_choices(name: str, entry: dict, recipe: dict, where: str) -> dict:
    """A ``{choices: [...]}`` entry -> ``{"choices": [...]}``; an empty or repeated list is an error."""
    w = f"tune.space.{name}"
    if set(entry) != {"choices"}:
        _fail(where, f"{w}: a list of values is {{choices: [...]}} alone, got keys {sorted(entry)}")
    choices = entry["choices"]
    if not isinstance(choices, list) or not choices:
        _fail(where, f"{w}: empty choices: give a non-empty list of values")
    if any(not isinstance(c, (bool, int, float, str, type(None))) for c in choices):
        _fail(where, f"{w}: choices must be plain values (numbers, strings, true/false, null), got {choices!r}")
    if len({repr(c) for c in choices}) != len(choices):
        _fail(where, f"{w}: choices repeat a value: {choices!r}")
    for c in choices:
        check_value(name, c, recipe, "choice", where)
    return {"choices": list(choices)}


def check_space(space: Any, recipe: dict, owned: set[str], where: str) -> dict[str, dict]:
    """The `space` mapping, every entry checked (see the module doc); returned in the file's order."""
    if not isinstance(space, dict) or not space:
        _fail(where, "tune.space must map recipe keys to {low, high, log} or {choices: [...]}, e.g. "
                     "{lr: {low: 1.0e-4, high: 1.0e-2, log: true}}")
    options = {f.name for f in dataclasses.fields(TrainConfig)}
    out = {}
    for name, entry in space.items():
        if name not in options:
            _fail(where, f"tune.space: unknown key {name!r}: not a training option (see `spach train --help`)")
        if name in owned or name in UNTUNABLE:
            _fail(where, f"tune.space: {name!r} cannot be tuned (set by the study, or it changes the data or "
                         "the budget: the same for every family)")
        if not isinstance(entry, dict):
            _fail(where, f"tune.space.{name} must be {{low, high, log}} or {{choices: [...]}}, got {entry!r}")
        out[name] = (check_choices if "choices" in entry else check_range)(name, entry, recipe, where)
    return out


def check_tune(value: Any, recipe: dict, owned: set[str], where: str) -> dict[str, Any]:
    """The `tune:` section completed by its defaults, every key checked; ValueError naming the key."""
    try:
        out = schema.read_section(schema.Tune, value, "tune")
    except ValueError as e:
        _fail(where, str(e))
    out["space"] = check_space(out["space"], recipe, owned, where)
    return out


def distributions(space: dict[str, dict]) -> dict[str, Any]:
    """The checked space as Optuna distributions, by key."""
    import optuna.distributions as od

    out = {}
    for name, entry in space.items():
        if "choices" in entry:
            out[name] = od.CategoricalDistribution(entry["choices"])
        elif entry["int"]:
            out[name] = od.IntDistribution(entry["low"], entry["high"], log=entry["log"])
        else:
            out[name] = od.FloatDistribution(float(entry["low"]), float(entry["high"]), log=entry["log"])
    return out
