"""The ray launcher (`launcher: {kind: ray, address: auto | HOST:PORT | ray://HOST:PORT, cpus_per_run: 1,
gpus_per_run: 0}`): each run one detached Ray actor that trains it; needs `pip install 'spach[ray]'`.

What runs where (the same resumable, crash-safe semantics as the slurm launcher):

- the coordinator (`spach battle`) connects to the cluster, creates one actor per run that is not done
  (at most `max_jobs` in flight), named `spach-KEY16-STAMP` in the namespace "spach", records
  "ray:NAME" as the run's job id, and every `poll_s` seconds imports what the run wrote into its run
  directory (`spach.battle.jobfiles`: metrics.jsonl, job.json, result.json);
- the actor (`RunActor`) is detached, so it outlives a killed coordinator: a coordinator started again
  re-attaches by the job ids in the database (and adopts an actor whose id it had no time to record),
  never starting a run twice; its constructor starts the training in a thread and returns;
- a worker process that dies (killed, out of memory, its node lost) is restarted by Ray (`max_restarts`
  = `max_attempts`): the new attempt continues from the run's last checkpoint (the engine's
  `resume="auto"`); past `max_attempts` attempts the run fails with the reason;
- an actor gone without a result (cancelled by `spach battle cancel`, or out of restarts) fails its run.

Ray's usage statistics are turned off (RAY_USAGE_STATS_ENABLED=0). The workers import the same `spach`
as the coordinator (its folder is put on their PYTHONPATH, before the coordinator's own PYTHONPATH).
"""
from __future__ import annotations

import json
import os
import socket
import threading
import time
from pathlib import Path
from typing import Any

from spach.battle import db
from spach.battle.jobfiles import JOB_FILE, import_epochs, read_json, run_attempt, settle_from_files
from spach.battle.launchers import Launcher, source_root
from spach.battle.progress import Progress
from spach.battle.threads import threads_per_run
from spach.errors import SpachError

NAMESPACE = "spach"
PREFIX = "ray:"           # a run's job id in the database: ray:<actor name>
ADDRESS_FILE = "ray.json"  # in OUT: the cluster address, for `spach battle status/cancel`


def import_ray():
    """The ray package (usage statistics off), or a SpachError that says how to install it."""
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    try:
        import ray
    except ImportError:
        raise SpachError("the ray launcher needs Ray: pip install 'spach[ray]'") from None
    return ray


def connect(address: str) -> Any:
    """Connect this process to the Ray cluster at `address` (once); returns the ray module."""
    ray = import_ray()
    if not ray.is_initialized():
        try:
            ray.init(address=address, namespace=NAMESPACE, log_to_driver=False, configure_logging=False,
                     runtime_env={"env_vars": {"PYTHONPATH": worker_pythonpath(), "RAY_USAGE_STATS_ENABLED": "0"}})
        except (ConnectionError, RuntimeError) as e:
            raise SpachError(f"no Ray cluster answers at {address!r} ({e}); start one with `ray start --head` "
                             "(on one machine: `make ray-up`) or set launcher.address") from None
    return ray


def worker_pythonpath() -> str:
    """The actors' PYTHONPATH: the folder of the coordinator's `spach`, then the coordinator's own PYTHONPATH
    (e.g. where a study's `plugins:` modules are found), as the local, torchrun and Slurm workers get it;
    Ray's env_vars replace the worker's variable, so without the latter an actor could not import them."""
    return os.pathsep.join([str(source_root()), *filter(None, [os.environ.get("PYTHONPATH")])])


class RunActor:
    """A run's actor: its constructor starts training the run in a thread (`run_attempt`), so a restarted
    actor (a new attempt) continues from the run's checkpoint. `alive()` answers while it exists."""

    def __init__(self, payload: dict[str, Any], job_id: str):
        out = Path(payload["output_dir"])
        previous = read_json(out / JOB_FILE) or {}
        attempt = int(previous.get("attempt", 0)) + 1 if str(previous.get("job_id")) == job_id else 1
        self.thread = threading.Thread(target=self._run, args=(payload, job_id, attempt), daemon=True)
        self.thread.start()

    @staticmethod
    def _run(payload: dict[str, Any], job_id: str, attempt: int) -> None:
        try:
            run_attempt(payload, job_id=job_id, attempt=attempt, node=socket.gethostname(),
                        threads=payload["threads"])
        except Exception:  # noqa: BLE001 — recorded in the run's result.json by run_attempt
            pass

    def alive(self) -> bool:
        return True


