"""Execute a study: every run is one training through the engine plus its measurements.

`run_study(spec, out_dir)` takes the output directory's lock, records the study
in the database, and executes the runs that are not done:

- sequentially in this process (default), or `workers` at a time in worker
  subprocesses, the machine's threads split between them: each worker slot is one
  long-lived `python -m spach.battle.worker OUT --serve` process that executes the
  runs it is handed one after another (`WorkerSlot`; a slot whose process dies gets
  a new one); with `launcher: {kind: torchrun}` each run is launched as
  `torchrun --standalone --nproc_per_node N -m spach.battle.worker OUT KEY`;
  with `launcher: {kind: slurm}` each run is one Slurm job (see spach.battle.slurm);
- a run left 'running' by an interrupted invocation continues from its
  checkpoint (the engine's `resume="auto"`); done runs are never run again;
  failed runs are retried only with `retry_failed=True`;
- a failing run is recorded with its error and the study goes on;
- inference throughput is measured in a quiet phase, after all training, one
  run at a time (`measure_speeds`), so no figure is taken while other runs
  train on the same cores; an interrupted study measures on its next invocation.

`--workers` defaults to what the cores allow at the study's threads per run
(`default_workers`). Then the study's `analysis:` measurements run on the finished runs
(`spach.battle.analysis_runs`), and the report is written at the end.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable

from spach.battle import db
from spach.battle.progress import Progress, error_line
from spach.battle.spec import Run, Study, check_runnable_here, load_study
from spach.errors import SpachError
from spach.io import check_writable_dir

LOCK_NAME = "battle.lock"


# --------------------------------------------------------------------------- the output directory's lock

class StudyLock:
    """An exclusive `flock` on OUT/battle.lock holding the owner's PID; released when the process dies."""

    def __init__(self, out_dir: str | Path):
        self.path = Path(out_dir) / LOCK_NAME
        self.fd: int | None = None

    def __enter__(self) -> "StudyLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise SpachError(f"{self.path.parent} is in use by another `spach battle` (pid {holder}); "
                             "wait for it to finish or stop it, or use another --out") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self.fd = fd
        return self

    def __exit__(self, *_) -> None:
        if self.fd is not None:
            os.ftruncate(self.fd, 0)
            os.close(self.fd)  # closing releases the flock
            self.fd = None


# --------------------------------------------------------------------------- one run

def run_dir(out_dir: str | Path, run: Run, runs_dir: str | None = None) -> Path:
    """Where a run's files go: OUT/runs/NAME-KEY8, or under the study's `runs_dir` (relative to OUT)."""
    return Path(out_dir) / (runs_dir or "runs") / f"{run.name}-{run.key[:8]}"


def available_threads() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def build_run_model(config: dict[str, Any]):
    """The run's model, built exactly as the engine builds it for training (3-channel input), and its img_size."""
    from spach.data import open_source
    from spach.engine.build import build_model

    train = config["train"]
    # the train split's classes (the same as val's): a tuning trial never opens the validation split
    num_classes = train.get("num_classes") or len(open_source(train["data"], "train").classes)
    img_size = int(train["img_size"])
    return build_model(config["model"], num_classes=num_classes, img_size=img_size,
                       model_kwargs=config["model_kwargs"]), img_size


def count_run(config: dict[str, Any]) -> dict[str, Any]:
    """Params and MACs of a run's architecture at the study's input size."""
    from spach.models import count_macs, count_params

    model, img_size = build_run_model(config)
    return {"params": int(count_params(model)), "macs": int(count_macs(model, img_size, in_chans=3))}


def measure_speed(config: dict[str, Any], threads: int | None) -> float:
    """Inference images/s of a run's architecture at the study's `measure` settings.

    By the Swin protocol (eval mode, `warmup` untimed passes, the mean of `repeats` timed ones),
    on CUDA with cuDNN autotuning and TF32 matmuls as in training.
    """
    from spach.bench import measure_throughput
    from spach.engine.device import cuda_math

    m = config["measure"]
    model, img_size = build_run_model(config)
    device = m.get("device", "cpu")
    with cuda_math(device):
        speed = measure_throughput(model, batch_size=m["batch_size"], img_size=img_size, dtype=m["dtype"],
                                   threads=m["threads"] or threads, mode="infer", warmup=m["warmup"],
                                   repeats=m["repeats"], device=device, protocol="swin")
    return float(speed["images_per_s"])


