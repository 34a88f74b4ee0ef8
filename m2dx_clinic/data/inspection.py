"""`inspect`: what a loaded task really contains, before anyone trains on it.

Reports recordings, subjects, items per class per split, segment durations, the sample rates of
the audio files, missing audio and notes, and (where the loader counts them) every recording and event
read, used and dropped with the reason, as a JSON-serialisable dict and as rich tables. For a
task with a full annotation table (ICBHI), the counts over ALL annotated cycles are reported too,
so they can be compared with the published figures even when only part of the audio is present.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pandas as pd
from rich.console import Console, Group
from rich.table import Table

from ..audio import audio_info
from ..errors import AudioError
from .segments import SPLITS
from .task_data import TaskData


def _durations(values: list[float]) -> dict[str, float | int]:
    if not values:
        return {"count": 0, "total": 0.0, "mean": None, "min": None, "max": None}
    return {
        "count": len(values),
        "total": round(float(sum(values)), 3),
        "mean": round(float(sum(values) / len(values)), 3),
        "min": round(float(min(values)), 3),
        "max": round(float(max(values)), 3),
    }


def _annotation_counts(frame: pd.DataFrame, classes: list[str]) -> dict:
    """Counts over every annotated segment (audio present or not), per split and in total."""
    subject_col = "patient" if "patient" in frame.columns else "subject"
    out: dict = {}
    present = [s for s in SPLITS if s in set(frame["split"])]
    for split in [*present, "total"]:
        part = frame if split == "total" else frame[frame["split"] == split]
        per_class = part["label"].value_counts()
        out[split] = {
            "recordings": int(part["recording"].nunique()),
            "subjects": int(part[subject_col].nunique()),
            "cycles": int(len(part)),
            **{name: int(per_class.get(i, 0)) for i, name in enumerate(classes)},
        }
    return out


def inspect_task(task_data: TaskData) -> dict:
    """A JSON-serialisable summary of `task_data` (reads audio headers only, never samples)."""
    td = task_data
    info_of: dict[Path, tuple[int, float] | str] = {}
    for item in td.items:
        if item.path not in info_of:
            try:
                info_of[item.path] = audio_info(item.path)
            except AudioError as exc:
                info_of[item.path] = str(exc)
    rates = Counter(v[0] for v in info_of.values() if isinstance(v, tuple))
    unreadable = sorted(v for v in info_of.values() if isinstance(v, str))

    per_split: dict[str, dict] = {}
    all_durations: list[float] = []
    for split in SPLITS:
        items = td.split(split)
        if not items:
            continue
        labels = Counter(it.label for it in items)
        durations = []
        for it in items:
            if it.duration is not None:
                durations.append(it.duration)
            else:
                header = info_of.get(it.path)
                if isinstance(header, tuple):
                    durations.append(header[1] - (it.start or 0.0))
        all_durations.extend(durations)
        per_split[split] = {
            "recordings": len({it.recording or str(it.path) for it in items}),
            "subjects": len({it.subject for it in items}),
            "items": len(items),
            "per_class": {name: int(labels.get(i, 0)) for i, name in enumerate(td.classes)},
            "durations_s": _durations(durations),
        }
    info = {
        "task": td.name,
        "classes": list(td.classes),
        "normal_class": td.classes[td.normal_class],
        "official_split": td.official_split,
        "recordings": len({it.recording or str(it.path) for it in td.items}),
        "subjects": len({it.subject for it in td.items}),
        "items": len(td.items),
        "splits": per_split,
        "durations_s": _durations(all_durations),
        "sample_rates": {str(rate): int(n) for rate, n in sorted(rates.items())},
        "unreadable_audio": unreadable,
        "missing_audio": list(td.missing_audio),
        "warnings": list(td.warnings),
        "notes": list(td.notes),
    }
    if td.accounting is not None:
        info["accounting"] = td.accounting
    if td.all_cycles is not None and not td.all_cycles.empty:
        info["all_annotations"] = _annotation_counts(td.all_cycles, td.classes)
    return info


def render_inspect(info: dict) -> Group:
    """Rich renderables for `inspect_task` output (print with `Console().print(...)`)."""
    classes = info["classes"]
    parts: list = []
    if "all_annotations" in info:
        table = Table(title=f"{info['task']}: all annotated segments (audio or not)")
        for column in ["split", "recordings", "subjects", "cycles", *classes]:
            table.add_column(column, justify="left" if column == "split" else "right")
        for split, row in info["all_annotations"].items():
            table.add_row(split, *[f"{row[c]:,}" for c in ["recordings", "subjects", "cycles", *classes]])
        parts.append(table)
    if "accounting" in info:
        table = Table(title=f"{info['task']}: every annotation file read")
        for column in ["", "read", "used", "dropped", "why"]:
            table.add_column(column, justify="left" if column in ("", "why") else "right")
        for kind in ("recordings", "events"):
            row = info["accounting"][kind]
            why = "; ".join(f"{n} {reason}" for reason, n in row["dropped"].items()) or "-"
            table.add_row(kind, str(row["read"]), str(row["used"]), str(sum(row["dropped"].values())), why)
        parts.append(table)
        for reason, shown in info["accounting"].get("examples", {}).items():
            parts.append(f"[yellow]{reason}:[/] {'; '.join(shown)}")
    table = Table(title=f"{info['task']}: items with audio (normal class: {info['normal_class']})")
    for column in ["split", "recordings", "subjects", "items", *classes, "mean s", "min s", "max s"]:
        table.add_column(column, justify="left" if column == "split" else "right")
    for split, row in info["splits"].items():
        d = row["durations_s"]
        table.add_row(
            split,
            str(row["recordings"]),
            str(row["subjects"]),
            str(row["items"]),
            *[str(row["per_class"][c]) for c in classes],
            *[("-" if d[k] is None else f"{d[k]:.2f}") for k in ("mean", "min", "max")],
        )
    parts.append(table)
    total = info["durations_s"]["total"]
    rates = ", ".join(f"{r} Hz x{n}" for r, n in info["sample_rates"].items()) or "none"
    lines = [f"audio: {total / 60:.1f} min in segments; sample rates: {rates}"]
    if info["missing_audio"]:
        shown = ", ".join(info["missing_audio"][:5])
        more = f" and {len(info['missing_audio']) - 5} more" if len(info["missing_audio"]) > 5 else ""
        lines.append(f"[yellow]audio missing for {len(info['missing_audio'])} recording(s):[/] {shown}{more}")
    for problem in info["unreadable_audio"]:
        lines.append(f"[red]unreadable:[/] {problem}")
    lines += [f"[yellow]warning:[/] {w}" for w in info["warnings"]]
    lines += [f"note: {n}" for n in info["notes"]]
    parts.extend(lines)
    return Group(*parts)


def print_inspect(info: dict, console: Console | None = None) -> None:
    """Print `render_inspect(info)` to `console` (stdout by default)."""
    if console is None:
        from ..progress import console
    console.print(render_inspect(info))
