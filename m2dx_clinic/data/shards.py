"""Cached log-mel arrays in a few large files: content-keyed, append-only, read with `pread`.

One file per recording needs one open descriptor (or memory map) per recording while training
reads them, and FSD50K alone has 51,000 clips: far past the usual limit of 1,024 open files and
Linux's ~65,000 memory maps. Here entries are written back to back into shard files of about a
gigabyte, each with an index of the entries it holds, and read with `os.preadv` through a small
pool of open descriptors. So a process holds at most `MAX_OPEN_SHARDS` descriptors and no memory
map, whatever the number of entries, and its resident memory is what it reads, not the cache.

Layout of a store folder:
    shard-<id>.bin   raw arrays, C order, back to back (float32 or float16)
    shard-<id>.idx   npz: the keys, byte offsets and shapes of the entries that are completely
                     written (replaced atomically at every commit)

Crash safety: a writer appends to its own new shard (locked while it writes), flushes and fsyncs
the data, and only then replaces the index. A killed build therefore leaves a shard whose index
covers a prefix of its data; the next build simply looks up which keys are missing and writes
those into a new shard. Data bytes past the index (at most one commit interval) are ignored, and a
shard with no index at all is deleted by the next writer once no process holds its lock.
"""

from __future__ import annotations

import fcntl
import io
import os
import secrets
import threading
import time
from collections import OrderedDict
from pathlib import Path
from typing import Sequence

import numpy as np

from ..fileio import atomic_write_bytes
from ..rundir import remove_stale_temp_files

SHARD_FORMAT_VERSION = 1
SHARD_BYTES = 1 << 30  # a new shard file is started past this size
COMMIT_BYTES = 64 << 20  # at most this much work is lost when a build is killed
COMMIT_SECONDS = 30.0
MAX_OPEN_SHARDS = 32  # descriptors one process keeps open for reading
DTYPES = {"float32": np.dtype("<f4"), "float16": np.dtype("<f2")}


def key_bytes(key: str) -> bytes:
    """A hex sha256 cache key as the 32 raw bytes the index stores."""
    return bytes.fromhex(key)


class _Index:
    """Every committed entry of a store folder, sorted by key for vectorised lookup."""

    def __init__(self, root: Path):
        keys, shard_no, offsets, rows, frames = [], [], [], [], []
        self.shards: list[Path] = []
        self.dtypes: list[np.dtype] = []
        for idx_path in sorted(root.glob("shard-*.idx")):
            try:
                with np.load(idx_path, allow_pickle=False) as z:
                    if int(z["version"]) != SHARD_FORMAT_VERSION:
                        continue
                    dtype = DTYPES[str(z["dtype"])]
                    k, o, r, f = z["keys"], z["offsets"], z["rows"], z["frames"]
            except (OSError, ValueError, KeyError):
                continue  # a damaged index only costs recomputing its entries
            data_path = idx_path.with_suffix(".bin")
            if not data_path.is_file() or len(k) == 0:
                continue
            self.shards.append(data_path)
            self.dtypes.append(dtype)
            keys.append(k)
            shard_no.append(np.full(len(k), len(self.shards) - 1, dtype=np.int32))
            offsets.append(o)
            rows.append(r)
            frames.append(f)
        if keys:
            all_keys = np.concatenate(keys)
            order = np.argsort(all_keys, kind="stable")
            self.keys = all_keys[order]
            self.shard_no = np.concatenate(shard_no)[order]
            self.offsets = np.concatenate(offsets)[order]
            self.rows = np.concatenate(rows)[order]
            self.frames = np.concatenate(frames)[order]
        else:
            self.keys = np.zeros(0, dtype="S32")
            self.shard_no = np.zeros(0, dtype=np.int32)
            self.offsets = np.zeros(0, dtype=np.int64)
            self.rows = np.zeros(0, dtype=np.int32)
            self.frames = np.zeros(0, dtype=np.int32)

    def find(self, keys: Sequence[str]) -> np.ndarray:
        """Position of each key in the index, -1 where it is not cached."""
        wanted = np.array([key_bytes(k) for k in keys], dtype="S32")
        if len(self.keys) == 0 or len(wanted) == 0:
            return np.full(len(wanted), -1, dtype=np.int64)
        pos = np.searchsorted(self.keys, wanted)
        pos_clipped = np.minimum(pos, len(self.keys) - 1)
        found = self.keys[pos_clipped] == wanted
        return np.where(found, pos_clipped, -1).astype(np.int64)


