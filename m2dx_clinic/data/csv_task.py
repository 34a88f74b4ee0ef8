"""A user's own labelled data: a manifest CSV with `path,label` and optional `subject,split,start,end`.

The CSV is read by `segments.read_manifest` (one line per problem, naming the CSV, the line and the
fix: this is the file users edit by hand). Here the task is made from it: the class list with the
normal class first, subjects (each file its own subject when the column is absent, with a warning)
and subject-disjoint splits: without a `split` column one is made (GroupShuffleSplit, 20 % test);
with one, overlap is an error.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
from sklearn.model_selection import GroupShuffleSplit

from ..errors import ConfigError, DataError
from .segments import read_manifest
from .task_data import TaskData, finish_task


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
    manifest = read_manifest(csv_path, required=("path", "label"))
    warnings: list[str] = []
    notes: list[str] = []
    names = [manifest.classes[seg.label] for seg in manifest.segments]  # every row has a label (required)
    if classes is not None:
        for line, name in zip(manifest.lines, names):
            if name not in classes:
                raise DataError(f"{csv_path}: line {line}: unknown label {name!r}; use one of {', '.join(classes)}")
    found = list(manifest.classes) if classes is None else list(classes)
    normal_name = _pick_normal(csv_path, found, normal_class)
    ordered = [normal_name] + [c for c in found if c != normal_name]
    index = {name: i for i, name in enumerate(ordered)}

    segments = manifest.segments
    if "subject" in manifest.columns:
        for line, seg in zip(manifest.lines, segments):
            if seg.subject is None:
                raise DataError(f"{csv_path}: line {line}: empty subject; fill it in or drop the subject column")
        subjects = [str(seg.subject) for seg in segments]
    else:
        subjects = [str(seg.path.resolve()) for seg in segments]
        warnings.append(
            f"{csv_path}: no subject column, so each file is its own subject; add subject ids so that a "
            "patient's recordings never land in both train and test"
        )

    if "split" in manifest.columns:
        splits = [seg.split or "" for seg in segments]
        for line, value in zip(manifest.lines, splits):
            if not value:
                raise DataError(f"{csv_path}: line {line}: split {value!r} is not train/val/test; "
                                "fix it or drop the split column")
        if "train" not in splits:
            raise DataError(f"{csv_path}: no row has split=train; mark the training rows")
        if "test" not in splits:
            warnings.append(f"{csv_path}: no row has split=test; test metrics will be empty")
    else:
        splits = _subject_split(csv_path, subjects, test_fraction, seed)
        notes.append(f"subject-disjoint train/test split made: test {test_fraction:.0%} of subjects, seed {seed}")

    items = [dataclasses.replace(seg, label=index[name], subject=subject, split=split)
             for seg, name, subject, split in zip(segments, names, subjects, splits)]
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
