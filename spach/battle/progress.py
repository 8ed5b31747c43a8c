"""Progress of a running study: which run, its epoch, runs done/left, an ETA.

Plain lines (one per run start, epoch and run end) so that logs stay readable
when stdout is not a terminal; on a terminal a tqdm bar also follows the steps
of the current epoch. When the console goes away (a closed pipe: `spach battle | head`),
the study goes on and the lines continue in OUT/progress.log. The ETA assumes the remaining runs cost what the finished
work did on average (runs of a grid are of similar cost by design).

Every launcher reports through these calls, so `listeners` (objects with `run_started(name)`,
`epoch_done(name, record)` and `run_finished(name, ok)`, e.g. the trackers of `spach.battle.tracking`)
see each run's start, epochs and end whatever executes it.
"""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any, TextIO


def format_duration(seconds: float) -> str:
    """Seconds as '1h05m' or '4m07s' (rounded to the second, never negative)."""
    seconds = max(0, int(round(seconds)))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


class Progress:
    """The study's console lines. If the console goes away (``spach battle ... | head`` exits: EPIPE), the
    study keeps working and the lines go on into `log_path` (OUT/progress.log) instead."""

    def __init__(self, total: int, already_done: int = 0, stream: TextIO | None = None, quiet: bool = False,
                 log_path: str | os.PathLike | None = None, scored_on: str = "val"):
        self.stream = stream or sys.stdout
        self.scored_on = scored_on        # the split the epoch lines' top-1 is measured on (tuning: selection)
        self.quiet = quiet
        self.log_path = Path(log_path) if log_path is not None else None
        self.stream_closed = False
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.total = total                # runs to execute in this invocation
        self.already_done = already_done  # runs finished by earlier invocations
        self.finished = 0
        self.failed = 0
        self.fraction: dict[str, float] = {}   # run name -> fraction of it done (running runs)
        self.t0 = time.time()
        self._bar = None
        self.listeners: list[Any] = []

    def _print(self, text: str) -> None:
        if self.quiet:
            return
        if not self.stream_closed:
            try:
                if self._bar is not None:
                    self._bar.write(text, file=self.stream)
                else:
                    print(text, file=self.stream, flush=True)
                return
            except (OSError, ValueError):  # EPIPE: the reader exited; ValueError: the stream was closed
                self._lost_stream()
        self._log(text)

    def _lost_stream(self) -> None:
        """The console is gone: stop writing to it (also at exit, when Python flushes stdout) and say where the
        lines go instead, in that file."""
        self.stream_closed = True
        self._bar = None
        try:
            fd = self.stream.fileno()
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, fd)  # what is still buffered for the closed pipe now goes nowhere, without an error
            os.close(devnull)
        except (OSError, ValueError, AttributeError):
            pass  # not a file descriptor (a StringIO): nothing is flushed to it at exit
        self._log(f"(the console was closed at {time.strftime('%H:%M:%S')}, e.g. by `| head`: the study goes on, "
                  "its progress lines continue here)")

    def _log(self, text: str) -> None:
        if self.log_path is None:
            return
        try:
            with open(self.log_path, "a") as f:
                f.write(text + "\n")
        except OSError:
            pass  # the output directory is the study's to report on; a progress line is not worth failing it

    def eta(self) -> str:
        work = self.finished + sum(self.fraction.values())
        if work <= 0:
            return "?"
        elapsed = time.time() - self.t0
        return format_duration(elapsed / work * (self.total - work))

    def status(self) -> str:
        left = self.total - self.finished
        return f"{self.finished}/{self.total} done ({self.failed} failed), {left} left, ETA {self.eta()}"

    def message(self, text: str) -> None:
        self._print(text)

    def run_started(self, name: str, epochs: int | None, index: int) -> None:
        self.fraction[name] = 0.0
        self._print(f"[{index}/{self.total}] {name}: started ({epochs or '?'} epochs) | {self.status()}")
        for listener in self.listeners:
            listener.run_started(name)

    def step(self, name: str, epoch: int, step: int, steps: int, epochs: int | None) -> None:
        """`epoch` counts from 0, `step` from 1 (steps done in this epoch), as the engine's on_step."""
        if epochs:
            self.fraction[name] = min(1.0, (epoch + step / max(steps, 1)) / epochs)
        if not self.tty or self.quiet:
            return
        if self._bar is None:
            from tqdm import tqdm
            self._bar = tqdm(total=steps, file=self.stream, leave=False, dynamic_ncols=True)
        self._bar.set_description(f"{name} epoch {epoch + 1}/{epochs or '?'}", refresh=False)
        self._bar.n = step
        self._bar.refresh()

    def epoch_done(self, name: str, record: dict[str, Any], epochs: int | None) -> None:
        """`record["epoch"]` counts from 1 (epochs finished), as the engine's records."""
        if epochs:
            self.fraction[name] = min(1.0, int(record["epoch"]) / epochs)
        self._close_bar()
        top1 = record.get("val_top1")
        loss = record.get("train_loss")
        self._print(f"    {name} epoch {int(record['epoch'])}/{epochs or '?'}: train loss "
                    f"{_f(loss, '.3f')}, {self.scored_on} top-1 {_f(top1, '.2f')}% | ETA {self.eta()}")
        for listener in self.listeners:
            listener.epoch_done(name, record)

    def run_finished(self, name: str, ok: bool, detail: str) -> None:
        self._close_bar()
        self.fraction.pop(name, None)
        self.finished += 1
        self.failed += 0 if ok else 1
        self._print(f"    {name}: {'done' if ok else 'FAILED'} — {detail} | {self.status()}")
        for listener in self.listeners:
            listener.run_finished(name, ok)

    def _close_bar(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


def error_line(error: str | None) -> str:
    """The first line of a run's recorded error ("Type: message"), for its console line."""
    lines = (error or "").strip().splitlines()
    return lines[0] if lines else "no error was recorded"


def done_detail(metrics: dict[str, Any], epochs: int | None, more: str = "") -> str:
    """A done run's console detail: "top-1 x%" and `more`, led by "pruned after epoch k of n: " for a
    pruned trial. `metrics` is the run's metrics or its database row (final_top1, pruned_after)."""
    k = metrics.get("pruned_after")
    pruned = "" if k is None else f"{pruned_phrase(k, epochs)}: "
    return f"{pruned}top-1 {_f(metrics['final_top1'], '.2f')}%{more}"


def pruned_phrase(k: int, epochs: int | None) -> str:
    """"pruned after epoch k of n": how the console names a tuning trial its pruner stopped."""
    return f"pruned after epoch {k} of {epochs or '?'}"


def _f(x: Any, spec: str) -> str:
    return "?" if x is None else format(float(x), spec)
