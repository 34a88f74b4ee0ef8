"""The checkpoints a pre-training run writes: published-layout training checkpoints, resume state, teacher.

All three are the published dict (`model`, `optimizer`, `epoch`, `scaler`, `args`) so the reference
tools read them, plus our metadata under `m2dx` (recipe, per-rank random state, norm stats, geometry),
made only of tensors and plain values so `weights_only=True` loads it.

A run folder holds `<published folder>/checkpoint-<epoch>.pth` every `run.save_every` epochs,
`state/last.pth` (the same layout) at the first epoch end after each `run.resume_every_minutes`, and
`teacher/<folder>/checkpoint-0.pth` when the frozen teacher is the initial encoder of a from-scratch run.

The loop hands both to `BackgroundSaver`: the state is copied to host memory (pinned on a GPU) and a
thread writes it, so training never waits on the disk; a killed process leaves the last complete file.
"""

from __future__ import annotations

import argparse
import threading
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable

import torch

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
    meta: dict[str, Any], on_device: bool = False,
) -> dict[str, Any]:
    """The published training-checkpoint dict plus our metadata under `m2dx`.

    `on_device=True` leaves the weights where they are (live tensors, not copies), for
    `BackgroundSaver.submit` to copy without a blocking device-to-host transfer.
    """
    meta = dict(meta)
    meta.setdefault("format_version", FORMAT_VERSION)
    meta["vit_config"] = to_dict(model.config)
    meta["predictor_config"] = asdict(model.predictor_config)
    state = {k: v.detach() if on_device else v.detach().cpu() for k, v in model.state_dict().items()}
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


def host_snapshot(obj: Any) -> tuple[Any, torch.cuda.Event | None]:
    """A copy of `obj` (nested dicts, lists, tuples of tensors and plain values) whose tensors live in host memory.

    GPU tensors are copied into pinned host memory without blocking (`non_blocking=True` on the current
    stream: later kernels that change the weights are queued after the copies); the returned event marks
    the copies' completion, for the writer to wait on. CPU tensors are cloned, so the training thread can
    go on changing its own. Plain values are shared (they are not changed in place).
    """
    pending = False

    def copy(value: Any) -> Any:
        nonlocal pending
        if isinstance(value, torch.Tensor):
            if value.device.type == "cuda":
                pending = True
                host = torch.empty(value.shape, dtype=value.dtype, pin_memory=True)
                return host.copy_(value.detach(), non_blocking=True)
            return value.detach().clone()
        if isinstance(value, dict):
            return {k: copy(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)) and not hasattr(value, "_fields"):
            return type(value)(copy(v) for v in value)
        return value

    snapshot = copy(obj)
    done = None
    if pending:
        done = torch.cuda.Event()
        done.record()
    return snapshot, done


class BackgroundSaver:
    """Writes checkpoints from a thread so the training loop never waits on the disk.

    `submit` takes a host snapshot (`host_snapshot`: the only time the loop spends) and returns; a
    thread writes it with `atomic_torch_save`, so a process killed mid-write leaves the previous file
    whole (and a temporary file that the next run folder holder removes). One write at a time: a
    `submit` while the previous write is still running waits for it rather than skipping, because
    a skipped save could be the published checkpoint of a `save_every` epoch or the run's last one.
    With saves minutes apart the wait does not happen in practice. An error in the writer (disk full)
    is raised by the next `submit` or by `close`.
    """

    def __init__(self) -> None:
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self.last_complete: Path | None = None  # the newest file known to be whole on disk

    def submit(self, state: dict[str, Any], path: Path, after: Callable[[Path], None] | None = None) -> None:
        """Snapshot `state` now; write it to `path` in the background, then call `after(path)` there."""
        self.wait()
        snapshot, copied = host_snapshot(state)

        def write() -> None:
            try:
                if copied is not None:
                    copied.synchronize()  # only these copies, not the training work queued after them
                atomic_torch_save(snapshot, path)
                self.last_complete = path
                if after is not None:
                    after(path)
            except BaseException as error:  # handed to the training thread by wait()
                self._error = error

        self._thread = threading.Thread(target=write, name=f"m2dx-save-{Path(path).name}", daemon=False)
        self._thread.start()

    def wait(self) -> None:
        """Block until the write in flight (if any) is on disk; raise its error."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    close = wait
