"""Atomic file writes: a kill at any moment leaves either the old file or the new one, never half of one.

    with atomic_write(path) as f:          # binary by default; atomic_write(path, "w") for text
        f.write(data)
    write_json(path, obj, indent=1)        # the one JSON writer: atomic, a trailing newline
    check_output_file(path, "--json")      # before long work: ValueError if `path` cannot be a file
    check_writable_dir(path, "--output")   # PermissionError (one clear line) if nothing can be written there

The data goes to a temporary file in the same directory, is flushed and fsync'ed,
renamed over ``path`` (``os.replace`` is atomic) and the directory is fsync'ed.
For outputs that must never replace anything (exports; files or whole folders)::

    with atomic_new_path(path) as tmp:     # FileExistsError if path exists
        write_somehow(tmp)                 # appears at path only when the block succeeds
"""
from __future__ import annotations

import errno
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any


def fsync_dir(directory: str | os.PathLike) -> None:
    """Make a rename in ``directory`` durable (no-op where directories cannot be opened)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb"):
    """Open a temporary file for writing that replaces ``path`` when the block ends without error."""
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_write mode must be 'w' or 'wb', got {mode!r}")
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes the file private; give it a normal file's mode
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def write_json(path: str | os.PathLike, obj: Any, indent: int | None = None) -> Path:
    """Write ``obj`` as JSON to ``path`` through :func:`atomic_write` (a reader sees the old file or the
    new one, never half of one); ends with a newline. Returns the path."""
    with atomic_write(path, "w") as f:
        json.dump(obj, f, indent=indent)
        f.write("\n")
    return Path(path)


def check_output_file(path: str | os.PathLike, flag: str) -> None:
    """ValueError unless ``path`` can be written as a file: not a directory, in an existing directory."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{flag} {path} is a directory; give a file name, e.g. {path / 'result.json'}")
    if not path.parent.is_dir():
        raise ValueError(f"{flag} {path}: the directory {path.parent} does not exist")


def check_writable_dir(path: str | os.PathLike, flag: str) -> None:
    """Before long work: ValueError if ``path`` is a file, PermissionError if it (or the existing directory
    it would be created in) cannot be written."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ValueError(f"{flag} {path} is a file, not a directory; give a directory")
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise ValueError(f"{flag} {path}: {existing} is a file, not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise PermissionError(errno.EACCES, f"{flag} {path}: cannot write in {existing} (read-only?); "
                                            "choose a writable location")


def atomic_savefig(fig, path: str | os.PathLike, dpi: int = 110) -> Path:
    """Save a matplotlib figure as PNG through :func:`atomic_write`; returns the path."""
    with atomic_write(path) as f:
        fig.savefig(f, format="png", dpi=dpi, bbox_inches="tight")
    return Path(path)


@contextmanager
def atomic_new_path(path: str | os.PathLike, directory: bool = False):
    """Yield a temporary path (a file's, or an empty folder with ``directory=True``) beside ``path``.

    When the block ends without error the result appears at ``path`` in one step, and it
    never replaces anything: ``FileExistsError`` if ``path`` exists (checked before and
    when publishing). On error the temporary file or folder is removed.
    """
    path = Path(path)
    if path.exists() or path.is_symlink():
        raise FileExistsError(f"{path} already exists: choose another output path or remove it first")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    target = tmp if directory else tmp / path.name
    try:
        yield target
        files = [f for f in tmp.rglob("*") if f.is_file()] if directory else [target]
        for f in files:
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
            os.chmod(f, 0o666 & ~_umask())
        if directory:
            os.chmod(tmp, 0o777 & ~_umask())
            if path.exists():  # os.rename would replace an empty folder
                raise FileExistsError(f"{path} already exists: choose another output path or remove it first")
            os.rename(tmp, path)
        else:
            os.link(target, path)  # fails (FileExistsError) rather than replace a file made meanwhile
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # after a file is published: its temporary folder
    fsync_dir(path.parent)
