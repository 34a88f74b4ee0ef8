"""Fixed-length segments as log-mel, decoded once and read from disk batch by batch.

Fine-tuning, its repeats, every tuning trial, the report's linear probe and the classical baseline
all need the same thing: each segment cut or padded to the cycle length and turned into log-mel by
the encoder's front-end. Decoding dominates small runs, so the result is cached on disk per segment
(keyed by the file's identity and every setting that changes the result) in a few large shard files
(`data.shards`). A split is then a `SegmentArrays`: the locations of its rows, read when a batch
needs them, so a process's memory is bounded by the batch size, not by the number of recordings.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from ..audio import FrontEndConfig, LogMelSpectrogram
from ..errors import AudioError
from ..fileio import file_identity, json_sha256
from ..progress import console, make_progress
from .logmel_cache import check_free_space
from .segments import Segment, load_fixed_length
from .shards import ShardStore

CYCLE_CACHE_VERSION = 1
MEMORY_CACHE_ENTRIES = 6

# Prepared splits per list of segments, kept across calls in this process (tuning trials, repeats).
# Disk-backed entries hold row locations only; in-memory ones (no cache folder) hold the arrays.
_MEMORY_CACHE: "OrderedDict[str, tuple[SegmentArrays, list[str]]]" = OrderedDict()


def clear_memory_cache() -> None:
    """Forget the in-process cache of prepared splits (tests; freeing memory between studies)."""
    _MEMORY_CACHE.clear()


class _InMemory:
    """Rows kept as arrays, for callers without a cache folder (prediction sees each recording once)."""

    def __init__(self, arrays: list[np.ndarray]):
        self.arrays = arrays

    def read_into(self, i: int, out: np.ndarray) -> None:
        out[...] = self.arrays[i]


class SegmentArrays:
    """Raw log-mel of N fixed-length segments [N, n_mels, frames], read when indexed.

    Indexing with a slice, an integer, an integer array / tensor or a boolean mask returns a fresh
    float32 tensor of those rows, so the training and evaluation loops use it like the stacked
    tensor it replaces; `subset` gives another `SegmentArrays` without reading anything. Rows whose
    audio could not be read (see `prepare_segments(problems=...)`) read as NaN and are False in
    `readable`.
    """

    def __init__(self, source: Any, rows: np.ndarray, n_mels: int, frames: int):
        self.source = source  # ShardArrays or _InMemory: anything with read_into(i, out)
        self.rows = np.asarray(rows, dtype=np.int64)  # position in `source` per segment, -1 = unreadable
        self.n_mels, self.frames = int(n_mels), int(frames)

    @property
    def shape(self) -> tuple[int, int, int]:
        return (len(self.rows), self.n_mels, self.frames)

    @property
    def nbytes(self) -> int:
        return len(self.rows) * self.n_mels * self.frames * 4

    @property
    def readable(self) -> torch.Tensor:
        return torch.from_numpy(self.rows >= 0)

    def __len__(self) -> int:
        return len(self.rows)

    def _positions(self, index: Any) -> np.ndarray:
        if isinstance(index, slice):
            return np.arange(len(self.rows))[index]
        if isinstance(index, torch.Tensor):
            index = index.cpu().numpy()
        index = np.asarray(index)
        if index.dtype == bool:
            if index.shape != (len(self.rows),):
                raise IndexError(f"a boolean mask of {index.shape} for {len(self.rows)} rows")
            return np.flatnonzero(index)
        return np.arange(len(self.rows))[index.astype(np.int64)]

    def __getitem__(self, index: Any) -> torch.Tensor:
        """float32 [n, n_mels, frames] for a slice / array / mask; [n_mels, frames] for an integer."""
        if isinstance(index, (int, np.integer)):
            return self[np.array([int(index)])][0]
        positions = self._positions(index)
        out = np.empty((len(positions), self.n_mels, self.frames), dtype=np.float32)
        for k, p in enumerate(positions):
            row = self.rows[p]
            if row < 0:
                out[k] = np.nan
            else:
                self.source.read_into(int(row), out[k])
        return torch.from_numpy(out)

    def subset(self, index: Any) -> "SegmentArrays":
        """The chosen rows as another SegmentArrays (nothing is read)."""
        return SegmentArrays(self.source, self.rows[self._positions(index)], self.n_mels, self.frames)

    def to_device(self, device: torch.device, chunk_rows: int = 256) -> torch.Tensor:
        """Every row as one tensor on `device`, copied in chunks (host memory stays at one chunk)."""
        out = torch.empty(self.shape, dtype=torch.float32, device=device)
        for start in range(0, len(self), chunk_rows):
            out[start:start + chunk_rows] = self[start:start + chunk_rows].to(device)
        return out


def segment_key(item: Segment, frontend: FrontEndConfig, length_s: float, pad: str) -> str:
    """Cache key from the file's identity (path, size, mtime) and every setting that changes the result.

    Editing a file changes its size or mtime and so its key; changing the cycle length, padding or
    front-end changes the key too, so a stale entry is never served.
    """
    ident = file_identity(item.path)
    # missing: loading raises the proper AudioError
    path = ident.path if ident else str(Path(item.path).expanduser().resolve())
    payload = {
        "version": CYCLE_CACHE_VERSION,
        "path": path,
        "size": ident.size if ident else -1,
        "mtime_ns": ident.mtime_ns if ident else -1,
        "start": item.start,
        "end": item.end,
        "length_s": float(length_s),
        "pad": pad,
        "frontend": asdict(frontend),
    }
    return json_sha256(payload)


def prepare_segments(
    items: Sequence[Segment],
    *,
    frontend: FrontEndConfig,
    length_s: float,
    pad: str,
    cache_dir: Path | None,
    workers: int = 0,
    progress: bool = False,
    description: str = "cycles",
    problems: list[str] | None = None,
    remember: bool = True,
) -> SegmentArrays:
    """Raw (un-normalised) log-mel of every segment fitted to `length_s`: [N, n_mels, frames] float32, read on access.

    With a `cache_dir` the rows live in its shards (computed once, then only read); without, in
    memory. An unreadable file raises `AudioError` here, before training starts; when a `problems`
    list is given, its row is NaN instead (see `readable_rows`) and the problem is appended to the
    list (the report's probe skips such segments). `remember=False` keeps the result out of the
    in-process cache (prediction: every recording is seen once).
    """
    keys = [segment_key(it, frontend, length_s, pad) for it in items]
    skip_bad = problems is not None
    split_key = hashlib.sha256(("".join(keys) + f"|skip={skip_bad}|{cache_dir}").encode("utf-8")).hexdigest()
    if split_key in _MEMORY_CACHE:
        _MEMORY_CACHE.move_to_end(split_key)
        cached, cached_problems = _MEMORY_CACHE[split_key]
        if problems is not None:
            problems.extend(cached_problems)
        return cached
    n_frames = frontend.num_frames(int(round(length_s * frontend.sample_rate)))
    mel = LogMelSpectrogram(frontend)
    bad: list[str] = []

    def compute(index: int) -> np.ndarray | None:
        try:
            wave = load_fixed_length(items[index], frontend.sample_rate, length_s=length_s, pad=pad)
        except AudioError as exc:
            if not skip_bad:
                raise
            bad.append(f"{items[index].item_id or items[index].describe()}: {exc}")
            return None
        with torch.no_grad():
            return mel(wave).numpy().astype(np.float32, copy=False)

    def each(indices: list[int], task_name: str):
        """(index, log-mel or None) in order, decoded by `workers` threads."""
        with make_progress(transient=True, show=progress) as bar:
            task = bar.add_task(task_name, total=len(indices), status="")
            if workers > 1:
                with ThreadPoolExecutor(max_workers=workers) as pool:
                    for i, lms in zip(indices, pool.map(compute, indices)):
                        yield i, lms
                        bar.advance(task)
            else:
                for i in indices:
                    yield i, compute(i)
                    bar.advance(task)

    if cache_dir is None:
        arrays: list[np.ndarray] = []
        rows = np.full(len(items), -1, dtype=np.int64)
        for i, lms in each(list(range(len(items))), description):
            if lms is not None:
                rows[i] = len(arrays)
                arrays.append(lms)
        result = SegmentArrays(_InMemory(arrays), rows, frontend.n_mels, n_frames)
    else:
        result = _prepare_on_disk(Path(cache_dir), keys, items, each, description, frontend.n_mels, n_frames)
    if remember:
        _MEMORY_CACHE[split_key] = (result, bad)
        while len(_MEMORY_CACHE) > MEMORY_CACHE_ENTRIES:
            _MEMORY_CACHE.popitem(last=False)
    if problems is not None:
        problems.extend(bad)
    return result


def _prepare_on_disk(cache_dir: Path, keys: list[str], items: Sequence[Segment], each, description: str,
                     n_mels: int, n_frames: int) -> SegmentArrays:
    """Compute the rows missing from the shards under `cache_dir`, then point at every row there."""
    store = ShardStore(cache_dir)
    positions = store.find(keys)
    missing: dict[str, int] = {}
    for i, (key, pos) in enumerate(zip(keys, positions)):
        if pos < 0 and key not in missing:
            missing[key] = i
    if missing:
        with store.writer("float32") as writer:
            moved = []
            for key in list(missing):  # entries of the one-file-per-segment layout: no second decode
                old = cache_dir / key[:2] / f"{key}.npy"
                try:
                    array = np.load(old) if old.is_file() else None
                except (OSError, ValueError):
                    array = None
                if array is not None and array.shape == (n_mels, n_frames):
                    writer.add(key, array)
                    moved.append(old)
                    del missing[key]
            if moved:
                console.print(f"moved {len(moved)} cached segment(s) from the old one-file-per-segment layout "
                              f"into shards under {cache_dir}")
            if missing:
                check_free_space(cache_dir, len(missing) * n_mels * n_frames * 4,
                                 f"the segment cache of {len(missing)} new segment(s)")
                by_index = {i: key for key, i in missing.items()}
                for i, lms in each(sorted(by_index), description):
                    if lms is not None:
                        writer.add(by_index[i], lms)
        for old in moved:
            old.unlink(missing_ok=True)
        store.refresh()
        positions = store.find(keys)
    usable = positions >= 0
    source = store.arrays(positions[usable])
    rows = np.full(len(keys), -1, dtype=np.int64)
    rows[usable] = np.arange(int(usable.sum()))
    return SegmentArrays(source, rows, n_mels, n_frames)


DEVICE_COPY_FRACTION = 0.25  # of the free GPU memory a split may take to skip per-batch host reads


def on_device_if_small(arrays: SegmentArrays, device: torch.device) -> SegmentArrays | torch.Tensor:
    """A split copied onto the GPU when it takes a small part of its free memory; else read per batch.

    On a CPU (or a split too large for the card) batches are read from the segment cache as they
    are needed, so host memory stays bounded by the batch size whatever the number of recordings.
    """
    if device.type != "cuda":
        return arrays
    free, _total = torch.cuda.mem_get_info(device)
    return arrays.to_device(device) if arrays.nbytes <= DEVICE_COPY_FRACTION * free else arrays


def readable_rows(prepared: SegmentArrays | torch.Tensor) -> torch.Tensor:
    """Boolean mask [N] of the rows that hold a decoded segment (False for skipped, NaN rows)."""
    if isinstance(prepared, SegmentArrays):
        return prepared.readable
    return ~torch.isnan(prepared.flatten(1)).any(dim=1)
