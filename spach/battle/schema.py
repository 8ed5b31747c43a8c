"""The study file's schema: its sections as typed dataclasses, and the one routine that validates a section.

Each section is a dataclass whose fields are the section's keys, with their types and defaults; the
bounds and choices sit in the field's metadata (:func:`key`). :func:`read_section` checks a mapping
against one: unknown keys, missing required keys, each value's type (by :func:`spach.engine.config.coerce`,
the coercion `TrainConfig` uses, in its strict mode) and bounds. Sections whose values are checked
by the code that expands them (the grid, sizes, extra entries) declare their keys here, once.
"""
from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Any, Optional, Union

from spach.battle.launchers import LAUNCHERS
from spach.engine.config import coerce

LAYOUTS = ("ss", "ms")
MEASURE_DTYPES = ("fp32", "bf16")  # the precisions spach.bench measures
LAUNCHER_KINDS = LAUNCHERS  # the launcher registry itself (spach.battle.launchers): its kinds, live
REQUIRED = dataclasses.MISSING


@dataclass(frozen=True)
class Arch:
    """One architecture of a study — the key its runs (spec.Run) and their aggregate (findings.Group) share."""

    family: str
    layout: str
    size: str
    cpe: bool = True
    shared: bool = False

    def label(self, base: str) -> str:
        """`base` with the ablations: ``-nocpe`` without the conv branch, ``-shared`` with shared weights."""
        return base + ("" if self.cpe else "-nocpe") + ("-shared" if self.shared else "")

    @property
    def name(self) -> str:
        """The grid's group name, e.g. ``attn-ms-tiny-nocpe``."""
        return self.label(f"{self.family}-{self.layout}-{self.size}")


class HasArch:
    """The fields of :class:`Arch`, read through a dataclass's ``arch``."""

    arch: Arch
    family = property(lambda self: self.arch.family)
    layout = property(lambda self: self.arch.layout)
    size = property(lambda self: self.arch.size)
    cpe = property(lambda self: self.arch.cpe)
    shared = property(lambda self: self.arch.shared)


