"""The spach error class: a failure of the user's work that one line explains (the CLI shows it without a traceback)."""


class SpachError(RuntimeError):
    """A failure of the user's work that one line explains: a corrupt checkpoint, a NaN loss, a busy directory.

    It is a RuntimeError, so callers that catch RuntimeError still catch it. `spach` (cli/main.py) prints it
    as one line; any other RuntimeError (e.g. one raised inside torch) is a bug or an unexpected failure and
    keeps its traceback.
    """
