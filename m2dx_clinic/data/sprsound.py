"""SPRSound (paediatric respiratory sounds, SJTU): per-recording JSON annotations, event and record levels.

Layouts (docs/METHOD.md, "SPRSound"), found from `--data` pointing at any of:
- the repository root, holding `BioCAS2022/`, `BioCAS2023/`, ... (each year's folder holds
  `train<year>_wav/`, `train<year>_json/` and/or `test<year>_wav/`, `test<year>_json/`; the 2022 test
  JSON folder has `inter_test_json/` and `intra_test_json/`);
- one year's folder (`BioCAS2023/`); a year without a training set takes the training recordings of
  the other years beside it, and says so;
- the older flat layout `train_wav/`, `train_json/`, `test_wav/`, `test_json/`.

Each test set is named `<year>-inter`, `<year>-intra` or `<year>` (flat: `inter`, `intra`, `test`) and
chosen with `test_set`: `inter` (the paper's; default), `intra`, `all`, a year or a name.

Tasks (challenge numbering): `sprsound` = 1-2 (7 event classes), `sprsound-1-1` (events Normal /
Adventitious), `sprsound-2-1` (records Normal / Adventitious / Poor Quality) and `sprsound-2-2`
(records Normal / CAS / DAS / CAS & DAS / Poor Quality). Every recording and event that is read is
accounted for (`TaskData.accounting`): used, or dropped with its reason.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from ..audio import AUDIO_SUFFIXES, audio_info
from ..errors import AudioError, ConfigError, DataError
from .task_data import TaskData, finish_task, resolve_normal_class, segment_items

CLASSES = ["Normal", "Rhonchi", "Wheeze", "Stridor", "Coarse Crackle", "Fine Crackle", "Wheeze+Crackle"]
BINARY_CLASSES = ["Normal", "Adventitious"]
RECORD_CLASSES = ["Normal", "CAS", "DAS", "CAS & DAS", "Poor Quality"]
TERNARY_CLASSES = ["Normal", "Adventitious", "Poor Quality"]
# task name -> (level, classes); the event labels of 1-1 and the record labels of 2-1 are merged from 1-2 / 2-2
LEVELS = {
    "sprsound": ("event", CLASSES),
    "sprsound-1-1": ("event", BINARY_CLASSES),
    "sprsound-2-1": ("record", TERNARY_CLASSES),
    "sprsound-2-2": ("record", RECORD_CLASSES),
}
POOR_QUALITY = "Poor Quality"
_LISTED = 5  # examples named per drop reason
_COLUMNS = ["recording", "subject", "split", "test_set", "start", "end", "label", "json_path", "audio_path"]
_YEAR_DIR = re.compile(r"^biocas(\d{4})$", re.IGNORECASE)
_SPLIT_DIR = re.compile(r"^(train|test)(\d{4})?_(json|wav)$", re.IGNORECASE)
_NAME = re.compile(r"^([^_]+)_[^_]+_[^_]+_p\d+_[^_]+$", re.IGNORECASE)  # patient_age_gender_location_number


def _normalise(name: str) -> str:
    """Compare labels loosely: case, spaces and '&' vs '+' vary between releases."""
    return name.lower().replace("&", "+").replace(" ", "").replace("_", "")


_EVENT_INDEX = {_normalise(c): i for i, c in enumerate(CLASSES)}
_RECORD_INDEX = {_normalise(c): i for i, c in enumerate(RECORD_CLASSES)}


def _milliseconds(value: object) -> float:
    return float(str(value).strip()) / 1000.0


def subject_of(stem: str) -> str:
    """The patient number of a published file name (`patient_age_gender_location_number`), else ''."""
    match = _NAME.match(stem)
    return match.group(1) if match else ""


# ---------------------------------------------------------------------------- the layout
@dataclass(frozen=True)
class Source:
    """One folder of annotations and its audio: the training set or a named test set."""

    split: str  # train | test
    name: str  # test set name ('' for train)
    json_dir: Path
    wav_dir: Path
    subset: str = ""  # inter / intra subfolder of a test JSON folder, '' for all of it


def _subsets(json_dir: Path) -> list[str]:
    found = []
    for child in sorted(p for p in json_dir.iterdir() if p.is_dir()):
        low = child.name.lower()
        if "inter" in low and "inter" not in found:
            found.append("inter")
        elif "intra" in low and "intra" not in found:
            found.append("intra")
    return found


def _folder_sources(folder: Path, year: str) -> list[Source]:
    """Sources of one folder holding `<split>[<year>]_json` / `_wav` folders."""
    dirs: dict[tuple[str, str], Path] = {}
    for child in sorted(p for p in folder.iterdir() if p.is_dir()):
        match = _SPLIT_DIR.match(child.name)
        if match and (match.group(2) or "") == year:
            dirs[(match.group(1).lower(), match.group(3).lower())] = child
    out = []
    for split in ("train", "test"):
        json_dir = dirs.get((split, "json"))
        if json_dir is None:
            continue
        wav_dir = dirs.get((split, "wav"), folder / f"{split}{year}_wav")
        if split == "train":
            out.append(Source("train", "", json_dir, wav_dir))
            continue
        subsets = _subsets(json_dir)
        prefix = f"{year}-" if year else ""
        if subsets:
            out += [Source("test", f"{prefix}{s}", json_dir, wav_dir, s) for s in subsets]
        else:
            out.append(Source("test", year or "test", json_dir, wav_dir))
    return out


def _year_folders(folder: Path) -> list[tuple[str, Path]]:
    return [(m.group(1), p) for p in sorted(folder.iterdir()) if p.is_dir() and (m := _YEAR_DIR.match(p.name))]


def find_sources(data: Path) -> tuple[list[Source], list[str]]:
    """The training and test sources under `data` (root, one year's folder or the flat layout) and notes."""
    if not data.is_dir():
        raise DataError(f"{data}: not a folder; pass the SPRSound repository folder (github "
                        "SJTU-YONGFU-RESEARCH-GRP/SPRSound) or one of its BioCAS<year>/ folders")
    notes: list[str] = []
    sources = _folder_sources(data, "")  # the flat layout
    if not sources:
        own = _YEAR_DIR.match(data.name)
        if own:  # one year's folder
            sources = _folder_sources(data, own.group(1))
            if not any(s.split == "train" for s in sources) and data.parent.is_dir():
                for year, folder in _year_folders(data.parent):
                    train = [s for s in _folder_sources(folder, year) if s.split == "train"]
                    if train and folder != data:
                        notes.append(f"{data.name} has no training set; training recordings from {folder.name}/")
                        sources = train + sources
        else:  # the repository root
            for year, folder in _year_folders(data):
                sources += _folder_sources(folder, year)
    if not any(s.split == "train" for s in sources):
        raise DataError(
            f"{data}: no SPRSound training annotations found (BioCAS2022/train2022_json/ or train_json/); pass the "
            "repository folder of github SJTU-YONGFU-RESEARCH-GRP/SPRSound, one of its BioCAS<year>/ folders, or a "
            "folder holding train_wav/, train_json/, test_wav/, test_json/")
    return sources, notes


def choose_tests(sources: list[Source], test_set: str) -> tuple[list[Source], list[str]]:
    """The test sources `test_set` names (inter, intra, all, a year or a full name) and notes."""
    tests = [s for s in sources if s.split == "test"]
    if not tests:
        return [], ["no test annotations found (test<year>_json/ or test_json/); only the training split is loaded"]
    wanted = test_set.strip().lower()
    if wanted == "all":
        chosen = tests
    elif wanted in ("inter", "intra"):
        chosen = [s for s in tests if s.subset == wanted]
        if not chosen and not any(s.subset for s in tests):
            return tests, [f"the test annotations have no inter/intra subfolders; all {len(tests)} test set(s) used "
                           f"({', '.join(s.name for s in tests)})"]
    else:
        chosen = [s for s in tests if s.name.lower() == wanted or s.name.lower().split("-")[0] == wanted]
    names = ", ".join(s.name for s in tests)
    if not chosen:
        raise ConfigError(f"SPRSound test set {test_set!r} not found; use inter, intra, all or one of: {names} "
                          "(--set data.test_set=...)")
    others = [s.name for s in tests if s not in chosen]
    notes = [f"test set(s) {', '.join(s.name for s in chosen)} used; also present: {', '.join(others)} "
             "(--set data.test_set=NAME or all)"] if others else []
    return chosen, notes


def _json_files(source: Source) -> list[Path]:
    if not source.json_dir.is_dir():
        return []
    files = sorted(source.json_dir.rglob("*.json"))
    if source.subset:
        files = [p for p in files if any(source.subset in part.lower()
                                         for part in p.relative_to(source.json_dir).parts[:-1])]
    return files


def _audio_index(folder: Path) -> dict[str, Path]:
    """stem -> audio path for every audio file under `folder` (recursive)."""
    if not folder.is_dir():
        return {}
    return {p.stem: p for p in sorted(folder.rglob("*")) if p.is_file() and p.suffix.lower() in AUDIO_SUFFIXES}


def read_record(path: Path) -> dict:
    """One annotation file as a dict; a damaged file is one DataError line naming it."""
    try:
        record = json.loads(path.read_text(encoding="utf-8-sig"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: not a SPRSound annotation ({exc.__class__.__name__}); re-download the file") from None
    if not isinstance(record, dict):
        raise DataError(f"{path}: not a SPRSound annotation (expected a JSON object); re-download the file")
    return record


def record_label(record: dict) -> str | None:
    """The record-level label (`record_annotation`; the repository README spells it `recording_annotation`)."""
    value = record.get("record_annotation", record.get("recording_annotation"))
    return None if value is None else str(value).strip()


def read_events(path: Path) -> list[tuple[float, float, str]]:
    """(start s, end s, type) of every event of an annotation file (times are strings in ms in the release)."""
    out = []
    for event in read_record(path).get("event_annotation") or []:
        try:
            out.append((_milliseconds(event["start"]), _milliseconds(event["end"]), str(event["type"])))
        except (KeyError, TypeError, ValueError):
            raise DataError(f"{path}: an event lacks a numeric start/end (ms) or a type: {event!r}; fix the file") from None
    return out


# ---------------------------------------------------------------------------- accounting
class Ledger:
    """What happened to every recording and event read: used, or dropped with a reason (with examples)."""

    def __init__(self) -> None:
        self.read = Counter()  # "recordings", "events"
        self.used = Counter()
        self.dropped: dict[str, Counter] = {"recordings": Counter(), "events": Counter()}
        self.examples: dict[str, list[str]] = {}
        self.clipped = 0
        self.missing: list[str] = []  # recordings without audio, all of them

    def drop(self, kind: str, reason: str, count: int = 1, example: str = "") -> None:
        self.dropped[kind][reason] += count
        if example and len(self.examples.setdefault(reason, [])) < _LISTED:
            self.examples[reason].append(example)

    def as_dict(self) -> dict:
        return {kind: {"read": int(self.read[kind]), "used": int(self.used[kind]),
                       "dropped": {r: int(n) for r, n in sorted(self.dropped[kind].items())}}
                for kind in ("recordings", "events")} | {"events_clipped_at_audio_end": self.clipped,
                                                          "examples": {r: list(v) for r, v in self.examples.items()},
                                                          "summary": self.lines()}

    def lines(self) -> list[str]:
        out = []
        for kind in ("recordings", "events"):
            dropped = self.dropped[kind]
            why = "; ".join(f"{n} {r}" for r, n in sorted(dropped.items()))
            out.append(f"{kind}: {self.read[kind]} read, {self.used[kind]} used, {sum(dropped.values())} dropped"
                       + (f" ({why})" if why else ""))
        return out


# ---------------------------------------------------------------------------- reading
def parse_sprsound(data: Path | str, *, test_set: str = "inter", level: str = "event") -> pd.DataFrame:
    """One row per usable event (level 'event') or recording (level 'record') of the train and chosen test sets.

    Columns: recording, subject, split, test_set, start, end (seconds; None for whole records), label
    (an index into CLASSES or RECORD_CLASSES), json_path, audio_path. `df.attrs` holds `warnings`,
    `notes` and `ledger` (a `Ledger`: what was read, used and dropped, and why).
    """
    if level not in ("event", "record"):
        raise ConfigError(f"SPRSound level must be 'event' or 'record', got {level!r}")
    data = Path(data).expanduser()
    sources, notes = find_sources(data)
    tests, test_notes = choose_tests(sources, test_set)
    notes += test_notes
    ledger = Ledger()
    unknown: Counter = Counter()
    rows: list[tuple] = []
    no_name = 0
    for source in [s for s in sources if s.split == "train"] + tests:
        files = _json_files(source)
        if not files:
            raise DataError(f"{source.json_dir}: no .json annotation files; check the SPRSound download")
        audio = _audio_index(source.wav_dir)
        for path in files:
            record = read_record(path)
            events = read_events(path)
            stem, label_text = path.stem, record_label(record)
            subject = subject_of(stem)
            no_name += subject == ""
            ledger.read["recordings"] += 1
            ledger.read["events"] += len(events)
            reason = _recording_problem(audio.get(stem), events, label_text, level)
            duration = None
            if reason is None:
                try:
                    duration = audio_info(audio[stem])[1]
                except AudioError as exc:
                    reason = "unreadable audio"
                    ledger.drop("recordings", reason, example=str(exc))
            else:
                ledger.drop("recordings", reason, example=stem)
                if reason == "no audio file":
                    ledger.missing.append(stem)
            if reason is not None:
                if events:
                    ledger.drop("events", f"recording dropped: {reason}", len(events))
                continue
            common = (stem, subject, source.split, source.name)
            wav = str(audio[stem])
            if level == "record":
                index = _RECORD_INDEX.get(_normalise(label_text or ""))
                if index is None:
                    unknown[f"record {label_text!r}"] += 1
                    ledger.drop("recordings", "unknown record label", example=f"{stem}: {label_text!r}")
                    if events:
                        ledger.drop("events", "recording dropped: unknown record label", len(events))
                    continue
                rows.append((*common, None, None, index, str(path), wav))
                ledger.used["recordings"] += 1
                ledger.used["events"] += len(events)
                continue
            used_here = 0
            for number, (start, end, kind) in enumerate(events):
                index = _EVENT_INDEX.get(_normalise(kind))
                if index is None:
                    unknown[kind] += 1
                    ledger.drop("events", "unknown event type", example=f"{stem}: {kind!r}")
                    continue
                if not end > start:
                    ledger.drop("events", "end <= start", example=f"{stem}: {start:g}-{end:g} s")
                    continue
                if start >= duration:
                    ledger.drop("events", "starts after the audio ends",
                                example=f"{stem}: event {number} starts at {start:g} s, the audio ends at {duration:.2f} s")
                    continue
                if end > duration:
                    ledger.clipped += 1
                    end = duration
                rows.append((*common, start, end, index, str(path), wav))
                used_here += 1
            ledger.used["events"] += used_here
            if used_here:
                ledger.used["recordings"] += 1
            else:
                ledger.drop("recordings", "no usable event", example=stem)
    warnings = _warnings(ledger, unknown, no_name)
    frame = pd.DataFrame(rows, columns=_COLUMNS)
    frame.attrs.update(warnings=warnings, notes=notes, ledger=ledger)
    return frame


def _recording_problem(wav: Path | None, events: list, label: str | None, level: str) -> str | None:
    """Why a whole recording cannot be used at this level (None: it can)."""
    if wav is None:
        return "no audio file"
    if level == "record":
        return "no record label" if label is None else None
    if not events:
        return "poor quality, no events" if label is not None and _normalise(label) == _normalise(POOR_QUALITY) \
            else "no events"
    return None


def _warnings(ledger: Ledger, unknown: Counter, no_name: int) -> list[str]:
    out = []
    if unknown:
        listed = ", ".join(f"{k!r} x{v}" for k, v in sorted(unknown.items()))
        out.append(f"skipped unknown labels: {listed} (events: {', '.join(CLASSES)}; records: "
                   f"{', '.join(RECORD_CLASSES)})")
    late = ledger.dropped["events"].get("starts after the audio ends", 0)
    if late:
        shown = "; ".join(ledger.examples.get("starts after the audio ends", []))
        out.append(f"{late} event(s) start after the end of their audio and are not used: {shown}")
    bad = ledger.dropped["events"].get("end <= start", 0)
    if bad:
        out.append(f"{bad} event(s) with end <= start are not used: {'; '.join(ledger.examples['end <= start'])}")
    if ledger.clipped:
        out.append(f"{ledger.clipped} event(s) end after their audio ends; clipped at the end of the audio")
    if no_name:
        out.append(f"{no_name} recording(s) have no patient number in their name (patient_age_gender_location_number),"
                   " so they share the subject '' and cannot be kept apart by patient")
    return out


def load_sprsound(
    data: Path | str, *, normal_class: str | None = None, test_set: str = "inter", val_fraction: float = 0.15,
    seed: int = 0, task: str = "sprsound",
) -> TaskData:
    """A SPRSound task (`LEVELS`) as `TaskData`: official train / chosen test sets, val carved by patient from train.

    The normal class is `Normal` unless `normal_class` names another.
    """
    if task not in LEVELS:
        raise ConfigError(f"unknown SPRSound task {task!r}; use one of {', '.join(LEVELS)}")
    level, classes = LEVELS[task]
    frame = parse_sprsound(data, test_set=test_set, level=level)
    ledger: Ledger = frame.attrs["ledger"]
    if frame.empty:
        raise DataError(f"{data}: no usable SPRSound {level}s found ({'; '.join(ledger.lines())}); "
                        "check the annotation and audio folders")
    frame = frame.copy()
    if classes is BINARY_CLASSES:
        frame["label"] = (frame["label"] != 0).astype(int)
    elif classes is TERNARY_CLASSES:
        frame["label"] = frame["label"].map(lambda c: 0 if c == 0 else 2 if c == 4 else 1)
    numbers = frame.groupby(["split", "recording"]).cumcount()
    items = segment_items(frame, numbers, "subject")
    missing = sorted(ledger.missing)
    td = finish_task(task, classes, items, official=True, source=str(data), val_fraction=val_fraction, seed=seed,
                     notes=[*frame.attrs["notes"], *ledger.lines()], warnings=list(frame.attrs["warnings"]),
                     missing_audio=missing)
    td.accounting = ledger.as_dict()
    td.official_metric = "sprsound"
    if normal_class is not None:
        td.normal_class = resolve_normal_class(td.classes, normal_class, "Normal", task)
    return td


# ---------------------------------------------------------------------------- predict's annotations
def find_annotation(audio: Path) -> Path | None:
    """The JSON annotation of an SPRSound recording: beside it, or in the `*_json` folder next to its `*_wav` folder."""
    beside = audio.with_suffix(".json")
    if beside.is_file():
        return beside
    for folder in [audio.parent, *audio.parents][:3]:
        match = _SPLIT_DIR.match(folder.name)
        if match and match.group(3).lower() == "wav":
            json_dir = folder.with_name(folder.name[: -len("wav")] + "json")
            if json_dir.is_dir():
                return next(iter(sorted(json_dir.rglob(f"{audio.stem}.json"))), None)
    return None


def annotation_ranges(path: Path) -> list[tuple[float, float]]:
    """The (start, end) seconds of every event of an annotation file, in time order."""
    return sorted((start, end) for start, end, _ in read_events(path) if end > start)