class ShardStore:
    """A folder of shards: look keys up, read entries, append new ones (see the module docstring)."""

    def __init__(self, root: Path | str):
        self.root = Path(root).expanduser()
        self._index: _Index | None = None

    @property
    def index(self) -> _Index:
        if self._index is None:
            self._index = _Index(self.root)
        return self._index

    def refresh(self) -> None:
        """Re-read the shard indexes (after this or another process wrote entries)."""
        self._index = None

    def find(self, keys: Sequence[str]) -> np.ndarray:
        return self.index.find(keys)

    def arrays(self, positions: Sequence[int] | np.ndarray) -> "ShardArrays":
        """The entries at these index positions (all >= 0), as a lazily read sequence."""
        positions = np.asarray(positions, dtype=np.int64)
        if len(positions) and positions.min() < 0:
            raise ValueError("cannot read entries that are not in the store")
        ix = self.index
        used = np.unique(ix.shard_no[positions]) if len(positions) else np.zeros(0, dtype=np.int32)
        remap = {int(s): i for i, s in enumerate(used)}
        return ShardArrays(
            shards=[str(ix.shards[int(s)]) for s in used],
            dtypes=[ix.dtypes[int(s)].str for s in used],
            shard_no=np.array([remap[int(s)] for s in ix.shard_no[positions]], dtype=np.int32),
            offsets=ix.offsets[positions].copy(),
            rows=ix.rows[positions].copy(),
            frames=ix.frames[positions].copy(),
        )

    def writer(self, dtype: str = "float32") -> "ShardWriter":
        return ShardWriter(self.root, dtype)


class _Descriptors:
    """At most `limit` read-only descriptors, least recently used closed first; safe across fork."""

    def __init__(self, limit: int = MAX_OPEN_SHARDS):
        self.limit = limit
        self._open: "OrderedDict[str, int]" = OrderedDict()
        self._lock = threading.Lock()
        self._pid = os.getpid()

    def read_into(self, path: str, buffer: memoryview, offset: int) -> None:
        """Fill `buffer` from `path` at `offset` (the whole buffer, or an error naming the file)."""
        with self._lock:
            if self._pid != os.getpid():  # a forked loader worker: its own pool, same open files are fine
                self._open, self._pid = OrderedDict(), os.getpid()
            fd = self._open.get(path)
            if fd is None:
                fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
                self._open[path] = fd
                while len(self._open) > self.limit:
                    os.close(self._open.popitem(last=False)[1])
            else:
                self._open.move_to_end(path)
            done = 0
            while done < len(buffer):
                n = os.preadv(fd, [buffer[done:]], offset + done)
                if n <= 0:
                    raise OSError(f"{path}: the cache shard is shorter than its index says; "
                                  "run `m2dx cache clean` and rebuild")
                done += n

    def close(self) -> None:
        with self._lock:
            if self._pid == os.getpid():
                for fd in self._open.values():
                    os.close(fd)
            self._open.clear()

    def count(self) -> int:
        return len(self._open)


_DESCRIPTORS = _Descriptors()  # one pool per process, shared by every ShardArrays: a hard bound


class ShardArrays(Sequence):
    """Cached entries [rows, frames] read on access: `arrays[i]` is a fresh numpy array in the stored dtype.

    Holds only the entries' locations (a few numbers each), so it is cheap to keep for 100,000
    recordings and to hand to loader workers (pickled, it is just those numbers). Reads go through
    one pool of descriptors per process, so any number of these hold at most MAX_OPEN_SHARDS.
    """

    def __init__(self, shards: list[str], dtypes: list[str], shard_no: np.ndarray, offsets: np.ndarray,
                 rows: np.ndarray, frames: np.ndarray):
        self.shards, self.dtypes = shards, [np.dtype(d) for d in dtypes]
        self.shard_no, self.offsets, self.rows, self.frames = shard_no, offsets, rows, frames

    def __len__(self) -> int:
        return len(self.offsets)

    def shape(self, i: int) -> tuple[int, int]:
        return int(self.rows[i]), int(self.frames[i])

    def dtype(self, i: int) -> np.dtype:
        return self.dtypes[int(self.shard_no[i])]

    def __getitem__(self, i):  # type: ignore[override]
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        out = np.empty(self.shape(i), dtype=self.dtype(i))
        self.read_into(i, out)
        return out

    def read_into(self, i: int, out: np.ndarray) -> None:
        """Read entry i into the C-contiguous `out` (its shape and dtype must be the entry's)."""
        if out.shape != self.shape(i) or out.dtype != self.dtype(i) or not out.flags.c_contiguous:
            raise ValueError(f"entry {i} is {self.shape(i)} {self.dtype(i)}, got a buffer {out.shape} {out.dtype}")
        _DESCRIPTORS.read_into(self.shards[int(self.shard_no[i])], memoryview(out).cast("B"), int(self.offsets[i]))

    @staticmethod
    def open_descriptors() -> int:
        """Cache descriptors this process holds (all ShardArrays share them; at most MAX_OPEN_SHARDS)."""
        return _DESCRIPTORS.count()

    @staticmethod
    def close() -> None:
        """Close this process's cache descriptors (they reopen on the next read)."""
        _DESCRIPTORS.close()


