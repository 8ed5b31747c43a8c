"""Test hook for tests/test_tracking.py: SIGKILLs a `spach battle` coordinator at a known point of a study.

Put this directory on PYTHONPATH and set SPACH_TEST_KILL_AT=RUN:EPOCH: the process kills itself (SIGKILL,
no handler runs) right after its progress has reported epoch EPOCH of run RUN — whatever the load.
"""
import os

if os.environ.get("SPACH_TEST_KILL_AT"):
    import signal

    from spach.battle import progress

    target_run, target_epoch = os.environ["SPACH_TEST_KILL_AT"].rsplit(":", 1)
    report = progress.Progress.epoch_done

    def epoch_done_then_die(self, name, record, epochs):
        report(self, name, record, epochs)
        if name == target_run and int(record["epoch"]) == int(target_epoch):
            os.kill(os.getpid(), signal.SIGKILL)

    progress.Progress.epoch_done = epoch_done_then_die
