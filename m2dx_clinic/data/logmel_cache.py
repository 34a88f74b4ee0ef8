"""The log-mel cache: every training recording decoded and turned into log-mel once, then read from shards.

Decoding and resampling dominate small pre-training runs and would be repeated every epoch, by every
loader worker and every DDP rank. Entries are content-addressed (sha256 of the file's bytes, the
segment range, the front-end settings and the stored dtype), so renaming or moving files reuses them
and editing a file invalidates its entry. They live in a few large shard files (`data.shards`), so
100,000 recordings or FSD50K's 51,000 noise clips need a handful of open files, not one each. Every
problem with the user's files is collected and reported together before training starts, so a long
run never dies on file 9,000 of 10,000; the disk space a build needs is checked before it starts.
"""

from __future__ import annotations

import json
import multiprocessing
import shutil
from collections import deque
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import asdict
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch

from ..audio import FrontEndConfig, LogMelSpectrogram, audio_info, load_audio
from ..errors import AudioError, DataError, one_line
from ..fileio import atomic_write_bytes, file_identity, json_sha256, sha256_file
from ..progress import console, make_progress
from .segments import Segment
from .shards import DTYPES, ShardArrays, ShardStore

# Bump when the stored array format or its computation changes: old entries are then ignored.
CACHE_FORMAT_VERSION = 1
_INDEX_NAME = "file_hashes.json"
_MAX_LISTED = 10
DISK_MARGIN_BYTES = 256 << 20  # besides the estimate: index files, a shard's last commit, the file system


def content_key(file_hash: str, start: float | None, end: float | None, frontend: FrontEndConfig,
                dtype: str = "float32") -> str:
    """Cache key from WHAT is computed (bytes, range, settings, format), not from where the file lives."""
    payload = {
        "version": CACHE_FORMAT_VERSION,
        "file_sha256": file_hash,
        "start": None if start is None else float(start),
        "end": None if end is None else float(end),
        "frontend": asdict(frontend),
    }
    if dtype != "float32":  # float32 keys are those of the one-file-per-entry cache, so it migrates
        payload["dtype"] = dtype
    return json_sha256(payload)


def expected_bytes(segment: Segment, frontend: FrontEndConfig, itemsize: int) -> int:
    """Bytes the log-mel of `segment` will take, from the audio header (0 when it cannot be read)."""
    try:
        seconds = segment.duration
        if seconds is None:
            seconds = audio_info(segment.path)[1] - (segment.start or 0.0)
    except AudioError:
        return 0
    samples = max(0, int(round(seconds * frontend.sample_rate)))
    return frontend.n_mels * frontend.num_frames(samples) * itemsize


def check_free_space(folder: Path, needed: int, what: str) -> None:
    """Refuse, in one line, a build that would fill the disk, before any of it is written."""
    folder.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(folder).free
    if needed + DISK_MARGIN_BYTES > free:
        raise DataError(
            f"{folder}: {what} needs about {needed / 1e9:.1f} GB but only {free / 1e9:.1f} GB are free; "
            "free space there, point data.cache_dir at a larger disk (--set data.cache_dir=PATH), "
            "or store float16 (--set data.cache_dtype=float16, half the size)"
        )


class LogMelCache:
    """Computes each segment's log-mel once and serves it from the shards in `cache_dir/lms`.

    `file_hashes.json` remembers each file's sha256 by (absolute path, size, mtime) so unchanged
    files are not re-read every run. Entries of the earlier one-file-per-entry layout
    (`lms/<key[:2]>/<key>.npy`) are moved into shards on first use, without decoding again.
    After `build`, `last_stats` counts cached / computed / bad entries and `last_good_segments`
    lists the segments matching the returned arrays (same order).
    """

    def __init__(self, cache_dir: Path | str, frontend: FrontEndConfig = FrontEndConfig(), dtype: str = "float32"):
        if dtype not in DTYPES:
            raise DataError(f"data.cache_dtype must be one of {sorted(DTYPES)}, got {dtype!r}; fix the recipe")
        self.cache_dir = Path(cache_dir).expanduser()
        self.frontend = frontend
        self.dtype = dtype
        self.store = ShardStore(self.cache_dir / "lms")
        self.last_stats: dict[str, int] = {}
        self.last_good_segments: list[Segment] = []

    def legacy_entry_path(self, key: str) -> Path:
        """Where the one-file-per-entry cache kept `key` (read once, moved into a shard)."""
        return self.cache_dir / "lms" / key[:2] / f"{key}.npy"

