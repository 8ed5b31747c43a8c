"""The slurm launcher (`launcher: {kind: slurm, ...}`): one submitit job per run; the coordinator submits,
re-attaches, imports and records.

What runs where:

- the coordinator (`spach battle` with `launcher: {kind: slurm}`, on the login node) is the only
  writer of `OUT/battle.db`. It submits one Slurm job per run that is not done (at most
  `max_jobs` in flight), stores the job id in the database, and every `poll_s` seconds imports
  what the jobs wrote into their run directories: the epochs (`metrics.jsonl`), the attempt
  (`job.json`) and the outcome (`result.json`), see `spach.battle.jobfiles`. A run whose job ended without a result
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
  not submitted again; jobs found by their comment (the run directory) are adopted (cancelled and
  submitted again if submitit's pickle of the call was never written: killed mid-submission); results of
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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import submitit

from spach.battle import db
from spach.battle.jobfiles import import_epochs, run_attempt, settle_from_files
from spach.battle.launchers import Launcher, source_root
from spach.battle.progress import Progress
from spach.battle.threads import threads_per_run
from spach.errors import SpachError

LOG_DIR = "slurm"              # in the run directory: submitit's pickles and the Slurm logs
COMMENT_PREFIX = "spach:"      # the job's --comment: spach:<run directory>
SQUEUE_TIMEOUT_S = 60.0  # a squeue that has not answered by then counts as Slurm being silent
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
    and (rank 0) write OUTPUT/result.json (`spach.battle.jobfiles.run_attempt`). Raises on failure (Slurm
    records the job FAILED)."""
    stop_on_sigterm()
    if int(os.environ.get("SLURM_NTASKS", "1")) > 1:
        submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False, overwrite=True)
    allotted = int(os.environ.get("SLURM_CPUS_PER_TASK", "0")) or None
    return run_attempt(payload, job_id=os.environ.get("SLURM_JOB_ID", ""),
                       attempt=int(os.environ.get("SLURM_RESTART_COUNT", "0")) + 1,
                       node=os.environ.get("SLURMD_NODENAME") or socket.gethostname(),
                       tasks=int(os.environ.get("SLURM_NTASKS", "1")), rank=int(os.environ.get("RANK", "0")),
                       world_size=int(os.environ.get("WORLD_SIZE", "1")),
                       threads=threads_per_run(payload["threads"], allotted=allotted, machine=False))


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
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=SQUEUE_TIMEOUT_S)
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

    root = shlex.quote(str(source_root()))
    return f'export PYTHONPATH={root}${{PYTHONPATH:+:$PYTHONPATH}}'


def stderr_tail(row: dict[str, Any], lines: int = 20) -> str:
    """The last lines of the Slurm stderr of the run's current job (task 0)."""
    path = Path(row["output_dir"]) / LOG_DIR / f"{row['job_id']}_0_log.err"
    try:
        text = path.read_text(errors="replace").splitlines()
    except OSError:
        return f"(no stderr file {path})"
    return "\n".join(text[-lines:])


# --------------------------------------------------------------------------- the coordinator

class SlurmLauncher(Launcher):
    """One Slurm job per run (at most `max_jobs` in flight), followed through squeue and the job files."""

    kind = "slurm"
    can_detach = True

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.jobs: dict[str, JobInfo] | None = None   # the last squeue snapshot (None: Slurm silent)
        self.looked = False

    def check(self) -> None:
        require_slurm()

    def capacity(self) -> int | None:
        return self.settings["max_jobs"]

    def poll_s(self) -> float:
        return self.settings["poll_s"]

    def attach(self, conn, rows: list[dict], progress: Progress) -> None:
        progress.message(f"re-attaching to {len(rows)} job(s): "
                         + ", ".join(f"{r['name']} (job {r['job_id']})" for r in rows))

    def submit(self, conn, row: dict, index: int, progress: Progress) -> None:
        if not self.looked:  # the first submission of this invocation: adopt jobs a killed coordinator left
            self.jobs, self.looked = slurm_jobs(), True
        submit_run(conn, row, self.study, self.jobs or {}, progress, index)

    def poll(self, conn, rows: list[dict], progress: Progress) -> set[str]:
        # squeue before reading the run directories: a job that ended wrote its result first
        self.jobs, self.looked = slurm_jobs(), True
        return {row["key"] for row in rows if sync_run(conn, row, self.jobs, progress) != "running"}

    def stop(self, interrupted: bool) -> None:
        if interrupted:
            print("stopped: the Slurm jobs keep running; the same command re-attaches to them", file=sys.stderr)

    @classmethod
    def job_states(cls, job_ids: list[str]) -> dict[str, tuple[str, str]] | None:
        jobs = slurm_jobs() if shutil.which("squeue") else None
        if jobs is None:
            return None
        return {j: (jobs[j].state, jobs[j].node) for j in job_ids if j in jobs}

    @classmethod
    def cancel_jobs(cls, job_ids: list[str]) -> None:
        require_slurm()
        if job_ids:
            subprocess.run(["scancel", *job_ids], check=True, capture_output=True, text=True, timeout=60)


