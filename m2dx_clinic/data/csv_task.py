"""A user's own labelled data: a CSV with `path,label` and optional `subject,split,start,end`.

Every problem is reported as one line naming the CSV, the line (the header is line 1) and the fix,
because this is the file users edit by hand. Splits must be subject-disjoint: without a `split`
column one is made (GroupShuffleSplit, 20 % test); with one, overlap is an error.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.model_selection import GroupShuffleSplit

from ..errors import ConfigError, DataError
from .tasks import SPLITS, LabelledItem, TaskData, finish_task

REQUIRED = ("path", "label")
OPTIONAL = ("subject", "split", "start", "end")
_EMPTY = {"", "nan", "none", "null", "na", "n/a"}


def _line(row: int) -> int:
    """CSV line of data row `row` (0-based): the header is line 1."""
    return row + 2


def _seconds(csv_path: Path, row: int, column: str, text: str) -> float | None:
    if text.strip().lower() in _EMPTY:
        return None
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value < 0:
        raise DataError(f"{csv_path}: line {_line(row)}: {column}={text!r} is not a time in seconds >= 0; fix the value or leave it empty")
    return value


def read_csv_table(csv_path: Path) -> pd.DataFrame:
    """The CSV as strings with normalised column names; DataError when unreadable or columns are missing."""
    if not csv_path.is_file():
        raise DataError(f"{csv_path}: CSV not found; pass a CSV with columns path,label (optional subject,split,start,end)")
    try:
        table = pd.read_csv(csv_path, dtype=str, keep_default_na=False, skipinitialspace=True)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        first = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else type(exc).__name__
        raise DataError(f"{csv_path}: cannot read as CSV ({first}); save it as comma-separated UTF-8 with a header row") from None
    table.columns = [str(c).strip().lower() for c in table.columns]
    for column in REQUIRED:
        if column not in table.columns:
            found = ", ".join(table.columns) or "none"
            raise DataError(f"{csv_path}: missing column {column!r} (found: {found}); the header row needs path,label")
    if table.empty:
        raise DataError(f"{csv_path}: no data rows; add one row per audio file (path,label)")
    return table


def load_csv_task(
    csv_path: Path | str,
    *,
    normal_class: str | None = None,
    classes: list[str] | None = None,
    val_fraction: float = 0.15,
    test_fraction: float = 0.2,
    seed: int = 0,
) -> TaskData:
    """Load a CSV task. Classes are the labels found (or `classes`, if given), with the normal class first."""
    csv_path = Path(csv_path).expanduser()
    table = read_csv_table(csv_path)
    base = csv_path.parent
    warnings: list[str] = []
    notes: list[str] = []

    labels = [str(v).strip() for v in table["label"]]
    for row, label in enumerate(labels):
        if label.lower() in _EMPTY:
            raise DataError(f"{csv_path}: line {_line(row)}: empty label; give every row a class name")
        if classes is not None and label not in classes:
            raise DataError(f"{csv_path}: line {_line(row)}: unknown label {label!r}; use one of {', '.join(classes)}")
    found = sorted(set(labels)) if classes is None else list(classes)
    normal_name = _pick_normal(csv_path, found, normal_class)
    ordered = [normal_name] + [c for c in found if c != normal_name]
    index = {name: i for i, name in enumerate(ordered)}

    paths: list[Path] = []
    missing: list[str] = []
    for row, text in enumerate(table["path"]):
        text = str(text).strip()
        if not text:
            raise DataError(f"{csv_path}: line {_line(row)}: empty path; give the audio file of every row")
        path = Path(text).expanduser()
        path = path if path.is_absolute() else base / path
        if not path.is_file():
            missing.append(f"{text} (line {_line(row)})")
        paths.append(path)
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise DataError(
            f"{csv_path}: {len(missing)} audio file(s) not found: {shown}; fix the paths (relative paths are relative to {base})"
        )

    starts: list[float | None] = [None] * len(table)
    ends: list[float | None] = [None] * len(table)
    for row in range(len(table)):
        if "start" in table.columns:
            starts[row] = _seconds(csv_path, row, "start", str(table["start"].iloc[row]))
        if "end" in table.columns:
            ends[row] = _seconds(csv_path, row, "end", str(table["end"].iloc[row]))
        lo, hi = starts[row], ends[row]
        if hi is not None and hi <= (lo or 0.0):
            raise DataError(f"{csv_path}: line {_line(row)}: start {lo or 0.0} >= end {hi}; the segment must have end > start")

    if "subject" in table.columns:
        subjects = [str(v).strip() for v in table["subject"]]
        for row, subject in enumerate(subjects):
            if subject.lower() in _EMPTY:
                raise DataError(f"{csv_path}: line {_line(row)}: empty subject; fill it in or drop the subject column")
    else:
        subjects = [str(p.resolve()) for p in paths]
        warnings.append(
            f"{csv_path}: no subject column, so each file is its own subject; add subject ids so that a "
            "patient's recordings never land in both train and test"
        )

    if "split" in table.columns:
        splits = [str(v).strip().lower() for v in table["split"]]
        for row, value in enumerate(splits):
            if value not in SPLITS:
                raise DataError(f"{csv_path}: line {_line(row)}: split {value!r} is not train/val/test; fix it or drop the split column")
        if "train" not in splits:
            raise DataError(f"{csv_path}: no row has split=train; mark the training rows")
        if "test" not in splits:
            warnings.append(f"{csv_path}: no row has split=test; test metrics will be empty")
    else:
        splits = _subject_split(csv_path, subjects, test_fraction, seed)
        notes.append(f"subject-disjoint train/test split made: test {test_fraction:.0%} of subjects, seed {seed}")

    items = [
        LabelledItem(
            item_id=f"{Path(str(table['path'].iloc[row]).strip()).stem}#{_line(row)}",
            path=paths[row],
            label=index[labels[row]],
            subject=subjects[row],
            split=splits[row],
            start=starts[row],
            end=ends[row],
            recording=str(table["path"].iloc[row]).strip(),
        )
        for row in range(len(table))
    ]
    return finish_task(csv_path.stem, ordered, items, official=False, source=str(csv_path), val_fraction=val_fraction,
                       seed=seed, notes=notes, warnings=warnings)


def _pick_normal(csv_path: Path, labels: list[str], normal_class: str | None) -> str:
    """The normal class: `normal_class` if given (must be a label), else a label called 'normal'."""
    if normal_class is not None:
        for label in labels:
            if label == normal_class:
                return label
        for label in labels:
            if label.lower() == normal_class.lower():
                return label
        raise ConfigError(f"{csv_path}: --normal-class {normal_class!r} is not one of the labels ({', '.join(labels)}); pick one of them")
    for label in labels:
        if label.lower() == "normal":
            return label
    raise DataError(f"{csv_path}: no label is called 'normal'; pass --normal-class NAME with one of: {', '.join(labels)}")


def _subject_split(csv_path: Path, subjects: list[str], test_fraction: float, seed: int) -> list[str]:
    """train/test by subject (GroupShuffleSplit, fixed seed)."""
    unique = set(subjects)
    if len(unique) < 2:
        raise DataError(
            f"{csv_path}: all rows belong to {len(unique)} subject; a subject-disjoint train/test split needs at least 2 "
            "(add recordings from more subjects, or add a split column)"
        )
    groups = np.asarray(subjects)
    splitter = GroupShuffleSplit(n_splits=1, test_size=test_fraction, random_state=seed)
    _, test_idx = next(splitter.split(groups, groups=groups))
    out = ["train"] * len(subjects)
    for i in test_idx:
        out[int(i)] = "test"
    return out