def measure_speeds(out_dir: str | Path, keys: list[str], threads: int | None, progress: Progress) -> int:
    """The quiet phase: inference throughput of every done run that lacks it, one at a time. Returns the count."""
    conn = db.connect(out_dir)
    try:
        todo = [r for r in db.runs(conn, keys) if r["status"] == "done" and r["images_per_s"] is None]
        if todo:
            progress.message(f"measuring inference throughput of {len(todo)} run(s), one at a time")
        for row in todo:
            images_per_s = measure_speed(json.loads(row["config"]), threads)
            db.record_speed(conn, row["key"], images_per_s)
            progress.message(f"{row['name']}: {images_per_s:.0f} img/s")
        return len(todo)
    finally:
        conn.close()


def train_and_measure(config: dict[str, Any], output_dir: str | Path, threads: int | None,
                      on_epoch_end: Callable[[dict], None] | None = None,
                      on_step: Callable[[int, int, int], None] | None = None,
                      speed_now: bool = True) -> tuple[dict[str, Any], list[dict]]:
    """Train a run (continuing from its checkpoint, if any) and measure it: (metrics, per-epoch history).

    `config` is the run's resolved configuration (its `config` column). The engine's own lines go to
    OUTPUT/train.log. Under torch.distributed only rank 0 measures; other ranks get ({}, history).
    `speed_now=False` leaves the inference throughput to the study's quiet phase (`measure_speeds`):
    local runs share the cores with other runs' training; a Slurm job has its node to itself.
    """
    from spach.engine import TrainConfig, train
    from spach.engine.config import settings_language
    from spach.engine.distributed import process_rank
    from spach.models.registry import import_plugins

    import_plugins(config.get("plugins") or [])  # the study's own mixers (a worker or Slurm job imports them anew)
    cfg_dict = dict(config["train"], output=str(output_dir), resume="auto", threads=threads)
    t0 = time.time()
    Path(output_dir).mkdir(parents=True, exist_ok=True)
    # the engine's own lines go to the run's log; the study's progress stays readable
    # the engine's errors name options as the study file does (recipe: {lr: ...}), not as spach train's flags
    with open(Path(output_dir) / "train.log", "a") as log, contextlib.redirect_stdout(log), \
            settings_language("study"):
        result = train(TrainConfig.from_dict(cfg_dict), on_epoch_end=on_epoch_end, on_step=on_step)
    train_time = time.time() - t0
    history = result.get("history") or []
    if process_rank() != 0:
        return {}, history
    metrics = count_run(config)
    if speed_now:
        metrics["images_per_s"] = measure_speed(config, threads)
    metrics.update(best_top1=result.get("best_top1"), final_top1=result.get("final_top1"),
                   final_top5=result.get("final_top5"), final_val_loss=result.get("final_val_loss"),
                   final_train_loss=(history[-1] if history else {}).get("train_loss"),
                   train_time_s=result.get("train_time_s", train_time))  # resumed runs: all epochs
    return metrics, history


def execute_run(out_dir: str | Path, key: str, threads: int | None = None,
                progress: Progress | None = None, index: int = 1) -> bool:
    """Train and measure one run of the database; record the outcome. Returns True if it is done.

    Under torchrun only rank 0 writes to the database and measures.
    """
    from spach.engine.distributed import process_rank

    rank = process_rank()
    conn = db.connect(out_dir)
    row = db.get_run(conn, key)
    config = json.loads(row["config"])
    epochs = config["train"].get("epochs")
    name = row["name"]
    if rank == 0:
        db.mark_running(conn, key, os.getpid())
        if progress:
            progress.run_started(name, epochs, index)
    cpu_clock = [time.process_time()]  # this process's CPU time, all its threads

    def on_epoch_end(record: dict[str, Any]) -> None:
        if rank == 0:
            db.record_epoch(conn, key, record)
            db.add_cpu_time(conn, key, time.process_time() - cpu_clock[0])
            cpu_clock[0] = time.process_time()
            if progress:
                progress.epoch_done(name, record, epochs)

    def on_step(epoch: int, step: int, steps: int) -> None:
        if rank == 0 and progress:
            progress.step(name, epoch, step, steps, epochs)

    try:
        # throughput: later, one run at a time, in the quiet phase (measure_speeds)
        metrics, history = train_and_measure(config, row["output_dir"], threads, on_epoch_end, on_step,
                                             speed_now=False)
        if rank != 0:
            conn.close()
            return True
        for record in history:
            db.record_epoch(conn, key, record)  # complete curves, also for epochs trained before a resume
    except Exception as e:  # a failing run never stops the study
        if rank == 0:
            error = f"{type(e).__name__}: {e}\n" + "".join(traceback.format_exc(limit=8))
            db.mark_failed(conn, key, error)
            if progress:
                progress.run_finished(name, False, error_line(error))
        conn.close()
        return False
    db.mark_done(conn, key, metrics)
    conn.close()
    if progress:
        progress.run_finished(name, True, f"top-1 {metrics['final_top1']:.2f}% (best {metrics['best_top1']:.2f}%), "
                                          f"{metrics['params'] / 1e6:.3f}M params, {metrics['train_time_s']:.0f}s")
    return True


