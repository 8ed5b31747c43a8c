"""Study files: loading, validation against the schema (spach.battle.schema), and the expansion of the grid into runs.

A study is a YAML mapping (see docs/battle.md for the full reference)::

    name: cpu-mini
    data: mnist5k
    img_size: 32
    recipe: {epochs: 6, batch_size: 64, lr: 2.0e-3, ...}   # any TrainConfig option
    measure: {batch_size: 64, dtype: fp32, threads: null}   # inference throughput
    plugins: [my_mixers.py]              # modules registering your own mixers (imported: runs their code)
    grid:
      family: [conv, attn, mlp]          # any registered mixer (`spach mixers`) | hybrid
      layout: [ss, ms]                   # single-stage | multi-stage
      size: [tiny]                       # xxs | xs | s (the zoo) or a name under `sizes:`
      cpe: [true]                        # ablation: the depthwise-conv branch
      shared: [false]                    # ablation: one spatial module per stage
      seed: [0, 1]
    sizes:
      tiny:
        ss: {hidden_dim: 64, num_heads: 2, depth: 4, patch_size: 4}
        ms: {hidden_dim: 16, num_heads: 1, depths: [1, 1, 2, 1], patch_size: 2}
    extra:                               # runs outside the grid
      - {model: spach_ms_s_plus_patch4_224_hybrid}
      - {model: shiftvit_light_tiny, model_kwargs: {embed_dim: 16, depths: [1, 1, 1, 1]}}  # sMLPNet/ShiftViT too
      - {name: my-net, layout: ms, net_arch: [[[conv, 1]], [[attn, 1]], [[attn, 1]], [[attn, 1]]],
         hidden_dim: 16, num_heads: 1}
    launcher: {kind: local}              # or {kind: torchrun, nproc_per_node: 8, ...} or {kind: slurm, ...}
    runs_dir: /shared/runs/cpu-mini      # where run directories go (default OUT/runs)
    analysis: [erf, cka, corruption, fourier, attn-distance]   # after training; or {erf: {images: 32}, ...}

Architecture rules live in the models, once: every grid cell is validated by
building its model on the meta device (no memory, no compute; each mixer probed on
an empty token grid); a cell the model refuses — its typed refusal,
`spach.errors.ArchitectureRefusal` — is *skipped*, with the model's own message
as the recorded reason (it appears in the database and the report) — e.g. CPE
removed from a conv model, weight sharing of a mixer without weights, windows
that do not tile the grid. The same refusal for an `extra` entry, which the user
wrote by hand, *rejects* the study. Any other exception while a model is built
(an unknown mixer option, a bug in a plugin mixer) rejects the study, naming the
mixer, the exception and the line of the user's code that raised it. The spec itself only knows what a family
name means: a registered mixer (stage 1 conv in the multi-stage layout, as in
the paper), or `hybrid` (multi-stage only; zoo sizes XS and S).
Every run has a key: a hash of its resolved configuration (stable JSON), so a
run is identified by what it computes, not by its name.

Hostile or careless files are refused before anything is expanded or run: names
(study, sizes, extra entries) must be safe path components (`NAME_RULE`), the
file may expand (YAML aliases) to at most `MAX_SPEC_NODES` values, and a study may
declare at most `MAX_RUNS` runs unless `max_runs` (`spach battle --max-runs`) says more.
"""
from __future__ import annotations

import hashlib
import itertools
import json
import re
import traceback
from collections import Counter
from dataclasses import dataclass, field, replace
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from spach.battle import schema
from spach.battle.schema import LAUNCHER_KINDS, LAYOUTS, Arch, HasArch
from spach import yaml_file
from spach.errors import ArchitectureRefusal, raised_at, user_exception
from spach.models.registry import canonical_mixer, import_plugins, mixer_names, resolve_plugins

ZOO_SIZES = ("xxs", "xs", "s")

GRID_KEYS = schema.keys(schema.Grid)
MEASURE_DEFAULTS = schema.defaults(schema.Measure)
LAUNCHER_DEFAULTS = schema.defaults(schema.Launcher)
# sbatch options the slurm launcher sets itself (logs, job name, pre-emption signal)
SLURM_OWNED_SBATCH = {"output", "error", "job-name", "signal", "open-mode", "comment", "wrap"}
# keys of TrainConfig that the study sets itself, per run
STUDY_OWNED = {"model", "model_kwargs", "data", "output", "seed", "img_size", "resume", "threads"}

def families() -> tuple[str, ...]:
    """The grid's families: every registered mixer (plugins included), then ``hybrid``."""
    return (*mixer_names(), "hybrid")


def __getattr__(name: str):
    if name == "FAMILIES":  # read from the mixer registry on access
        return families()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# names become directory and file names under OUT: one path component, no '.'/'..', no separators
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+=-]{0,99}")
NAME_RULE = "1-100 characters from A-Z a-z 0-9 _ . + = -, starting with a letter or digit"
MAX_SPEC_NODES = 1_000_000   # values a study file may expand to (YAML aliases are expanded by the run keys)
MAX_RUNS = 10_000            # runs a study may declare without an explicit max_runs


