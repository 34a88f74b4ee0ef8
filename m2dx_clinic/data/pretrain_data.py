"""Unlabelled training audio for M2D / M2D-X further pre-training (spec §1, §4).

The pipeline is: list the audio (a folder or a CSV manifest) -> compute every log-mel once into a
content-addressed cache (so renaming files reuses it and editing a file invalidates it) -> memory-map
the cached arrays -> serve random crops, repeated ("inflated") to a minimum epoch size, each with
its noise crop drawn in the loader workers -> mix the noise in the log domain on the device, per batch.

Every problem with the user's files is collected and reported together before training starts, so
a long run never dies on file 9,000 of 10,000.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, NamedTuple, Sequence

import numpy as np
import torch

from ..audio import LOG_EPS, FrontEndConfig, LogMelSpectrogram, list_audio_files, load_audio
from ..errors import AudioError, ConfigError, DataError
from ..fileio import atomic_save_npy, atomic_write_bytes

# Bump when the stored array format or its computation changes: old entries are then ignored.
CACHE_FORMAT_VERSION = 1
_INDEX_NAME = "file_hashes.json"
_HASH_CHUNK = 1 << 20
_MAX_LISTED = 10


@dataclass(frozen=True)
class AudioSegment:
    """One training item: a whole file, or the [start, end) seconds of it."""

    path: Path
    start: float | None = None
    end: float | None = None
    label: str | None = None
    subject: str | None = None

    def describe(self) -> str:
        """Path plus the segment range, for error messages."""
        if self.start is None and self.end is None:
            return str(self.path)
        lo = "0" if self.start is None else f"{self.start:g}"
        hi = "end" if self.end is None else f"{self.end:g}"
        return f"{self.path} [{lo}-{hi} s]"


# --------------------------------------------------------------------------------------------
# Listing
# --------------------------------------------------------------------------------------------


def list_training_audio(source: Path | str) -> list[AudioSegment]:
    """Training segments from a folder (recursive, every audio file) or a CSV manifest.

    The manifest needs a `path` column; `subject`, `label`, `start`, `end` (seconds) are optional.
    Relative paths are taken relative to the CSV's folder so a data set can be moved as a whole.
    """
    source = Path(source).expanduser()
    if source.is_dir():
        files = list_audio_files(source)
        if not files:
            raise DataError(
                f"{source}: no audio files (.wav/.flac/.ogg/.mp3/.aiff) found in this folder or below; "
                "put the recordings there or pass a CSV manifest with a 'path' column"
            )
        return [AudioSegment(path=p) for p in files]
    if source.is_file():
        if source.suffix.lower() != ".csv":
            raise DataError(f"{source}: expected a folder of audio files or a .csv manifest; pass one of those")
        return _read_manifest(source)
    raise DataError(f"{source}: not found; pass a folder of audio files or a CSV manifest with a 'path' column")


def _read_manifest(csv_path: Path) -> list[AudioSegment]:
    try:
        with open(csv_path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            header = [(h or "").strip().lower() for h in (reader.fieldnames or [])]
            raw_rows = list(reader)
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DataError(f"{csv_path}: cannot read the manifest ({exc}); save it as UTF-8 CSV") from None
    if "path" not in header:
        raise DataError(
            f"{csv_path}: the manifest has no 'path' column (columns: {', '.join(h for h in header if h) or 'none'}); "
            "add a header line with 'path' (optional: subject, label, start, end)"
        )
    if not raw_rows:
        raise DataError(f"{csv_path}: the manifest lists no files; add one row per recording")
    base = csv_path.parent
    segments: list[AudioSegment] = []
    missing: list[str] = []
    for line_no, raw in enumerate(raw_rows, start=2):  # line 1 is the header
        row = {(k or "").strip().lower(): (v or "").strip() for k, v in raw.items() if k is not None}
        if not row.get("path"):
            raise DataError(f"{csv_path}: line {line_no} has an empty 'path'; fill it in or delete the line")
        path = Path(row["path"]).expanduser()
        if not path.is_absolute():
            path = base / path
        if not path.is_file():
            missing.append(f"{path} (line {line_no})")
            continue
        start = _parse_seconds(csv_path, line_no, "start", row.get("start", ""))
        end = _parse_seconds(csv_path, line_no, "end", row.get("end", ""))
        if start is not None and end is not None and end <= start:
            raise DataError(f"{csv_path}: line {line_no} has end {end:g} <= start {start:g}; fix the segment times")
        segments.append(
            AudioSegment(
                path=path,
                start=start,
                end=end,
                label=row.get("label") or None,
                subject=row.get("subject") or None,
            )
        )
    if missing:
        shown = "; ".join(missing[:_MAX_LISTED])
        more = f" and {len(missing) - _MAX_LISTED} more" if len(missing) > _MAX_LISTED else ""
        raise DataError(
            f"{csv_path}: {len(missing)} listed file(s) do not exist: {shown}{more}; "
            f"fix the paths (relative paths are relative to {base})"
        )
    return segments


def _parse_seconds(csv_path: Path, line_no: int, column: str, text: str) -> float | None:
    if text == "":
        return None
    try:
        value = float(text)
    except ValueError:
        raise DataError(f"{csv_path}: line {line_no} has {column}={text!r}, not a number of seconds; fix it or leave it empty") from None
    if not math.isfinite(value) or value < 0:
        raise DataError(f"{csv_path}: line {line_no} has {column}={text!r}; use a non-negative number of seconds")
    return value


# --------------------------------------------------------------------------------------------
# Log-mel cache
# --------------------------------------------------------------------------------------------


def file_sha256(path: Path) -> str:
    """sha256 of a file's bytes, read in chunks so big files do not fill memory."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


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
        self.last_good_segments: list[AudioSegment] = []

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
                    return item, file_sha256(Path(item[1]))
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
        segments: Sequence[AudioSegment],
        *,
        workers: int = 2,
        skip_bad: bool = False,
        progress: bool = True,
    ) -> tuple[list[np.ndarray], list[tuple[AudioSegment, str]]]:
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
            jobs: dict[str, AudioSegment] = {}
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


