"""The log-mel cache: every training recording decoded and turned into log-mel once, then memory-mapped.

Decoding and resampling dominate small pre-training runs and would be repeated every epoch, by every
loader worker and every DDP rank. Entries are content-addressed (sha256 of the file's bytes, the
segment range and the front-end settings), so renaming or moving files reuses them and editing a
file invalidates its entry. Every problem with the user's files is collected and reported together
before training starts, so a long run never dies on file 9,000 of 10,000.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import asdict
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from ..audio import FrontEndConfig, LogMelSpectrogram, load_audio
from ..errors import AudioError, DataError, one_line
from ..fileio import atomic_save_npy, atomic_write_bytes, sha256_file
from .segments import Segment

# Bump when the stored array format or its computation changes: old entries are then ignored.
CACHE_FORMAT_VERSION = 1
_INDEX_NAME = "file_hashes.json"
_MAX_LISTED = 10




def content_key(file_hash: str, start: float | None, end: float | None, frontend: FrontEndConfig) -> str:
    """Cache key from WHAT is computed (bytes, range, settings, format), not from where the file lives."""
    payload = {
        "version": CACHE_FORMAT_VERSION,
        "file_sha256": file_hash,
        "start": None if start is None else float(start),
        "end": None if end is None else float(end),
        "frontend": asdict(frontend),
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode("utf-8")).hexdigest()


class LogMelCache:
    """Computes each segment's log-mel once and serves it memory-mapped from `cache_dir`.

    Layout: `cache_dir/lms/<key[:2]>/<key>.npy` (float32 [n_mels, frames]) plus `file_hashes.json`,
    which remembers each file's sha256 by (absolute path, size, mtime_ns) so unchanged files are not
    re-read every run. After `build`, `last_stats` counts cached / computed / bad entries and
    `last_good_segments` lists the segments matching the returned arrays (same order).
    """

    def __init__(self, cache_dir: Path | str, frontend: FrontEndConfig = FrontEndConfig()):
        self.cache_dir = Path(cache_dir).expanduser()
        self.frontend = frontend
        self.last_stats: dict[str, int] = {}
        self.last_good_segments: list[Segment] = []

    def entry_path(self, key: str) -> Path:
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
            absolute = str(path.resolve())
            try:
                st = os.stat(absolute)
            except OSError:
                results[path] = AudioError(path, "file not found; check the path")
                continue
            known = index.get(absolute)
            if isinstance(known, list) and len(known) == 3 and known[0] == st.st_size and known[1] == st.st_mtime_ns:
                results[path] = known[2]
            else:
                todo.append((path, absolute, st.st_size, st.st_mtime_ns))
        if todo:
            task = progress.add_task("hashing audio files", total=len(todo))

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
    ) -> tuple[list[np.ndarray], list[tuple[Segment, str]]]:
        """Memory-mapped log-mels for the good segments and (segment, problem) for the bad ones.

        Raises DataError naming all bad segments unless `skip_bad`, so problems surface before training.
        """
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        segments = list(segments)
        bar = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeRemainingColumn(),
            disable=not progress,
            transient=True,
        )
        problems: dict[int, str] = {}
        keys: dict[int, str] = {}
        computed = 0
        with bar:
            unique_paths = list(dict.fromkeys(seg.path for seg in segments))
            hashes = self._hash_files(unique_paths, workers, bar)
            for i, seg in enumerate(segments):
                digest = hashes[seg.path]
                if isinstance(digest, AudioError):
                    problems[i] = digest.problem
                else:
                    keys[i] = content_key(digest, seg.start, seg.end, self.frontend)

            # One job per distinct missing key: duplicated content is computed once.
            jobs: dict[str, Segment] = {}
            for i, key in keys.items():
                if key not in jobs and not self.entry_path(key).is_file():
                    jobs[key] = segments[i]
            job_problems: dict[str, str] = {}
            if jobs:
                task = bar.add_task("computing log-mel spectrograms", total=len(jobs))
                args = [
                    (str(seg.path), seg.start, seg.end, self.frontend, str(self.entry_path(key)))
                    for key, seg in jobs.items()
                ]
                for key, problem in zip(jobs, self._run_jobs(args, workers, bar, task)):
                    if problem is None:
                        computed += 1
                    else:
                        job_problems[key] = problem
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
        arrays = [np.load(self.entry_path(keys[i]), mmap_mode="r") for i in good_idx]
        return arrays, bad

    def _run_jobs(self, args: list[tuple], workers: int, bar, task) -> list[str | None]:
        out: list[str | None] = []
        if workers <= 1 or len(args) == 1:
            for a in args:
                out.append(_compute_entry(a))
                bar.advance(task)
            return out
        context = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn")
        n = min(workers, len(args))
        chunk = max(1, min(16, len(args) // (n * 8)))
        with ProcessPoolExecutor(max_workers=n, mp_context=context, initializer=_init_worker) as pool:
            for problem in pool.map(_compute_entry, args, chunksize=chunk):
                out.append(problem)
                bar.advance(task)
        return out


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


def _compute_entry(args: tuple[str, float | None, float | None, FrontEndConfig, str]) -> str | None:
    """Decode, log-mel, save atomically; returns None on success or a one-line problem."""
    path, start, end, frontend, out_path = args
    try:
        wave = load_audio(path, frontend.sample_rate, start, end)
        if wave.numel() < frontend.win_length:
            seconds = wave.numel() / frontend.sample_rate
            return (
                f"shorter than one frame ({seconds * 1000:.1f} ms < {frontend.win_length / frontend.sample_rate * 1000:.0f} ms); "
                "remove it or widen the segment"
            )
        module = _WORKER_FRONTENDS.get(frontend)
        if module is None:
            module = _WORKER_FRONTENDS[frontend] = LogMelSpectrogram(frontend)
        with torch.no_grad():
            lms = module(wave).numpy().astype(np.float32, copy=False)
        if not np.isfinite(lms).all():
            return "the log-mel spectrogram has NaN/Inf values; re-export the audio as PCM"
        atomic_save_npy(Path(out_path), np.ascontiguousarray(lms))
        return None
    except AudioError as exc:
        return exc.problem
    except Exception as exc:  # anything a decoder throws makes this one file bad, not the run
        return f"cannot compute the log-mel ({one_line(exc, with_type=True)}); check the file"
