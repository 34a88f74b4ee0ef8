"""User-facing errors.

Everything a user can cause (a bad file, a bad option, a missing data set) raises a subclass of
`M2DXError` with a one-line message that names the file and the fix. The CLI turns these into a
single line on stderr and exit code 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

from pathlib import Path


class M2DXError(Exception):
    """Base class for errors caused by user input; the message is shown as is."""


class AudioError(M2DXError):
    """An audio file that cannot be used (unreadable, empty, NaN/Inf, silent)."""

    def __init__(self, path: str | Path, problem: str):
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")


class CheckpointError(M2DXError):
    """A checkpoint that cannot be loaded safely or does not fit the model."""


class DataError(M2DXError):
    """A data folder, manifest or annotation that is missing or malformed."""


class ConfigError(M2DXError):
    """A recipe, override or option that is unknown or has a bad value."""


class DownloadError(M2DXError):
    """A download that failed or did not verify."""


def one_line(exc: BaseException, *, limit: int = 160, with_type: bool = False) -> str:
    """An exception's message folded onto one line, at most `limit` characters (its type name when empty).

    Errors from libraries (decoders, pickles, databases) often span many lines; the toolkit's own
    messages must stay on one line, so every place that quotes a foreign error goes through here.
    `with_type=True` prefixes the exception's class name (`ValueError: ...`) for bug-like errors.
    """
    text = " ".join(str(exc).split())
    if with_type or not text:
        text = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."