# -- file hashes ------------------------------------------------------------------------

    def _load_index(self) -> dict[str, list]:
        try:
            data = json.loads((self.cache_dir / _INDEX_NAME).read_text(encoding="utf-8"))
            return data if isinstance(data, dict) else {}
        except (OSError, ValueError):
            return {}  # a missing or damaged index only costs re-hashing

    def _save_index(self, index: dict[str, list]) -> None:
        atomic_write_bytes(self.cache_dir / _INDEX_NAME, json.dumps(index, sort_keys=True).encode("utf-8"))

    def _hash_files(self, paths: Sequence[Path], workers: int, progress) -> dict[Path, str | AudioError]:
        """sha256 for each path (from the index when size and mtime are unchanged) or the problem."""
        index = self._load_index()
        results: dict[Path, str | AudioError] = {}
        todo: list[tuple[Path, str, int, int]] = []
        for path in paths:
            ident = file_identity(path)
            if ident is None:
                results[path] = AudioError(path, "file not found; check the path")
                continue
            known = index.get(ident.path)
            if isinstance(known, list) and len(known) == 3 and known[0] == ident.size and known[1] == ident.mtime_ns:
                results[path] = known[2]
            else:
                todo.append((path, ident.path, ident.size, ident.mtime_ns))
        if todo:
            task = progress.add_task("hashing audio files", total=len(todo), status="")

            def one(item: tuple[Path, str, int, int]) -> tuple[tuple[Path, str, int, int], str | AudioError]:
                try:
                    return item, sha256_file(Path(item[1]))
                except OSError as exc:
                    return item, AudioError(item[0], f"cannot read the file ({exc.strerror or exc}); check permissions")

            # hashlib releases the GIL on large buffers, so threads overlap reading and hashing.
            with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
                for (path, absolute, size, mtime_ns), digest in pool.map(one, todo):
                    results[path] = digest
                    if isinstance(digest, str):
                        index[absolute] = [size, mtime_ns, digest]
                    progress.advance(task)
            self._save_index(index)
        return results

    # -- build --------------------------------------------------------------------------------

    def build(
        self,
        segments: Sequence[Segment],
        *,
        workers: int = 2,
        skip_bad: bool = False,
        progress: bool = True,
    ) -> tuple[ShardArrays, list[tuple[Segment, str]]]:
        """Log-mels [n_mels, frames] for the good segments (read on access) and (segment, problem) for the bad ones.

        Raises DataError naming all bad segments unless `skip_bad`, so problems surface before
        training, and before any work when the disk cannot hold the new entries.
        """
        segments = list(segments)
        problems: dict[int, str] = {}
        keys: dict[int, str] = {}
        computed = 0
        with make_progress(transient=True, show=progress) as bar:
            unique_paths = list(dict.fromkeys(seg.path for seg in segments))
            hashes = self._hash_files(unique_paths, workers, bar)
            for i, seg in enumerate(segments):
                digest = hashes[seg.path]
                if isinstance(digest, AudioError):
                    problems[i] = digest.problem
                else:
                    keys[i] = content_key(digest, seg.start, seg.end, self.frontend, self.dtype)

            # One job per distinct missing key: duplicated content is computed once.
            found = dict(zip(keys.values(), self.store.find(list(keys.values()))))
            jobs: dict[str, Segment] = {}
            for i, key in keys.items():
                if found[key] < 0 and key not in jobs:
                    jobs[key] = segments[i]
            job_problems: dict[str, str] = {}
            if jobs:
                with self.store.writer(self.dtype) as writer:
                    migrated = self._migrate_legacy(jobs, writer)
                    if jobs:
                        self._check_space(jobs, workers)
                        task = bar.add_task("computing log-mel spectrograms", total=len(jobs), status="")
                        args = [(str(seg.path), seg.start, seg.end, self.frontend) for seg in jobs.values()]
                        for key, (problem, lms) in zip(list(jobs), self._run_jobs(args, workers)):
                            if problem is None:
                                writer.add(key, lms)
                                computed += 1
                            else:
                                job_problems[key] = problem
                            bar.advance(task)
                for path in migrated:  # only once their shard is committed
                    path.unlink(missing_ok=True)
                self.store.refresh()
            for i, key in keys.items():
                if key in job_problems:
                    problems[i] = job_problems[key]

        bad = [(segments[i], problems[i]) for i in sorted(problems)]
        self.last_stats = {
            "segments": len(segments),
            "computed": computed,
            "cached": len(segments) - len(bad) - computed,
            "bad": len(bad),
        }
        if bad and not skip_bad:
            raise DataError(describe_bad_segments(bad, len(segments)))
        good_idx = [i for i in range(len(segments)) if i not in problems]
        self.last_good_segments = [segments[i] for i in good_idx]
        positions = self.store.find([keys[i] for i in good_idx])
        return self.store.arrays(positions), bad

    def _migrate_legacy(self, jobs: dict[str, Segment], writer) -> list[Path]:
        """Move entries of the one-file-per-entry layout into the writer's shard; drops them from `jobs`."""
        moved: list[Path] = []
        for key in list(jobs):
            old = self.legacy_entry_path(key)
            if not old.is_file():
                continue
            try:
                writer.add(key, np.load(old))
            except (OSError, ValueError):
                continue  # damaged: computed again
            moved.append(old)
            del jobs[key]
        if moved:
            console.print(f"moved {len(moved)} cached log-mel(s) from the old one-file-per-recording layout "
                          f"into shards under {self.store.root} (no re-decoding)")
        return moved

    def _check_space(self, jobs: dict[str, Segment], workers: int) -> None:
        itemsize = DTYPES[self.dtype].itemsize
        with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
            needed = sum(pool.map(lambda seg: expected_bytes(seg, self.frontend, itemsize), jobs.values()))
        check_free_space(self.store.root, needed, f"the log-mel cache of {len(jobs)} new segment(s)")

    def _run_jobs(self, args: list[tuple], workers: int) -> Iterator[tuple[str | None, np.ndarray | None]]:
        """Results in order; at most a few jobs per worker in flight, so memory does not grow with the count."""
        if workers <= 1 or len(args) == 1:
            for a in args:
                yield _compute_entry(a)
            return
        context = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn")
        n = min(workers, len(args))
        with ProcessPoolExecutor(max_workers=n, mp_context=context, initializer=_init_worker) as pool:
            pending: deque = deque()
            todo = iter(args)
            for a in todo:
                pending.append(pool.submit(_compute_entry, a))
                if len(pending) >= 8 * n:
                    break
            while pending:
                yield pending.popleft().result()
                nxt = next(todo, None)
                if nxt is not None:
                    pending.append(pool.submit(_compute_entry, nxt))


