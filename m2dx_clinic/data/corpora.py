"""Public data sets users fetch with `m2dx data download NAME`: ICBHI 2017, FSD50K, ESC-50.

Each download is resumable and idempotent (a `.completed` marker in `<root>/<name>/`) and ends in
the folder a user passes to `--data` / `--noise`, so the commands can also accept the bare names
`fsd50k` / `esc50` as noise sources. The root is `--data-root`, else `$M2DX_DATA`, else
`~/.cache/m2dx/data`.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from ..errors import DataError, DownloadError
from ..fetch import check_zip, download_file, extract_zip, is_completed, join_multipart_zip, mark_completed

__all__ = [
    "DATASETS",
    "DatasetSpec",
    "RemoteFile",
    "cache_root",
    "data_root",
    "dataset_path",
    "download_dataset",
    "download_esc50",
    "download_fsd50k",
    "download_icbhi",
    "resolve_noise",
]

_ICBHI_SITE = "https://bhichallenge.med.auth.gr/sites/default/files/ICBHI_final_database"
_FSD50K_RECORD = "https://zenodo.org/record/4060432/files"
NOISE_SETS = ("fsd50k", "esc50")


@dataclass(frozen=True)
class RemoteFile:
    """One file to fetch; `filename` is its local name and its name under a `base_url` mirror."""

    url: str
    filename: str


@dataclass(frozen=True)
class DatasetSpec:
    """A downloadable data set and where its usable folder ends up under `<root>/<name>/`."""

    name: str
    description: str
    terms: str
    files: tuple[RemoteFile, ...]
    result: str  # path of the folder to hand to the commands, relative to <root>/<name>/


def _fsd50k_files() -> tuple[RemoteFile, ...]:
    names = [f"FSD50K.dev_audio.z{i:02d}" for i in range(1, 6)] + ["FSD50K.dev_audio.zip"]
    return tuple(RemoteFile(f"{_FSD50K_RECORD}/{n}?download=1", n) for n in names)


DATASETS: dict[str, DatasetSpec] = {
    "icbhi": DatasetSpec(
        name="icbhi",
        description="ICBHI 2017 respiratory sound database (recordings, cycle annotations, official split)",
        terms="freely available for research; cite the ICBHI 2017 challenge paper",
        files=(
            RemoteFile(f"{_ICBHI_SITE}/ICBHI_final_database.zip", "ICBHI_final_database.zip"),
            RemoteFile(
                f"{_ICBHI_SITE}/ICBHI_challenge_train_test.txt", "ICBHI_challenge_train_test.txt"
            ),
        ),
        result=".",
    ),
    "fsd50k": DatasetSpec(
        name="fsd50k",
        description="FSD50K development audio (background noise in the paper; ~24 GB download)",
        terms="Creative Commons licences per clip (see the FSD50K metadata on Zenodo)",
        files=_fsd50k_files(),
        result="FSD50K.dev_audio",
    ),
    "esc50": DatasetSpec(
        name="esc50",
        description="ESC-50 environmental sounds, 2,000 clips of 5 s (a light noise set)",
        terms="CC BY-NC 3.0 (see the ESC-50 repository)",
        files=(
            RemoteFile("https://github.com/karolpiczak/ESC-50/archive/master.zip", "ESC-50-master.zip"),
        ),
        result="ESC-50-master/audio",
    ),
}


def data_root(explicit: Path | None = None) -> Path:
    """Where data sets are stored: the explicit path, else `$M2DX_DATA`, else `~/.cache/m2dx/data`."""
    if explicit is not None:
        return Path(explicit).expanduser()
    env = os.environ.get("M2DX_DATA")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "m2dx" / "data"


def cache_root(cache_dir: str | Path | None = None, root: str | Path | None = None) -> Path:
    """Where decoded log-mels are cached: `cache_dir` when given, else `<data root>/cache`.

    Pre-training caches whole recordings under `lms/`, fine-tuning its fixed-length segments under
    `cycles/`; both share this root so one `m2dx cache info` / `clean` covers them.
    """
    if cache_dir:
        return Path(cache_dir).expanduser()
    return data_root(Path(root) if root else None) / "cache"


def _spec(name: str) -> DatasetSpec:
    key = name.strip().lower().replace("-", "")
    if key not in DATASETS:
        raise DataError(
            f"unknown data set {name!r}; choose one of: {', '.join(DATASETS)} "
            "(m2dx data download NAME)"
        )
    return DATASETS[key]


def dataset_path(name: str, root: Path | None = None) -> Path:
    """The folder a finished download of `name` provides (it may not exist yet)."""
    spec = _spec(name)
    return (data_root(root) / spec.name / spec.result).resolve()


def _url_for(file: RemoteFile, base_url: str | None) -> str:
    base = base_url or os.environ.get("M2DX_DATA_BASE_URL") or None
    if base:
        return f"{base.rstrip('/')}/{file.filename}"
    return file.url


def _unpack(zip_path: Path, dest: Path) -> None:
    """Extract so that `dest` holds the archive's content, unwrapping one top-level folder."""
    staging = dest.with_name(f".{dest.name}.extracting")
    if staging.exists():
        shutil.rmtree(staging)
    try:
        extract_zip(zip_path, staging)
        (staging / ".completed").unlink(missing_ok=True)
        entries = [p for p in staging.iterdir() if p.name != "__MACOSX"]
        source = entries[0] if len(entries) == 1 and entries[0].is_dir() else staging
        if dest.exists():
            shutil.rmtree(dest)
        os.replace(source, dest)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def download_dataset(
    name: str,
    root: Path | None = None,
    *,
    base_url: str | None = None,
    progress: bool = True,
    keep_archives: bool = False,
) -> Path:
    """Download, join and extract a data set; returns the folder to pass to `--data` / `--noise`.

    Idempotent (re-running after success makes no request) and resumable (unfinished files are
    resumed). `base_url` (or `$M2DX_DATA_BASE_URL`) replaces every URL's prefix with a mirror that
    serves the files by name. Archives are deleted after a successful extraction unless
    `keep_archives`, because FSD50K would otherwise need three times its size on disk.
    """
    spec = _spec(name)
    folder = data_root(root) / spec.name
    result = (folder / spec.result).resolve()
    if is_completed(folder) and result.exists():
        return result

    downloads = folder / "downloads"
    fetched: list[Path] = []
    for file in spec.files:
        check = check_zip if file.filename.endswith(".zip") and spec.name != "fsd50k" else None
        fetched.append(
            download_file(_url_for(file, base_url), downloads / file.filename, progress=progress,
                          check=check)
        )

    archives = list(fetched)
    if spec.name == "icbhi":
        _unpack(fetched[0], folder / "ICBHI_final_database")
        shutil.copyfile(fetched[1], folder / fetched[1].name)
    elif spec.name == "fsd50k":
        joined = downloads / "FSD50K.dev_audio.joined.zip"
        join_multipart_zip(fetched, joined)
        archives.append(joined)
        try:
            _unpack(joined, folder / "FSD50K.dev_audio")
        finally:
            joined.unlink(missing_ok=True)
    elif spec.name == "esc50":
        _unpack(fetched[0], folder / "ESC-50-master")
    if not result.is_dir():
        raise DownloadError(
            f"{result}: expected folder missing after extracting {spec.name}; the archive layout "
            f"changed - delete {folder} and report it, or extract by hand and pass the folder"
        )
    mark_completed(folder, f"{spec.name}: {spec.description}")
    if not keep_archives:
        for p in archives:
            p.unlink(missing_ok=True)
        if downloads.is_dir() and not any(downloads.iterdir()):
            downloads.rmdir()
    return result