def key(default: Any = REQUIRED, *, ge: float | None = None, gt: float | None = None, lt: float | None = None,
        choices: tuple | None = None, nonempty: bool = False, hint: str = "") -> Any:
    """A section's key: its default (none: required), bounds (``ge``/``gt`` below, ``lt`` above), ``choices``,
    and the ``hint`` its error message ends with."""
    meta = {"ge": ge, "gt": gt, "lt": lt, "choices": choices, "nonempty": nonempty, "hint": hint}
    if isinstance(default, (dict, list)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class Measure:
    """``measure:``: throughput by the Swin protocol (eval mode, `warmup` untimed passes, then the mean of
    `repeats` timed ones)."""

    batch_size: int = key(64, ge=1)
    dtype: str = key("fp32", choices=MEASURE_DTYPES, hint="the precisions spach bench measures")
    threads: Optional[int] = key(None, ge=1)
    warmup: int = key(50, ge=0)
    repeats: int = key(30, ge=1)
    device: str = key("cpu", choices=("cpu", "cuda"))


@dataclass(frozen=True)
class Launcher:
    """``launcher:``. The slurm keys (spach.battle.slurm: one Slurm job per run) may also sit in a local or
    torchrun launcher, for ``spach battle --launcher slurm``; None leaves the option to the cluster's defaults."""

    kind: str = key("local", choices=LAUNCHER_KINDS)
    nproc_per_node: int = key(1, ge=1)
    args: list[str] = key([], hint="extra torchrun arguments")
    partition: Optional[str] = key(None, nonempty=True)
    account: Optional[str] = key(None, nonempty=True)
    qos: Optional[str] = key(None, nonempty=True)
    constraint: Optional[str] = key(None, nonempty=True)
    nodes: int = key(1, ge=1)
    gpus_per_node: int = key(0, ge=0)
    tasks_per_node: Optional[int] = key(None, ge=1)
    cpus_per_task: Optional[int] = key(None, ge=1)
    mem_gb: Optional[float] = key(None, gt=0)
    time_min: int = key(1440, ge=1)
    setup: list[str] = key([], hint="shell lines, e.g. ['module load cuda/12.1']")
    sbatch: dict[str, Union[str, int, float, bool]] = key({}, hint="sbatch option names to values, "
                                                                   "e.g. {exclusive: true}")
    max_jobs: Optional[int] = key(None, ge=1)
    max_attempts: int = key(3, ge=1)
    poll_s: float = key(30.0, gt=0)
    address: str = key("auto", nonempty=True, hint="ray: auto, HOST:PORT or ray://HOST:PORT")
    cpus_per_run: float = key(1.0, gt=0, hint="ray: the CPUs each run's task reserves")
    gpus_per_run: float = key(0.0, ge=0, hint="ray: the GPUs each run's task reserves")


@dataclass(frozen=True)
class MlflowTracking:
    """``tracking.mlflow``: log every run to MLflow (spach.battle.tracking.mlflow)."""

    uri: str = key(nonempty=True, hint="a tracking URI, e.g. sqlite:///runs/mlflow.db")
    experiment: Optional[str] = key(None, nonempty=True, hint="default: the study name")


@dataclass(frozen=True)
class Tracking:
    """``tracking:``: where runs are logged besides the study database (which stays the source of truth)."""

    mlflow: Any = key(None)
    tensorboard: bool = key(True, hint="write each run's TensorBoard HParams summary to RUN_DIR/tb")


@dataclass(frozen=True)
class Grid:
    """``grid:``: the axes, each a value or a list of values (checked as the grid expands)."""

    family: list = key()
    layout: list = key()
    size: list = key()
    cpe: list = key([True])
    shared: list = key([False])
    seed: list = key([0])


@dataclass(frozen=True)
class SingleStageSize:
    """``sizes.NAME.ss``: each value may also be a mapping family -> value."""

    hidden_dim: Any = key()
    num_heads: Any = key()
    depth: Any = key()
    channel_ratio: Any = key(None)
    token_ratio: Any = key(None)
    patch_size: Any = key(None)
    mixer_kwargs: Any = key(None)


@dataclass(frozen=True)
class MultiStageSize:
    """``sizes.NAME.ms``: each value may also be a mapping family -> value."""

    hidden_dim: Any = key()
    num_heads: Any = key()
    depths: Any = key()
    channel_ratio: Any = key(None)
    token_ratio: Any = key(None)
    patch_size: Any = key(None)
    hybrid_attn: Any = key(None)
    mixer_kwargs: Any = key(None)


SIZE_SECTIONS = {"ss": SingleStageSize, "ms": MultiStageSize}


@dataclass(frozen=True)
class Extra:
    """An ``extra:`` entry: a zoo or release model by name, or a custom ``net_arch``."""

    name: Optional[str] = key(None)
    model: Optional[str] = key(None)
    family: Optional[str] = key(None)
    layout: Optional[str] = key(None)
    net_arch: Any = key(None)
    hidden_dim: Any = key(None)
    num_heads: Any = key(None)
    channel_ratio: Any = key(None)
    token_ratio: Any = key(None)
    patch_size: Any = key(None)
    stem_type: Any = key(None)
    cpe: bool = key(True)
    shared: bool = key(False)
    seeds: Any = key([0])
    model_kwargs: Any = key(None)
    mixer_kwargs: Any = key(None)


@dataclass(frozen=True)
class Statistics:
    """``statistics:`` — how the report tests its comparisons (docs/battle.md, "How verdicts are computed")."""

    alpha: float = key(0.05, gt=0, lt=0.5, hint="the family-wise error rate of all the report's tests, e.g. 0.05")
    margin: Optional[float] = key(1.0, gt=0, hint="top-1 equivalence margin in points; null: no equivalence tests")
    loss_margin: Optional[float] = key(None, gt=0, hint="equivalence margin for train loss and gap; null: none")
    power: float = key(0.8, gt=0, lt=1, hint="the power of the seeds-needed figures, e.g. 0.8")
    min_effect: Optional[float] = key(None, gt=0, hint="top-1 effect (points) the seeds-needed figures aim at; "
                                                      "null: the observed one")


@dataclass(frozen=True)
class Tune:
    """``tune:``: an equal tuning budget per architecture (spach.battle.tune). `space` maps recipe keys to
    ``{low, high, log}`` or ``{choices}`` (checked by spach.battle.tune_space); `seed` fixes the sampler,
    the selection split and the trials' training seed; `selection` is the fraction of each class of the
    training data held out to score the trials."""

    trials: int = key(ge=1, hint="per architecture, the same for every family")
    space: Any = key()
    seed: int = key(0, ge=0)
    selection: float = key(0.2, gt=0, lt=1, hint="a fraction of the training data")
    startup_trials: int = key(10, ge=1, hint="TPE's random trials before it models the results")
    pruner: Any = key(None, hint="{kind: median | asha | threshold, ...}; null: every trial trains all its epochs")


@dataclass(frozen=True)
class MedianPruner:
    """``tune.pruner`` of kind ``median`` (Optuna's MedianPruner): after an epoch past the warm-up, stop a trial
    whose best selection top-1 so far is below the median of the complete trials' at that epoch."""

    kind: str = key(choices=("median",))
    startup_trials: int = key(5, ge=0, hint="complete trials before any trial is pruned")
    warmup_epochs: int = key(0, ge=0, hint="the epochs of every trial that are never followed by pruning")


@dataclass(frozen=True)
class AshaPruner:
    """``tune.pruner`` of kind ``asha`` (Optuna's SuccessiveHalvingPruner, asynchronous successive halving):
    at epochs min_epochs x reduction_factor^k a trial goes on only if it is in the top 1/reduction_factor
    of the trials that reached that epoch."""

    kind: str = key(choices=("asha",))
    min_epochs: int = key(1, ge=1, hint="the epoch of the first comparison")
    reduction_factor: int = key(4, ge=2, hint="the factor between the comparisons' epochs, and 1/the share kept")


@dataclass(frozen=True)
class ThresholdPruner:
    """``tune.pruner`` of kind ``threshold`` (Optuna's ThresholdPruner): after an epoch past the warm-up, stop a
    trial whose selection top-1 is below `lower`."""

    kind: str = key(choices=("threshold",))
    lower: float = key(ge=0, hint="a selection top-1 in %, as the report gives it")
    warmup_epochs: int = key(0, ge=0, hint="the epochs of every trial that are never followed by pruning")


PRUNERS = {"median": MedianPruner, "asha": AshaPruner, "threshold": ThresholdPruner}  # tune.pruner.kind -> section


@dataclass(frozen=True)
class StudyFile:
    """The study's top level, read by :func:`read_section` (``grid`` is required unless there are ``extra``
    entries; the sections are read by their own schemas, or by the code that expands them)."""

    name: str = key()
    data: Any = key()
    description: Any = key("")
    img_size: int = key(224, ge=8, hint="the input size of every run, in pixels")
    threads: Optional[int] = key(None, ge=1, hint="torch threads per run; null: the machine's share")
    recipe: Any = key(None)
    measure: Any = key(None)
    grid: Any = key(None)
    sizes: Any = key(None)
    extra: Any = key(None)
    launcher: Any = key(None)
    tracking: Any = key(None)
    analysis: Any = key(None)
    runs_dir: Optional[str] = key(None, nonempty=True, hint="the folder for the run directories")
    plugins: Any = key(None)
    statistics: Any = key(None)
    tune: Any = key(None)


def keys(section: type) -> set[str]:
    """The keys a section allows."""
    return {f.name for f in dataclasses.fields(section)}


def required(section: type) -> set[str]:
    """The keys a section needs."""
    return {f.name for f in dataclasses.fields(section)
            if f.default is REQUIRED and f.default_factory is REQUIRED}


def defaults(section: type) -> dict[str, Any]:
    """The section's defaults (required keys left out)."""
    out = {}
    for f in dataclasses.fields(section):
        if f.default is not REQUIRED:
            out[f.name] = f.default
        elif f.default_factory is not REQUIRED:
            out[f.name] = f.default_factory()
    return out


def unknown_keys(value: dict, section: type, name: str | None) -> str | None:
    """The error for keys of `value` that `section` does not declare, or None (`name` None: the top level)."""
    unknown = set(value) - keys(section)
    prefix = f"{name}: " if name else ""
    return f"{prefix}unknown key(s) {sorted(unknown)}; allowed: {sorted(keys(section))}" if unknown else None


def describe(f: dataclasses.Field, tp: Any) -> str:
    """What a field's value must be, in words (for its error message)."""
    meta, optional = f.metadata, type(None) in typing.get_args(tp)
    inner = [a for a in typing.get_args(tp) if a is not type(None)][0] if optional else tp
    if meta.get("choices"):
        text = f"one of {list(meta['choices'])}"
    elif typing.get_origin(inner) is list:
        text = "a list of strings"
    elif typing.get_origin(inner) is dict:
        text = "a mapping"
    elif inner in (int, float):
        kind = "integer" if inner is int else "number"
        ge = meta.get("ge")
        text = f"an {kind} >= {ge}" if ge not in (None, 0, 1) else \
            f"a {'non-negative' if ge == 0 else 'positive'} {kind}"
        if meta.get("lt") is not None:
            text += f" below {meta['lt']:g}"
    elif inner is str:
        text = "a non-empty string" if meta.get("nonempty") else "a string"
    else:
        text = getattr(inner, "__name__", str(inner))
    return text + (" or null" if optional else "") + (f" ({meta['hint']})" if meta.get("hint") else "")


def check_value(f: dataclasses.Field, tp: Any, value: Any) -> bool:
    """Whether `value` has the field's type (strict `coerce`) and is within its bounds and choices."""
    try:
        coerce(f.name, value, tp, strict=True)
    except ValueError:
        return False
    if value is None:
        return True
    meta = f.metadata
    return not ((meta.get("choices") and value not in meta["choices"])
                or (meta.get("ge") is not None and value < meta["ge"])
                or (meta.get("gt") is not None and not value > meta["gt"])
                or (meta.get("lt") is not None and not value < meta["lt"])
                or (meta.get("nonempty") and not (value.strip() if isinstance(value, str) else value)))


def read_section(section: type, value: Any, name: str | None) -> dict[str, Any]:
    """`value` (a mapping) completed by the section's defaults, every key checked; ValueError otherwise.
    `name` is the section's key in the study (None for the top level: errors name the bare key)."""
    if not isinstance(value, dict):
        raise ValueError(f"{name or 'a study'} must be a mapping")
    if (why := unknown_keys(value, section, name)) is not None:
        raise ValueError(why)
    missing = required(section) - set(value)
    if missing:
        raise ValueError(f"{f'{name}: ' if name else ''}missing required key(s) {sorted(missing)}")
    out = dict(defaults(section), **value)
    hints = typing.get_type_hints(section)
    for f in dataclasses.fields(section):
        if not check_value(f, hints[f.name], out[f.name]):
            where = f"{name}.{f.name}" if name else f.name
            raise ValueError(f"{where} must be {describe(f, hints[f.name])}, got {out[f.name]!r}")
    return out
