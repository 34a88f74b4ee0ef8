"""Writes that a crash cannot leave half-done, and the one conversion of results into plain JSON.

Every file the toolkit produces (checkpoints, cached log-mels, recipes, metrics, reports, plots) is
written to a uniquely named temporary file in the target's own folder and then renamed over the
target with `os.replace`, which is atomic on one file system: a reader, a resumed run or a killed
process sees either the old file or the new one, never a torn one. The temporary name carries the
process id and a random suffix, so parallel workers (cache builders, DDP ranks, tuning trials)
writing the same target never collide; it is removed when the write fails.

numpy and torch are imported only where an array or checkpoint is written, so the light modules
that re-export these helpers (`config`) stay quick to import for the command line.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import io
import json
import math
import os
import secrets
import shutil
import sys
from pathlib import Path
from typing import IO, Any, Callable, Literal


def _temp_path(path: Path) -> Path:
    """`.<name>.<pid>.<token>.tmp` beside `path`: unique per writer, and recognised (by the pid) as
    a dead process's leftover by `rundir.remove_stale_temp_files`."""
    return path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")


def _atomic_write(path: str | Path, write: Callable[[IO[Any]], None], *, fsync: bool, text: bool = False) -> Path:
    """Run `write` on a fresh temporary file next to `path`, optionally fsync, then rename it over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_path(path)
    try:
        with (open(tmp, "w", encoding="utf-8") if text else open(tmp, "wb")) as f:
            write(f)
            if fsync:  # the rename must not reach the disk before the data (power loss)
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def atomic_link_or_copy(source: str | Path, target: str | Path) -> Path:
    """`target` becomes the same file as `source` (a hard link; a copy across file systems), atomically."""
    target = Path(target)
    tmp = _temp_path(target)
    try:
        try:
            os.link(source, tmp)
        except OSError:
            shutil.copy2(source, tmp)
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    return target


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Bytes to `path` atomically (no fsync: used for caches and plots that can be rebuilt)."""
    return _atomic_write(path, lambda f: f.write(data), fsync=False)


def atomic_write_text(path: str | Path, text: str) -> Path:
    """UTF-8 text to `path` atomically and fsynced: recipes, CSVs and reports are records a user keeps."""
    return _atomic_write(path, lambda f: f.write(text), fsync=True, text=True)


def atomic_write_json(path: str | Path, obj: Any, *, end: str = "\n") -> Path:
    """`to_jsonable(obj)` as indented JSON (+ `end`), written like `atomic_write_text`."""
    return atomic_write_text(path, json.dumps(to_jsonable(obj), indent=2) + end)


def atomic_save_npy(path: str | Path, array: Any) -> Path:
    """np.save to `path` atomically (no fsync: cache entries are recomputed when lost)."""
    import numpy as np

    return _atomic_write(path, lambda f: np.save(f, array), fsync=False)


def atomic_torch_save(obj: Any, path: str | Path) -> Path:
    """torch.save to `path` atomically and fsynced: never half a checkpoint, even after a power cut."""
    import torch

    return _atomic_write(path, lambda f: torch.save(obj, f), fsync=True)


def atomic_savefig(fig: Any, path: str | Path, **kwargs: Any) -> Path:
    """`fig.savefig(**kwargs)` to `path` atomically, so a viewer never shows half an image.

    The format defaults to the file suffix, since the temporary name does not carry it.
    """
    path = Path(path)
    kwargs.setdefault("format", path.suffix.lstrip(".") or None)
    return _atomic_write(path, lambda f: fig.savefig(f, **kwargs), fsync=False)


def atomic_write_csv(path: str | Path, frame: Any, *, float_format: str | None = "%.8g") -> Path:
    """A pandas DataFrame as CSV (no index), written like `atomic_write_text`.

    `%.8g` keeps probabilities to 8 significant digits: enough to recompute every metric, and the
    same text on every platform.
    """
    buffer = io.StringIO()
    frame.to_csv(buffer, index=False, float_format=float_format)
    return atomic_write_text(path, buffer.getvalue())


def sha256_file(path: str | Path, chunk_bytes: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes, read in chunks so multi-GB archives and checkpoints do not fill memory."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk_bytes):
            digest.update(block)
    return digest.hexdigest()


def json_sha256(payload: Any) -> str:
    """Hex sha256 of `payload` as key-sorted JSON: the one digest of settings, so equal settings give equal keys."""
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode("utf-8")).hexdigest()


@dataclasses.dataclass(frozen=True)
class FileIdentity:
    """Who a file is without reading it: resolved path, size and modification time (an edit changes one)."""

    path: str
    size: int
    mtime_ns: int


def file_identity(path: str | Path) -> FileIdentity | None:
    """The file's identity, or None when it cannot be stat'ed (missing: the reader raises the proper error)."""
    resolved = Path(path).expanduser().resolve()
    try:
        stat = resolved.stat()
    except OSError:
        return None
    return FileIdentity(str(resolved), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=32)
def content_sha256(identity: FileIdentity) -> str:
    """`sha256_file` of the file `identity` names, read once per (path, size, mtime): tuning trials and
    repeats fingerprint one base checkpoint of hundreds of MB many times."""
    return sha256_file(identity.path)


def to_jsonable(value: Any, *, nonfinite: Literal["null", "text"] = "null") -> Any:
    """Plain JSON data from results: dict keys -> str, tuples/lists -> lists, dataclasses -> dicts,
    numpy / torch scalars -> Python (larger arrays -> nested lists), Path and any other object -> str.

    NaN / Inf become null (strict JSON that every reader accepts), or with nonfinite="text" the
    strings "nan" / "inf" / "-inf": the metric log has always written them so, and its readers
    (`report.runinfo.finite`) accept both.
    """
    if isinstance(value, dict):
        return {str(k): to_jsonable(v, nonfinite=nonfinite) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v, nonfinite=nonfinite) for v in value]
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return to_jsonable(dataclasses.asdict(value), nonfinite=nonfinite)
    value = _unwrap_array(value)
    if isinstance(value, list):
        return to_jsonable(value, nonfinite=nonfinite)
    if isinstance(value, float):
        value = float(value)
        if math.isfinite(value):
            return value
        return str(value) if nonfinite == "text" else None
    if isinstance(value, (str, int, bool)) or value is None:
        return value
    return str(value)


def _unwrap_array(value: Any) -> Any:
    """A numpy / torch scalar (or one-element array) as a Python scalar, a larger array as a list."""
    np = sys.modules.get("numpy")  # not imported yet: the value cannot be a numpy object
    if np is not None and isinstance(value, (np.ndarray, np.generic)):
        return value.item() if value.size == 1 else value.tolist()
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(value, torch.Tensor):
        return value.item() if value.numel() == 1 else value.tolist()
    return value