# --------------------------------------------------------------------------- subprocess workers

def worker_command(out_dir: str | Path, key: str | None, threads: int | None, launcher: dict[str, Any]) -> list[str]:
    """The command line of a worker: one run in a fresh process (plain Python, or torchrun), or with
    `key=None` a local `--serve` process that executes the keys written to its stdin."""
    tail = ["-m", "spach.battle.worker", str(out_dir), *([key] if key else ["--serve"])]
    if threads:
        tail += ["--threads", str(threads)]
    if launcher.get("kind") == "torchrun":
        return [sys.executable, "-m", "torch.distributed.run", "--standalone",
                f"--nproc_per_node={launcher['nproc_per_node']}", *launcher.get("args", []), *tail]
    return [sys.executable, *tail]


class WorkerSlot:
    """One of `--workers` slots. Local launcher: a long-lived `python -m spach.battle.worker OUT --serve`
    process executes the runs it is handed one after another (only its first run pays for importing torch
    and timm, 3.3 s on a 2-core machine); a new one replaces it if it dies. torchrun: one launch per run."""

    def __init__(self, out_dir: Path, slot: int, workers: int, threads: int | None, launcher: dict[str, Any]):
        self.out_dir, self.slot, self.workers, self.threads, self.launcher = out_dir, slot, workers, threads, launcher
        self.serving = launcher.get("kind", "local") == "local"
        self.proc: subprocess.Popen | None = None
        self.log = None

    def start(self, row: dict) -> None:
        """Begin executing a run (its output goes to RUN_DIR/worker.log)."""
        Path(row["output_dir"]).mkdir(parents=True, exist_ok=True)
        if not self.serving:
            if self.log is not None:
                self.log.close()  # the previous run's
            self.log = open(Path(row["output_dir"]) / "worker.log", "a")
            self.proc = self._spawn(row["key"], stdout=self.log)
            return
        if self.proc is None or self.proc.poll() is not None:
            # the process's own output (before and between runs) goes to OUT/worker-SLOT.log (removed if empty)
            if self.log is not None:
                self.log.close()
            self.log = open(self.out_dir / f"worker-{self.slot}.log", "a")
            self.proc = self._spawn(None, stdout=self.log, stdin=subprocess.PIPE)
        try:
            self.proc.stdin.write(row["key"] + "\n")
            self.proc.stdin.flush()
        except BrokenPipeError:  # died since poll(): the caller sees its exit code
            pass

    def _spawn(self, key: str | None, **streams) -> subprocess.Popen:
        return subprocess.Popen(worker_command(self.out_dir, key, self.threads, self.launcher),
                                stderr=subprocess.STDOUT, text=True, preexec_fn=_die_with_parent,
                                env=_child_env(self.slot, self.workers, self.launcher), **streams)

    def finished(self, status: str) -> int | None:
        """None while the current run executes; else the exit code of its process (0 when a serving
        process finished the run and waits for the next, i.e. the run's status is final)."""
        code = self.proc.poll()
        if code is None and self.serving and status in ("done", "failed"):
            return 0
        return code

    def stop(self, wait: bool = True) -> None:
        """End the slot's process: at the end of its input (`wait`), or terminated (an interrupted study)."""
        if self.proc is None:
            return
        if self.proc.stdin is not None and not self.proc.stdin.closed:
            try:
                self.proc.stdin.close()
            except BrokenPipeError:
                pass
        if not wait:
            self.proc.terminate()
        self.proc.wait()
        if self.log is not None and not self.log.closed:
            self.log.close()
        if self.serving and self.log is not None and os.path.getsize(self.log.name) == 0:
            os.remove(self.log.name)  # nothing was said outside the runs' own logs


