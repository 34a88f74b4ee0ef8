"""Where weights come from: the published M2D table, the download cache, and names resolved to files.

Users start from a published checkpoint; naming it (`m2d_vit_base-80x200p16x4-230529`) should be
as good as giving a path. The table is plain data so the CLI can list it and tests can check it;
the geometry of each entry is parsed from its name, exactly as the reference loaders do.
`open_checkpoint` / `load_encoder` take a published name, a folder or a file, so every command
accepts all three. A run that starts from a base checkpoint resolves it once (`load_base`): the
`ResolvedCheckpoint` it gets back says which file was loaded and under which published name, and is
what the run's records, classifier files and model card name.
"""

from __future__ import annotations

import difflib
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .checkpoint import LoadedCheckpoint, latest_checkpoint, parse_geometry_from_name
from .errors import CheckpointError, ConfigError, DownloadError
from .fetch import check_zip, download_file, extract_zip, is_completed, mark_completed
from .fileio import FileIdentity, file_identity
from .models.vit import AudioViT, ViTConfig

GITHUB_RELEASES = "https://github.com/nttcslab/m2d/releases/download"

__all__ = [
    "PUBLISHED_WEIGHTS",
    "PublishedWeights",
    "ResolvedCheckpoint",
    "checkpoint_key",
    "download_weights",
    "get_published",
    "load_base",
    "load_encoder",
    "open_checkpoint",
    "resolve_checkpoint",
    "weights_cache_dir",
]


@dataclass(frozen=True)
class PublishedWeights:
    """One published release asset (`<name>.zip` holding `<name>/checkpoint-<epoch>.pth`)."""

    name: str
    release_tag: str
    purpose: str
    input_size: tuple[int, int]
    patch_size: tuple[int, int]
    sample_rate: int
    encoder_only: bool

    @property
    def url(self) -> str:
        """Download URL of the release asset on GitHub."""
        return f"{GITHUB_RELEASES}/{self.release_tag}/{self.name}.zip"


def _entry(name: str, tag: str, purpose: str) -> PublishedWeights:
    geometry = parse_geometry_from_name(name)
    if geometry is None:  # pragma: no cover - guards the table below
        raise ValueError(f"published weights name without geometry: {name}")
    input_size, patch_size, rate = geometry
    return PublishedWeights(
        name=name,
        release_tag=tag,
        purpose=purpose,
        input_size=input_size,
        patch_size=patch_size,
        sample_rate=rate,
        encoder_only=name.endswith("_enconly"),
    )


_UNSURE = " (asset name not verified against the release page)"

PUBLISHED_WEIGHTS: tuple[PublishedWeights, ...] = (
    _entry(
        "m2d_vit_base-80x200p16x4-230529",
        "v0.1.0",
        "medical further pre-training base (paper's ICBHI setting): M2D ViT-B, AudioSet, 2 s input",
    ),
    _entry(
        "m2d_vit_base-80x608p16x16-221006-mr7",
        "v0.1.0",
        "general-purpose M2D ViT-B on AudioSet, masking ratio 0.7, 6 s input",
    ),
    _entry(
        "m2d_vit_base-80x608p16x16-221006-mr6",
        "v0.1.0",
        "general-purpose M2D ViT-B on AudioSet, masking ratio 0.6, 6 s input",
    ),
    _entry(
        "m2d_as_vit_base-80x608p16x16-240213",
        "v0.1.0",
        "M2D-AS (M2D-X with AudioSet labels): specialised for AudioSet-like sound events",
    ),
    _entry(
        "m2d_clap_vit_base-80x608p16x16-240128",
        "v0.1.0",
        "M2D-CLAP: audio encoder trained with an audio-language objective",
    ),
    _entry(
        "m2d_s_vit_base-80x608p80x2-230220",
        "v0.2.0",
        "M2D-S speech model (80x2 patches), 6 s input",
    ),
    _entry(
        "m2d_s_vit_base-80x400p80x2-230201",
        "v0.2.0",
        "M2D-S speech model (80x2 patches), 4 s input",
    ),
    _entry(
        "m2d_s_vit_base-80x512p80x2-230301",
        "v0.2.0",
        "M2D-S speech model (80x2 patches), 5.12 s input",
    ),
    _entry(
        "m2d_vit_base-80x608p16x16-221006-mr7_enconly",
        "v0.1.0",
        "encoder-only copy of the general-purpose mr7 model (smaller download)" + _UNSURE,
    ),
    _entry(
        "m2d_as_vit_base-80x608p16x16-240213_enconly",
        "v0.1.0",
        "encoder-only copy of M2D-AS (smaller download)" + _UNSURE,
    ),
    _entry(
        "m2d_as_vit_base-80x1001p16x16p32k-240413_enconly",
        "v0.3.0",
        "32 kHz M2D-AS encoder, 10 s input (example of the p32k variants)" + _UNSURE,
    ),
)

