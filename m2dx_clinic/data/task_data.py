"""A loaded labelled task: classes, segments with their splits, subject-disjoint validation, leakage checks.

Every labelled task (ICBHI, SPRSound, a user's CSV) is turned into the same `TaskData` so that
fine-tuning, metrics and reports never need to know where the labels came from. The corpus loaders
(`icbhi`, `sprsound`, `csv_task`) end in `finish_task`; `tasks.load_task` picks the loader by name.
"""

from __future__ import annotations

from collections import Counter

import dataclasses
import hashlib
from dataclasses import dataclass, field
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.model_selection import GroupShuffleSplit

from ..errors import ConfigError, DataError
from .segments import SPLITS, Segment, write_manifest


@dataclass
class TaskData:
    """A loaded task: classes, items with their splits, and everything the user should be told."""

    name: str
    classes: list[str]
    normal_class: int
    items: list[Segment]
    missing_audio: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    official_split: bool = False
    notes: list[str] = field(default_factory=list)
    # Every annotated segment, audio or not (ICBHI): lets `inspect` report the published counts.
    all_cycles: pd.DataFrame | None = None
    # What was read, used and dropped, and why (recordings and events), when the loader counts it.
    accounting: dict | None = None
    # The name of the corpus's own score in `metrics.OFFICIAL_SCORES` (e.g. 'sprsound'), reported beside Se/Sp/Score.
    official_metric: str | None = None

    def split(self, name: str) -> list[Segment]:
        if name not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {name!r}")
        return [it for it in self.items if it.split == name]

    def subjects(self, split: str | None = None) -> list[str]:
        """Sorted subject ids in `split` (all splits when None)."""
        items = self.items if split is None else self.split(split)
        return sorted({it.subject for it in items})

    def counts(self) -> pd.DataFrame:
        """Items per class: one row per split present (train, val, test order), columns classes + total."""
        rows = {}
        for name in SPLITS:
            labels = [it.label for it in self.items if it.split == name]
            if not labels:
                continue
            per_class = np.bincount(labels, minlength=len(self.classes))[: len(self.classes)]
            rows[name] = [int(c) for c in per_class] + [len(labels)]
        frame = pd.DataFrame.from_dict(rows, orient="index", columns=[*self.classes, "total"])
        frame.index.name = "split"
        return frame

    def fingerprint(self, splits: dict[str, list[Segment]] | None = None) -> dict:
        """What a model saw: a sha256 of the items (path, range, class, subject, split), counts, subjects.

        Two runs with the same fingerprint were trained and scored on the same data; a classifier
        file carries it so a reader can tell which data it came from without the run folder.
        """
        chosen = splits if splits is not None else {name: self.split(name) for name in SPLITS}
        lines = sorted(f"{split}\t{Path(it.path).resolve()}\t{it.start}\t{it.end}\t{self.classes[it.label]}\t{it.subject}"
                       for split, items in chosen.items() for it in items)
        digest = hashlib.sha256("\n".join(lines).encode("utf-8")).hexdigest()
        counts = {split: {name: int(sum(1 for it in items if it.label == c)) for c, name in enumerate(self.classes)}
                  for split, items in chosen.items()}
        subjects = {split: len({it.subject for it in items}) for split, items in chosen.items()}
        return {"sha256": digest, "task": self.name, "counts": counts, "subjects": subjects,
                "items": {split: len(items) for split, items in chosen.items()}, "official_split": self.official_split}


def check_leakage(items: Sequence[Segment], official: bool, source: str = "") -> list[str]:
    """Subjects found in more than one split.

    Anything with `.subject` and `.split` works. A published split (official=True) is kept as is and the overlap is returned as a warning,
    because changing it would make results incomparable; anywhere else it raises DataError,
    since a subject on both sides inflates test scores.
    """
    splits_of: dict[str, set[str]] = {}
    for it in items:
        splits_of.setdefault(it.subject, set()).add(it.split)
    leaking = sorted((s for s, sp in splits_of.items() if len(sp) > 1), key=_natural_key)
    if not leaking:
        return []
    described = ", ".join(
        f"{s} ({'/'.join(x for x in SPLITS if x in splits_of[s])})" for s in leaking[:10]
    )
    more = f" and {len(leaking) - 10} more" if len(leaking) > 10 else ""
    if official:  # a warning travels into shipped files (the model card): counts, never subject ids
        pairs = Counter("/".join(x for x in SPLITS if x in splits_of[s]) for s in leaking)
        by_splits = ", ".join(f"{n} in {where}" for where, n in sorted(pairs.items()))
        return [
            f"the official split puts {len(leaking)} subject(s) in more than one split ({by_splits}); "
            "kept as published so scores stay comparable"
        ]
    prefix = f"{source}: " if source else ""
    raise DataError(
        f"{prefix}{len(leaking)} subject(s) appear in more than one split: {described}{more}; "
        "put all of a subject's recordings in one split (or drop the split column to split automatically)"
    )


