"""The spach error classes: a failure of the user's work that one line explains, and a model's typed refusal."""
from __future__ import annotations

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
    """`exc` and the exceptions it was raised from or while handling (``__cause__`` / ``__context__``), outermost first."""
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