def describe_bad_segments(bad: Sequence[tuple[Segment, str]], total: int) -> str:
    """One line listing the first bad segments, a count, and the fix."""
    shown = "; ".join(f"{seg.describe()} ({problem})" for seg, problem in bad[:_MAX_LISTED])
    more = f"; and {len(bad) - _MAX_LISTED} more" if len(bad) > _MAX_LISTED else ""
    return (
        f"{len(bad)} of {total} training audio segment(s) cannot be used: {shown}{more}; "
        "fix or remove them, or pass --skip-bad"
    )


_WORKER_FRONTENDS: dict[FrontEndConfig, LogMelSpectrogram] = {}


def _init_worker() -> None:
    # Several processes each running multi-threaded STFTs would oversubscribe the CPU.
    torch.set_num_threads(1)


def _compute_entry(args: tuple[str, float | None, float | None, FrontEndConfig]) -> tuple[str | None, np.ndarray | None]:
    """Decode and log-mel one segment: (None, float32 [n_mels, frames]) or (a one-line problem, None)."""
    path, start, end, frontend = args
    try:
        wave = load_audio(path, frontend.sample_rate, start, end)
        if wave.numel() < frontend.win_length:
            seconds = wave.numel() / frontend.sample_rate
            return (
                f"shorter than one frame ({seconds * 1000:.1f} ms < {frontend.win_length / frontend.sample_rate * 1000:.0f} ms); "
                "remove it or widen the segment"
            ), None
        module = _WORKER_FRONTENDS.get(frontend)
        if module is None:
            module = _WORKER_FRONTENDS[frontend] = LogMelSpectrogram(frontend)
        with torch.no_grad():
            lms = module(wave).numpy().astype(np.float32, copy=False)
        if not np.isfinite(lms).all():
            return "the log-mel spectrogram has NaN/Inf values; re-export the audio as PCM", None
        return None, np.ascontiguousarray(lms)
    except AudioError as exc:
        return exc.problem, None
    except Exception as exc:  # anything a decoder throws makes this one file bad, not the run
        return f"cannot compute the log-mel ({one_line(exc, with_type=True)}); check the file", None