def carve_validation(
    items: list[Segment], *, val_fraction: float = 0.15, seed: int = 0, source: str = ""
) -> tuple[list[Segment], list[str]]:
    """Move whole training subjects to a 'val' split (about `val_fraction` of training items).

    Subjects that are also in the test split stay in train, so the validation split shares no
    subject with either side. Among 20 seeded group shuffles the one whose item fraction is
    closest to `val_fraction` is kept (deterministic for a given seed). Returns (items, notes).
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ConfigError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if val_fraction == 0.0 or any(it.split == "val" for it in items):
        return list(items), []
    train_idx = [i for i, it in enumerate(items) if it.split == "train"]
    train_subjects = {items[i].subject for i in train_idx}
    prefix = f"{source}: " if source else ""
    if len(train_subjects) < 2:
        raise DataError(
            f"{prefix}the training split has {len(train_subjects)} subject(s); a subject-disjoint "
            "validation split needs at least 2 (add recordings from more subjects, or set val_fraction=0)"
        )
    test_subjects = {it.subject for it in items if it.split == "test"}
    candidates = [i for i in train_idx if items[i].subject not in test_subjects]
    groups = np.array([items[i].subject for i in candidates])
    unique = sorted(set(groups.tolist()), key=_natural_key)
    notes = []
    if len(unique) < len(train_subjects):
        notes.append(
            f"{len(train_subjects) - len(unique)} training subject(s) also in test kept out of validation"
        )
    if not unique:
        raise DataError(
            f"{prefix}every training subject is also in the test split, so no subject-disjoint "
            "validation split can be made; set val_fraction=0"
        )
    if len(unique) == 1:
        val_positions = set(candidates)
    else:
        splitter = GroupShuffleSplit(n_splits=20, test_size=val_fraction, random_state=seed)
        best: tuple[float, np.ndarray] | None = None
        target = val_fraction * len(train_idx)
        for _, val_part in splitter.split(groups, groups=groups):
            gap = abs(len(val_part) - target)
            if best is None or gap < best[0]:
                best = (gap, val_part)
        assert best is not None
        val_positions = {candidates[j] for j in best[1]}
    out = [dataclasses.replace(it, split="val") if i in val_positions else it for i, it in enumerate(items)]
    n_val_subjects = len({out[i].subject for i in val_positions})
    notes.append(
        f"validation carved from train: {len(val_positions)} of {len(train_idx)} items, "
        f"{n_val_subjects} subject(s), seed {seed}"
    )
    return out, notes


def segment_items(segments: pd.DataFrame, numbers: pd.Series, subject_column: str) -> list[Segment]:
    """Items from annotated segments that have audio (`recording, split, start, end, label, audio_path`).

    A row whose start and end are empty (None / NaN) is a whole recording (record-level tasks).

    `numbers` counts each segment within its recording over ALL annotations, audio or not, so an
    item id (`<recording>#<nnn>`) names the same segment whichever audio files are present.
    """
    return [
        Segment(
            path=Path(row.audio_path),
            start=_seconds(row.start),
            end=_seconds(row.end),
            label=int(row.label),
            subject=str(row[subject_column]),
            split=str(row.split),
            item_id=f"{row.recording}#{int(numbers[index]):03d}",
            recording=str(row.recording),
        )
        for index, row in segments.iterrows()
    ]


def _seconds(value: object) -> float | None:
    """A segment bound, None for a whole recording (None / NaN in the annotation table)."""
    return None if value is None or pd.isna(value) else float(value)


def finish_task(
    name: str,
    classes: list[str],
    items: list[Segment],
    *,
    official: bool,
    source: str,
    val_fraction: float,
    seed: int,
    notes: list[str],
    warnings: list[str],
    missing_audio: list[str] | None = None,
    all_cycles: pd.DataFrame | None = None,
    leakage_prefix: str = "",
) -> TaskData:
    """The last steps of every loader: carve validation, check leakage, build `TaskData` (normal class first).

    A user's own split (official=False) is refused when it leaks, before carving, so the leak and not
    a carving problem is what the user is told; a published split keeps its overlap as a warning.
    """
    if not official:
        check_leakage(items, official=False, source=source)
    subject_problems = subject_warnings(items)
    items, carve_notes = carve_validation(items, val_fraction=val_fraction, seed=seed, source=source)
    leaks = check_leakage(items, official=official, source=source)
    return TaskData(
        name=name,
        classes=list(classes),
        normal_class=0,
        items=items,
        missing_audio=list(missing_audio or []),
        warnings=[*warnings, *subject_problems, *(leakage_prefix + w for w in leaks)],
        official_split=official,
        notes=[*notes, *carve_notes],
        all_cycles=all_cycles,
    )


def subject_warnings(items: Sequence[Segment], *, share: float = 0.5, min_recordings: int = 10) -> list[str]:
    """Warnings when grouping by subject is impossible or degenerate in the training split.

    Recordings without a subject (''), or one subject holding more than `share` of at least
    `min_recordings` training recordings (e.g. anonymised names that all parse to the same id), make a
    subject-disjoint validation split meaningless: most of the data sits on one side.
    """
    recordings: dict[str, str] = {}
    for it in items:
        if it.split in ("train", "val"):
            recordings.setdefault(it.recording or str(it.path), str(it.subject or ""))
    if not recordings:
        return []
    per_subject: dict[str, int] = {}
    for subject in recordings.values():
        per_subject[subject] = per_subject.get(subject, 0) + 1
    out = []
    blank = per_subject.get("", 0)
    if blank:
        out.append(f"{blank} training recording(s) have no subject id and are grouped as one subject; "
                   "give each recording its patient (a subject column, or the corpus's naming rule)")
    top, count = max(per_subject.items(), key=lambda kv: kv[1])
    if len(recordings) >= min_recordings and count > share * len(recordings) and top != "":
        out.append(f"subject {top!r} holds {count} of {len(recordings)} training recordings; the subject-disjoint "
                   "validation split and the subject bootstrap are degenerate (check how subjects are named)")
    return out


def resolve_normal_class(classes: list[str], normal_class: str | None, default: str, source: str) -> int:
    """Index of the normal class; a name not in `classes` is a ConfigError listing the choices."""
    wanted = default if normal_class is None else normal_class
    for i, name in enumerate(classes):
        if name == wanted:
            return i
    for i, name in enumerate(classes):
        if name.lower() == wanted.lower():
            return i
    raise ConfigError(f"{source}: normal class {wanted!r} is not one of {', '.join(classes)}; pass --normal-class with one of them")


def _natural_key(text: str) -> tuple:
    """Sort '9' before '10' (subject ids are often numbers)."""
    return (0, int(text), "") if text.isdigit() else (1, 0, text)


def export_manifest(
    task_data: TaskData,
    out_csv: Path | str,
    *,
    splits: Sequence[str] = ("train", "val", "test"),
    recordings: bool = False,
) -> Path:
    """Write a task as a CSV manifest (`path,label,subject,split,start,end`) for `--task csv` or pre-training.

    The carved validation split is written back as `train` (loading the CSV carves it again, with
    the same seed). With `recordings=True` there is one row per audio file (no label, no segment):
    the input of `m2dx further-pretrain --data`, e.g. the training recordings only.
    """
    wanted = {"train" if s == "val" else s for s in splits}
    rows: list[Segment] = []
    seen: set[str] = set()
    for it in task_data.items:
        split = "train" if it.split == "val" else it.split
        if split not in wanted:
            continue
        if recordings:
            if str(it.path) in seen:
                continue
            seen.add(str(it.path))
            rows.append(Segment(path=it.path, subject=it.subject, split=split))
        else:
            rows.append(dataclasses.replace(it, split=split))
    if not rows:
        raise DataError(f"no items in split(s) {', '.join(sorted(wanted))} to export")
    columns = ("path", "subject", "split") if recordings else ("path", "label", "subject", "split", "start", "end")
    return write_manifest(rows, task_data.classes, out_csv, columns=columns)
