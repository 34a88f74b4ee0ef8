"""The one metric logger: every loop calls `log(metrics, step)`; JSONL on disk feeds reports, tuning and tests.

TensorBoard is written too when it is installed (optional; never required).
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.progress import (BarColumn, DownloadColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                           TimeRemainingColumn, TransferSpeedColumn)

from .fileio import atomic_write_text, to_jsonable

# Logs and CI capture stderr without a terminal; rich would then wrap every table at 80 columns.
console = Console(stderr=True, width=None if sys.stderr.isatty() else 160)


class MetricLogger:
    """Append-only JSONL (one dict per line, with `step` and wall time) plus optional TensorBoard.

    `keep_until_step`: a resumed run first drops the rows a killed process logged after the point
    it resumes from (atomically), so the log never holds the same steps twice.
    """

    def __init__(self, path: str | Path, tensorboard: bool = True, keep_until_step: int | None = None):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if keep_until_step is not None and self.path.is_file():
            rows = read_jsonl(self.path)
            kept = [r for r in rows if isinstance(r.get("step"), (int, float)) and r["step"] <= keep_until_step]
            if len(kept) != len(rows) or self.path.read_text(encoding="utf-8").count("\n") != len(rows):
                atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in kept))
        self._file = open(self.path, "a", encoding="utf-8")
        self._tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter  # needs the optional tensorboard package

                self._tb = SummaryWriter(str(self.path.parent / "tensorboard"))
            except Exception:
                self._tb = None

    def log(self, metrics: dict[str, Any], step: int) -> None:
        # NaN / Inf stay readable as "nan" / "inf" text, as the log has always written them
        row = {"step": int(step), "time": time.time(), **to_jsonable(metrics, nonfinite="text")}
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()
        if self._tb is not None:
            for key, value in row.items():
                if isinstance(value, (int, float)) and key not in ("step", "time"):
                    self._tb.add_scalar(key, value, step)

    def close(self) -> None:
        self._file.close()
        if self._tb is not None:
            self._tb.close()


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """All complete rows of a JSONL log (a torn last line from a killed run is ignored)."""
    rows = []
    path = Path(path)
    if not path.is_file():
        return rows
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def environment_facts() -> dict[str, Any]:
    """Versions and hardware, saved in each run so numbers can be traced to a machine."""
    facts: dict[str, Any] = {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "torch": torch.__version__,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.is_available(),
    }
    if torch.cuda.is_available():
        facts["gpu"] = torch.cuda.get_device_name(0)
    try:
        import torchaudio
        import timm

        facts["torchaudio"] = torchaudio.__version__
        facts["timm"] = timm.__version__
    except Exception:
        pass
    return facts


def make_progress(transient: bool = False, show: bool = True, transfer: bool = False) -> Progress:
    """The one progress bar: count, elapsed time and ETA plus a free-text status field (with
    `transfer=True`: bytes and speed, for downloads).

    With `show=False` (or M2DX_NO_PROGRESS=1) it is disabled: the same calls, no live display, so a
    report or probe running inside another command's live bar cannot clash with it.
    """
    if transfer:
        columns = (TextColumn("[bold]{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                   TimeRemainingColumn())
    else:
        columns = (TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                   TimeRemainingColumn(), TextColumn("{task.fields[status]}"))
    return Progress(
        *columns,
        console=console,
        transient=transient,
        disable=not show or os.environ.get("M2DX_NO_PROGRESS") == "1",
    )
