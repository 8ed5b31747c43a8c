"""MLflow as the lab notebook (`tracking: {mlflow: {uri: sqlite:///runs/mlflow.db, experiment: NAME}}`, or
`spach battle --mlflow URI`); needs the optional extra `pip install spach[mlflow]`.

Every run is one MLflow run (named as the study's run) under one parent run for the study, the tuning
trials of a study with `tune:` too:

- params: the run's architecture and recipe (`spach.battle.tracking.run_params`);
- tags: spach.study, spach.group, spach.seed, spach.launcher, spach.commit (the git commit of spach),
  spach.role ("trial" for a tuning trial, scored on the selection split, else "run");
- metrics per epoch (step = epoch): train_loss, val_loss, top1, top5, train_images_per_s, lr; at the
  end the final figures (final_top1, best_top1, params, macs, ..., images_per_s once measured);
- a pruned tuning trial ends FINISHED (MLflow has no pruned state) with the tag spach.pruned_after = k, the
  last epoch it trained (as `runs.pruned_after` in battle.db); a failed run ends FAILED;
- artifacts: config.json (the resolved run configuration), metrics.json (the final row), and the run's
  train.log / worker.log; the parent gets the report, its figures and the study file.

The MLflow run ids are kept in the run directory (RUN_DIR/mlflow.json, per tracking URI) and in
OUT/mlflow.json for the parent, so a resumed or re-attached run continues its MLflow run (epochs already
logged are not logged again) and rerunning the study creates no duplicates. With a `sqlite:///PATH` URI the
artifacts go beside the database file, in PATH's folder/mlartifacts. Talks to the store through
`mlflow.MlflowClient` (no global active run, so runs of several workers interleave safely).
"""
from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path

from spach.battle.tracking import EPOCH_METRICS, Tracker, final_metrics, run_params, spach_commit
from spach.errors import SpachError
from spach.io import write_json

IDS_FILE = "mlflow.json"   # in a run directory (its MLflow run) and in OUT (the study's parent run)


def import_mlflow():
    """The mlflow package, or a SpachError that says how to install it."""
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")  # nothing leaves the machine
    os.environ.setdefault("DO_NOT_TRACK", "true")
    try:
        import mlflow
    except ImportError:
        raise SpachError("tracking.mlflow needs MLflow: pip install 'spach[mlflow]'") from None
    return mlflow


def artifact_location(uri: str) -> str | None:
    """Where a new experiment keeps its artifacts: beside a SQLite store's file (None: the server's default)."""
    if not uri.startswith("sqlite:///"):
        return None
    return (Path(uri[len("sqlite:///"):]).resolve().parent / "mlartifacts").as_uri()


