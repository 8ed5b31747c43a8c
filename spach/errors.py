"""The spach error classes — a failure of the user's work that one line explains, a model's typed refusal, a full
disk — and where an exception came from (the user's own code or not)."""
from __future__ import annotations

import errno
import os
import shutil
import sysconfig
import traceback
from functools import lru_cache
from pathlib import Path


class SpachError(RuntimeError):
    """A failure of the user's work that one line explains: a corrupt checkpoint, a NaN loss, a busy directory.

    It is a RuntimeError, so callers that catch RuntimeError still catch it. `spach` (cli/main.py) prints it
    as one line; any other RuntimeError (e.g. one raised inside torch) is a bug or an unexpected failure and
    keeps its traceback.
    """


class ArchitectureRefusal(ValueError):
    """A model (or a mixer) refuses a configuration that means nothing for it: CPE removed from a conv-only
    network, weights shared by a mixer without weights, an input size a fixed-size mixer cannot take.

    The one typed refusal: a study's grid cell whose model raises it is *skipped* with this message as the
    reason (docs/battle.md); any other exception while a model is built is a bug and rejects the study.
    A plugin mixer raises it for the configurations it refuses. It is a ValueError, so code that catches
    ValueError still catches it.
    """


_SPACH_DIR = Path(__file__).resolve().parent


@lru_cache(maxsize=1)
def _installed_dirs() -> tuple[Path, ...]:
    """Python's own library folders (the standard library, site-packages): code the user did not write."""
    names = ("stdlib", "platstdlib", "purelib", "platlib")
    return tuple({Path(p).resolve() for p in (sysconfig.get_paths().get(n) for n in names) if p})


def is_user_file(filename: str) -> bool:
    """True for a file outside the spach package and outside Python's installation (a plugin, a script)."""
    if filename.startswith("<"):  # <frozen ...>, <string>: not a file the user can open
        return False
    path = Path(filename).resolve()
    return not any(path.is_relative_to(d) for d in (_SPACH_DIR, *_installed_dirs()))


def _chain(exc: BaseException) -> list[BaseException]:
    """`exc` and the exceptions it was raised from or while handling (``__cause__`` / ``__context__``),
    outermost first."""
    chain: list[BaseException] = []
    while exc is not None and exc not in chain:
        chain.append(exc)
        exc = exc.__cause__ or exc.__context__
    return chain


def user_exception(exc: BaseException) -> BaseException | None:
    """The exception of `exc`'s chain raised through the user's own code (a plugin's constructor or forward;
    see :func:`is_user_file`), the original one first; None when the user's code is not involved."""
    for e in reversed(_chain(exc)):
        if any(is_user_file(f.filename) for f in traceback.extract_tb(e.__traceback__)):
            return e
    return None


def raised_at(exc: BaseException) -> str:
    """Where `exc` was raised, as ``file:line``: the innermost frame of the user's own code in its traceback,
    else its innermost frame."""
    frames = traceback.extract_tb(exc.__traceback__)
    if not frames:
        return "an unknown place"
    user = [f for f in frames if is_user_file(f.filename)]
    frame = (user or frames)[-1]
    return f"{frame.filename}:{frame.lineno}"


class NoSpaceError(SpachError):
    """A write failed because the file system is full; nothing earlier was replaced (free space, then resume)."""


NO_SPACE_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
# torch's zip writer reports a failed write as a RuntimeError without an errno
TORCH_WRITE_FAILURES = ("inline_container", "unexpected pos", "PytorchStreamWriter failed")
LOW_SPACE_BYTES = 64 * 2**20  # below this much free space, a failed write is taken to be a full disk


def no_space(error: BaseException, path: str | os.PathLike,
             then: str = "free some space and run again") -> NoSpaceError | None:
    """A :class:`NoSpaceError` naming `path` when `error` (or an error it came from) is the file system being
    full — an ENOSPC/EDQUOT errno, or torch's errno-less write failure while less than `LOW_SPACE_BYTES` are
    free where `path` is written — else None. `then` says what to do. Call it before removing a partial file
    (that file holds the space)."""
    path = Path(path)
    chain = _chain(error)
    if any(getattr(e, "errno", None) in NO_SPACE_ERRNOS for e in chain):
        return NoSpaceError(f"no space left on device at {path}{_free_text(path)}: {then}")
    if any(isinstance(e, RuntimeError) and any(s in str(e) for s in TORCH_WRITE_FAILURES) for e in chain):
        free = _free_bytes(path)
        if free is not None and free < LOW_SPACE_BYTES:
            return NoSpaceError(f"no space left on device at {path}{_free_text(path)}; writing it failed with "
                                f"\"{' '.join(str(error).split())}\": {then}")
    return None


def _free_bytes(path: Path) -> int | None:
    """Bytes free for this user on the file system holding `path` (or its nearest existing folder)."""
    folder = path if path.is_dir() else path.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return None


def _free_text(path: Path) -> str:
    free = _free_bytes(path)
    return "" if free is None else f" ({free / 2**20:.1f} MiB free)"