class RayLauncher(Launcher):
    """One detached Ray actor per run, followed through the job files and the cluster's named actors."""

    kind = "ray"
    can_detach = True

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.ray = None

    def check(self) -> None:
        self.ray = connect(self.settings["address"])
        self.out_dir.mkdir(parents=True, exist_ok=True)
        (self.out_dir / ADDRESS_FILE).write_text(json.dumps({"address": self.settings["address"]}) + "\n")

    def describe(self) -> str:
        return (f"ray at {self.settings['address']}: one actor per run, {self.settings['cpus_per_run']:g} CPU(s) "
                f"and {self.settings['gpus_per_run']:g} GPU(s) each")

    def capacity(self) -> int | None:
        return self.settings["max_jobs"]

    def poll_s(self) -> float:
        return self.settings["poll_s"]

    def attach(self, conn, rows: list[dict], progress: Progress) -> None:
        progress.message(f"re-attaching to {len(rows)} Ray actor(s): " + ", ".join(r["name"] for r in rows))

    def submit(self, conn, row: dict, index: int, progress: Progress) -> None:
        stem = f"spach-{row['key'][:16]}-"
        live = [n for n in live_actors(self.ray) if n.startswith(stem) and PREFIX + n != row["job_id"]]
        if live:  # created by a coordinator killed before it could record the id
            name = live[0]
            progress.message(f"    {row['name']}: adopting Ray actor {name}")
        else:
            name = f"{stem}{time.time_ns()}"
            threads = threads_per_run(self.study.threads, allotted=int(self.settings["cpus_per_run"]) or None)
            payload = {"key": row["key"], "name": row["name"], "config": json.loads(row["config"]),
                       "output_dir": str(Path(row["output_dir"]).resolve()), "threads": threads,
                       "max_attempts": self.settings["max_attempts"]}
            actor = self.ray.remote(RunActor).options(
                name=name, namespace=NAMESPACE, lifetime="detached", max_restarts=self.settings["max_attempts"],
                num_cpus=self.settings["cpus_per_run"], num_gpus=self.settings["gpus_per_run"])
            actor.remote(payload, PREFIX + name)
            progress.run_started(row["name"], db.epochs_of(row), index)
            progress.message(f"    {row['name']}: started Ray actor {name}")
        db.mark_submitted(conn, row["key"], PREFIX + name)

    def poll(self, conn, rows: list[dict], progress: Progress) -> set[str]:
        ended = set()
        for row in rows:
            if self.sync(conn, row, progress) != "running":
                ended.add(row["key"])
        return ended

    def sync(self, conn, row: dict, progress: Progress) -> str:
        """Bring one run's row up to date with its actor; returns its status."""
        import_epochs(conn, row, progress)
        name = row["job_id"][len(PREFIX):]
        status = settle_from_files(conn, row, progress)
        if status is None:
            actor = named_actor(self.ray, name)
            if actor is not None:
                return "running"
            status = settle_from_files(conn, row, progress)  # written just before the actor went
            if status is None:
                error = (f"Ray actor {name} is gone without a result (cancelled, or its worker died more than "
                         f"max_attempts={self.settings['max_attempts']} times); see {row['output_dir']}/train.log")
                db.mark_failed(conn, row["key"], error)
                progress.run_finished(row["name"], False, error)
                return "failed"
        actor = named_actor(self.ray, name)
        if actor is not None:  # its run has ended: free its CPUs
            self.ray.kill(actor, no_restart=True)
        return status

    @classmethod
    def job_states(cls, job_ids: list[str]) -> dict[str, tuple[str, str]] | None:
        ray = cluster_of_env()
        if ray is None:
            return None
        return {j: ("RUNNING", "ray") for j in job_ids if named_actor(ray, j[len(PREFIX):]) is not None}

    @classmethod
    def cancel_jobs(cls, job_ids: list[str]) -> None:
        ray = cluster_of_env()
        if ray is None:
            raise SpachError("no Ray cluster answers (set RAY_ADDRESS, or start it with `make ray-up`)")
        for job_id in job_ids:
            actor = named_actor(ray, job_id[len(PREFIX):])
            if actor is not None:
                ray.kill(actor, no_restart=True)


def live_actors(ray) -> list[str]:
    """The names of the live actors in the spach namespace."""
    return [a["name"] if isinstance(a, dict) else a for a in ray.util.list_named_actors(all_namespaces=False)]


def named_actor(ray, name: str):
    """The handle of a live actor by its name, or None."""
    try:
        return ray.get_actor(name, namespace=NAMESPACE)
    except ValueError:
        return None


def cluster_of_env():
    """The ray module connected to $RAY_ADDRESS (else the local cluster), or None when none answers."""
    try:
        return connect(os.environ.get("RAY_ADDRESS", "auto"))
    except SpachError:
        return None
