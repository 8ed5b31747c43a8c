"""Test hook for tests/test_slurm.py: holds a Slurm job after its first checkpoint while a file exists.

Put this directory on PYTHONPATH and set SPACH_TEST_HOLD=FILE before submitting: a job (SLURM_JOB_ID
set) that finds FILE after writing its first checkpoint writes FILE.reached and waits until FILE is
removed, so a test can scancel / requeue / signal it at a known point of the run, whatever the load.
"""
import os

if os.environ.get("SPACH_TEST_HOLD") and os.environ.get("SLURM_JOB_ID"):
    import time
    from pathlib import Path

    from spach.engine import checkpoint

    hold = Path(os.environ["SPACH_TEST_HOLD"])
    save = checkpoint.save_checkpoint
    held = []

    def save_then_hold(state, out_dir):
        path = save(state, out_dir)
        if not held and hold.exists():
            held.append(True)
            (hold.parent / (hold.name + ".reached")).write_text(os.environ["SLURM_JOB_ID"])
            while hold.exists():
                time.sleep(0.05)
        return path

    checkpoint.save_checkpoint = save_then_hold
