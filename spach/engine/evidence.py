"""Per-example evidence of a finished run: the predicted and true class of every validation image.

    write_evidence(out, predictions, targets)      # OUT/evidence.npz, atomically
    predictions, targets = read_evidence(out)      # None when the run has none

The battle stores it in the study database (`spach.battle.db`), so that any two runs of a study,
scored on the same validation images in the same order, can be compared example by example
(`spach.battle.stats.compare`).
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np

from spach.io import atomic_write

EVIDENCE_FILE = "evidence.npz"


def write_evidence(out: str | Path, predictions: np.ndarray, targets: np.ndarray) -> Path:
    """Write OUT/evidence.npz (compressed int arrays of equal length); returns its path."""
    predictions, targets = np.asarray(predictions), np.asarray(targets)
    if predictions.shape != targets.shape or predictions.ndim != 1:
        raise ValueError(f"evidence needs two 1-d arrays of one length, got {predictions.shape} and {targets.shape}")
    path = Path(out) / EVIDENCE_FILE
    with atomic_write(path) as f:
        np.savez_compressed(f, predictions=predictions.astype(np.int64), targets=targets.astype(np.int64))
    return path


def read_evidence(out: str | Path) -> Optional[tuple[np.ndarray, np.ndarray]]:
    """(predictions, targets) from OUT/evidence.npz, or None when the run wrote none."""
    path = Path(out) / EVIDENCE_FILE
    if not path.is_file():
        return None
    with np.load(path, allow_pickle=False) as z:
        return z["predictions"], z["targets"]
