"""Shared test set-up: the `slurm` marker's cluster check and the `one_thread` fixture."""
from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
_slurm_state: dict[str, str | None] = {}


def _slurm_answers() -> bool:
    try:
        proc = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return False
    states = proc.stdout.split()
    return proc.returncode == 0 and any(s.rstrip("*~#") in ("idle", "mixed", "allocated") for s in states)


def slurm_unavailable() -> str | None:
    """Why the `slurm` tests cannot run here, or None when a Slurm cluster answers.

    As root with Slurm installed but not running, the one-node cluster of `make slurm-up` is started.
    """
    if "reason" in _slurm_state:
        return _slurm_state["reason"]
    reason = None
    if shutil.which("sbatch") is None or shutil.which("sinfo") is None:
        reason = "Slurm is not installed (as root: `make slurm-up` installs and starts a one-node cluster)"
    elif not _slurm_answers():
        if os.geteuid() != 0:
            reason = "no Slurm cluster answers and this is not root (start one with `make slurm-up` as root)"
        else:
            with open("/tmp/spach-slurm-up.lock", "w") as lock:  # one pytest-xdist worker starts it
                fcntl.flock(lock, fcntl.LOCK_EX)
                if not _slurm_answers():
                    subprocess.run([str(ROOT / "tools/slurm-local.sh"), "up"], capture_output=True, timeout=300)
            if not _slurm_answers():
                reason = "Slurm is installed but `tools/slurm-local.sh up` did not bring a node up"
    _slurm_state["reason"] = reason
    return reason


@pytest.fixture(autouse=True)
def _slurm_cluster(request):
    if request.node.get_closest_marker("slurm") is None:
        return
    reason = slurm_unavailable()
    if reason is None:
        return
    if os.environ.get("SPACH_REQUIRE_SLURM") == "1":
        pytest.fail(f"SPACH_REQUIRE_SLURM=1 but the slurm tests cannot run: {reason}")
    pytest.skip(reason)


@pytest.fixture
def one_thread():
    """One torch thread for the test (the machine's cores are shared); the count is restored after."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