_BY_NAME = {w.name: w for w in PUBLISHED_WEIGHTS}


def weights_cache_dir() -> Path:
    """Where downloaded weights live: `$M2DX_WEIGHTS`, else `~/.cache/m2dx/weights`."""
    env = os.environ.get("M2DX_WEIGHTS")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "m2dx" / "weights"


def _normalize(name: str) -> str:
    name = name.strip().rstrip("/")
    return name[: -len(".zip")] if name.endswith(".zip") else name


def _close_matches(name: str) -> list[str]:
    return difflib.get_close_matches(name, list(_BY_NAME), n=3, cutoff=0.5)


def get_published(name: str) -> PublishedWeights:
    """Look up published weights by name (a trailing `.zip` is accepted)."""
    key = _normalize(name)
    if key in _BY_NAME:
        return _BY_NAME[key]
    matches = _close_matches(key)
    hint = f" Did you mean: {', '.join(matches)}?" if matches else ""
    raise ConfigError(
        f"unknown published weights {name!r}.{hint} See `m2dx weights list` for all names."
    )


def _weights_base_url(base_url: str | None) -> str | None:
    base = base_url or os.environ.get("M2DX_WEIGHTS_BASE_URL") or None
    return base.rstrip("/") if base else None


def _move_into(staging: Path, target: Path) -> None:
    """Move the extracted files into `target`, unwrapping a single top-level folder."""
    entries = [p for p in staging.iterdir() if p.name not in (".completed", "__MACOSX")]
    source = entries[0] if len(entries) == 1 and entries[0].is_dir() else staging
    target.mkdir(parents=True, exist_ok=True)
    for item in source.iterdir():
        if item.name in (".completed", "__MACOSX"):
            continue
        destination = target / item.name
        if destination.is_dir():
            shutil.rmtree(destination)
        elif destination.exists():
            destination.unlink()
        os.replace(item, destination)


