"""How checkpoint files and folders are named: the published convention the reference loaders parse.

A published model lives in a folder whose name encodes its geometry,
`<model>-<F>x<T>p<pf>x<pt>[p16k|p32k]-<yymmdd>[-<tags>]/checkpoint-<epoch>.pth`
(e.g. `m2d_vit_base-80x200p16x4-230529/checkpoint-300.pth`). The reference code reads the input
size and patch size from that folder name, so everything we save is named the same way.
"""

from __future__ import annotations

import datetime as _dt
import re
from pathlib import Path

from ..errors import CheckpointError
from ..models.vit import ViTConfig

# `<model>-<F>x<T>p<pf>x<pt>[p16k|p32k]-<yymmdd>[-<tags>]`: the geometry segment sits between dashes.
_GEOMETRY = re.compile(r"(?:^|-)(\d+)x(\d+)p(\d+)x(\d+)(?:p(\d+)k)?(?=-|$)")
_RATE_FROM_KHZ = {8: 8000, 16: 16000, 22: 22050, 24: 24000, 32: 32000, 44: 44100, 48: 48000}
CHECKPOINT_FILE = re.compile(r"checkpoint-(\d+)\.pth")


def parse_geometry_from_name(name: str | Path) -> tuple[tuple[int, int], tuple[int, int], int] | None:
    """((F, T), (pf, pt), sample_rate) encoded in a weights folder name, or None if it has none.

    Accepts a bare name, a folder or a checkpoint path (the parent folder is tried too), because
    the reference loaders read the geometry from the folder holding `checkpoint-*.pth`.
    """
    path = Path(name)
    for candidate in (path.name, path.parent.name):
        if not candidate:
            continue
        if candidate.endswith(".zip"):
            candidate = candidate[: -len(".zip")]
        m = _GEOMETRY.search(candidate)
        if m:
            f, t, pf, pt = (int(m.group(i)) for i in range(1, 5))
            khz = int(m.group(5)) if m.group(5) else 16
            rate = _RATE_FROM_KHZ.get(khz, khz * 1000)
            return (f, t), (pf, pt), rate
    return None


def model_family_name(config: ViTConfig, offline: bool) -> str:
    """`m2d_x_vit_base` for ViT-B sized models, `m2d_vit_d192l4` style for others."""
    prefix = "m2d_x_vit" if offline else "m2d_vit"
    if (config.embed_dim, config.depth, config.num_heads) == (768, 12, 12):
        return f"{prefix}_base"
    return f"{prefix}_d{config.embed_dim}l{config.depth}"


def checkpoint_folder_name(config: ViTConfig, offline: bool, date: _dt.date | None = None, tag: str = "") -> str:
    """The published convention `<model>-<F>x<T>p<pf>x<pt>p16k-<yymmdd>[-<tag>]` that reference loaders parse."""
    date = date or _dt.date.today()
    (f, t), (pf, pt) = config.input_size, config.patch_size
    rate = f"p{config.sample_rate // 1000}k"
    name = f"{model_family_name(config, offline)}-{f}x{t}p{pf}x{pt}{rate}-{date:%y%m%d}"
    if tag:
        name += "-" + re.sub(r"[^A-Za-z0-9_.]+", "_", tag)
    return name


def checkpoint_epoch(path: str | Path) -> int | None:
    """Epoch number of a `checkpoint-<epoch>.pth` file, None for other names."""
    m = CHECKPOINT_FILE.fullmatch(Path(path).name)
    return int(m.group(1)) if m else None


def list_checkpoints(folder: str | Path) -> list[tuple[int, Path]]:
    """(epoch, path) of every `checkpoint-<epoch>.pth` under `folder` (searched one level down too), sorted."""
    folder = Path(folder)
    found = []
    for path in [*folder.glob("checkpoint-*.pth"), *folder.glob("*/checkpoint-*.pth")]:
        epoch = checkpoint_epoch(path)
        if epoch is not None and path.is_file():
            found.append((epoch, path))
    return sorted(found)


def latest_checkpoint(folder: str | Path) -> Path:
    """The highest-epoch `checkpoint-*.pth` directly in `folder` (the one the reference code evaluates)."""
    folder = Path(folder)
    numbered = [(e, p) for p in folder.glob("checkpoint-*.pth") if p.is_file() and (e := checkpoint_epoch(p)) is not None]
    if not numbered:
        raise CheckpointError(
            f"{folder}: no checkpoint-<epoch>.pth file in this folder; pass a .pth file or a "
            "folder that holds checkpoints"
        )
    return max(numbered, key=lambda item: item[0])[1]
