"""The checkpoints a pre-training run writes: published-layout training checkpoints, resume state, teacher.

All three are the published dict (`model`, `optimizer`, `epoch`, `scaler`, `args`) so the reference
tools read them, plus our metadata under `m2dx` (recipe, per-rank random state, norm stats, geometry),
made only of tensors and plain values so `weights_only=True` loads it.

A run folder holds `<published folder>/checkpoint-<epoch>.pth` every `run.save_every` epochs,
`state/last.pth` (the same layout) after the other epochs, and `teacher/<folder>/checkpoint-0.pth`
when the frozen teacher is the initial encoder of a from-scratch run.
"""

from __future__ import annotations

import argparse
from dataclasses import asdict
from pathlib import Path
from typing import Any

from ..config import to_dict
from ..fileio import atomic_torch_save
from ..models.m2d import M2D
from ..models.vit import AudioViT
from .loading import META_KEY, peek_checkpoint
from .names import checkpoint_folder_name, list_checkpoints

FORMAT_VERSION = 1
RESUME_STATE = Path("state") / "last.pth"


def to_namespace(values: dict[str, Any]) -> argparse.Namespace:
    """Flatten a recipe dict into an argparse.Namespace of plain values, as the published `args`."""
    flat: dict[str, Any] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}_{k}" if prefix else k, v)
        elif isinstance(value, (str, int, float, bool)) or value is None:
            flat[prefix] = value
        elif isinstance(value, (list, tuple)) and all(isinstance(v, (str, int, float, bool)) for v in value):
            flat[prefix] = list(value)
        else:
            flat[prefix] = str(value)

    walk("", values)
    return argparse.Namespace(**flat)


def training_checkpoint(
    model: M2D, *, epoch: int, optimizer: dict | None, scaler: dict | None, args: dict[str, Any],
    meta: dict[str, Any],
) -> dict[str, Any]:
    """The published training-checkpoint dict plus our metadata under `m2dx`."""
    meta = dict(meta)
    meta.setdefault("format_version", FORMAT_VERSION)
    meta["vit_config"] = to_dict(model.config)
    meta["predictor_config"] = asdict(model.predictor_config)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    return {"model": state, "optimizer": optimizer, "epoch": int(epoch), "scaler": scaler,
            "args": to_namespace(args), META_KEY: meta}


def save_teacher(teacher: AudioViT, run_dir: Path) -> Path:
    """The frozen initial encoder of a from-scratch M2D-X run, under RUN/teacher/, so a resume reuses it."""
    folder = checkpoint_folder_name(teacher.config, offline=False, tag="teacher")
    path = Path(run_dir) / "teacher" / folder / "checkpoint-0.pth"
    atomic_torch_save({"model": teacher.state_dict(), "epoch": 0, META_KEY: {"vit_config": to_dict(teacher.config)}},
                      path)
    return path


def latest_resume_point(run_dir: Path) -> Path | None:
    """The newest of `state/last.pth` and the published checkpoints, by epoch.

    Published files carry their epoch in the name; `last.pth` is only peeked at for its epoch
    (a ViT-B training checkpoint is ~2 GB; the resume reads it once, later).
    """
    published = list_checkpoints(run_dir)
    newest = published[-1] if published else None
    last = Path(run_dir) / RESUME_STATE
    if last.is_file():
        last_epoch = peek_checkpoint(last)[0] or 0
        if newest is None or last_epoch > newest[0]:
            return last
    return newest[1] if newest else None