def check_name(name: Any, what: str, where: str) -> str:
    """`name` if it is a safe path component (NAME_RULE), else ValueError naming the rule."""
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        _fail(where, f"{what} {name!r} is not a safe name: use {NAME_RULE} (it names folders and files "
                     "under the output directory)")
    return name


def _check_expansion(raw: Any, where: str, limit: int = MAX_SPEC_NODES) -> None:
    """Refuse a spec whose values, with YAML aliases expanded, exceed `limit` (an alias bomb, a cycle)."""
    count, stack = 0, [raw]
    while stack:
        x = stack.pop()
        count += 1
        if count > limit:
            _fail(where, f"the study expands to more than {limit:,} values (nested YAML aliases?); "
                         "write it out without aliases")
        if isinstance(x, dict):
            stack.extend(x.keys())
            stack.extend(x.values())
        elif isinstance(x, (list, tuple)):
            stack.extend(x)


def _declared_runs(raw: dict) -> int:
    """How many runs the grid and extra entries declare (an upper bound: skipped cells included)."""
    def n(values: Any) -> int:
        return len(values) if isinstance(values, list) else 1
    grid = raw.get("grid") if isinstance(raw.get("grid"), dict) else None
    total = 0
    if grid is not None:
        total = 1
        for axis in GRID_KEYS:
            total *= n(grid.get(axis, [0]))
    extra = raw.get("extra")
    for entry in extra if isinstance(extra, list) else []:
        total += n(entry.get("seeds", [0])) if isinstance(entry, dict) else 1
    return total


def _fail(where: str, msg: str) -> None:
    raise ValueError(f"{where}: {msg}")


