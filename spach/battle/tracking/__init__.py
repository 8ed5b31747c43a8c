"""The tracker seam: where a study's runs are logged besides its database (MLflow, TensorBoard HParams).

    hub = open_tracking(study, out_dir, say=progress.message)   # None when the study tracks nothing
    progress.listeners.append(hub)                                # sees every run's start, epochs and end
    ...
    hub.study_finished(report_path); hub.close()

A tracker (a subclass of `Tracker`) gets the coordinator's events with the run's database row: a run
started (also a resumed one), an epoch done, a run finished (done or failed, with all its epochs), and the
study finished (after the quiet measure phase, with the report). The database stays the source of truth:
a tracker that fails is reported once on the console and the study goes on (`TrackingHub`).
Adding a tracker is one new module here with its class and one line in `TRACKERS`; its package is
imported only when a study enables it.
"""
from __future__ import annotations

import importlib
import json
import subprocess
from pathlib import Path
from typing import Any, Callable

from spach.battle import db

# name (its key under `tracking:`) -> "module:Class", one line per tracker
TRACKERS = {
    "mlflow": "spach.battle.tracking.mlflow:MlflowTracker",
    "tensorboard": "spach.battle.tracking.tensorboard:HParamsTracker",
}


class Tracker:
    """The protocol every tracker implements; `settings` is its section of `tracking:`."""

    name = ""

    def __init__(self, settings: Any, study, out_dir: Path):
        self.settings, self.study, self.out_dir = settings, study, Path(out_dir)

    def run_started(self, row: dict) -> None:
        """A run starts executing (fresh, or resumed from its checkpoint, or re-attached to)."""

    def epoch_done(self, row: dict, record: dict) -> None:
        """An epoch of the run ended (`record`: the engine's metrics of that epoch)."""

    def run_finished(self, row: dict, epochs: list[dict]) -> None:
        """The run is done or failed (`row["status"]`); `epochs` are all its epochs in the database."""

    def study_finished(self, rows: list[dict], report: Path | None) -> None:
        """Every run has its final row (throughput measured); `report` is OUT/report.md if written."""

    def close(self) -> None:
        """Release what the tracker holds."""


def tracker_class(name: str) -> type[Tracker]:
    entry = TRACKERS[name]
    if isinstance(entry, type):
        return entry
    module, cls = entry.split(":")
    return getattr(importlib.import_module(module), cls)


class TrackingHub:
    """The Progress listener that hands each event to every tracker with the run's current row."""

    def __init__(self, study, out_dir: Path, trackers: list[Tracker], say: Callable[[str], None] = print):
        self.study, self.out_dir, self.trackers, self.say = study, Path(out_dir), trackers, say
        self.keys = {r.name: r.key for r in study.runs}
        self.started: set[str] = set()
        self.broken: set[str] = set()
        self.conn = None

    def follow(self, runs) -> None:
        """Also hand on the events of `runs` (battle Runs made after the study, e.g. its tuning trials)."""
        self.keys.update({r.name: r.key for r in runs})

    def _row(self, name: str) -> dict | None:
        if name not in self.keys:
            return None
        if self.conn is None:
            self.conn = db.connect(self.out_dir)
        return db.get_run(self.conn, self.keys[name])

    def _each(self, method: str, *args) -> None:
        for tracker in self.trackers:
            if tracker.name in self.broken:
                continue
            try:
                getattr(tracker, method)(*args)
            except Exception as e:  # noqa: BLE001 — a tracker never stops the study
                self.broken.add(tracker.name)
                self.say(f"tracking: {tracker.name} failed ({type(e).__name__}: {e}); it logs nothing more in "
                         "this invocation; the study goes on (battle.db has every result)")

    def run_started(self, name: str) -> None:
        row = self._row(name)
        if row is not None:
            self.started.add(name)
            self._each("run_started", row)

    def epoch_done(self, name: str, record: dict) -> None:
        if name not in self.started:  # a run re-attached to, or resumed by another process
            self.run_started(name)
        row = self._row(name)
        if row is not None:
            self._each("epoch_done", row, record)

    def run_finished(self, name: str, ok: bool) -> None:
        if name not in self.started:
            self.run_started(name)
        row = self._row(name)
        if row is not None:
            self._each("run_finished", row, db.epochs(self.conn, row["key"]))

    def study_finished(self, report: str | Path | None) -> None:
        if self.conn is None:
            self.conn = db.connect(self.out_dir)
        rows = db.runs(self.conn, [r.key for r in self.study.runs])
        self._each("study_finished", rows, Path(report) if report else None)

    def close(self) -> None:
        self._each("close")
        if self.conn is not None:
            self.conn.close()
            self.conn = None


def open_tracking(study, out_dir: Path, say: Callable[[str], None] = print) -> TrackingHub | None:
    """The hub of the trackers that `study.tracking` enables (None if none is)."""
    tracking = study.tracking or {"tensorboard": True}
    trackers = []
    for name in TRACKERS:
        settings = tracking.get(name)
        if settings:
            tracker = tracker_class(name)(settings, study, out_dir)
            tracker.name = tracker.name or name
            trackers.append(tracker)
    return TrackingHub(study, out_dir, trackers, say) if trackers else None


# --------------------------------------------------------------------------- what trackers log

def run_params(row: dict) -> dict[str, str | int | float | bool]:
    """A run's architecture and recipe as flat parameters: family, layout, size, cpe, shared, seed, model,
    model_kwargs.* and recipe.* (nested values as JSON), and the measurement settings as measure.*."""
    config = json.loads(row["config"])
    params: dict[str, Any] = {k: row[k] for k in ("family", "layout", "size", "seed", "model")}
    params.update(cpe=bool(row["cpe"]), shared=bool(row["shared"]))
    for prefix, section in (("model_kwargs", config.get("model_kwargs") or {}), ("recipe", config["train"]),
                            ("measure", config.get("measure") or {})):
        for key, value in section.items():
            if prefix == "recipe" and key in ("model", "model_kwargs"):
                continue  # given above
            flat = value if isinstance(value, (str, int, float, bool)) else json.dumps(value, sort_keys=True)
            params[f"{prefix}.{key}"] = flat
    return params


FINAL_METRICS = ("final_top1", "best_top1", "final_top5", "final_val_loss", "final_train_loss", "params", "macs",
                 "train_time_s", "images_per_s")
EPOCH_METRICS = {"train_loss": "train_loss", "val_loss": "val_loss", "val_top1": "top1", "val_top5": "top5",
                 "images_per_s": "train_images_per_s", "lr": "lr"}   # the engine's name -> the logged name


def final_metrics(row: dict) -> dict[str, float]:
    """The run's final figures that are known (finite numbers only)."""
    import math

    out = {}
    for key in FINAL_METRICS:
        value = row.get(key)
        if isinstance(value, (int, float)) and math.isfinite(value):
            out[key] = float(value)
    return out


def spach_commit() -> str:
    """The git commit of the spach source this process runs ("unknown" outside a git checkout)."""
    root = Path(__file__).resolve().parents[3]
    try:
        proc = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return proc.stdout.strip() if proc.returncode == 0 and proc.stdout.strip() else "unknown"


__all__ = ["TRACKERS", "Tracker", "TrackingHub", "open_tracking", "tracker_class", "run_params", "final_metrics",
           "spach_commit", "EPOCH_METRICS", "FINAL_METRICS"]