def download_icbhi(root: Path | None = None, **kwargs: object) -> Path:
    """ICBHI 2017: folder with `ICBHI_final_database/` and the official split file."""
    return download_dataset("icbhi", root, **kwargs)  # type: ignore[arg-type]


def download_fsd50k(root: Path | None = None, **kwargs: object) -> Path:
    """FSD50K development audio: folder of wav files (the paper's background noise)."""
    return download_dataset("fsd50k", root, **kwargs)  # type: ignore[arg-type]


def download_esc50(root: Path | None = None, **kwargs: object) -> Path:
    """ESC-50: its `audio/` folder (a lighter noise set)."""
    return download_dataset("esc50", root, **kwargs)  # type: ignore[arg-type]


def resolve_noise(spec: str, root: Path | None = None) -> Path:
    """A `--noise` value -> folder/CSV path: an existing path, or a downloaded set's name."""
    path = Path(spec).expanduser()
    if path.exists():
        return path
    key = spec.strip().lower().replace("-", "")
    if key in NOISE_SETS:
        ds = _spec(key)
        folder = data_root(root) / ds.name
        result = folder / ds.result
        if is_completed(folder) and result.is_dir():
            return result
        raise DataError(
            f"noise set {ds.name} is missing at {folder}; run `m2dx data download {ds.name}` "
            "(or pass a folder of audio files)"
        )
    raise DataError(
        f"{spec}: no such noise folder or CSV, and not a known noise set "
        f"({', '.join(NOISE_SETS)}); pass an existing path or run `m2dx data download fsd50k`"
    )


CACHE_KINDS = {"lms": "pre-training log-mels (whole recordings)", "cycles": "fixed-length segments (fine-tuning)"}


def cache_summary(root: Path) -> dict:
    """What the cache at `root` holds: entries and bytes per kind, and in all."""
    from .shards import ShardStore

    root = Path(root)
    kinds = {}
    total_files = total_bytes = 0
    for name, what in CACHE_KINDS.items():
        folder = root / name
        files = [p for p in folder.rglob("*") if p.is_file()] if folder.is_dir() else []
        legacy = sum(1 for p in files if p.suffix == ".npy")  # the one-file-per-entry layout, moved on use
        entries = len(ShardStore(folder).index.keys) + legacy if folder.is_dir() else 0
        size = sum(p.stat().st_size for p in files)
        kinds[name] = {"what": what, "entries": entries, "bytes": size,
                       "files": len(files)}
        total_files, total_bytes = total_files + entries, total_bytes + size
    others = [p for p in root.rglob("*") if p.is_file() and p.parts[len(root.parts)] not in CACHE_KINDS] \
        if root.is_dir() else []
    total_bytes += sum(p.stat().st_size for p in others)
    return {"root": str(root), "exists": root.is_dir(), "kinds": kinds, "entries": total_files,
            "bytes": total_bytes, "other_files": len(others)}


def clean_cache(root: Path) -> int:
    """Delete the cache's entries (log-mels, segments, the file-hash index); returns the bytes freed.

    Only what the toolkit writes there is removed; the folder itself stays. Nothing else is lost:
    every entry is recomputed from the audio on the next run.
    """
    root = Path(root)
    freed = cache_summary(root)["bytes"]
    for name in CACHE_KINDS:
        shutil.rmtree(root / name, ignore_errors=True)
    (root / "file_hashes.json").unlink(missing_ok=True)
    return freed - cache_summary(root)["bytes"]