def submitted_pickle(run_dir: Path, job_id: str) -> Path:
    """Where submitit keeps the pickled call of job `job_id` of a run (its job reads it at start)."""
    return submitit.core.utils.JobPaths(run_dir / LOG_DIR, job_id=job_id).submitted_pickle


def submit_run(conn, row: dict[str, Any], study, jobs: dict[str, JobInfo], progress: Progress,
               index: int) -> str:
    """Submit the run's job, or adopt the live job already submitted for its directory; record the job id."""
    out = Path(row["output_dir"]).resolve()
    comment = job_comment(out)
    # (not the run's previous job: it may still be finishing after writing its result)
    live = [j for j in jobs.values() if j.comment == comment and j.state in IN_FLIGHT and j.job_id != row["job_id"]]
    epochs = db.epochs_of(row)
    if live and not submitted_pickle(out, live[0].job_id).exists():
        # a coordinator killed between sbatch and submitit's writing of the job's pickle: the job can never
        # start the run (it waits for the pickle, then fails); cancel it and submit the run afresh
        progress.message(f"    {row['name']}: job {live[0].job_id} was submitted without its payload "
                         "(coordinator killed mid-submission); cancelling it and submitting again")
        SlurmLauncher.cancel_jobs([live[0].job_id])
        live = []
    if live:  # submitted by a coordinator killed before it could record the id
        job_id = live[0].job_id
        progress.message(f"    {row['name']}: adopting job {job_id} ({live[0].state})")
    else:
        # the job's torch threads (spach.battle.threads): the study's, else cpus_per_task, else the node's
        threads = threads_per_run(study.threads, allotted=study.launcher["cpus_per_task"], machine=False)
        payload = {"key": row["key"], "name": row["name"], "config": json.loads(row["config"]),
                   "output_dir": str(out), "threads": threads, "max_attempts": study.launcher["max_attempts"]}
        executor = make_executor(study.launcher, out / LOG_DIR, f"spach-{row['name']}", comment, threads)
        job_id = str(executor.submit(RunJob(), payload).job_id)
        progress.run_started(row["name"], epochs, index)
        progress.message(f"    {row['name']}: submitted job {job_id}")
    db.mark_submitted(conn, row["key"], job_id)
    return job_id


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
    if job is not None and job.state not in IN_FLIGHT:
        again = back_in_flight(job_id)
        if again is None or again:
            return "running"  # requeued (in flight again), or Slurm fell silent meanwhile: decide nothing
    elif job is not None:
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


def back_in_flight(job_id: str, looks: int = 3) -> bool | None:
    """Is a job that shows a final state queued or running again a moment later? None: Slurm fell silent.

    A job that submitit requeues (pre-emption, time limit) ends its attempt FAILED and is PENDING again
    shortly after; one ``squeue`` snapshot can fall between the two. A run is failed only when its
    job still shows a final state after ``REQUEUE_SETTLE_S`` seconds, at every look; when squeue does
    not answer one of them, nothing is decided (the rule: Slurm does not answer, decide nothing)."""
    for _ in range(looks):
        time.sleep(REQUEUE_SETTLE_S / looks)
        jobs = slurm_jobs()
        if jobs is None:
            return None
        job = jobs.get(job_id)
        if job is not None and job.state in IN_FLIGHT:
            return True
    return False
