"""The slurm launcher: one submitit job per run; the coordinator submits, re-attaches, imports and records.

What runs where:

- the coordinator (`spach battle` with `launcher: {kind: slurm}`, on the login node) is the only
  writer of `OUT/battle.db`. It submits one Slurm job per run that is not done (at most
  `max_jobs` in flight), stores the job id in the database, and every `poll_s` seconds imports
  what the jobs wrote into their run directories: the epochs (`metrics.jsonl`), the attempt
  (`job.json`) and the outcome (`result.json`). A run whose job ended without a result
  (cancelled, out of memory, node failure, killed) is failed with its state and the tail of its
  Slurm stderr.
- a job (`RunJob`, pickled by submitit) trains and measures its run in its run directory, which
  may be on a shared file system (`runs_dir:`); with several tasks (nodes x tasks per node) it
  trains with DDP, the process group set up from Slurm's environment. It never opens battle.db.
- pre-emption and time limits: Slurm signals the job (USR2, `signal_delay_s` before the end);
  submitit calls `RunJob.checkpoint`, which resubmits the same call, and requeues the job, which
  continues from the run's last checkpoint (the engine's `resume="auto"`). A job requeued by hand
  (`scontrol requeue`) does the same. SIGTERM (scancel, requeue, the end of the time limit) stops a
  job at once (`stop_on_sigterm`): submitit ignores it, which would let a cancelled job train on and
  even finish during Slurm's KillWait. Each start is an attempt, counted in the database; the job
  of a run past `max_attempts` attempts fails with the reason.
- a coordinator killed or restarted re-attaches: runs in the database with a job id are followed,
  not submitted again; jobs found by their comment (the run directory) are adopted; results of
  jobs that ended while no coordinator ran are imported at its next start.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import submitit

from spach.battle import db
from spach.battle.progress import Progress, format_duration
from spach.errors import SpachError
from spach.io import atomic_write

JOB_FILE = "job.json"          # in the run directory: the job's current attempt (written at its start)
RESULT_FILE = "result.json"    # in the run directory: the job's outcome (done + metrics, or failed + error)
LOG_DIR = "slurm"              # in the run directory: submitit's pickles and the Slurm logs
COMMENT_PREFIX = "spach:"      # the job's --comment: spach:<run directory>
REQUEUE_SETTLE_S = 6.0  # how long a job's final state must last before its run is failed (see back_in_flight)
# job states in which a job may still produce its result (a requeued job goes back to PENDING)
IN_FLIGHT = {"PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "SUSPENDED", "REQUEUED", "REQUEUE_FED",
             "REQUEUE_HOLD", "RESIZING", "SIGNALING", "STAGE_OUT", "STOPPED", "RESV_DEL_HOLD"}


# --------------------------------------------------------------------------- the job

class RunJob(submitit.helpers.Checkpointable):
    """The callable of a run's Slurm job: `RunJob()(payload)` trains and measures the run.

    On pre-emption or time limit submitit calls `checkpoint(payload)`, which returns the same call
    (Checkpointable's default): the requeued job resumes from the run's last checkpoint.
    """

    def __call__(self, payload: dict[str, Any]) -> dict[str, Any] | None:
        return run_job(payload)


def run_job(payload: dict[str, Any]) -> dict[str, Any] | None:
    """Body of a run's job, on every task: set up DDP when the job has several tasks, then train, measure
    and (rank 0) write OUTPUT/result.json. Raises on failure (Slurm records the job FAILED)."""
    from spach.battle.runner import train_and_measure

    stop_on_sigterm()
    if int(os.environ.get("SLURM_NTASKS", "1")) > 1:
        submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False, overwrite=True)
    rank = int(os.environ.get("RANK", "0"))
    job_id = os.environ.get("SLURM_JOB_ID", "")
    attempt = int(os.environ.get("SLURM_RESTART_COUNT", "0")) + 1
    out = Path(payload["output_dir"])
    out.mkdir(parents=True, exist_ok=True)
    if rank == 0:
        write_json(out / JOB_FILE, {"job_id": job_id, "attempt": attempt, "started_at": time.time(),
                                    "node": os.environ.get("SLURMD_NODENAME") or socket.gethostname(),
                                    "tasks": int(os.environ.get("SLURM_NTASKS", "1"))})
    if attempt > payload["max_attempts"]:
        error = (f"job {job_id} was pre-empted or reached its time limit {attempt - 1} time(s); "
                 f"max_attempts is {payload['max_attempts']} (raise launcher.max_attempts or time_min)")
        if rank == 0:
            write_json(out / RESULT_FILE, {"job_id": job_id, "status": "failed", "error": error})
        return None
    threads = payload["threads"] or int(os.environ.get("SLURM_CPUS_PER_TASK", "0")) or None
    try:
        metrics, history = train_and_measure(payload["config"], out, threads)
    except Exception as e:
        if rank == 0:
            error = f"{type(e).__name__}: {e}\n" + "".join(traceback.format_exc(limit=8))
            write_json(out / RESULT_FILE, {"job_id": job_id, "status": "failed", "error": error})
        raise
    if rank == 0:
        write_json(out / RESULT_FILE, {"job_id": job_id, "status": "done", "metrics": metrics, "history": history,
                                       "world_size": int(os.environ.get("WORLD_SIZE", "1"))})
    return metrics


def stop_on_sigterm() -> None:
    """In a job: SIGTERM ends the process now (SystemExit, so atomic writes clean up), without a result.

    Slurm sends SIGTERM on scancel, on requeue and at the time limit, then SIGKILL after KillWait.
    submitit's own handler ignores SIGTERM, so without this a cancelled job trains on for KillWait
    seconds and may write a result; the run's checkpoints make stopping at any point safe.
    """
    def handler(signum: int, frame: Any) -> None:
        job_id = os.environ.get("SLURM_JOB_ID", "?")
        print(f"spach: job {job_id} got SIGTERM (scancel, requeue or time limit): stopping now; "
              "a new attempt continues from the run's last checkpoint", file=sys.stderr, flush=True)
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, handler)


def write_json(path: Path, obj: Any) -> None:
    with atomic_write(path, "w") as f:
        json.dump(obj, f)


def read_json(path: Path) -> dict | None:
    """The JSON object in `path`, or None if it is missing or not (yet) readable."""
    try:
        obj = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    return obj if isinstance(obj, dict) else None


# --------------------------------------------------------------------------- talking to Slurm

@dataclass(frozen=True)
class JobInfo:
    job_id: str
    state: str      # PENDING, RUNNING, COMPLETED, CANCELLED, ...
    node: str       # the node list, or the reason it is pending
    comment: str


def require_slurm() -> None:
    if shutil.which("sbatch") is None or shutil.which("squeue") is None:
        raise SpachError("the slurm launcher needs Slurm's sbatch and squeue on PATH (run `spach battle` on a "
                         "login node of the cluster; on one machine: `make slurm-up`)")


def slurm_jobs() -> dict[str, JobInfo] | None:
    """This user's jobs that Slurm still knows (also recently ended ones): job id -> info.

    None when squeue does not answer (the controller is down or busy): nothing is decided then.
    """
    user = os.environ.get("USER") or _user_name()
    cmd = ["squeue", "-h", "-t", "all", "-u", user, "-o", "%i|%T|%R|%k"]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if proc.returncode != 0:
        return None
    jobs = {}
    for line in proc.stdout.splitlines():
        parts = line.split("|", 3)
        if len(parts) == 4:
            jobs[parts[0]] = JobInfo(parts[0], parts[1], parts[2], parts[3])
    return jobs


def _user_name() -> str:
    import pwd
    return pwd.getpwuid(os.getuid()).pw_name


def job_comment(output_dir: str | Path) -> str:
    return COMMENT_PREFIX + str(Path(output_dir).resolve())


def make_executor(launcher: dict[str, Any], folder: Path, name: str, comment: str,
                  threads: int | None) -> submitit.SlurmExecutor:
    """A submitit executor for one run's job with the launcher's settings."""
    executor = submitit.SlurmExecutor(folder=folder, max_num_timeout=launcher["max_attempts"])
    tasks = launcher["tasks_per_node"] or max(1, launcher["gpus_per_node"])
    params: dict[str, Any] = dict(job_name=name, comment=comment, nodes=launcher["nodes"], ntasks_per_node=tasks,
                                  time=launcher["time_min"], setup=[*launcher["setup"], pythonpath_line()],
                                  additional_parameters=dict(launcher["sbatch"]))
    for key in ("partition", "account", "qos", "constraint", "cpus_per_task"):
        if launcher[key] is not None:
            params[key] = launcher[key]
    if launcher["gpus_per_node"]:
        params["gpus_per_node"] = launcher["gpus_per_node"]
    if launcher["mem_gb"] is not None:
        params["mem"] = f"{int(launcher['mem_gb'] * 1024)}M"
    if threads:
        params["setup"].append(f"export OMP_NUM_THREADS={threads}")
    executor.update_parameters(**params)
    return executor


def pythonpath_line() -> str:
    """The job imports the same `spach` as the coordinator, installed or not."""
    import shlex

    root = shlex.quote(str(Path(__file__).resolve().parents[2]))
    return f'export PYTHONPATH={root}${{PYTHONPATH:+:$PYTHONPATH}}'


def cancel_jobs(job_ids: Iterable[str]) -> None:
    ids = [str(j) for j in job_ids]
    if ids:
        subprocess.run(["scancel", *ids], check=True, capture_output=True, text=True, timeout=60)


def stderr_tail(row: dict[str, Any], lines: int = 20) -> str:
    """The last lines of the Slurm stderr of the run's current job (task 0)."""
    path = Path(row["output_dir"]) / LOG_DIR / f"{row['job_id']}_0_log.err"
    try:
        text = path.read_text(errors="replace").splitlines()
    except OSError:
        return f"(no stderr file {path})"
    return "\n".join(text[-lines:])


# --------------------------------------------------------------------------- the coordinator

def run_on_slurm(study, out_dir: str | Path, progress: Progress, detach: bool = False) -> None:
    """Submit, follow and record the study's runs on Slurm until none is queued or running
    (with `detach`: submit what is missing and return). The caller holds the study lock."""
    require_slurm()
    launcher = study.launcher
    keys = [r.key for r in study.runs]
    conn = db.connect(out_dir)
    try:
        inflight = [r for r in db.runs(conn, keys) if r["status"] == "running"]
        if inflight:
            progress.total += len(inflight)
            progress.message(f"re-attaching to {len(inflight)} job(s): "
                             + ", ".join(f"{r['name']} (job {r['job_id']})" for r in inflight))
        submitted = 0
        while True:
            jobs = slurm_jobs()  # before reading the run directories: a job that ended wrote its result first
            rows = db.runs(conn, keys)
            for row in rows:
                if row["status"] == "running":
                    sync_run(conn, row, jobs, progress)
            rows = db.runs(conn, keys)
            running = sum(r["status"] == "running" for r in rows)
            queued = [r for r in rows if r["status"] == "queued"]
            room = len(queued) if launcher["max_jobs"] is None else max(0, launcher["max_jobs"] - running)
            for row in queued[:room]:
                submitted += 1
                submit_run(conn, row, study, jobs or {}, progress, submitted)
            if detach:
                progress.message(f"detached: {running + min(room, len(queued))} job(s) queued or running; "
                                 f"follow with `spach battle status {out_dir}`, collect with the same command")
                return
            if not queued and not running:
                return
            time.sleep(launcher["poll_s"])
    except KeyboardInterrupt:
        progress.message("interrupted: the Slurm jobs keep running; the same command re-attaches to them")
        raise
    finally:
        conn.close()


def submit_run(conn, row: dict[str, Any], study, jobs: dict[str, JobInfo], progress: Progress,
               index: int) -> str:
    """Submit the run's job, or adopt the live job already submitted for its directory; record the job id."""
    out = Path(row["output_dir"]).resolve()
    comment = job_comment(out)
    # (not the run's previous job: it may still be finishing after writing its result)
    live = [j for j in jobs.values() if j.comment == comment and j.state in IN_FLIGHT and j.job_id != row["job_id"]]
    epochs = json.loads(row["config"])["train"].get("epochs")
    if live:  # submitted by a coordinator killed before it could record the id
        job_id = live[0].job_id
        progress.message(f"    {row['name']}: adopting job {job_id} ({live[0].state})")
    else:
        threads = study.launcher["cpus_per_task"] or study.threads
        payload = {"key": row["key"], "name": row["name"], "config": json.loads(row["config"]),
                   "output_dir": str(out), "threads": threads, "max_attempts": study.launcher["max_attempts"]}
        executor = make_executor(study.launcher, out / LOG_DIR, f"spach-{row['name']}", comment, threads)
        job_id = str(executor.submit(RunJob(), payload).job_id)
        progress.run_started(row["name"], epochs, index)
        progress.message(f"    {row['name']}: submitted job {job_id}")
    db.mark_submitted(conn, row["key"], job_id)
    return job_id


def import_epochs(conn, row: dict[str, Any], progress: Progress | None = None) -> None:
    """Copy the epochs the job has written to its metrics.jsonl into the database."""
    path = Path(row["output_dir"]) / "metrics.jsonl"
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return
    have = {e["epoch"] for e in db.epochs(conn, row["key"])}
    epochs = json.loads(row["config"])["train"].get("epochs")
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:  # a line being written
            continue
        if isinstance(record, dict) and "epoch" in record and int(record["epoch"]) not in have:
            db.record_epoch(conn, row["key"], record)
            if progress:
                progress.epoch_done(row["name"], record, epochs)


def sync_run(conn, row: dict[str, Any], jobs: dict[str, JobInfo] | None, progress: Progress | None) -> str:
    """Bring one submitted run's database row up to date with its job; returns its status."""
    out, job_id = Path(row["output_dir"]), row["job_id"]
    import_epochs(conn, row, progress)
    status = settle_from_files(conn, row, progress)
    if status is not None:
        return status
    if jobs is None:
        return "running"  # Slurm does not answer: decide nothing
    job = jobs.get(job_id)
    if job is not None and (job.state in IN_FLIGHT or back_in_flight(job_id)):
        return "running"
    # the job has ended: a result it wrote after the look above (a short last attempt) still counts
    status = settle_from_files(conn, row, progress)
    if status is not None:
        return status
    state = f"ended {job.state}" if job else "is no longer known to Slurm"
    error = f"Slurm job {job_id} {state} without a result; stderr tail:\n{stderr_tail(row)}"
    db.mark_failed(conn, row["key"], error)
    if progress:
        progress.run_finished(row["name"], False, f"Slurm job {job_id} {state}; see {out / LOG_DIR}")
    return "failed"


def settle_from_files(conn, row: dict[str, Any], progress: Progress | None) -> str | None:
    """Record what the run's job wrote: its current attempt, and its result ("done"/"failed", returned;
    None while there is none)."""
    out, key, job_id = Path(row["output_dir"]), row["key"], row["job_id"]
    # the result before the job file: a job writes its job file, then (maybe at once) its result, so a
    # result read first comes with the job file of the same attempt or a newer one, never an older one
    result = read_json(out / RESULT_FILE)
    info = read_json(out / JOB_FILE)
    if info and str(info.get("job_id")) == job_id:
        db.mark_job_attempt(conn, key, job_id, int(info["attempt"]), info.get("node"), info.get("started_at"))
    if not (result and str(result.get("job_id")) == job_id):
        return None
    if result.get("status") == "done":
        for record in result.get("history") or []:
            db.record_epoch(conn, key, record)
        metrics = result["metrics"]
        db.mark_done(conn, key, metrics)
        if progress:
            progress.run_finished(row["name"], True, f"top-1 {metrics['final_top1']:.2f}% (job {job_id})")
        return "done"
    error = str(result.get("error") or "the job reported a failure without a message")
    db.mark_failed(conn, key, error)
    if progress:
        progress.run_finished(row["name"], False, error.splitlines()[0])
    return "failed"


def back_in_flight(job_id: str, looks: int = 3) -> bool:
    """Is a job that shows a final state queued or running again a moment later?

    A job that submitit requeues (pre-emption, time limit) ends its attempt FAILED and is PENDING again
    shortly after; one ``squeue`` snapshot can fall between the two. A run is failed only when its
    job still shows a final state after ``REQUEUE_SETTLE_S`` seconds."""
    for _ in range(looks):
        time.sleep(REQUEUE_SETTLE_S / looks)
        jobs = slurm_jobs()
        if jobs is None:
            return False
        job = jobs.get(job_id)
        if job is not None and job.state in IN_FLIGHT:
            return True
    return False


# --------------------------------------------------------------------------- status and cancel

def study_status(out_dir: str | Path) -> list[dict[str, Any]]:
    """One entry per run of the study: name, status, job id, Slurm state, node, epoch, epochs, elapsed (s).

    Reads the database and the run directories; writes nothing."""
    conn = db.connect_readonly(out_dir)
    try:
        rows = db.runs(conn, db.study_keys(conn))
        done_epochs = {r["key"]: len(db.epochs(conn, r["key"])) for r in rows}
    finally:
        conn.close()
    jobs = slurm_jobs() if shutil.which("squeue") else None
    now, entries = time.time(), []
    for row in rows:
        job_id = row.get("job_id")
        info = read_json(Path(row["output_dir"]) / JOB_FILE) or {}
        current = job_id is not None and str(info.get("job_id")) == job_id
        job = (jobs or {}).get(job_id) if job_id else None
        epoch = max(done_epochs[row["key"]], _epochs_on_disk(row["output_dir"]) if row["status"] == "running" else 0)
        started = info.get("started_at") if current else row["started_at"]
        if row["status"] == "running":
            elapsed = now - started if started and job and job.state == "RUNNING" else None
        else:
            elapsed = row["train_time_s"]
        entries.append({"name": row["name"], "status": row["status"], "job_id": job_id,
                        "slurm_state": job.state if job else None,
                        "node": (job.node if job else None) or (info.get("node") if current else row.get("node")),
                        "epoch": epoch, "epochs": json.loads(row["config"])["train"].get("epochs"),
                        "elapsed_s": elapsed,
                        # attempts recorded, plus starts of the current job the coordinator has not seen yet
                        "attempts": row["attempts"] + (max(0, int(info["attempt"]) - (row.get("job_attempt") or 0))
                                                       if current and row["status"] == "running" else 0),
                        "error": (row["error"] or "").splitlines()[0] if row["error"] else None})
    return entries


def _epochs_on_disk(output_dir: str) -> int:
    try:
        return sum(1 for line in (Path(output_dir) / "metrics.jsonl").read_text().splitlines() if line.strip())
    except OSError:
        return 0


def cancel_runs(out_dir: str | Path, names: list[str] | None = None) -> list[tuple[str, str]]:
    """scancel the jobs of the study's submitted runs (all, or those named); returns [(name, job id)].

    The coordinator records them as failed (cancelled) at its next poll, or at the next `spach battle`."""
    conn = db.connect_readonly(out_dir)
    try:
        rows = db.runs(conn, db.study_keys(conn))
    finally:
        conn.close()
    if names:
        unknown = sorted(set(names) - {r["name"] for r in rows})
        if unknown:
            raise ValueError(f"no run(s) named {unknown} in {out_dir} (see `spach battle status {out_dir}`)")
    chosen = [(r["name"], r["job_id"]) for r in rows
              if r["status"] == "running" and r.get("job_id") and (not names or r["name"] in names)]
    require_slurm()
    cancel_jobs(job_id for _, job_id in chosen)
    return chosen


def format_status(entries: list[dict[str, Any]]) -> str:
    """The table of `spach battle status`: one line per run."""
    lines = [f"{'run':32s} {'state':10s} {'job':>8s} {'node':12s} {'epoch':>7s} {'elapsed':>9s} attempts"]
    for e in entries:
        state = e["slurm_state"].lower() if e["status"] == "running" and e["slurm_state"] else e["status"]
        epoch = f"{e['epoch']}/{e['epochs'] or '?'}"
        elapsed = format_duration(e["elapsed_s"]) if e["elapsed_s"] is not None else "-"
        line = (f"{e['name']:32s} {state:10s} {e['job_id'] or '-':>8s} {(e['node'] or '-')[:12]:12s} {epoch:>7s} "
                f"{elapsed:>9s} {e['attempts'] or 0}")
        if e["status"] == "failed" and e["error"]:
            line += f"  {e['error'][:100]}"
        lines.append(line)
    return "\n".join(lines)