def describe_bad_segments(bad: Sequence[tuple[AudioSegment, str]], total: int) -> str:
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
        text = str(exc).strip().splitlines()
        return f"cannot compute the log-mel ({type(exc).__name__}: {text[0][:160] if text else ''}); check the file"


# --------------------------------------------------------------------------------------------
# Normalisation
# --------------------------------------------------------------------------------------------


def normalize(lms: Any, mean: float, std: float) -> Any:
    """(lms - mean) / std with scalar statistics (numpy arrays or tensors)."""
    return (lms - mean) / std


def compute_norm_stats(
    lms_list: Sequence[np.ndarray],
    crop_frames: int,
    num_samples: int = 10000,
    seed: int = 0,
) -> tuple[float, float]:
    """Scalar (mean, std) of log-mel values over `num_samples` random crops (the reference recipe).

    A clip shorter than the crop contributes its own frames only: the repeated padding the model
    sees would just re-weight the same values.
    """
    if len(lms_list) == 0:
        raise DataError("no training audio to compute normalisation statistics from; check the training list")
    if crop_frames < 1 or num_samples < 1:
        raise ValueError("crop_frames and num_samples must be positive")
    rng = np.random.default_rng(seed)
    total = 0.0
    total_sq = 0.0
    count = 0
    clip_ids = rng.integers(0, len(lms_list), size=num_samples)
    for idx in clip_ids:
        lms = lms_list[int(idx)]
        frames = lms.shape[-1]
        if frames > crop_frames:
            start = int(rng.integers(0, frames - crop_frames + 1))
            crop = lms[..., start : start + crop_frames]
        else:
            crop = lms
        values = np.asarray(crop, dtype=np.float64)
        total += float(values.sum())
        total_sq += float(np.square(values).sum())
        count += values.size
    mean = total / count
    var = max(total_sq / count - mean * mean, 0.0)
    return float(mean), float(math.sqrt(var))


# --------------------------------------------------------------------------------------------
# Crops
# --------------------------------------------------------------------------------------------


def crop_lms(lms: Any, start: int, width: int) -> torch.Tensor:
    """[n_mels, width] float32 from `start`, wrapping around (circular repeat) when short."""
    array = lms.numpy() if isinstance(lms, torch.Tensor) else lms
    frames = array.shape[-1]
    if start + width <= frames:
        window = np.array(array[:, start : start + width], dtype=np.float32)
    else:
        window = np.array(array[:, (start + np.arange(width)) % frames], dtype=np.float32)
    return torch.from_numpy(window)


def _check_clips(lms_list: Sequence[Any], what: str) -> None:
    if len(lms_list) == 0:
        raise DataError(f"no {what} clips to train on; check the {what} folder or list")
    for i, lms in enumerate(lms_list):
        if len(lms.shape) != 2 or lms.shape[-1] < 1:
            raise ValueError(f"{what} clip {i} has shape {tuple(lms.shape)}, expected [n_mels, frames >= 1]")


