"""How many torch threads a run gets: the one rule that the runner, the workers, the Slurm and Ray jobs,
the measure phase and the analysis phase all ask (`threads_per_run`).

The rule, first match wins:

1. `measure.threads` of the study, for the inference-throughput measurement only;
2. `spach battle --threads TOTAL`: TOTAL split evenly between the `workers` that run at once;
3. the study's `threads:` (per run);
4. the CPUs the launcher allotted to the run (Slurm's `cpus_per_task`, Ray's `cpus_per_run`);
5. this machine's cores (its CPU affinity) split between the workers — or None with `machine=False`,
   where a process elsewhere (a job on another node) decides with its own cores.
"""
from __future__ import annotations

import os


def available_threads() -> int:
    """The cores this process may run on (its CPU affinity on Linux, else the CPU count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def threads_per_run(study_threads: int | None, *, total: int | None = None, workers: int = 1,
                    allotted: int | None = None, measure: int | None = None,
                    machine: bool = True) -> int | None:
    """Torch threads for one run by the rule of the module docstring (at least 1)."""
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    for explicit in (measure, max(1, total // workers) if total else None, study_threads, allotted):
        if explicit:
            return int(explicit)
    if not machine:
        return None
    return max(1, available_threads() // workers)