def _run_in_subprocesses(out_dir: Path, pending: list[dict], workers: int, threads: int | None,
                         launcher: dict[str, Any], progress: Progress) -> None:
    """Keep `workers` worker slots busy; follow their progress through the database."""
    conn = db.connect(out_dir)
    queue = list(pending)
    slots = [WorkerSlot(Path(out_dir), i, workers, threads, launcher) for i in range(workers)]
    active: dict[str, tuple[WorkerSlot, dict]] = {}   # key -> (slot, row)
    free = list(slots)
    seen_epochs: dict[str, int] = {}
    started = 0
    interrupted = True
    try:
        while queue or active:
            while queue and free:
                row, slot = queue.pop(0), free.pop(0)
                slot.start(row)
                active[row["key"]] = (slot, row)
                seen_epochs[row["key"]] = 0
                started += 1
                progress.run_started(row["name"], _epochs_of(row), started)
            time.sleep(0.5)
            for key, (slot, row) in list(active.items()):
                for record in db.epochs(conn, key)[seen_epochs[key]:]:
                    progress.epoch_done(row["name"], record, _epochs_of(row))
                    seen_epochs[key] += 1
                code = slot.finished(db.get_run(conn, key)["status"])
                if code is None:
                    continue
                del active[key]
                free.append(slot)
                final = db.get_run(conn, key)  # read again: a process records its outcome just before it exits
                if final["status"] == "done":
                    progress.run_finished(row["name"], True, f"top-1 {final['final_top1']:.2f}%")
                else:
                    if final["status"] != "failed":  # the worker died without recording why
                        db.mark_failed(conn, key, f"worker exited with code {code}; see {row['output_dir']}/worker.log")
                        final = db.get_run(conn, key)
                    detail = error_line(final["error"])
                    log = f"{row['output_dir']}/worker.log"
                    progress.run_finished(row["name"], False, detail if log in detail else f"{detail} (see {log})")
        interrupted = False
    finally:
        for slot in slots:  # interrupted: stop our children, their runs stay 'running'
            slot.stop(wait=not interrupted)
        conn.close()


def _epochs_of(row: dict) -> int | None:
    return json.loads(row["config"])["train"].get("epochs")


def _die_with_parent() -> None:
    """In a worker, before exec: get SIGTERM when the battle dies, even by SIGKILL (Linux)."""
    if sys.platform.startswith("linux"):
        import ctypes
        PR_SET_PDEATHSIG = 1
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def _child_env(slot: int = 0, workers: int = 1, launcher: dict | None = None) -> dict[str, str]:
    """The environment of a worker: it imports the same `spach` as this process, installed or not;
    with several workers on a GPU machine, worker slot i sees only its own GPUs (see `gpus_for_slot`)."""
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    if workers > 1:
        per_slot = launcher["nproc_per_node"] if launcher and launcher.get("kind") == "torchrun" else 1
        gpus = visible_gpus()
        if gpus:
            env["CUDA_VISIBLE_DEVICES"] = ",".join(gpus_for_slot(slot, per_slot, gpus))
    return env


