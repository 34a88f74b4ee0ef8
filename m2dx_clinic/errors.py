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


def one_line(exc: BaseException, *, limit: int | None = 160, with_type: bool = False) -> str:
    """An exception's message folded onto one line, at most `limit` characters (its type name when empty).

    Errors from libraries (decoders, pickles, databases) often span many lines; the toolkit's own
    messages must stay on one line, so every place that quotes a foreign error goes through here.
    `with_type=True` prefixes the exception's class name (`ValueError: ...`) for bug-like errors;
    `limit=None` keeps the whole text (the toolkit's own errors, printed by the CLI).
    """
    text = " ".join(str(exc).split())
    if with_type or not text:
        text = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    return text if limit is None or len(text) <= limit else text[: limit - 3] + "..."


class ResourceLimitError(M2DXError):
    """The operating system refused a resource (open files, disk space, memory maps): the fix is a setting."""


_LIMIT_TEXTS = {"Too many open files": "EMFILE", "No space left on device": "ENOSPC",
                "Cannot allocate memory": "ENOMEM"}


def os_limit_error(exc: BaseException) -> ResourceLimitError | None:
    """The one-line explanation of an OS limit hit anywhere below (also inside a loader worker), or None.

    A DataLoader worker's OSError reaches the main process as a re-raised exception without its
    errno, so the standard messages are recognised too.
    """
    import errno
    import resource

    code = getattr(exc, "errno", None)
    name = errno.errorcode.get(code, "") if isinstance(code, int) else ""
    if not name:
        name = next((n for text, n in _LIMIT_TEXTS.items() if text in str(exc)), "")
    where = f" ({exc.filename})" if getattr(exc, "filename", None) else ""
    if name in ("EMFILE", "ENFILE"):
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        suggested = 4096 if hard == resource.RLIM_INFINITY else min(max(4096, soft * 4), hard)
        return ResourceLimitError(
            f"too many open files{where}: this shell allows {soft}; raise it with `ulimit -n {suggested}` "
            "before the command, or lower data.loader_workers / data.cache_workers")
    if name == "ENOSPC":
        return ResourceLimitError(
            f"no space left on the device{where}; free space there, or point data.cache_dir / --out at a "
            "larger disk (a cache folder can be emptied with `m2dx cache clean`)")
    if name == "ENOMEM" and ("mmap" in str(exc).lower() or "map" in str(exc).lower()):
        return ResourceLimitError(
            f"the process ran out of memory maps{where}; raise the limit with "
            "`sudo sysctl -w vm.max_map_count=262144`, or lower data.loader_workers")
    return None
