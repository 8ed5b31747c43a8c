"""Test hook for the tuning tests on the torchrun, Slurm and Ray launchers (tests/test_tune.py: `SPLIT_HOOK`):
records which data splits each run opens, in the process that trains it.

Put this directory on PYTHONPATH (the launchers hand it on to their workers and jobs): while a process
trains a run (`spach.battle.execute.train_and_measure`, which every launcher's worker or job calls), each
`spach.data.open_source(source, split)` appends one JSON line {"split", "spach", "pid"} to
RUN_DIR/opened-splits.jsonl ("spach": the folder of the `spach` package this process imported). It is the
cross-process form of tests/test_tune.py's monkeypatch of `open_source`. Nothing is imported before the
process imports `spach.battle.execute` itself (a torchrun agent or a Ray worker that never trains pays nothing).
"""
import json
import os
import sys
from pathlib import Path

LOG_NAME = "opened-splits.jsonl"
TARGET = "spach.battle.execute"
_current: list[Path] = []  # the run directory this process trains now (inside train_and_measure)


def _recording(open_source):
    def recording_open_source(source, split):
        if _current:
            import spach

            line = {"split": split, "spach": str(Path(spach.__file__).resolve().parent), "pid": os.getpid()}
            with open(_current[-1] / LOG_NAME, "a") as log:
                log.write(json.dumps(line) + "\n")
        return open_source(source, split)

    recording_open_source.recording = True
    return recording_open_source


def _patch(execute) -> None:
    """Wrap the module's train_and_measure: execute_run looks it up in the module, and jobfiles (Slurm and Ray
    jobs) imports it by name after this module has been executed, so both get the wrapper."""
    real = execute.train_and_measure

    def train_and_measure(config, output_dir, *args, **kwargs):
        import spach.data

        if not getattr(spach.data.open_source, "recording", False):
            spach.data.open_source = _recording(spach.data.open_source)
        Path(output_dir).mkdir(parents=True, exist_ok=True)
        _current.append(Path(output_dir))
        try:
            return real(config, output_dir, *args, **kwargs)
        finally:
            _current.pop()

    execute.train_and_measure = train_and_measure


class _PatchOnImport:
    """A meta path finder that lets the normal finders load TARGET, then patches it once it has executed."""

    def find_spec(self, name, path=None, target=None):
        if name != TARGET:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(name, path, target)
            if spec is not None and spec.loader is not None:
                run = spec.loader.exec_module

                def exec_module(module):
                    run(module)
                    _patch(module)

                spec.loader.exec_module = exec_module
                return spec
        return None


sys.meta_path.insert(0, _PatchOnImport())
