"""Crash-safe checkpoints: atomic writes, a previous good copy, weights_only loading.

    save_checkpoint(state, out_dir)            # -> out_dir/last.pt (old one kept as last.prev.pt)
    state, path = find_resumable(out_dir)      # newest loadable of last.pt, last.prev.pt (warns on a bad one and
                                               # renames it aside; CheckpointError if none can be read)
    state = load_checkpoint_file(path)         # CheckpointError (a SpachError) if unreadable or corrupt
    moved = set_aside_results(out_dir)         # earlier results -> out_dir/earlier-<time>/ before a fresh start

A write goes to a temporary file in the same directory, is flushed and fsync'ed, then
`last.pt` is renamed to `last.prev.pt` and the temporary file renamed to `last.pt`
(os.replace is atomic), and the directory is fsync'ed. Each checkpoint carries a checksum of
its content (`spach.models.with_checksum`), verified on load: flipped bytes fall back like
any unreadable file; an unreadable file next to a readable one is renamed aside
(last.unreadable-<time>.pt), so the next save cannot move it over the good copy. A kill at
any moment leaves at least one complete checkpoint. Everything inside is tensors and plain
Python data, so `torch.load(path, weights_only=True)` reads it: RNG states are stored as
tensors/lists (`spach.rng.get_rng_state`, each rank's own).
"""
from __future__ import annotations

import os
import tempfile
import time
import warnings
from pathlib import Path
from typing import Optional

import torch

from spach.errors import SpachError, no_space
from spach.io import fsync_dir

LAST = "last.pt"
PREV = "last.prev.pt"
# what a run directory holds that a fresh start would overwrite (see set_aside_results)
RESULTS = ("metrics.jsonl", "model.safetensors", "model_ema.safetensors", "config.yaml", "tb")


class CheckpointError(SpachError):
    """A checkpoint file is missing, truncated, corrupt or not a spach training checkpoint."""


# --- atomic write ----------------------------------------------------------------------------

def save_checkpoint(state: dict, out_dir: str | Path) -> Path:
    """Write `state` as OUT/last.pt, keeping the previous one as OUT/last.prev.pt."""
    from spach.models import with_checksum

    out_dir = Path(out_dir)
    state = with_checksum(state)
    fd, tmp = tempfile.mkstemp(prefix=".last.", suffix=".tmp", dir=out_dir)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        if (out_dir / LAST).exists():
            os.replace(out_dir / LAST, out_dir / PREV)
        os.replace(tmp, out_dir / LAST)
    except BaseException as e:
        full = no_space(e, out_dir / LAST, then=f"free some space, then resume: {LAST} / {PREV} were kept as they "
                                               "were, the run continues from the newest of them")
        Path(tmp).unlink(missing_ok=True)
        if full is not None:
            raise full from e
        raise
    fsync_dir(out_dir)
    return out_dir / LAST


# --- loading ---------------------------------------------------------------------------------

def load_checkpoint_file(path: str | Path) -> dict:
    """Load a training checkpoint with weights_only=True; CheckpointError with the reason if it cannot."""
    from spach.models import read_state_file

    path = Path(path)
    try:
        state = read_state_file(path)
    except (FileNotFoundError, ValueError) as e:  # missing, truncated, corrupt, or code in the pickle
        raise CheckpointError(str(e)) from None
    if not isinstance(state, dict) or "model" not in state or "position" not in state:
        raise CheckpointError(f"{path} is not a spach training checkpoint (no 'model'/'position' entries); "
                              f"to start from its weights use init_checkpoint / --init-checkpoint")
    return state


def find_resumable(out_dir: str | Path) -> tuple[Optional[dict], Optional[Path]]:
    """The newest loadable checkpoint in `out_dir` (last.pt, else last.prev.pt), or (None, None) if there is none.

    CheckpointError if checkpoints exist but none can be read: starting afresh would overwrite their run.
    """
    found, errors, unreadable = [], [], []
    for name in (LAST, PREV):
        path = Path(out_dir) / name
        if not path.exists():
            continue
        try:
            found.append((load_checkpoint_file(path), path))
        except CheckpointError as e:
            errors.append(str(e))
            unreadable.append(path)
    if errors and not found:
        raise CheckpointError(f"no checkpoint in {out_dir} can be read ({'; '.join(errors)}); nothing was "
                              f"overwritten: to start that run over, move {out_dir} aside or use another --output")
    for path, error in zip(unreadable, errors):
        aside = _set_aside_unreadable(path)
        warnings.warn(f"{error}; falling back to an older checkpoint (the unreadable file is kept as "
                      f"{aside.name})", stacklevel=2)
    if not found:
        return None, None
    # normally last.pt; if a crash left only/also last.prev.pt, still take the furthest position
    return max(found, key=lambda sp: tuple(sp[0]["position"][k] for k in ("epoch", "step")))


def _set_aside_unreadable(path: Path) -> Path:
    """Rename an unreadable checkpoint to <dir>/<name>.unreadable-<time>.pt (kept for inspection); returns the new path.

    Done while the other checkpoint is readable, so the directory always holds one; afterwards the
    next `save_checkpoint` cannot move the unreadable file over the good last.prev.pt.
    """
    dest = _unused_path(path.parent, f"{path.name[:-len('.pt')]}.unreadable-{time.strftime('%Y%m%d-%H%M%S')}", ".pt")
    os.replace(path, dest)
    fsync_dir(path.parent)
    return dest


def _unused_path(directory: Path, stem: str, suffix: str = "") -> Path:
    """directory/<stem><suffix>, or <stem>.2<suffix>, <stem>.3<suffix>, ...: the first that does not exist."""
    path, n = directory / f"{stem}{suffix}", 1
    while path.exists():
        n += 1
        path = directory / f"{stem}.{n}{suffix}"
    return path


def set_aside_results(out_dir: str | Path) -> Optional[Path]:
    """Move the results of an earlier run in `out_dir` (RESULTS) into out_dir/earlier-<time>/; returns it or None.

    Called before a run starts from scratch in a directory that has no checkpoint to continue,
    so that nothing of an earlier run is overwritten. An empty metrics.jsonl is not a result.
    """
    out_dir = Path(out_dir)
    metrics = out_dir / "metrics.jsonl"
    if not (out_dir / "model.safetensors").exists() and not (metrics.is_file() and metrics.read_text().strip()):
        return None
    dest = _unused_path(out_dir, time.strftime("earlier-%Y%m%d-%H%M%S"))
    dest.mkdir()
    for name in RESULTS:
        if (out_dir / name).exists():
            os.replace(out_dir / name, dest / name)
    fsync_dir(out_dir)
    return dest

