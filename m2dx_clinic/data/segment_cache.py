"""Fixed-length segments as log-mel, decoded once: on disk between runs, in memory between repeats.

Fine-tuning, its repeats, every tuning trial, the report's linear probe and the classical baseline
all need the same thing: each segment cut or padded to the cycle length and turned into log-mel by
the encoder's front-end. Decoding dominates small runs, so the result is cached on disk per segment
(keyed by the file's identity and every setting that changes the result) and the stacked tensor of
a whole split in memory, so nothing is decoded twice.
"""

from __future__ import annotations

import hashlib
import json
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from ..audio import FrontEndConfig, LogMelSpectrogram
from ..errors import AudioError
from ..fileio import atomic_save_npy
from ..progress import make_progress
from .segments import Segment, load_fixed_length

CYCLE_CACHE_VERSION = 1
MEMORY_CACHE_ENTRIES = 6

# Stacked log-mel per list of segments, kept across calls in this process (tuning trials, repeats).
_MEMORY_CACHE: "OrderedDict[str, tuple[torch.Tensor, list[str]]]" = OrderedDict()


def clear_memory_cache() -> None:
    """Forget the in-process cache of prepared splits (tests; freeing memory between studies)."""
    _MEMORY_CACHE.clear()


def segment_key(item: Segment, frontend: FrontEndConfig, length_s: float, pad: str) -> str:
    """Cache key from the file's identity (path, size, mtime) and every setting that changes the result.

    Editing a file changes its size or mtime and so its key; changing the cycle length, padding or
    front-end changes the key too, so a stale entry is never served.
    """
    path = Path(item.path).expanduser().resolve()
    try:
        stat = path.stat()
        size, mtime = stat.st_size, stat.st_mtime_ns
    except OSError:
        size, mtime = -1, -1  # missing: loading raises the proper AudioError
    payload = {
        "version": CYCLE_CACHE_VERSION,
        "path": str(path),
        "size": size,
        "mtime_ns": mtime,
        "start": item.start,
        "end": item.end,
        "length_s": float(length_s),
        "pad": pad,
        "frontend": asdict(frontend),
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode("utf-8")).hexdigest()


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
) -> torch.Tensor:
    """Raw (un-normalised) log-mel of every segment fitted to `length_s`, stacked [N, n_mels, frames] float32.

    Results are cached on disk (when `cache_dir` is given) and the stacked tensor in memory. An
    unreadable file raises `AudioError` here, before training starts; when a `problems` list is
    given, its row is NaN instead (see `readable_rows`) and the problem is appended to the list
    (the report's probe skips such segments). `remember=False` keeps the result out of the memory
    cache (prediction: every recording is seen once).
    """
    keys = [segment_key(it, frontend, length_s, pad) for it in items]
    skip_bad = problems is not None
    split_key = hashlib.sha256(("".join(keys) + f"|skip={skip_bad}").encode("ascii")).hexdigest()
    if split_key in _MEMORY_CACHE:
        _MEMORY_CACHE.move_to_end(split_key)
        cached, cached_problems = _MEMORY_CACHE[split_key]
        if problems is not None:
            problems.extend(cached_problems)
        return cached
    n_frames = frontend.num_frames(int(round(length_s * frontend.sample_rate)))
    out = torch.empty(len(items), frontend.n_mels, n_frames, dtype=torch.float32)
    mel = LogMelSpectrogram(frontend)
    bad: list[str] = []

    def one(index: int) -> None:
        entry = cache_dir / keys[index][:2] / f"{keys[index]}.npy" if cache_dir is not None else None
        if entry is not None and entry.is_file():
            try:
                array = np.load(entry)
                if array.shape == (frontend.n_mels, n_frames):
                    out[index] = torch.from_numpy(array)
                    return
            except (OSError, ValueError):
                pass  # a damaged entry is simply recomputed
        try:
            wave = load_fixed_length(items[index], frontend.sample_rate, length_s=length_s, pad=pad)
        except AudioError as exc:
            if not skip_bad:
                raise
            out[index] = float("nan")
            bad.append(f"{items[index].item_id or items[index].describe()}: {exc}")
            return
        with torch.no_grad():
            lms = mel(wave)
        out[index] = lms
        if entry is not None:
            atomic_save_npy(entry, lms.numpy().astype(np.float32, copy=False))

    with make_progress(transient=True, show=progress) as bar:
        task = bar.add_task(description, total=len(items), status="")
        if workers > 1:
            with ThreadPoolExecutor(max_workers=workers) as pool:
                for _ in pool.map(one, range(len(items))):
                    bar.advance(task)
        else:
            for i in range(len(items)):
                one(i)
                bar.advance(task)
    if remember:
        _MEMORY_CACHE[split_key] = (out, bad)
        while len(_MEMORY_CACHE) > MEMORY_CACHE_ENTRIES:
            _MEMORY_CACHE.popitem(last=False)
    if problems is not None:
        problems.extend(bad)
    return out


def readable_rows(prepared: torch.Tensor) -> torch.Tensor:
    """Boolean mask [N] of the rows that hold a decoded segment (False for skipped, NaN rows)."""
    return ~torch.isnan(prepared.flatten(1)).any(dim=1)