def visible_gpus() -> list[str]:
    """The GPUs this process may use: CUDA_VISIBLE_DEVICES if set, else every GPU torch sees."""
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed is not None:
        return [g.strip() for g in listed.split(",") if g.strip()]
    import torch

    return [str(i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []


def gpus_for_slot(slot: int, per_slot: int, gpus: list[str]) -> list[str]:
    """Worker slot i's GPUs: `per_slot` consecutive ones from slot i * per_slot (one GPU per local
    worker, nproc_per_node per torchrun worker), wrapping round when the slots outnumber the GPUs."""
    return [gpus[(slot * per_slot + i) % len(gpus)] for i in range(per_slot)]


# --------------------------------------------------------------------------- the study

def default_workers(study: Study, threads: int | None = None) -> int:
    """Runs at a time that the cores allow at the study's threads per run (1 for launchers other than local)."""
    if study.launcher["kind"] != "local" or not study.threads:
        return 1
    return max(1, (threads or available_threads()) // study.threads)


def queue_study(out_dir: Path, study: Study, retry_failed: bool,
                accept_changed_data: bool = False) -> tuple[list[dict], list[str]]:
    """Register the study's runs in OUT/battle.db and requeue interrupted (and, if asked, failed) ones.

    Returns (the runs' rows, names of the interrupted runs); refuses while a run still executes elsewhere,
    and when done runs were trained on data that has changed since (`check_data_unchanged`).
    """
    conn = db.connect(out_dir, create=True)
    try:
        fingerprint, accepted = check_data_unchanged(conn, out_dir, study, accept_changed_data)
    except SpachError:
        conn.close()
        raise
    db.register_study(conn, study, lambda r: run_dir(out_dir, r, study.runs_dir))
    db.record_data_fingerprint(conn, [r.key for r in study.runs], fingerprint, accepted=accepted)
    interrupted, alive = db.reset_interrupted(conn)
    if alive:
        conn.close()
        raise SpachError("run(s) still executing in another process (a worker of an earlier, killed "
                         f"`spach battle`?): {', '.join(f'{n} (pid {p})' for n, p in alive)}; "
                         "wait for them to finish or stop them, then run again")
    keys = [r.key for r in study.runs]
    if retry_failed:
        db.requeue_failed(conn, keys)
    rows = db.runs(conn, keys)
    conn.close()
    return rows, interrupted


def check_data_unchanged(conn, out_dir: Path, study: Study, accept: bool) -> tuple[str, str | None]:
    """Done runs are reused only on the data they were trained on (its `spach.data.fingerprint`): refuse
    (SpachError, saying what changed) when the study's data differs now, unless `accept` (then the runs are
    kept, and the report says so). Returns (the data's fingerprint now, what changed for kept runs or None)."""
    from spach.battle.spec import stable_json
    from spach.data import describe_change, source_fingerprint

    now = source_fingerprint(study.data)
    keys = [r.key for r in study.runs]
    changed = db.runs_on_other_data(conn, keys, stable_json(now))
    what = None
    if changed:
        what = (f"{len(changed)} done run(s) were trained on data {study.data} as it was before "
                f"({describe_change(json.loads(changed[0]['data_fingerprint']), now)})")
        if not accept:
            raise SpachError(f"{out_dir}: {what}; their results would not describe the data as it is now. "
                             "Use another --out (or move this one aside) to train on the current data, or pass "
                             "--accept-changed-data to keep them (the report will say so)")
    return stable_json(now), what


def finish_study(out_dir: Path, study: Study, progress: Progress, threads: int, report: bool) -> dict[str, Any]:
    """After the runs: the status counts, the study's analyses (if asked) and the report."""
    conn = db.connect(out_dir)
    final = db.runs(conn, [r.key for r in study.runs])
    conn.close()
    result = {s: sum(r["status"] == s for r in final) for s in ("done", "failed", "queued", "running")}
    result["launcher"] = study.launcher["kind"]
    result["skipped"] = len(study.skipped)
    if study.analysis:  # measurements after training (spach.analysis), on the finished runs
        from spach.battle.analysis_runs import analyze_study
        result["analyses"] = analyze_study(out_dir, study.analysis, say=progress.message, threads=threads)
    if report:
        from spach.battle.report import write_report
        result["report"] = str(write_report(out_dir))
        progress.message(f"report: {result['report']}")
    return result


def threads_per_run(study: Study, workers: int, threads: int | None) -> int:
    """Torch threads per run: --threads split between the workers, else the study's setting, else the
    machine's share."""
    if threads:
        return max(1, threads // workers)
    return study.threads or max(1, available_threads() // workers)


def execute_pending(out_dir: Path, study: Study, pending: list[dict], workers: int, per_run: int,
                    progress: Progress, detach: bool = False, first: int = 1) -> None:
    """Execute the queued rows `pending` of the study's runs on its launcher (slurm: every run of
    `study.runs` that is not done), `workers` at a time, `per_run` threads each; `first`: the
    progress number of the first run."""
    if study.launcher["kind"] == "slurm":
        from spach.battle.slurm import run_on_slurm
        run_on_slurm(study, out_dir, progress, detach=detach)
    elif study.launcher["kind"] == "local" and workers == 1:
        for i, row in enumerate(pending, first):
            execute_run(out_dir, row["key"], threads=per_run, progress=progress, index=i)
    elif pending:
        _run_in_subprocesses(out_dir, pending, workers, per_run if study.launcher["kind"] == "local" else None,
                             study.launcher, progress)


def earlier_versions_note(out_dir: str | Path, keys: list[str]) -> str | None:
    """A console line when OUT/battle.db holds done runs that are not this study's (an earlier version of it,
    before a change of recipe or grid): the report leaves them out too."""
    conn = db.connect(out_dir)
    try:
        mine = set(keys)
        others = [r for r in db.runs(conn) if r["key"] not in mine and r["status"] == "done"]
    finally:
        conn.close()
    if not others:
        return None
    return (f"note: {out_dir} also holds {len(others)} done run(s) of an earlier version of the study (another "
            "recipe or grid); they are kept in the database, not rerun and not in this report")


def run_study(spec: Study | str | Path | dict, out_dir: str | Path, workers: int | None = None,
              retry_failed: bool = False,
              threads: int | None = None, quiet: bool = False,
              report: bool = True, on_progress: Callable[[Progress], None] | None = None,
              launcher: str | None = None, detach: bool = False,
              accept_changed_data: bool = False) -> dict[str, Any]:
    """Run every run of the study that is not done yet; write the report. Returns the status counts.

    `launcher` overrides the study's launcher kind (e.g. "slurm"); with the slurm launcher, `detach`
    submits the missing runs' jobs and returns without waiting for them (see spach.battle.slurm).
    `accept_changed_data` keeps done runs whose data changed since they were trained (the report says so).
    """
    study = spec if isinstance(spec, Study) else load_study(spec)
    if launcher:
        from spach.battle.spec import with_launcher
        study = with_launcher(study, launcher)
    if detach and study.launcher["kind"] != "slurm":
        raise ValueError("--detach needs the slurm launcher (launcher: {kind: slurm} or --launcher slurm)")
    if detach and study.tune:
        raise ValueError("--detach cannot run a study with tune: (each trial waits for the previous ones' scores)")
    if workers is None:
        workers = default_workers(study, threads)
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    out_dir = Path(out_dir)
    check_runnable_here(study)
    check_writable_dir(out_dir, "--out")
    with StudyLock(out_dir):
        if study.tune:  # the trials first; the study's runs become each architecture's best configuration
            from spach.battle.tune import tune_study
            study = tune_study(study, out_dir, workers, threads, quiet)
        keys = [r.key for r in study.runs]
        rows, interrupted = queue_study(out_dir, study, retry_failed, accept_changed_data)
        pending = [r for r in rows if r["status"] == "queued"]
        counts = {s: sum(r["status"] == s for r in rows) for s in ("done", "failed")}
        # threads per run: --threads split between the workers, else the study's setting, else the machine's share
        per_run = threads_per_run(study, workers, threads)
        earlier = earlier_versions_note(out_dir, keys)
        progress = Progress(total=len(pending), already_done=counts["done"], quiet=quiet,
                            log_path=Path(out_dir) / "progress.log")  # where lines go if the console is closed
        if on_progress:
            on_progress(progress)
        from spach.battle.spec import summary
        progress.message(summary(study))
        progress.message(f"output {out_dir}: {counts['done']} run(s) already done, {counts['failed']} failed"
                         f"{' (not retried; use --retry-failed)' if counts['failed'] and not retry_failed else ''}, "
                         f"{len(pending)} to run"
                         + (f"; resuming interrupted: {', '.join(interrupted)}" if interrupted else "")
                         + f"; {workers} worker(s) x {per_run} thread(s)")
        if earlier:
            progress.message(earlier)
        execute_pending(out_dir, study, pending, workers, per_run, progress, detach)
        measure_speeds(out_dir, keys, per_run, progress)
        result = finish_study(out_dir, study, progress, threads=threads or per_run, report=report)
        progress.message(f"study {study.name}: {result['done']} done, {result['failed']} failed, "
                         + (f"{result['running']} running, " if result["running"] else "")
                         + f"{result['skipped']} skipped combination(s), {progress.t0 and _elapsed(progress.t0)}")
    return result


def _elapsed(t0: float) -> str:
    from spach.battle.progress import format_duration
    return f"took {format_duration(time.time() - t0)}"