def keyed_generator(*key: int) -> torch.Generator:
    """A generator seeded from a tuple of integers (run seed, rank, epoch, item, ...).

    Pre-training draws every random choice of an item from its own key, so what a batch contains
    depends only on (seed, rank, epoch, position): not on which loader worker made it, how many
    workers there are, or whether they were restarted. That is what lets the workers persist
    across epochs and a resumed run still see exactly the batches of an uninterrupted one.
    """
    words = [int(k) % (1 << 64) for k in key]
    seed = int(np.random.SeedSequence(words).generate_state(1, dtype=np.uint64)[0])
    return torch.Generator().manual_seed(seed)


def _random_start(frames: int, crop_frames: int, generator: torch.Generator | None) -> int:
    if frames <= crop_frames:
        return 0
    return int(torch.randint(0, frames - crop_frames + 1, (1,), generator=generator).item())


class CropDataset(torch.utils.data.Dataset):
    """Random crops of raw (unnormalised) log-mels, the list repeated to at least `min_ds_size`.

    Normalisation and noise mixing happen per batch on the device, so crops stay raw here.
    `dataset[i]` draws its crop from torch's global RNG; `crop(i, generator)` from the given one
    (the pre-training loader passes a per-item generator, see `PretrainItems`).
    """

    def __init__(
        self,
        lms_list: Sequence[Any],
        crop_frames: int,
        *,
        min_ds_size: int = 0,
        labels: Sequence[int | Sequence[int]] | None = None,
        num_classes: int | None = None,
    ):
        _check_clips(lms_list, "training")
        if crop_frames < 1:
            raise ValueError("crop_frames must be positive")
        self.lms_list = lms_list
        self.crop_frames = int(crop_frames)
        n = len(lms_list)
        self.repeats = max(1, math.ceil(max(0, min_ds_size) / n))
        if labels is not None:
            if len(labels) != n:
                raise ValueError(f"{len(labels)} labels for {n} clips; give one label per clip")
            multi = [not isinstance(lab, (int, np.integer)) for lab in labels]
            if any(multi) and num_classes is None:
                raise ValueError("multi-label targets need num_classes")
            for lab in labels:
                ids = [int(lab)] if isinstance(lab, (int, np.integer)) else [int(x) for x in lab]
                if num_classes is not None and any(not 0 <= x < num_classes for x in ids):
                    raise ValueError(f"label {lab} is outside [0, {num_classes})")
        self.labels = labels
        self.num_classes = num_classes

    def __len__(self) -> int:
        return len(self.lms_list) * self.repeats

    def __getitem__(self, i: int) -> dict[str, torch.Tensor | int]:
        return self.crop(i, None)

    def crop(self, i: int, generator: torch.Generator | None) -> dict[str, torch.Tensor | int]:
        """Item i: {"lms": [1, n_mels, crop_frames], "index": clip index[, "label"]}."""
        if not -len(self) <= i < len(self):
            raise IndexError(i)
        index = i % len(self.lms_list)
        lms = self.lms_list[index]
        start = _random_start(lms.shape[-1], self.crop_frames, generator)
        item: dict[str, torch.Tensor | int] = {"lms": crop_lms(lms, start, self.crop_frames).unsqueeze(0), "index": index}
        if self.labels is not None:
            label = self.labels[index]
            if isinstance(label, (int, np.integer)):
                item["label"] = torch.tensor(int(label), dtype=torch.long)
            else:
                hot = torch.zeros(int(self.num_classes), dtype=torch.float32)  # type: ignore[arg-type]
                hot[[int(x) for x in label]] = 1.0
                item["label"] = hot
        return item