class ShardWriter:
    """Appends entries to a new shard of its own and commits them (index replaced) every so often.

    Use as a context manager: leaving it commits what was written. Entries are visible to a store
    after `commit` and `ShardStore.refresh`.
    """

    def __init__(self, root: Path, dtype: str = "float32", shard_bytes: int = SHARD_BYTES):
        if dtype not in DTYPES:
            raise ValueError(f"cache dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
        self.root, self.dtype, self.shard_bytes = Path(root), DTYPES[dtype], shard_bytes
        self.root.mkdir(parents=True, exist_ok=True)
        remove_orphan_shards(self.root)
        self._fd: int | None = None
        self.written = 0  # entries added by this writer

    # -- one shard ------------------------------------------------------------------------------
    def _start_shard(self) -> None:
        name = f"shard-{time.strftime('%Y%m%d%H%M%S')}-{os.getpid()}-{secrets.token_hex(4)}"
        self._data_path = self.root / f"{name}.bin"
        self._fd = os.open(self._data_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o644)
        fcntl.flock(self._fd, fcntl.LOCK_EX)  # "being written": not an orphan
        self._size = 0
        self._keys: list[bytes] = []
        self._offsets: list[int] = []
        self._rows: list[int] = []
        self._frames: list[int] = []
        self._pending_bytes = 0
        self._last_commit = time.monotonic()

    def add(self, key: str, array: np.ndarray) -> None:
        """Append one [rows, frames] array under `key` (converted to the writer's dtype)."""
        if array.ndim != 2:
            raise ValueError(f"cache entries are [rows, frames], got shape {array.shape}")
        if self._fd is None:
            self._start_shard()
        data = np.ascontiguousarray(array, dtype=self.dtype)
        view = memoryview(data).cast("B")
        done = 0
        while done < len(view):
            done += os.write(self._fd, view[done:])
        self._keys.append(key_bytes(key))
        self._offsets.append(self._size)
        self._rows.append(data.shape[0])
        self._frames.append(data.shape[1])
        self._size += len(view)
        self._pending_bytes += len(view)
        self.written += 1
        if self._pending_bytes >= COMMIT_BYTES or time.monotonic() - self._last_commit >= COMMIT_SECONDS:
            self.commit()
        if self._size >= self.shard_bytes:
            self._finish_shard()

    def commit(self) -> None:
        """Make every entry added so far durable and visible: fsync the data, then replace the index."""
        if self._fd is None or not self._keys:
            return
        os.fsync(self._fd)
        buffer = io.BytesIO()
        np.savez(buffer, version=np.int64(SHARD_FORMAT_VERSION), dtype=np.array(self.dtype.name),
                 keys=np.array(self._keys, dtype="S32"), offsets=np.array(self._offsets, dtype=np.int64),
                 rows=np.array(self._rows, dtype=np.int32), frames=np.array(self._frames, dtype=np.int32))
        atomic_write_bytes(self._data_path.with_suffix(".idx"), buffer.getvalue())
        self._pending_bytes = 0
        self._last_commit = time.monotonic()

    def _finish_shard(self) -> None:
        if self._fd is None:
            return
        self.commit()
        empty = not self._keys
        os.close(self._fd)  # releases the lock
        self._fd = None
        if empty:
            self._data_path.unlink(missing_ok=True)

    def close(self) -> None:
        self._finish_shard()

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def remove_orphan_shards(root: Path) -> int:
    """Delete shard data files that have no index and no live writer (a build killed before its first commit)."""
    removed = 0
    remove_stale_temp_files(root)
    for data_path in root.glob("shard-*.bin"):
        if data_path.with_suffix(".idx").exists():
            continue
        try:
            fd = os.open(data_path, os.O_RDONLY)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            continue  # another process is writing it
        finally:
            os.close(fd)
        data_path.unlink(missing_ok=True)
        removed += 1
    return removed
