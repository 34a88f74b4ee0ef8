"""The labelled tasks the toolkit knows, by name: `load_task("icbhi" | "sprsound..." | "csv", data)`.

A task is an entry in `TASKS` (a name, what `--data` is, and its loader), so a new corpus is one
loader module plus one line here; the commands, the report and the tuner only ever call `load_task`.
`ANNOTATIONS` is the same for `m2dx predict`: each corpus that keeps annotation files beside its audio
registers how to find and read them, and `find_annotations` asks each in turn.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ..errors import ConfigError
from .csv_task import load_csv_task
from . import sprsound
from .icbhi import load_icbhi, read_annotation
from .sprsound import load_sprsound
from .task_data import TaskData


@dataclass(frozen=True)
class TaskOptions:
    """What a command may ask of any loader; each loader uses the options that apply to it."""

    normal_class: str | None = None
    val_fraction: float = 0.15
    seed: int = 0
    test_set: str = "inter"  # SPRSound's inter- / intra-patient test set


@dataclass(frozen=True)
class Task:
    name: str
    data: str  # what --data is, for help texts
    load: Callable[[Path, TaskOptions], TaskData]


TASKS: dict[str, Task] = {
    "icbhi": Task("icbhi", "the ICBHI 2017 folder (ICBHI_final_database/ + the official split file)",
                  lambda data, o: load_icbhi(data, normal_class=o.normal_class, val_fraction=o.val_fraction,
                                             seed=o.seed)),
    **{name: Task(name, "the SPRSound repository folder, one BioCAS<year>/ folder, or train_wav/, train_json/, "
                        "test_wav/, test_json/",
                  (lambda task: lambda data, o: load_sprsound(data, normal_class=o.normal_class, test_set=o.test_set,
                                                              val_fraction=o.val_fraction, seed=o.seed,
                                                              task=task))(name))
       for name in sprsound.LEVELS},
    "csv": Task("csv", "a CSV manifest path,label[,subject,split,start,end]",
                lambda data, o: load_csv_task(data, normal_class=o.normal_class, val_fraction=o.val_fraction,
                                              seed=o.seed)),
}


def load_task(
    task: str,
    data: Path | str,
    *,
    normal_class: str | None = None,
    val_fraction: float = 0.15,
    seed: int = 0,
    test_set: str = "inter",
) -> TaskData:
    """Load a task by name: 'icbhi' (a folder), 'sprsound[-1-1|-2-1|-2-2]' (a folder; `test_set`) or 'csv'."""
    entry = TASKS.get(task.strip().lower())
    if entry is None:
        raise ConfigError(f"unknown task {task!r}; use one of: {', '.join(TASKS)}")
    options = TaskOptions(normal_class=normal_class, val_fraction=val_fraction, seed=seed, test_set=test_set)
    return entry.load(Path(data).expanduser(), options)


# ---------------------------------------------------------------------------- annotations beside audio
@dataclass(frozen=True)
class AnnotationReader:
    """How one corpus keeps the segments of a recording: find its file, read its (start, end) seconds."""

    name: str
    find: Callable[[Path], Path | None]
    read: Callable[[Path], list[tuple[float, float]]]


def _icbhi_file(audio: Path) -> Path | None:
    path = audio.with_suffix(".txt")
    return path if path.is_file() else None


ANNOTATIONS: list[AnnotationReader] = [
    AnnotationReader("icbhi .txt", _icbhi_file, lambda p: [(s, e) for s, e, _, _ in read_annotation(p)]),
    AnnotationReader("sprsound .json", sprsound.find_annotation, sprsound.annotation_ranges),
]


def find_annotations(audio: Path) -> tuple[list[tuple[float, float]], Path] | None:
    """The annotated (start, end) seconds of `audio` and the file they came from, from the first reader that has one."""
    for reader in ANNOTATIONS:
        path = reader.find(audio)
        if path is not None:
            return reader.read(path), path
    return None
