"""The study file's `tune:` section: its checks, and its search space as Optuna distributions.

    tune:
      trials: 3                                   # per architecture, the same for every family
      space:
        lr: {low: 1.0e-4, high: 1.0e-2, log: true}  # a range (integers for integer options)
        weight_decay: {choices: [0.0, 0.05]}         # or a list of values
      seed: 0                                     # sampler, selection split, trials' training seed
      selection: 0.2                              # held-out fraction of each class of the training data
      startup_trials: 10                          # TPE's random trials before it models the results
      pruner: {kind: median, startup_trials: 2, warmup_epochs: 1}   # optional; null: no pruning

Every key of `space` must be a training option (`TrainConfig`) that changes how a model learns: not
one the study sets itself (data, seed, ...), not the data slices or the selection split, and not
`epochs` (the budget is trials x epochs, the same for every family). Each end of a range and each
choice is checked by the recipe itself (`TrainConfig.validate`, with the study's other recipe
keys), so a value the engine would refuse is rejected before any training, with its key named.

`pruner` is one of three Optuna pruners (schema.PRUNERS), the same for every architecture. Its steps are
epochs, counted from 1 as the battle counts them, and its values the selection top-1 (%) after each epoch:

    {kind: median, startup_trials: S, warmup_epochs: W}     MedianPruner(n_startup_trials=S, n_warmup_steps=W + 1)
    {kind: asha, min_epochs: M, reduction_factor: R}        SuccessiveHalvingPruner(min_resource=M, reduction_factor=R)
    {kind: threshold, lower: L, warmup_epochs: W}           ThresholdPruner(lower=L, n_warmup_steps=W + 1)

(W warm-up epochs: the first decision comes after epoch W + 1; Optuna prunes from step n_warmup_steps on).
A pruner that could never stop a trial (its first decision at or after the recipe's last epoch) is an error.
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
    out["pruner"] = check_pruner(out["pruner"], recipe, where)
    return out


def check_pruner(value: Any, recipe: dict, where: str) -> dict[str, Any] | None:
    """`tune.pruner` completed by its kind's defaults (schema.PRUNERS), or None (no pruning); ValueError naming
    the key for an unknown kind or key, a value out of bounds, or a pruner that could never stop a trial."""
    if value is None:
        return None
    kinds = sorted(schema.PRUNERS)
    if not isinstance(value, dict) or "kind" not in value:
        _fail(where, f"tune.pruner must be a mapping with a kind, one of {kinds}, e.g. {{kind: median, "
                     f"startup_trials: 2, warmup_epochs: 1}}; null: no pruning (got {value!r})")
    if value["kind"] not in schema.PRUNERS:
        _fail(where, f"tune.pruner.kind must be one of {kinds}, got {value['kind']!r}")
    try:
        out = schema.read_section(schema.PRUNERS[value["kind"]], value, "tune.pruner")
    except ValueError as e:
        _fail(where, str(e))
    epochs = TrainConfig.from_dict(dict(recipe, model="tune-check", data="tune-check", output="tune-check")).epochs
    if first_pruning_epoch(out) >= epochs:
        name = "min_epochs" if out["kind"] == "asha" else "warmup_epochs"
        _fail(where, f"tune.pruner.{name}: {out[name]} leaves no epoch at which to prune: the first decision comes "
                     f"after epoch {first_pruning_epoch(out)} and the recipe trains {epochs} epoch(s)")
    return out


def first_pruning_epoch(pruner: dict[str, Any]) -> int:
    """The first epoch after which the checked `pruner` may stop a trial."""
    return pruner["min_epochs"] if pruner["kind"] == "asha" else pruner["warmup_epochs"] + 1


def optuna_pruner(pruner: dict[str, Any] | None):
    """The checked `pruner` as an Optuna pruner (None: Optuna's NopPruner); steps are epochs from 1."""
    import optuna.pruners as op

    if pruner is None:
        return op.NopPruner()
    if pruner["kind"] == "median":
        return op.MedianPruner(n_startup_trials=pruner["startup_trials"], n_warmup_steps=first_pruning_epoch(pruner))
    if pruner["kind"] == "asha":
        return op.SuccessiveHalvingPruner(min_resource=pruner["min_epochs"],
                                          reduction_factor=pruner["reduction_factor"])
    return op.ThresholdPruner(lower=float(pruner["lower"]), n_warmup_steps=first_pruning_epoch(pruner))


def describe_pruner(pruner: dict[str, Any] | None) -> str:
    """The pruner in words, for the report and the console."""
    if pruner is None:
        return "no pruner: every trial trains all its epochs"
    first = first_pruning_epoch(pruner)
    if pruner["kind"] == "median":
        return (f"median pruner: after each epoch from epoch {first} on, once {pruner['startup_trials']} trial(s) are "
                "complete, a trial whose best selection top-1 is below the complete trials' median at that epoch is "
                "stopped")
    if pruner["kind"] == "asha":
        return (f"successive-halving pruner (ASHA): at epochs {first} x {pruner['reduction_factor']}^k only the top "
                f"1/{pruner['reduction_factor']} of the trials that reached that epoch go on")
    return (f"threshold pruner: after each epoch from epoch {first} on, a trial whose selection top-1 is below "
            f"{pruner['lower']:g}% is stopped")


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
