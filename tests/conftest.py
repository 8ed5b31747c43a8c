"""Shared test set-up: the `slurm` and `ray` markers' cluster checks and the `one_thread` fixture."""
from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import sys
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


RAY_ADDRESS = "127.0.0.1:" + os.environ.get("SPACH_RAY_PORT", "6390")
_ray_state: dict[str, str | None] = {}


def _ray_command() -> str | None:
    """The `ray` command of this Python's environment (where `pip install 'spach[ray]'` puts it)."""
    return shutil.which("ray", path=str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", ""))


def _ray_answers() -> bool:
    ray = _ray_command()
    if ray is None:
        return False
    try:
        proc = subprocess.run([ray, "status", "--address", RAY_ADDRESS], capture_output=True, timeout=60,
                              env=dict(os.environ, RAY_USAGE_STATS_ENABLED="0"))
    except (OSError, subprocess.TimeoutExpired):
        return False
    return proc.returncode == 0


def ray_unavailable() -> str | None:
    """Why the `ray` tests cannot run here, or None when a Ray cluster answers at RAY_ADDRESS
    (started here with `tools/ray-local.sh up` when Ray is installed but no cluster answers)."""
    if "reason" in _ray_state:
        return _ray_state["reason"]
    reason = None
    try:
        import ray  # noqa: F401
    except ImportError:
        reason = "Ray is not installed (pip install 'spach[ray]')"
    if reason is None and not _ray_answers():
        with open("/tmp/spach-ray-up.lock", "w") as lock:  # one pytest-xdist worker starts it
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not _ray_answers():
                subprocess.run([str(ROOT / "tools/ray-local.sh"), "up"], capture_output=True, timeout=300,
                               env=dict(os.environ, RAY=_ray_command() or "ray"))
        if not _ray_answers():
            reason = f"Ray is installed but no cluster answers at {RAY_ADDRESS} after `tools/ray-local.sh up`"
    _ray_state["reason"] = reason
    return reason


@pytest.fixture(autouse=True)
def _ray_cluster(request):
    if request.node.get_closest_marker("ray") is None:
        return
    reason = ray_unavailable()
    if reason is None:
        return
    if os.environ.get("SPACH_REQUIRE_RAY") == "1":
        pytest.fail(f"SPACH_REQUIRE_RAY=1 but the ray tests cannot run: {reason}")
    pytest.skip(reason)


@pytest.fixture
def one_thread():
    """One torch thread for the test (the machine's cores are shared); the count is restored after."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