def download_weights(
    name: str,
    dest_dir: Path | None = None,
    *,
    base_url: str | None = None,
    progress: bool = True,
    expected_sha256: str | None = None,
    keep_zip: bool = False,
) -> Path:
    """Download and unpack published weights; returns the highest-epoch checkpoint file.

    The result is `dest_dir/<name>/checkpoint-<epoch>.pth` whatever the zip layout, so the folder
    name keeps encoding the geometry. `base_url` (or `$M2DX_WEIGHTS_BASE_URL`) replaces the GitHub
    release prefix; a `{tag}` in it is filled with the release tag. Re-running is free.
    """
    weights = get_published(name)
    dest_dir = Path(dest_dir).expanduser() if dest_dir is not None else weights_cache_dir()
    target = dest_dir / weights.name
    if is_completed(target):
        try:
            return latest_checkpoint(target)
        except CheckpointError:
            (target / ".completed").unlink()  # marker without files: redo the download

    base = _weights_base_url(base_url)
    if base is None:
        url = weights.url
    else:
        url = f"{base.replace('{tag}', weights.release_tag)}/{weights.name}.zip"
    zip_path = dest_dir / f"{weights.name}.zip"
    download_file(
        url,
        zip_path,
        sha256=expected_sha256,
        progress=progress,
        check=lambda p: check_zip(p, full=True),
    )

    staging = dest_dir / f".{weights.name}.extracting"
    if staging.exists():
        shutil.rmtree(staging)
    extract_zip(zip_path, staging)
    try:
        if not any(staging.rglob("checkpoint-*.pth")):
            raise DownloadError(
                f"{zip_path}: archive holds no checkpoint-*.pth; delete it and download again, or "
                "check the name"
            )
        _move_into(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    checkpoint = latest_checkpoint(target)
    mark_completed(target, f"downloaded from {url}")
    if not keep_zip:
        zip_path.unlink(missing_ok=True)
    return checkpoint


def resolve_checkpoint(
    name_or_path: str | Path,
    *,
    download: bool = False,
    cache_dir: Path | None = None,
) -> Path:
    """Turn a checkpoint file, a checkpoint folder or a published name into a `.pth` path.

    Published names resolve to the cached download; with download=True a missing one is fetched.
    """
    return _find(name_or_path, download=download, cache_dir=cache_dir)[0]


def _find(name_or_path: str | Path, *, download: bool, cache_dir: Path | None) -> tuple[Path, str | None]:
    """(the `.pth` file, the published name when `name_or_path` was one): `resolve_checkpoint`'s one search."""
    path = Path(name_or_path).expanduser()
    if path.is_file():
        return path, None
    if path.is_dir():
        return latest_checkpoint(path), None

    text = _normalize(str(name_or_path))
    if text in _BY_NAME:
        cache = Path(cache_dir).expanduser() if cache_dir is not None else weights_cache_dir()
        folder = cache / text
        if folder.is_dir():
            try:
                return latest_checkpoint(folder), text
            except CheckpointError:
                pass
        if download:
            return download_weights(text, cache), text
        raise CheckpointError(
            f"published weights {text} are not downloaded yet (looked in {folder}); "
            f"run: m2dx weights download {text}"
        )

    matches = _close_matches(text)
    hint = f" Did you mean: {', '.join(matches)}?" if matches else ""
    raise CheckpointError(
        f"{name_or_path}: no such checkpoint file or folder, and not a published weights name."
        f"{hint} See `m2dx weights list`."
    )


def open_checkpoint(name_or_path: str | Path, *, download: bool = False) -> LoadedCheckpoint:
    """Resolve a published name, checkpoint folder or file and load it safely."""
    return LoadedCheckpoint(resolve_checkpoint(str(name_or_path), download=download))


def load_encoder(name_or_path: str | Path, *, download: bool = False) -> AudioViT:
    """A ready encoder (eval mode) from any accepted checkpoint layout."""
    return open_checkpoint(name_or_path, download=download).encoder()


@dataclass(frozen=True)
class ResolvedCheckpoint:
    """A base checkpoint as a run uses it, settled once where it is loaded.

    `--checkpoint` may be a published name, a folder or a file; which file that was, and whether a
    published name found it in the weights cache, is decided here and nowhere later, so the run's
    records say the same thing as the weights it trained (a published name is no longer "not a path").
    """

    given: str  # what the user passed, as they passed it (commands that re-run the run repeat it)
    path: Path  # the `.pth` file loaded
    published: str | None  # the published weights name `given` was, else None
    vit_config: ViTConfig  # the encoder's geometry
    identity: FileIdentity  # (resolved path, size, mtime) of the file: a fingerprint that costs no read

    @property
    def key(self) -> Any:
        """What an inputs fingerprint records of it (`checkpoint_key`)."""
        return checkpoint_key(self.path, self.published)

    def record(self) -> dict[str, Any]:
        """The run's internal record of it (metrics.json; never shipped: it holds a path)."""
        return {"checkpoint": self.given, "checkpoint_resolved": self.identity.path,
                "checkpoint_published": self.published}


def checkpoint_key(path: Path, published: str | None = None) -> Any:
    """A base checkpoint in an inputs fingerprint: its published name (a release never changes), else the
    identity of the file (path, size, mtime), so an edited or replaced file is new input."""
    if published:
        return published
    identity = file_identity(path)
    return asdict(identity) if identity is not None else str(path)


def load_base(name_or_path: str | Path, *, download: bool = False) -> tuple[AudioViT, ResolvedCheckpoint]:
    """The encoder (eval mode) of a run's base checkpoint and what it was resolved to (`ResolvedCheckpoint`)."""
    path, published = _find(name_or_path, download=download, cache_dir=None)
    loaded = LoadedCheckpoint(path)
    encoder = loaded.encoder()
    identity = file_identity(path)
    if identity is None:  # pragma: no cover - removed between loading and stat
        raise CheckpointError(f"{path}: checkpoint vanished while being loaded")
    return encoder, ResolvedCheckpoint(str(name_or_path), path, published, loaded.vit_config, identity)
