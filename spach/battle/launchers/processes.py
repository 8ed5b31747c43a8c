"""Worker processes on this machine, for the local and torchrun launchers: one `WorkerSlot` per run at a time.

A local slot is a long-lived `python -m spach.battle.worker OUT --serve` process that executes the runs
it is handed one after another; a torchrun slot launches
`torchrun --standalone --nproc_per_node N -m spach.battle.worker OUT KEY` per run. Workers record their
runs in the database themselves (`spach.battle.execute.execute_run`); `SlotLauncher` follows them there.
With several slots on a GPU machine, slot i sees only its own GPUs (`gpus_for_slot`).
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from spach.battle import db
from spach.battle.launchers import Launcher, source_root
from spach.battle.progress import Progress, done_detail, error_line


def worker_command(out_dir: str | Path, key: str | None, threads: int | None,
                   prefix: list[str] | None = None) -> list[str]:
    """The command line of a worker: one run in a fresh process, or with `key=None` a `--serve` process that
    executes the keys written to its stdin; `prefix` runs the module (default: this Python, `python -m`)."""
    tail = ["-m", "spach.battle.worker", str(out_dir), *([key] if key else ["--serve"])]
    if threads:
        tail += ["--threads", str(threads)]
    return [*(prefix or [sys.executable]), *tail]


class WorkerSlot:
    """One of `--workers` slots. Serving (local launcher): a long-lived `python -m spach.battle.worker OUT --serve`
    process executes the runs it is handed one after another (only its first run pays for importing torch
    and timm, 3.3 s on a 2-core machine); a new one replaces it if it dies. Not serving (torchrun): one
    launch of `prefix` per run. The slot sees `gpus_per_slot` GPUs of its own when there are several slots."""

    def __init__(self, out_dir: Path, slot: int, workers: int, threads: int | None, serving: bool = True,
                 prefix: list[str] | None = None, gpus_per_slot: int = 1):
        self.out_dir, self.slot, self.workers, self.threads = out_dir, slot, workers, threads
        self.serving, self.prefix, self.gpus_per_slot = serving, prefix, gpus_per_slot
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
        return subprocess.Popen(worker_command(self.out_dir, key, self.threads, self.prefix),
                                stderr=subprocess.STDOUT, text=True, preexec_fn=_die_with_parent,
                                env=child_env(self.slot, self.workers, self.gpus_per_slot), **streams)

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


def _die_with_parent() -> None:
    """In a worker, before exec: get SIGTERM when the battle dies, even by SIGKILL (Linux)."""
    if sys.platform.startswith("linux"):
        import ctypes
        PR_SET_PDEATHSIG = 1
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def child_env(slot: int = 0, workers: int = 1, gpus_per_slot: int = 1) -> dict[str, str]:
    """The environment of a worker: it imports the same `spach` as this process, installed or not;
    with several workers on a GPU machine, worker slot i sees only its own GPUs (see `gpus_for_slot`)."""
    env = dict(os.environ)
    root = str(source_root())
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    if workers > 1:
        gpus = visible_gpus()
        if gpus:
            env["CUDA_VISIBLE_DEVICES"] = ",".join(gpus_for_slot(slot, gpus_per_slot, gpus))
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


class SlotLauncher(Launcher):
    """Runs in `WorkerSlot`s on this machine, followed through the database (the workers record them)."""

    runs_here = True
    serving = True  # one long-lived process per slot (else one launch per run)

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.slots = [WorkerSlot(self.out_dir, i, self.workers, self.threads, serving=self.serving,
                                 prefix=self.command_prefix(), gpus_per_slot=self.gpus_per_slot())
                      for i in range(self.workers)]
        self.free = list(self.slots)
        self.busy: dict[str, WorkerSlot] = {}   # key -> the slot executing it
        self.seen_epochs: dict[str, int] = {}

    def command_prefix(self) -> list[str] | None:
        """What runs `-m spach.battle.worker ...` (None: this Python)."""
        return None

    def gpus_per_slot(self) -> int:
        return 1

    def submit(self, conn, row: dict, index: int, progress: Progress) -> None:
        slot = self.free.pop(0)
        slot.start(row)
        self.busy[row["key"]] = slot
        self.seen_epochs[row["key"]] = 0
        progress.run_started(row["name"], db.epochs_of(row), index)

    def poll(self, conn, rows: list[dict], progress: Progress) -> set[str]:
        ended = set()
        for row in rows:
            key, slot = row["key"], self.busy[row["key"]]
            for record in db.epochs(conn, key)[self.seen_epochs[key]:]:
                progress.epoch_done(row["name"], record, db.epochs_of(row))
                self.seen_epochs[key] += 1
            code = slot.finished(row["status"])
            if code is None:
                continue
            ended.add(key)
            self.free.append(self.busy.pop(key))
            final = db.get_run(conn, key)  # read again: a process records its outcome just before it exits
            if final["status"] == "done":
                progress.run_finished(row["name"], True, done_detail(final, db.epochs_of(row)))
            else:
                if final["status"] != "failed":  # the worker died without recording why
                    db.mark_failed(conn, key, f"worker exited with code {code}; see {row['output_dir']}/worker.log")
                    final = db.get_run(conn, key)
                detail = error_line(final["error"])
                log = f"{row['output_dir']}/worker.log"
                progress.run_finished(row["name"], False, detail if log in detail else f"{detail} (see {log})")
        return ended

    def stop(self, interrupted: bool) -> None:
        for slot in self.slots:  # interrupted: stop our children, their runs stay 'running'
            slot.stop(wait=not interrupted)
