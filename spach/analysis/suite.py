"""Run a named analysis on one or more models and write its JSON and PNG figures (for the CLI and studies).

    subjects = [load_subject(run_dir=d) for d in run_dirs]
    result = run_analysis("corruption", subjects, {"images": 200, "baseline": 0})
    write_analysis("corruption", result, "out/")      # out/corruption.json, out/corruption.png

Settings per analysis (all optional) are in `DEFAULTS`; unknown keys are refused.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from spach.analysis.common import ImageSet, Subject
from spach.io import write_json

KINDS = ("erf", "cka", "corruption", "fourier", "attn-distance")
DEFAULTS: dict[str, dict[str, Any]] = {
    "erf": {"images": 32, "stages": None, "batch_size": 16},
    "cka": {"images": 256, "batch_size": 64},
    "corruption": {"images": 500, "corruptions": None, "seed": 0, "baseline": 0, "batch_size": 64},
    "fourier": {"images": 100, "eps": 4.0, "step": 1, "bandwidths": None, "seed": 0, "batch_size": 128},
    "attn-distance": {"images": 32, "batch_size": 32},
}


def check_settings(kind: str, settings: dict | None, where: str = "analysis") -> dict:
    """The analysis' settings completed with defaults; ValueError naming an unknown kind, key or bad count."""
    if kind not in DEFAULTS:
        raise ValueError(f"{where}: unknown analysis {kind!r}; choose from {', '.join(KINDS)}")
    settings = settings or {}
    if not isinstance(settings, dict):
        raise ValueError(f"{where}.{kind}: settings must be a mapping, e.g. {{images: 64}}")
    unknown = set(settings) - set(DEFAULTS[kind])
    if unknown:
        raise ValueError(f"{where}.{kind}: unknown setting(s) {sorted(unknown)}; allowed: {sorted(DEFAULTS[kind])}")
    out = dict(DEFAULTS[kind], **settings)
    for key in ("images", "batch_size", "step"):
        if key in out and (not isinstance(out[key], int) or isinstance(out[key], bool) or out[key] < 1):
            raise ValueError(f"{where}.{kind}.{key} must be a positive integer, got {out[key]!r}")
    for key in ("stages", "bandwidths"):
        if out.get(key) is not None and not (isinstance(out[key], list) and out[key] and all(
                isinstance(v, int) and not isinstance(v, bool) and (key == "stages" or v > 0) for v in out[key])):
            raise ValueError(f"{where}.{kind}.{key} must be a non-empty list of integers, got {out[key]!r}")
    if out.get("corruptions") is not None:
        from spach.analysis.corruptions import CORRUPTIONS

        bad = [c for c in out["corruptions"] if c not in CORRUPTIONS] if isinstance(out["corruptions"], list) \
            else [out["corruptions"]]
        if bad or not out["corruptions"]:
            raise ValueError(f"{where}.{kind}.corruptions: unknown {bad}; choose from {', '.join(CORRUPTIONS)}")
    if "seed" in out and (not isinstance(out["seed"], int) or isinstance(out["seed"], bool) or out["seed"] < 0):
        raise ValueError(f"{where}.{kind}.seed must be a non-negative integer, got {out['seed']!r}")
    if kind == "cka" and out["batch_size"] < 4:
        raise ValueError(f"{where}.cka.batch_size must be >= 4 (the unbiased HSIC estimator), got {out['batch_size']}")
    if kind == "fourier" and not (isinstance(out["eps"], (int, float)) and out["eps"] > 0):
        raise ValueError(f"{where}.fourier.eps must be a positive number, got {out['eps']!r}")
    return out


def _images(subject: Subject, n: int, cache: dict) -> ImageSet:
    key = (subject.data, subject.img_size, n, subject.crop_pct, subject.interpolation)
    if key not in cache:
        cache[key] = ImageSet.for_subject(subject, n)
    return cache[key]


def measure(kind: str, subject: Subject, settings: dict, images: ImageSet) -> dict:
    """One analysis of one model with complete settings (see `check_settings`)."""
    from spach.analysis.attention import attention_distance_analysis
    from spach.analysis.cka import cka_analysis
    from spach.analysis.corruptions import corruption_analysis
    from spach.analysis.erf import erf_analysis
    from spach.analysis.fourier import fourier_analysis

    s = settings
    if kind == "erf":
        r = erf_analysis(subject, stages=s["stages"], batch_size=s["batch_size"], images=images)
    elif kind == "cka":
        r = cka_analysis(subject, batch_size=s["batch_size"], images=images)
    elif kind == "corruption":
        r = corruption_analysis(subject, corruptions=s["corruptions"], seed=s["seed"], batch_size=s["batch_size"],
                                images=images)
    elif kind == "fourier":
        r = fourier_analysis(subject, eps=float(s["eps"]), step=s["step"], bandwidths=s["bandwidths"], seed=s["seed"],
                             batch_size=s["batch_size"], images=images)
    else:
        r = attention_distance_analysis(subject, batch_size=s["batch_size"], images=images)
    return dict(r, model=subject.model_name, family=subject.family)


