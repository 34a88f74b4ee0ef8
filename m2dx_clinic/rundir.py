"""Run folders safe to share: default and fresh names, one writer at a time, clean records after a crash,
and reuse of earlier work only when it was made from the same inputs.

Every command that writes a run folder (further-pretrain, pretrain, finetune, tune, report, quickstart)
takes its folder rules from here, so they behave the same everywhere.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import re
import socket
import time
from pathlib import Path
from typing import Any

from ._version import __version__
from .errors import ConfigError
from .fileio import atomic_write_json, file_identity, json_sha256


def fresh_dir(path: str | Path) -> Path:
    """`path`, or `path-2`, `path-3`, ... when something of that name already exists."""
    path = Path(path)
    if not path.exists():
        return path
    n = 2
    while path.with_name(f"{path.name}-{n}").exists():
        n += 1
    return path.with_name(f"{path.name}-{n}")


def default_run_dir(name: str, root: str | Path = "runs") -> Path:
    """`runs/<name>-<yyyymmdd-hhmmss>`, made unique with a `-N` suffix when started within the same second."""
    return fresh_dir(Path(root) / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}")


# ============================================================================ one writer per folder
LOCK_NAME = ".m2dx.lock"


class RunLock:
    """An OS-level exclusive lock on `<folder>/.m2dx.lock`, held while one command writes the folder.

    `fcntl.flock` is released by the operating system when the holder exits in any way (including
    kill -9), so a crashed run never leaves the folder locked and `--resume` simply takes it. The
    file also says who holds it (pid, host, start time, command) for the message a second writer gets;
    it is removed when the (last) holder releases it, so a finished run carries no host name or pid.
    """

    def __init__(self, folder: str | Path, command: str):
        self.folder, self.command = Path(folder), command
        self.path = self.folder / LOCK_NAME
        self._file = None
        self._created = False

    def acquire(self, *, wait: bool = False, shared: bool = False) -> "RunLock":
        """Take the lock (fail at once, or `wait`); `shared` lets several holders in (tuning workers of one study)."""
        import fcntl

        self._created = not self.folder.exists()
        self.folder.mkdir(parents=True, exist_ok=True)
        while True:
            handle = open(self.path, "a+", encoding="utf-8")
            try:
                fcntl.flock(handle.fileno(), (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | (0 if wait else fcntl.LOCK_NB))
            except BlockingIOError:
                handle.seek(0)
                holder = _describe_holder(handle.read())
                handle.close()
                raise ConfigError(f"{self.folder}: in use by {holder}; wait for it to finish, or pick another --out") from None
            if _same_file(handle, self.path):
                break
            handle.close()  # the previous holder removed the file between our open and our lock: take the new one
        if not shared:  # a shared holder leaves the file alone: other holders are named in it
            handle.seek(0)
            handle.truncate()
        handle.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "command": self.command,
                                 "started": _dt.datetime.now().isoformat(timespec="seconds")}))
        handle.flush()
        self._file = handle
        return self

    def release(self) -> None:
        """Unlock and remove the lock file (it names the host and pid), unless other holders still share it;
        a folder this lock created and nothing else was written to disappears again."""
        if self._file is not None:
            import fcntl

            try:  # the last holder (no other shared holder left) removes the file
                fcntl.flock(self._file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                last = True
            except BlockingIOError:
                last = False
            if last and _same_file(self._file, self.path):
                self.path.unlink(missing_ok=True)
                if self._created and not any(self.folder.iterdir()):
                    self.folder.rmdir()  # a command that failed before writing anything leaves nothing
            fcntl.flock(self._file.fileno(), fcntl.LOCK_UN)
            self._file.close()
            self._file = None

    def __enter__(self) -> "RunLock":
        return self.acquire() if self._file is None else self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _same_file(handle: Any, path: Path) -> bool:
    """Whether the open `handle` is still the file at `path` (not one removed and created anew)."""
    try:
        return os.fstat(handle.fileno()).st_ino == os.stat(path).st_ino
    except FileNotFoundError:
        return False


def _describe_holder(text: str) -> str:
    try:
        info = json.loads(text)
        return f"{info['command']} (pid {info['pid']} on {info['host']}, started {info['started']})"
    except (ValueError, KeyError, TypeError):
        return "another m2dx process"


def hold(folder: str | Path, command: str, *, wait: bool = False) -> RunLock:
    """Take the folder's lock (see `RunLock`); use as `with hold(run_dir, "m2dx finetune"): ...`."""
    return RunLock(folder, command).acquire(wait=wait)


# ============================================================================ records left by a killed process
_TEMP_FILE = re.compile(r"^\..+\.(\d+)\.[0-9a-f]+\.tmp$")  # fileio's `.<name>.<pid>.<token>.tmp`


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temp_files(folder: str | Path) -> list[Path]:
    """Delete the half-written temporary files of processes that no longer run (a kill -9 leaves them)."""
    removed = []
    for path in Path(folder).rglob(".*.tmp"):
        match = _TEMP_FILE.match(path.name)
        if match and path.is_file() and not _alive(int(match.group(1))):
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed


# ============================================================================ reuse only on matching inputs
def tree_fingerprint(path: str | Path) -> str:
    """sha256 of a file or folder's content listing: every file's relative path, size and modification time.

    Cheap (nothing is read) and strict: adding, removing, replacing or editing a file changes it.
    """
    root = Path(path).expanduser()
    files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
    digest = hashlib.sha256(str(root.resolve()).encode())
    for file in files:
        ident = file_identity(file)
        size, mtime_ns = (ident.size, ident.mtime_ns) if ident else (-1, -1)  # vanished while listed
        digest.update(f"{file.relative_to(root) if file != root else file.name}\t{size}\t{mtime_ns}\n".encode())
    return digest.hexdigest()


def fingerprint(**parts: object) -> dict[str, str]:
    """A record of a step's inputs: each part as text, plus one sha256 over all of them."""
    record = {key: json.dumps(value, sort_keys=True, default=str) for key, value in sorted(parts.items())}
    record["package_version"] = __version__
    record["sha256"] = json_sha256(record)
    return record


def check_inputs(folder: str | Path, record: dict[str, str], what: str) -> None:
    """Refuse (one ConfigError line naming what differs) to reuse work in `folder` made from other inputs.

    The folder's `inputs.json` must equal `record`; work without a record (an older version made it,
    or it was copied in by hand) is not reused either.
    """
    path = Path(folder) / "inputs.json"
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        raise ConfigError(f"{folder}: holds {what} whose inputs are not recorded (no inputs.json); pick another "
                          "--out or delete the folder to recompute") from None
    if saved.get("sha256") == record["sha256"]:
        return
    differ = sorted(k for k in set(saved) | set(record) if k != "sha256" and saved.get(k) != record.get(k))
    raise ConfigError(f"{folder}: holds {what} made from other inputs ({', '.join(differ)} differ); "
                      "pick another --out or delete the folder to recompute")


def record_inputs(folder: str | Path, record: dict[str, str]) -> Path:
    """Write `folder/inputs.json`, before the step starts: a killed step is resumed only on the same inputs."""
    return atomic_write_json(Path(folder) / "inputs.json", record)
