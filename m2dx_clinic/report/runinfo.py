"""What a run folder says about itself: its recipe, its logged epochs, its checkpoints (one row each).

A report reads runs made by older versions of the training loop, so unknown recipe keys are dropped
with a note, a logged epoch whose checkpoint is missing becomes a row with an error, and a missing
recipe.toml is recovered from the newest readable checkpoint.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import checkpoint as ckpt_io
from ..config import build_dataclass, read_toml
from ..errors import ConfigError, M2DXError
from ..recipes import PretrainRecipe
from ..weights import resolve_checkpoint


def _prune_to(cls: type, values: dict[str, Any], where: str, dropped: list[str]) -> dict[str, Any]:
    """Keep only keys `cls` still declares (recursively), listing the rest in `dropped`.

    A report reads runs made by older versions of the training loop; a recipe key that was renamed
    since must not make the whole report unreadable.
    """
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    out: dict[str, Any] = {}
    for key, value in values.items():
        name = f"{where}.{key}" if where else key
        if key not in fields:
            dropped.append(name)
        elif isinstance(value, dict) and dataclasses.is_dataclass(hints[key]):
            out[key] = _prune_to(hints[key], value, name, dropped)
        else:
            out[key] = value
    return out


def load_run_recipe(run_dir: Path, checkpoints: list[tuple[int, Path]]) -> tuple[Any, list[str]]:
    """(the run's resolved recipe, notes): recipe.toml, else the copy stored in the newest readable checkpoint.

    Keys this version no longer knows are dropped with a note instead of failing.
    """
    dropped: list[str] = []
    values: dict[str, Any] | None = None
    toml_path = run_dir / "recipe.toml"
    if toml_path.is_file():
        values = read_toml(toml_path)
        values.pop("about", None)
    else:
        for _, path in reversed(checkpoints):
            try:
                meta = ckpt_io.peek_checkpoint(path)[1]
            except M2DXError:
                continue
            if isinstance(meta.get("recipe"), dict):
                values = meta["recipe"]
                break
    if values is None:
        raise ConfigError(f"{run_dir}: no recipe.toml and no readable checkpoint; pass the folder that further-pretrain created")
    recipe = build_dataclass(PretrainRecipe, _prune_to(PretrainRecipe, values, "", dropped))
    notes = [f"run recipe keys unknown to this version were ignored: {', '.join(dropped)}"] if dropped else []
    return recipe, notes


def epoch_end_rows(metrics: list[dict[str, Any]]) -> dict[int, dict[str, Any]]:
    """Completed epoch (1-based) -> its `epoch_end` row; a resumed epoch keeps its last row.

    The first epoch_end row of a run always closes epoch 1, so any constant offset in the logged
    `epoch` field (older loops logged the next epoch's number) is removed from that anchor.
    """
    ends = [r for r in metrics if r.get("epoch_end") and isinstance(r.get("epoch"), (int, float))]
    if not ends:
        return {}
    offset = int(ends[0]["epoch"]) - 1
    offset = offset if offset in (0, 1) else 0
    return {int(r["epoch"]) - offset: r for r in ends}


def finite(value: Any) -> float | None:
    """A float for JSON, None for missing / NaN / 'nan' strings (the logger writes non-finite as text)."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


@dataclass
class Slot:
    """One report row before scoring: which checkpoint, where it came from, or why it is missing."""

    epoch: int
    source: str  # "base", "teacher" or "run"
    checkpoint: str
    path: Path | None
    error: str | None = None


def collect_slots(run_dir: Path, recipe: Any, ends: dict[int, dict[str, Any]],
                   checkpoints: list[tuple[int, Path]]) -> list[Slot]:
    """Epoch 0 (base or teacher), every saved checkpoint, and rows for checkpoints the log says should exist."""
    slots: list[Slot] = []
    if recipe.base:
        try:
            slots.append(Slot(0, "base", str(recipe.base), resolve_checkpoint(str(recipe.base))))
        except M2DXError as exc:
            slots.append(Slot(0, "base", str(recipe.base), None, f"base checkpoint unavailable: {exc}"))
    else:
        teachers = ckpt_io.list_checkpoints(run_dir / "teacher")
        if teachers:
            slots.append(Slot(0, "teacher", str(teachers[0][1]), teachers[0][1]))
    found = {epoch for epoch, _ in checkpoints}
    for epoch, path in checkpoints:
        slots.append(Slot(epoch, "run", str(path), path))
    save_every = max(1, int(recipe.run.save_every))
    folder = checkpoints[0][1].parent if checkpoints else None
    for epoch in sorted(ends):
        expected = epoch % save_every == 0 or epoch >= int(recipe.optim.epochs)
        if expected and epoch not in found:
            where = folder / f"checkpoint-{epoch}.pth" if folder else Path(f"checkpoint-{epoch}.pth")
            slots.append(Slot(epoch, "run", str(where), None,
                               f"{where}: checkpoint missing (metrics.jsonl says epoch {epoch} was saved); "
                               "it was deleted or moved"))
    slots.sort(key=lambda s: (s.epoch, s.source != "base" and s.source != "teacher"))
    return slots


def run_norm_stats(checkpoints: list[tuple[int, Path]]) -> tuple[float, float] | None:
    """The normalisation statistics the run trained with (its newest readable checkpoint's metadata)."""
    for _, path in reversed(checkpoints):
        try:
            stats = ckpt_io.peek_checkpoint(path)[1].get("norm_stats")
        except M2DXError:
            continue
        if isinstance(stats, (list, tuple)) and len(stats) == 2:
            return float(stats[0]), float(stats[1])
    return None