def run_analysis(kind: str, subjects: list[Subject], settings: dict | None = None) -> dict:
    """{"kind", "settings", "models": {label: result}} (+ "pairs" for CKA, mCE for corruption)."""
    from spach.analysis.cka import cka_joint
    from spach.analysis.corruptions import mce

    s = check_settings(kind, settings)
    if not subjects:
        raise ValueError(f"{kind}: no model to analyse")
    labels = [x.label for x in subjects]
    if len(set(labels)) != len(labels):
        raise ValueError(f"{kind}: two models have the same label ({labels}); give them distinct labels")
    cache: dict = {}
    out: dict[str, Any] = {"kind": kind, "settings": s, "models": {}}
    if kind == "cka":
        joint = cka_joint(subjects, batch_size=s["batch_size"], images=_images(subjects[0], s["images"], cache))
        for a in subjects:
            out["models"][a.label] = dict(cka_slice(joint, a.label, a.label), model=a.model_name, family=a.family)
        out["pairs"] = [cka_slice(joint, a.label, b.label) for i, a in enumerate(subjects) for b in subjects[i + 1:]]
        return out
    for sub in subjects:
        out["models"][sub.label] = measure(kind, sub, s, _images(sub, s["images"], cache))
    if kind == "corruption" and s["baseline"] is not None:
        base = _baseline(s["baseline"], labels)
        out["baseline"] = base
        for label, r in out["models"].items():
            r.update(mce(r, out["models"][base]))
    return out


def cka_slice(joint: dict, x: str, y: str) -> dict:
    """The block × block CKA map between models x and y out of a `cka_joint` result."""
    ox, oy = joint["offsets"][x], joint["offsets"][y]
    nx, ny = len(joint["blocks"][x]), len(joint["blocks"][y])
    matrix = [row[oy:oy + ny] for row in joint["matrix"][ox:ox + nx]]
    return {"x": x, "y": y, "x_blocks": joint["blocks"][x], "y_blocks": joint["blocks"][y], "matrix": matrix,
            "n_images": joint["n_images"]}


def _baseline(choice: Any, labels: list[str]) -> str:
    if isinstance(choice, int) and not isinstance(choice, bool):
        if not -len(labels) <= choice < len(labels):
            raise ValueError(f"corruption baseline {choice} is not one of the {len(labels)} models "
                             f"(0..{len(labels) - 1})")
        return labels[choice]
    if choice not in labels:
        raise ValueError(f"corruption baseline {choice!r} is not among the models analysed: {labels}")
    return choice


def finite_json(obj: Any) -> Any:
    """NaN/inf -> None, so the JSON is standard."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite_json(v) for v in obj]
    return obj


def write_analysis(kind: str, result: dict, out_dir: str | Path, overwrite: bool = False) -> list[Path]:
    """OUT/<kind>.json and the figures; refuses to replace an existing result unless `overwrite`."""
    from spach.analysis import figures

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    name = kind.replace("-", "_")
    target = out_dir / f"{name}.json"
    if target.exists() and not overwrite:
        raise ValueError(f"{target} already exists: choose another --out or pass --overwrite")
    write_json(target, finite_json(result), indent=1)
    models = result["models"]
    paths = [target]
    if kind == "erf":
        paths.append(figures.figure_erf(models, out_dir / "erf.png"))
    elif kind == "cka":
        for k, (label, r) in enumerate(models.items()):
            paths.append(figures.figure_cka(r, out_dir / f"cka_{k}_self.png", title=f"CKA within {label}"))
        for k, r in enumerate(result.get("pairs", [])):
            paths.append(figures.figure_cka(r, out_dir / f"cka_pair_{k}.png", title=f"CKA {r['x']} vs {r['y']}"))
    elif kind == "corruption":
        paths.append(figures.figure_corruptions(models, out_dir / "corruption.png"))
    elif kind == "fourier":
        paths.append(figures.figure_fourier(models, out_dir / "fourier.png"))
        paths.append(figures.figure_bandpass(models, out_dir / "fourier_bandpass.png"))
    else:
        paths.append(figures.figure_attention(models, out_dir / "attn_distance.png"))
    return [p for p in paths if p is not None]