def stable_json(obj: Any) -> str:
    """JSON with sorted keys and no whitespace: equal configurations give equal text."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"))


@dataclass(frozen=True)
class Run(HasArch):
    """One training + its measurements, fully resolved."""

    name: str            # e.g. "attn-ms-tiny-s0"
    group: str           # the name without the seed: runs of one group are averaged
    arch: Arch           # family, layout, size, cpe, shared (also readable as run.family, ...)
    seed: int
    model: str                       # a zoo name (create_model)
    model_kwargs: dict[str, Any]     # overrides passed to create_model
    train: dict[str, Any]            # TrainConfig fields except output / resume / threads
    measure: dict[str, Any]
    plugins: tuple = ()              # resolved plugin modules (spach.models.registry.resolve_plugins)
    prune: dict | None = None        # a tuning trial with a pruner: its Optuna trial (spach.battle.pruning)

    def resolved(self) -> dict[str, Any]:
        """What the run computes: the basis of its key (names are not part of it)."""
        out = {"model": self.model, "model_kwargs": self.model_kwargs, "train": self.train, "measure": self.measure}
        if self.plugins:  # the code that defines its mixers (absent for plugin-free studies: their keys stay)
            out["plugins"] = list(self.plugins)
        if self.prune:  # the trial it reports to and the pruner that may stop it (absent without a pruner)
            out["prune"] = self.prune
        return out

    @property
    def key(self) -> str:
        return hashlib.sha256(stable_json(self.resolved()).encode()).hexdigest()[:16]


@dataclass
class Study:
    name: str
    description: str
    data: str
    img_size: int
    recipe: dict[str, Any]
    measure: dict[str, Any]
    launcher: dict[str, Any]
    threads: int | None = None     # torch threads per run (None: the machine's share)
    runs_dir: str | None = None    # where the run directories go; relative to the output directory (None: "runs")
    plugins: list[dict] = field(default_factory=list)              # resolved `plugins:` entries
    runs: list[Run] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)   # (name, reason)
    source: dict[str, Any] = field(default_factory=dict)          # the raw mapping, for the record
    analysis: dict[str, dict] = field(default_factory=dict)       # measurement -> settings, run after training
    tracking: dict[str, Any] = field(default_factory=dict)        # `tracking:` checked (spach.battle.tracking)
    statistics: dict[str, Any] = field(default_factory=dict)      # how the report tests (schema.Statistics)
    tune: dict[str, Any] | None = None  # `tune:` checked (spach.battle.tune_space); None: the recipe as written


# --------------------------------------------------------------------------- loading

def list_presets() -> list[str]:
    root = resources.files("spach.battle") / "presets"
    return sorted(p.name[: -len(".yaml")] for p in root.iterdir() if p.name.endswith(".yaml"))


def load_study(path_or_preset: str | Path | dict, max_runs: int = MAX_RUNS, data: str | None = None) -> Study:
    """Load a study from a YAML file, a preset name (e.g. "cpu-mini") or a mapping; validate and expand it.

    `max_runs`: refuse a study that declares more runs (a typo such as 100,000 seeds); raise it on purpose.
    `data`: a SOURCE replacing the study's `data:` (`spach battle --data ROOT`), before the runs are expanded.
    """
    if isinstance(path_or_preset, dict):
        raw = dict(path_or_preset, data=data) if data is not None else path_or_preset
        return parse_study(raw, where="study", max_runs=max_runs)  # plugins: relative to the cwd
    text_path = str(path_or_preset)
    path = Path(text_path)
    if path.is_file():
        where = str(path)
        text = path.read_text()
    elif text_path in list_presets():
        where = f"preset {text_path}"
        text = (resources.files("spach.battle") / "presets" / f"{text_path}.yaml").read_text()
    else:
        raise FileNotFoundError(
            f"no study file {text_path!r} and no preset of that name (presets: {', '.join(list_presets())})")
    try:
        raw = yaml_file.load(text)
    except yaml_file.DuplicateKeyError as e:
        raise ValueError(f"{where}: {e}") from None
    except yaml.YAMLError as e:
        raise ValueError(f"{where}: not valid YAML: {' '.join(str(e).split())}") from None
    except RecursionError:
        raise ValueError(f"{where}: nested too deeply to be a study") from None
    if not isinstance(raw, dict):
        _fail(where, "a study must be a YAML mapping")
    if data is not None:
        raw["data"] = data
    return parse_study(raw, where=where, max_runs=max_runs, base_dir=path.parent if path.is_file() else None)


def parse_study(raw: dict, where: str = "study", max_runs: int = MAX_RUNS,
                base_dir: str | Path | None = None) -> Study:
    """Validate and expand a study mapping. ``plugins:`` are imported first, relative to ``base_dir``
    (the study file's folder; default the working directory) — this runs their code."""
    _check_expansion(raw, where)  # first: everything below may expand aliases
    top = _section(schema.StudyFile, raw, None, where)  # unknown and missing keys, types and bounds
    if top["grid"] is None and not top["extra"]:
        _fail(where, "missing required key 'grid' (or give `extra:` entries)")
    name = check_name(raw["name"], "the study name", where)
    declared = _declared_runs(raw)
    if declared > max_runs:
        _fail(where, f"the study declares {declared:,} runs, more than the limit of {max_runs:,} (a typo in "
                     f"grid/seeds?); if you mean it, pass --max-runs {declared} (load_study(..., max_runs=...))")
    img_size, threads, runs_dir = top["img_size"], top["threads"], top["runs_dir"]
    recipe = _check_recipe(raw.get("recipe") or {}, where)
    measure = _check_measure(raw.get("measure") or {}, where)
    launcher = _check_launcher(raw.get("launcher") or {}, where)
    tracking = check_tracking(raw.get("tracking") or {}, where)
    plugins = []
    if raw.get("plugins") is not None:
        try:
            plugins = resolve_plugins(raw["plugins"], base_dir or Path.cwd())
            import_plugins(plugins)
        except ValueError as e:
            _fail(where, str(e))
    study = Study(name=name, description=str(raw.get("description", "")).strip(), data=str(raw["data"]),
                  img_size=img_size, recipe=recipe, measure=measure, launcher=launcher, threads=threads,
                  runs_dir=runs_dir, source=raw, plugins=plugins, tracking=tracking)
    sizes = _check_sizes(raw.get("sizes") or {}, where)
    if raw.get("grid") is not None:
        _expand_grid(study, raw["grid"], sizes, where)
    for i, entry in enumerate(raw.get("extra") or []):
        study.runs.extend(_expand_extra(study, entry, f"{where}: extra[{i}]"))
    if not study.runs:
        reasons = "; ".join(f"{n}: {r}" for n, r in study.skipped) or "the grid is empty"
        _fail(where, f"the study has no runs ({reasons})")
    keys: dict[str, str] = {}
    for run in study.runs:
        if run.key in keys:
            _fail(where, f"runs {keys[run.key]!r} and {run.name!r} are the same configuration")
        keys[run.key] = run.name
    for run in study.runs:  # names built from sizes and extra entries: still one safe path component
        check_name(run.name, "run name", where)
    dup = sorted(n for n, count in Counter(r.name for r in study.runs).items() if count > 1)
    if dup:
        _fail(where, f"duplicate run name(s) {dup}; give extra entries distinct names")
    study.analysis = check_analysis(raw.get("analysis"), {r.group for r in study.runs}, where)
    study.statistics = check_statistics(raw.get("statistics"), where)
    if raw.get("tune") is not None:
        from spach.battle.tune_space import check_tune
        study.tune = check_tune(raw["tune"], recipe, STUDY_OWNED, where)
    return study


def check_statistics(value: Any, where: str) -> dict[str, Any]:
    """`statistics:` completed by its defaults, checked by its schema (schema.Statistics)."""
    return _section(schema.Statistics, value or {}, "statistics", where)


def check_analysis(value: Any, groups: set[str], where: str) -> dict[str, dict]:
    """`analysis:` as a list of names (or {name: settings} items) or a mapping -> {name: settings}.

    The settings are those of `spach.analysis.suite.DEFAULTS`; the corruption baseline is a group name
    (default: chosen when the report is written, the first conv group, else the first group).
    """
    from spach.analysis.suite import check_settings

    if value is None:
        return {}
    items: list[tuple[Any, Any]] = []
    if isinstance(value, dict):
        items = list(value.items())
    elif isinstance(value, list):
        for v in value:
            if isinstance(v, dict) and len(v) == 1:
                items.append(next(iter(v.items())))
            elif isinstance(v, str):
                items.append((v, None))
            else:
                _fail(where, f"analysis: expected a name or {{name: settings}}, got {v!r}")
    else:
        _fail(where, "analysis must be a list of measurements (erf, cka, corruption, fourier, attn-distance) "
                     "or a mapping of them to settings")
    out: dict[str, dict] = {}
    for name, settings in items:
        if name in out:
            _fail(where, f"analysis: {name!r} is listed twice")
        baseline = (settings or {}).get("baseline") if isinstance(settings, dict) else None
        out[name] = check_settings(name, settings, f"{where}: analysis")
        if name == "corruption":
            if baseline is not None and baseline not in groups:
                _fail(where, f"analysis.corruption.baseline {baseline!r} is not a group of the study; "
                             f"choose from {sorted(groups)}")
            out[name]["baseline"] = baseline
    return out


def _check_recipe(recipe: Any, where: str) -> dict:
    if not isinstance(recipe, dict):
        _fail(where, "recipe must be a mapping of training options")
    owned = sorted(set(recipe) & STUDY_OWNED)
    if owned:
        _fail(where, f"recipe key(s) {owned} are set by the study itself "
                     "(use data/img_size/threads at the top level, grid.seed for seeds)")
    from spach.engine.config import TrainConfig, settings_language  # the engine validates its own options
    try:
        with settings_language("study"):
            TrainConfig.from_dict(dict(recipe, model="recipe-check", data="recipe-check", output="recipe-check"))
    except (TypeError, ValueError) as e:
        _fail(where, f"recipe: {e}")
    return dict(recipe)


def _section(section: type, value: Any, name: str | None, where: str) -> dict:
    """A section of the study read by its schema (spach.battle.schema); errors name the study."""
    try:
        return schema.read_section(section, value, name)
    except ValueError as e:
        _fail(where, str(e))


def _check_measure(measure: Any, where: str) -> dict:
    return _section(schema.Measure, measure, "measure", where)


def check_runnable_here(study: Study) -> None:
    """Before any training: the study's data (`check_study_data`); runs launched on this machine are
    measured on it, so a CUDA measurement needs CUDA here (a study is still loadable, listable and
    launchable elsewhere without it)."""
    from spach.battle.launchers import launcher_class

    check_study_data(study)
    if study.measure["device"] == "cuda" and launcher_class(study.launcher["kind"]).runs_here:
        import torch

        if not torch.cuda.is_available():
            _fail(f"study {study.name}", "measure.device is cuda but this machine has no CUDA device "
                  "(torch.cuda.is_available() is false): every run would train and then fail to be measured; "
                  "use measure: {device: cpu}, or run the study on a GPU machine")


def check_study_data(study: Study) -> dict:
    """The study's `data:` checked once for all its runs (spach.data.checks.check_source): at least two
    classes, the same classes in train and val, one optimizer step of training images. Returns its summary."""
    from spach.data.checks import check_source
    from spach.engine.config import TrainConfig

    cfg = TrainConfig.from_dict(dict(study.recipe, model="data-check", data=study.data, output="data-check"))
    try:
        return check_source(study.data, batch_size=cfg.batch_size, accum_steps=cfg.accum_steps,
                            max_train_samples=cfg.max_train_samples, max_val_samples=cfg.max_val_samples,
                            setting="recipe.batch_size")
    except ValueError as e:
        _fail(f"study {study.name}", str(e))


def _check_launcher(launcher: Any, where: str) -> dict:
    out = _section(schema.Launcher, launcher, "launcher", where)
    owned = sorted(k for k in out["sbatch"] if k.replace("_", "-") in SLURM_OWNED_SBATCH)
    if owned:
        _fail(where, f"launcher.sbatch: {owned} are set by the slurm launcher itself; remove them")
    return out


def check_tracking(tracking: Any, where: str = "--mlflow") -> dict:
    """``tracking:`` completed by its defaults ({mlflow: None or {uri, experiment}, tensorboard: bool})."""
    out = _section(schema.Tracking, tracking, "tracking", where)
    if out["mlflow"] is not None:
        out["mlflow"] = _section(schema.MlflowTracking, out["mlflow"], "tracking.mlflow", where)
    return out


def with_tracking(study: Study, mlflow_uri: str) -> Study:
    """The study with its runs also logged to the MLflow store at `mlflow_uri` (`spach battle --mlflow URI`;
    the study's experiment name kept, else the study's name)."""
    mlflow = dict(study.tracking.get("mlflow") or {}, uri=mlflow_uri)
    return replace(study, tracking=check_tracking(dict(study.tracking, mlflow=mlflow)))


def with_launcher(study: Study, kind: str) -> Study:
    """The study with its launcher switched to `kind` (the file's other launcher settings kept)."""
    if kind not in LAUNCHER_KINDS:
        raise ValueError(f"--launcher must be one of {list(LAUNCHER_KINDS)}, got {kind!r}")
    return replace(study, launcher=dict(study.launcher, kind=kind))


def _check_sizes(sizes: Any, where: str) -> dict:
    if not isinstance(sizes, dict):
        _fail(where, "sizes must be a mapping of size name -> {ss: {...}, ms: {...}}")
    for name, layouts in sizes.items():
        check_name(name, "size name", f"{where}: sizes")
        w = f"{where}: sizes.{name}"
        if name in ZOO_SIZES:
            _fail(w, f"{name!r} is a zoo size; pick another name for an explicit size")
        if not isinstance(layouts, dict) or not layouts or set(layouts) - set(LAYOUTS):
            _fail(w, "must map layouts ('ss' and/or 'ms') to their widths and depths")
        for layout, d in layouts.items():
            section = schema.SIZE_SECTIONS[layout]
            if not isinstance(d, dict):
                _fail(f"{w}.{layout}", "must be a mapping")
            unknown = set(d) - schema.keys(section)
            if unknown:
                _fail(f"{w}.{layout}", f"unknown key(s) {sorted(unknown)}; allowed: {sorted(schema.keys(section))}")
            missing = schema.required(section) - set(d)
            if missing:
                _fail(f"{w}.{layout}", f"missing key(s) {sorted(missing)}")
    return sizes


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


# --------------------------------------------------------------------------- the grid

def _axis(grid: dict, key: str, default: list, where: str) -> list:
    values = grid.get(key, default)
    if not isinstance(values, list):
        values = [values]
    if not values:
        _fail(where, f"grid.{key} is empty")
    if len(set(map(str, values))) != len(values):
        _fail(where, f"grid.{key} has repeated values {values}")
    return values


def _expand_grid(study: Study, grid: Any, sizes: dict, where: str) -> None:
    if not isinstance(grid, dict):
        _fail(where, "grid must be a mapping of axes")
    unknown = set(grid) - GRID_KEYS
    if unknown:
        _fail(where, f"grid: unknown axis/axes {sorted(unknown)}; allowed: {sorted(GRID_KEYS)}")
    for key in sorted(schema.required(schema.Grid)):
        if key not in grid:
            _fail(where, f"grid.{key} is required")
    grid_families = _axis(grid, "family", [], where)
    layouts = _axis(grid, "layout", [], where)
    size_names = _axis(grid, "size", [], where)
    cpes = _axis(grid, "cpe", [True], where)
    shareds = _axis(grid, "shared", [False], where)
    seeds = _check_seeds(_axis(grid, "seed", [0], where), where)
    for f in grid_families:
        if f not in families():
            _fail(where, f"grid.family: unknown family {f!r}; choose from {list(families())} (a registered "
                         "mixer — add your own with `plugins:` — or hybrid)")
    for lay in layouts:
        if lay not in LAYOUTS:
            _fail(where, f"grid.layout: unknown layout {lay!r}; choose from {list(LAYOUTS)} (single-/multi-stage)")
    for s in size_names:
        if s not in ZOO_SIZES and s not in sizes:
            _fail(where, f"grid.size: unknown size {s!r}; use a zoo size {list(ZOO_SIZES)} "
                         f"or define it under 'sizes:' (defined: {sorted(sizes)})")
    for key, values in (("cpe", cpes), ("shared", shareds)):
        if not all(isinstance(v, bool) for v in values):
            _fail(where, f"grid.{key} must be a list of true/false, got {values}")
    for family, layout, size, cpe, shared in itertools.product(grid_families, layouts, size_names, cpes, shareds):
        arch = Arch(family, layout, size, cpe, shared)
        try:
            model, kwargs = resolve_architecture(family, layout, size, cpe, shared, sizes)
            refusal = model_refusal(model, dict(kwargs, img_size=study.img_size))
        except ArchitectureRefusal as e:  # the spec's own: no model of this family, layout and size
            refusal = str(e)
        except Exception as e:  # noqa: BLE001 — a user error or a bug (a plugin's): the study is rejected
            _fail(where, f"{arch.name}: {build_error(e)}")
        if refusal:
            study.skipped.append((arch.name, refusal))
            continue
        for seed in seeds:
            study.runs.append(_make_run(study, arch.name, arch, seed, model, kwargs))


def _check_seeds(seeds: list, where: str) -> list[int]:
    for s in seeds:
        if not _is_int(s) or s < 0:
            _fail(where, f"seeds must be non-negative integers, got {s!r}")
    return seeds


def _zoo_name(family: str, layout: str, size: str) -> str:
    if layout == "ss":
        return f"spach_{size}_patch16_224_{family}"
    return f"spach_ms_{size}_patch4_224_{family}"


def _per_family(value: Any, family: str, what: str) -> Any:
    """Size fields may be one value or a mapping family -> value (the paper widens conv/MLP vs attention)."""
    if isinstance(value, dict):
        unknown = set(value) - set(families())
        if unknown:
            raise ValueError(f"{what}: unknown family key(s) {sorted(unknown)}")
        if family not in value:
            raise ValueError(f"{what} gives no value for family {family!r}")
        return value[family]
    return value


def resolve_architecture(family: str, layout: str, size: str, cpe: bool, shared: bool,
                         sizes: dict) -> tuple[str, dict]:
    """(zoo model name, create_model overrides) for one grid cell; raises ArchitectureRefusal where the family
    has no model of that layout and size. Whether the model accepts the cell is :func:`model_refusal`'s question."""
    from spach.models import ALL_MODELS

    if family == "hybrid" and layout == "ss":
        raise ArchitectureRefusal("hybrids are defined in the multi-stage layout only (conv early, attention late)")
    kwargs: dict[str, Any] = {}
    if not cpe:
        kwargs["cpe"] = False
    if shared:
        kwargs["shared_spatial_func"] = True
    if size in ZOO_SIZES:
        if family == "hybrid" and size == "xxs":
            raise ArchitectureRefusal("the zoo has no XXS hybrid (hybrids exist at XS and S)")
        if _zoo_name(family, layout, size) not in ALL_MODELS:
            raise ArchitectureRefusal(f"the zoo has no {_zoo_name(family, layout, size)} (define the size under "
                                      "`sizes:` to build this family at it)")
        return _zoo_name(family, layout, size), kwargs
    d = sizes[size].get(layout)
    if d is None:
        raise ArchitectureRefusal(f"size {size!r} defines no {layout!r} layout")
    w = f"sizes.{size}.{layout}"
    depth_key = "depth" if layout == "ss" else "depths"
    depth = _per_family(d[depth_key], family, f"{w}.{depth_key}")
    for key in ("hidden_dim", "num_heads", "channel_ratio", "token_ratio", "patch_size"):
        if key in d:
            kwargs[key] = _per_family(d[key], family, f"{w}.{key}")
    mixer = None if family == "hybrid" else family
    if layout == "ss":
        if not _is_int(depth) or depth < 1:
            raise ValueError(f"{w}.depth must be a positive integer, got {depth!r}")
        kwargs["net_arch"] = [[mixer, depth]]
    else:
        if not (isinstance(depth, list) and len(depth) == 4 and all(_is_int(x) and x >= 1 for x in depth)):
            raise ValueError(f"{w}.depths must be 4 positive integers (one per stage), got {depth!r}")
        if family == "hybrid":
            attn = d.get("hybrid_attn")
            if attn is None:
                raise ValueError(f"{w} needs hybrid_attn: how many of the last blocks of each stage are "
                                 "attention, e.g. [0, 0, 1, 1]")
            if not (isinstance(attn, list) and len(attn) == 4 and all(_is_int(a) and 0 <= a <= n
                                                                       for a, n in zip(attn, depth))):
                raise ValueError(f"{w}.hybrid_attn must be 4 integers, each between 0 and that stage's depth")
            if attn[0] != 0 or sum(attn) == 0:
                raise ValueError(f"{w}.hybrid_attn: stage 1 is conv-only and at least one block must be attention")
            kwargs["net_arch"] = [[[m, k] for m, k in (("conv", n - a), ("attn", a)) if k > 0]
                                  for n, a in zip(depth, attn)]
        else:
            kwargs["net_arch"] = [[["conv", depth[0]]]] + [[[mixer, n]] for n in depth[1:]]
    options = d.get("mixer_kwargs") or {}
    if not isinstance(options, dict):
        raise ValueError(f"{w}.mixer_kwargs must map mixer names to their options, e.g. {{window: {{window_size: 4}}}}")
    used = {m for stage in (kwargs["net_arch"] if layout == "ms" else [kwargs["net_arch"]]) for m, _ in stage}
    options = {m: o for m, o in options.items() if canonical_mixer(m) in used}  # only the mixers this cell uses
    if options:
        kwargs["mixer_kwargs"] = options
    # the explicit size replaces the zoo's widths and depths; the xxs name only picks the class
    # (the paper's families keep their own name, so their run keys are as before)
    base = _zoo_name(family if family in ("conv", "attn", "mlp") else "conv", layout, "xxs")
    return base, kwargs


def model_refusal(model: str, model_kwargs: dict) -> str | None:
    """Why the model refuses this configuration — its typed refusal (:class:`spach.errors.ArchitectureRefusal`),
    from building it on the meta device (no memory, no compute; each mixer kind is probed once on an empty
    grid-sized input) — or None if it accepts it.

    Any other exception propagates: an unknown mixer option, a mixer returning the wrong shape, or a bug in a
    plugin's constructor or forward is not a refusal (:func:`build_error` says what and where).
    """
    import torch

    from spach.engine.build import build_model

    try:
        with torch.device("meta"):
            build_model(model, num_classes=10, model_kwargs=model_kwargs)
    except NotImplementedError:
        return None  # an operator without a meta kernel: the run itself will tell
    except ArchitectureRefusal as e:
        return str(e) or type(e).__name__
    return None


def build_error(error: Exception) -> str:
    """One line for an exception raised while a model was built (not a refusal).

    spach's own ValueErrors (an unknown mixer option, a malformed size) keep their message. An exception raised
    through the user's own code (a plugin mixer) names the mixer, the exception type and the innermost line of
    the user's code that raised it (:func:`spach.errors.raised_at`); anything else names its type and place.
    """
    user = user_exception(error)
    if user is None and isinstance(error, ValueError):
        return str(error)
    cause = user or error
    mixer = _mixer_in_traceback(cause)
    who = f"mixer {mixer!r}" if mixer else "building the model"
    hint = (" — a bug in the mixer, not a refusal (a mixer refuses a configuration by raising "
            "spach.ArchitectureRefusal: the cell is then skipped)" if user is not None else "")
    return f"{who} raised {type(cause).__name__} at {raised_at(cause)}: {cause}{hint}"


def _mixer_in_traceback(error: BaseException) -> str | None:
    """The registered mixer whose constructor or forward `error` passed through (innermost first), if any."""
    from spach.models.registry import MixerInfo, get_mixer

    classes = [(get_mixer(name).cls, name) for name in mixer_names()]
    frames = [frame for frame, _ in traceback.walk_tb(error.__traceback__)]
    for frame in reversed(frames):
        owner = frame.f_locals.get("self")
        if isinstance(owner, MixerInfo):
            return owner.name
        for cls, name in classes:
            if isinstance(owner, cls):
                return name
    return None


# --------------------------------------------------------------------------- runs

def _make_run(study: Study, group: str, arch: Arch, seed: int, model: str, kwargs: dict) -> Run:
    model_kwargs = dict(kwargs, img_size=study.img_size)
    train = dict(study.recipe, model=model, model_kwargs=model_kwargs, data=study.data,
                 img_size=study.img_size, seed=seed)
    return Run(name=f"{group}-s{seed}", group=group, arch=arch, seed=seed, model=model, model_kwargs=model_kwargs,
               train=train, measure=dict(study.measure), plugins=tuple(study.plugins))


def run_dir(out_dir: str | Path, run: Run, runs_dir: str | None = None) -> Path:
    """Where a run's files go: OUT/runs/NAME-KEY8, or under the study's `runs_dir` (relative to OUT)."""
    return Path(out_dir) / (runs_dir or "runs") / f"{run.name}-{run.key[:8]}"


def with_seed(run: Run, seed: int) -> Run:
    """The same architecture and recipe as `run`, trained with another seed (e.g. a seed added by
    ``spach battle --until-decisive``)."""
    return replace(run, name=f"{run.group}-s{seed}", seed=seed, train=dict(run.train, seed=seed))


def _check_net_arch(arch: Any, layout: str, where: str) -> list:
    def check_stage(stage: Any, w: str) -> list:
        if not isinstance(stage, list) or not stage:
            _fail(w, "a stage must be a non-empty list of [mixer, depth] pairs")
        out = []
        for pair in stage:
            if not (isinstance(pair, (list, tuple)) and len(pair) == 2):
                _fail(w, f"expected a [mixer, depth] pair, got {pair!r}")
            mixer, depth = pair
            try:
                mixer = canonical_mixer(mixer)
            except ValueError as e:
                _fail(w, str(e))
            if not _is_int(depth) or depth < 1:
                _fail(w, f"depth must be a positive integer, got {depth!r}")
            out.append([mixer, depth])
        return out

    if layout == "ss":
        return check_stage(arch, f"{where}.net_arch")
    if not (isinstance(arch, list) and len(arch) == 4):
        _fail(where, "a multi-stage net_arch is 4 lists of [mixer, depth] pairs, one per stage")
    stages = [check_stage(s, f"{where}.net_arch[{i}]") for i, s in enumerate(arch)]
    if any(m != "conv" for m, _ in stages[0]):
        _fail(where, "stage 1 of a multi-stage net_arch is conv-only")
    return stages


def _family_of(arch: list, layout: str) -> str:
    blocks = arch if layout == "ss" else [p for stage in arch[1:] for p in stage]
    mixers = {m for m, _ in blocks}
    return mixers.pop() if len(mixers) == 1 else "hybrid"


def _expand_extra(study: Study, entry: Any, where: str) -> list[Run]:
    if isinstance(entry, str):
        entry = {"model": entry}
    if not isinstance(entry, dict):
        _fail(where, "an extra entry is a zoo name or a mapping")
    if (why := schema.unknown_keys(entry, schema.Extra, "")) is not None:
        _fail(where, why[2:])
    seeds = _check_seeds(entry.get("seeds", [0]) if isinstance(entry.get("seeds", [0]), list)
                         else [entry["seeds"]], where)
    cpe = entry.get("cpe", True)
    shared = entry.get("shared", False)
    if not isinstance(cpe, bool) or not isinstance(shared, bool):
        _fail(where, "cpe and shared must be true/false")
    kwargs = dict(entry.get("model_kwargs") or {})
    if not isinstance(kwargs, dict):
        _fail(where, "model_kwargs must be a mapping")
    for key in ("hidden_dim", "num_heads", "channel_ratio", "token_ratio", "patch_size", "stem_type", "mixer_kwargs"):
        if key in entry:
            kwargs[key] = entry[key]
    if "net_arch" in entry:
        layout = entry.get("layout")
        if layout not in LAYOUTS:
            _fail(where, f"a custom net_arch needs layout: ss or ms, got {layout!r}")
        arch = _check_net_arch(entry["net_arch"], layout, where)
        family = entry.get("family", _family_of(arch, layout))
        kwargs["net_arch"] = arch
        model = entry.get("model") or _zoo_name("conv", layout, "xxs")
        name = entry.get("name")
        if not name:
            _fail(where, "a custom net_arch entry needs a name")
        check_name(name, "name", where)
        size = "custom"
    elif "model" in entry and _is_release_model(entry["model"]):
        return _expand_release_extra(study, entry, kwargs, seeds, where)
    elif "model" in entry:
        model = entry["model"]
        if not isinstance(model, str) or not model.startswith("spach_"):
            _fail(where, f"model must be a spach zoo name or one of the release's sMLPNet/ShiftViT names "
                         f"(see `spach models`), got {model!r}")
        layout = "ms" if model.startswith("spach_ms_") else "ss"
        family = entry.get("family", model.rsplit("_", 1)[-1])
        size = model.split("_")[2 if layout == "ms" else 1]
        if size == "s" and "_s_plus_" in model:
            size = "s_plus"
        name = check_name(entry.get("name") or model, "name", where)
    else:
        _fail(where, "an extra entry needs a zoo `model` name or a custom `net_arch`")
    if family not in families():
        _fail(where, f"unknown family {family!r}; choose from {list(families())}")
    if not cpe:
        kwargs["cpe"] = False
    if shared:
        kwargs["shared_spatial_func"] = True
    try:
        refusal = model_refusal(model, dict(kwargs, img_size=study.img_size))
    except Exception as e:  # noqa: BLE001 — a user error or a bug (a plugin's): the study is rejected
        _fail(where, build_error(e))
    if refusal:
        _fail(where, f"the model refuses this entry: {refusal}")
    arch = Arch(family, layout, size, cpe, shared)
    return [_make_run(study, arch.label(name), arch, seed, model, kwargs) for seed in seeds]


def _is_release_model(model: Any) -> bool:
    from spach.models.release_zoo import RELEASE_ZOO

    return isinstance(model, str) and model in RELEASE_ZOO


def _expand_release_extra(study: Study, entry: dict, kwargs: dict, seeds: list[int], where: str) -> list[Run]:
    """An sMLPNet or ShiftViT of the original release, by name: its own family, multi-stage, no SPACH ablations."""
    from spach.models.release_zoo import release_family, release_size

    model = entry["model"]
    family = release_family(model)
    if entry.get("family", family) != family:
        _fail(where, f"{model} is of family {family!r}, not {entry['family']!r}; drop the family key")
    if entry.get("layout", "ms") != "ms":
        _fail(where, f"{model} is a multi-stage network: layout must be ms (or left out)")
    spach_keys = sorted(set(entry) & {"net_arch", "hidden_dim", "num_heads", "channel_ratio", "token_ratio",
                                      "patch_size", "stem_type", "cpe", "shared"})
    if spach_keys:
        _fail(where, f"{spach_keys} are SPACH settings; {model} takes its own constructor keywords in model_kwargs "
                     f"(e.g. dim/depths for sMLPNet, embed_dim/depths/n_div for ShiftViT)")
    name = entry.get("name") or model
    arch = Arch(family, "ms", release_size(model))
    return [_make_run(study, name, arch, seed, model, kwargs) for seed in seeds]


def summary(study: Study) -> str:
    groups = sorted({r.group for r in study.runs})
    seeds = sorted({r.seed for r in study.runs})
    return (f"study {study.name}: {len(study.runs)} runs ({len(groups)} architectures x seeds {seeds}), "
            f"{len(study.skipped)} combination(s) skipped; data {study.data} @ {study.img_size}px, "
            f"{study.recipe.get('epochs', '?')} epochs")


__all__ = ["Run", "Study", "load_study", "parse_study", "check_runnable_here", "check_name", "list_presets",
           "stable_json", "summary", "check_analysis", "with_launcher", "with_tracking", "check_tracking",
           "resolve_architecture", "model_refusal", "families", "with_seed", "run_dir", "LAYOUTS", "ZOO_SIZES"]
