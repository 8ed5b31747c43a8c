"""The battle: declare a study, run it resumably, get the paper's tables and figures.

    from spach.battle import load_study, run_study, write_report

    study = load_study("cpu-mini")            # a preset name, a YAML path or a mapping
    run_study(study, "runs/cpu-mini")         # resumable; workers=N, retry_failed=True
    write_report("runs/cpu-mini")             # report.md + figures/*.png from battle.db

See docs/battle.md for the study file reference.
"""
from spach.battle.report import write_report
from spach.battle.runner import run_study
from spach.battle.spec import Run, Study, list_presets, load_study

__all__ = ["load_study", "run_study", "write_report", "list_presets", "Study", "Run"]