class NoiseCropDataset:
    """Background-noise crops along a shuffled cycle over all clips (spec §4), as a pure function of position.

    Position p of a stream uses clip perm_c[p mod n], where n is the number of clips, c = p // n and
    perm_c is a permutation seeded by (seed, c): every clip once per cycle, a fresh order each cycle.
    The crop offset is seeded by (seed, p). So there is no state to save for an exact resume, and any
    loader worker can produce any position. `mean` is the noise set's own log-mel mean (noise is
    centred with it before mixing).
    """

    def __init__(
        self,
        lms_list: Sequence[Any],
        crop_frames: int,
        *,
        mean: float | None = None,
        seed: int = 0,
        num_stat_samples: int = 10000,
        stats_seed: int | None = None,
    ):
        """`seed` drives the cycle and crops; `stats_seed` (default `seed`) the sample that gives `mean`."""
        _check_clips(lms_list, "noise")
        self.lms_list = lms_list
        self.crop_frames = int(crop_frames)
        self.seed = int(seed)
        if mean is None:
            sample_seed = self.seed if stats_seed is None else int(stats_seed)
            mean = compute_norm_stats(lms_list, crop_frames, num_stat_samples, sample_seed)[0]
        self.mean = float(mean)
        self._cycle: tuple[int, list[int]] = (-1, [])  # the last permutation used (positions come in runs)

    def __len__(self) -> int:
        return len(self.lms_list)

    def clip_at(self, position: int) -> int:
        """Index of the clip used at stream `position`."""
        if position < 0:
            raise ValueError(f"noise stream positions start at 0, got {position}")
        cycle, offset = divmod(int(position), len(self.lms_list))
        if self._cycle[0] != cycle:
            order = torch.randperm(len(self.lms_list), generator=keyed_generator(self.seed, 0x6E6F, cycle)).tolist()
            self._cycle = (cycle, order)
        return self._cycle[1][offset]

    def crop_at(self, position: int) -> torch.Tensor:
        """[1, n_mels, crop_frames] raw noise crop at stream `position` (short clips repeat from their start)."""
        lms = self.lms_list[self.clip_at(position)]
        start = _random_start(lms.shape[-1], self.crop_frames, keyed_generator(self.seed, 0x6372, position))
        return crop_lms(lms, start, self.crop_frames).unsqueeze(0)

    def batch(self, start: int, count: int) -> torch.Tensor:
        """[count, 1, n_mels, crop_frames]: the crops at positions start .. start + count - 1."""
        return torch.stack([self.crop_at(p) for p in range(start, start + count)])


class ItemKey(NamedTuple):
    """What the pre-training sampler hands the dataset: enough to make the item reproducibly."""

    epoch: int
    position: int  # place in this rank's stream of items across epochs (drives the noise cycle)
    index: int  # item of the (inflated) crop dataset


class KeyedSampler(torch.utils.data.Sampler):
    """Wraps the shuffling sampler and numbers its indices with the epoch and the stream position.

    It runs in the main process, so `set_epoch` reaches it even when the loader workers persist.
    """

    def __init__(self, base: torch.utils.data.Sampler):
        self.base = base
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)
        if hasattr(self.base, "set_epoch"):
            self.base.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __iter__(self):
        first = self.epoch * len(self)
        for offset, index in enumerate(self.base):
            yield ItemKey(self.epoch, first + offset, int(index))


class PretrainItems(torch.utils.data.Dataset):
    """The pre-training loader's dataset: a training crop and, with a noise set, its noise crop.

    Indexed by `ItemKey`; the crop is seeded by (seed, rank, epoch, index) and the noise by the
    stream position, so loader workers do the cropping (off the training loop's thread, pinned by
    the loader) and can persist across epochs without changing what the run sees.
    """

    def __init__(self, crops: CropDataset, noise: NoiseCropDataset | None, seed: int, rank: int = 0):
        self.crops, self.noise = crops, noise
        self.seed, self.rank = int(seed), int(rank)

    def __len__(self) -> int:
        return len(self.crops)

    def __getitem__(self, key: ItemKey) -> dict[str, torch.Tensor | int]:
        epoch, position, index = key
        item = self.crops.crop(index, keyed_generator(self.seed, self.rank, epoch, index))
        if self.noise is not None:
            item["noise"] = self.noise.crop_at(position)
        return item


# --------------------------------------------------------------------------------------------
# Log-domain mixing
# --------------------------------------------------------------------------------------------


def mix_in_log_domain(
    clean: torch.Tensor,
    noise: torch.Tensor,
    ratio: float,
    clean_mean: float,
    noise_mean: float,
    std: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(clean, mixed), both normalised by the main set's std (spec §4).

    Each input is centred with its own mean, then mixed = log(max(r*exp(noise) + (1-r)*exp(clean), eps)).
    Computed as logaddexp(noise + log r, clean + log(1-r)) in float32, which is the same value but
    cannot overflow and gives exactly `clean` at r = 0 (and `noise` at r = 1).
    """
    if not 0.0 <= ratio <= 1.0:
        raise ConfigError(f"noise ratio must be within [0, 1], got {ratio}; fix the noise ratio setting")
    with torch.autocast(device_type=clean.device.type, enabled=False):
        clean_c = clean.float() - clean_mean
        noise_c = noise.float() - noise_mean
        log_r = math.log(ratio) if ratio > 0 else -math.inf
        log_1r = math.log1p(-ratio) if ratio < 1 else -math.inf
        mixed = torch.logaddexp(noise_c + log_r, clean_c + log_1r).clamp_min(math.log(LOG_EPS))
        return clean_c / std, mixed / std