class MlflowTracker(Tracker):
    """Logs the study's runs to one MLflow experiment (see the module docstring)."""

    name = "mlflow"

    def __init__(self, settings, study, out_dir):
        super().__init__(settings, study, out_dir)
        mlflow = import_mlflow()
        self.entities = mlflow.entities
        self.uri = settings["uri"]
        self.client = mlflow.MlflowClient(tracking_uri=self.uri)
        name = settings.get("experiment") or study.name
        experiment = self.client.get_experiment_by_name(name)
        self.experiment_id = (experiment.experiment_id if experiment is not None else
                              self.client.create_experiment(name, artifact_location=artifact_location(self.uri)))
        self.parent_id = self._parent()
        self.run_ids: dict[str, str] = {}      # run key -> MLflow run id
        self.logged: dict[str, int] = {}       # run key -> last epoch logged

    # ---- ids kept on disk, per tracking URI
    def _stored_id(self, folder: Path) -> str | None:
        try:
            ids = json.loads((folder / IDS_FILE).read_text())
        except (OSError, ValueError):
            return None
        run_id = ids.get(self.uri) if isinstance(ids, dict) else None
        if run_id is None:
            return None
        try:
            run = self.client.get_run(run_id)
        except Exception:  # noqa: BLE001 — deleted or from another store of the same URI: start anew
            return None
        return run_id if run.info.lifecycle_stage == "active" else None

    def _store_id(self, folder: Path, run_id: str) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        try:
            ids = json.loads((folder / IDS_FILE).read_text())
        except (OSError, ValueError):
            ids = {}
        write_json(folder / IDS_FILE, dict(ids, **{self.uri: run_id}), indent=1)

    def _parent(self) -> str:
        run_id = self._stored_id(self.out_dir)
        if run_id is None:
            tags = {"spach.study": self.study.name, "spach.commit": spach_commit(), "spach.role": "study",
                    "spach.launcher": self.study.launcher["kind"]}
            run_id = self.client.create_run(self.experiment_id, run_name=self.study.name, tags=tags).info.run_id
            self._store_id(self.out_dir, run_id)
        else:
            self.client.update_run(run_id, status="RUNNING")
        return run_id

    # ---- the runs
    def _run_id(self, row: dict) -> str:
        if row["key"] in self.run_ids:
            return self.run_ids[row["key"]]
        folder = Path(row["output_dir"])
        run_id = self._stored_id(folder)
        if run_id is None:
            tags = {"spach.study": self.study.name, "spach.group": row["grp"], "spach.seed": str(row["seed"]),
                    "spach.launcher": self.study.launcher["kind"], "spach.commit": spach_commit(),
                    "spach.key": row["key"], "mlflow.parentRunId": self.parent_id,
                    "spach.role": "trial" if json.loads(row["config"])["train"].get("selection_fraction") else "run"}
            run_id = self.client.create_run(self.experiment_id, run_name=row["name"], tags=tags).info.run_id
            params = [self.entities.Param(k, str(v)[:6000]) for k, v in sorted(run_params(row).items())]
            for i in range(0, len(params), 100):  # MLflow takes at most 100 params a batch
                self.client.log_batch(run_id, params=params[i:i + 100])
            self._store_id(folder, run_id)
            self.logged[row["key"]] = 0
        else:  # logged by an earlier invocation: continue this MLflow run after the epochs it has
            steps = [m.step for m in self.client.get_metric_history(run_id, "train_loss")]
            self.logged[row["key"]] = max(steps, default=0)
        self.run_ids[row["key"]] = run_id
        return run_id

    def run_started(self, row: dict) -> None:
        run_id = self._run_id(row)
        if self.client.get_run(run_id).info.status != "RUNNING":  # resumed, or retried after a failure
            self.client.update_run(run_id, status="RUNNING")

    def epoch_done(self, row: dict, record: dict) -> None:
        run_id = self._run_id(row)
        epoch = int(record["epoch"])
        if epoch <= self.logged[row["key"]]:
            return  # logged before the run was resumed
        now = int(time.time() * 1000)
        metrics = [self.entities.Metric(name, float(record[key]), now, epoch)
                   for key, name in EPOCH_METRICS.items() if isinstance(record.get(key), (int, float))]
        self.client.log_batch(run_id, metrics=metrics)
        self.logged[row["key"]] = epoch

    def run_finished(self, row: dict, epochs: list[dict]) -> None:
        run_id = self._run_id(row)
        for record in epochs:  # epochs recorded without an event (a job's result brings its whole history)
            self.epoch_done(row, record)
        self._log_final(run_id, row)
        with tempfile.TemporaryDirectory() as tmp:
            write_json(Path(tmp) / "config.json", json.loads(row["config"]), indent=1)
            self.client.log_artifact(run_id, str(Path(tmp) / "config.json"))
        for log in ("train.log", "worker.log"):
            if (Path(row["output_dir"]) / log).is_file():
                self.client.log_artifact(run_id, str(Path(row["output_dir"]) / log))
        if row.get("pruned_after") is not None:
            self.client.set_tag(run_id, "spach.pruned_after", str(row["pruned_after"]))
        self.client.set_terminated(run_id, status="FINISHED" if row["status"] == "done" else "FAILED")

    def _log_final(self, run_id: str, row: dict) -> None:
        now = int(time.time() * 1000)
        self.client.log_batch(run_id, metrics=[self.entities.Metric(k, v, now, 0)
                                               for k, v in final_metrics(row).items()])
        with tempfile.TemporaryDirectory() as tmp:
            final = {k: row.get(k) for k in ("name", "status", "error", "attempts", *final_metrics(row))}
            write_json(Path(tmp) / "metrics.json", final, indent=1)
            self.client.log_artifact(run_id, str(Path(tmp) / "metrics.json"))

    def study_finished(self, rows: list[dict], report: Path | None) -> None:
        for row in rows:  # the throughput of the quiet phase, measured after the runs ended
            if row["status"] != "done" or row.get("images_per_s") is None or not Path(row["output_dir"]).is_dir():
                continue
            run_id = self._run_id(row)
            if "images_per_s" not in self.client.get_run(run_id).data.metrics:
                self._log_final(run_id, row)
        if report is not None and report.is_file():
            self.client.log_artifact(self.parent_id, str(report))
            if (report.parent / "figures").is_dir():
                self.client.log_artifacts(self.parent_id, str(report.parent / "figures"), "figures")
        with tempfile.TemporaryDirectory() as tmp:
            write_json(Path(tmp) / "study.json", self.study.source, indent=1)
            self.client.log_artifact(self.parent_id, str(Path(tmp) / "study.json"))
        now = int(time.time() * 1000)
        counts = {f"runs_{s}": sum(r["status"] == s for r in rows) for s in ("done", "failed")}
        self.client.log_batch(self.parent_id, metrics=[self.entities.Metric(k, v, now, 0) for k, v in counts.items()])
        if all(r["status"] in ("done", "failed") for r in rows):  # else (detached jobs) it stays RUNNING
            self.client.set_terminated(self.parent_id, status="FINISHED")
