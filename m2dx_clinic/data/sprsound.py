"""SPRSound (paediatric respiratory sounds): per-recording JSON event annotations, 7 event classes.

Layout: DIR/train_wav, DIR/train_json, DIR/test_wav, DIR/test_json; the test folders may hold
inter-patient and intra-patient subfolders (e.g. test_json/inter_test_json). The paper reports the
inter-patient test set; the intra-patient one shares patients with train by design, so its overlap
is reported as a warning rather than refused.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from ..audio import AUDIO_SUFFIXES
from ..errors import ConfigError, DataError
from .task_data import TaskData, finish_task, resolve_normal_class, segment_items

CLASSES = ["Normal", "Rhonchi", "Wheeze", "Stridor", "Coarse Crackle", "Fine Crackle", "Wheeze+Crackle"]
TEST_SETS = ("inter", "intra", "all")
_COLUMNS = ["recording", "subject", "split", "test_set", "start", "end", "label", "json_path", "audio_path"]


def _normalise(name: str) -> str:
    """Compare event types loosely: case, spaces and '&' vs '+' vary between releases."""
    return name.lower().replace("&", "+").replace(" ", "").replace("_", "")


_CLASS_INDEX = {_normalise(c): i for i, c in enumerate(CLASSES)}


def _milliseconds(value: object) -> float:
    return float(str(value).strip()) / 1000.0


def _test_subset(json_path: Path, test_root: Path) -> str:
    """'inter', 'intra' or '' from the first folder below test_json."""
    parts = json_path.relative_to(test_root).parts[:-1]
    for part in parts:
        low = part.lower()
        if "inter" in low:
            return "inter"
        if "intra" in low:
            return "intra"
    return ""


def _audio_index(folder: Path) -> dict[str, Path]:
    """stem -> audio path for every audio file under `folder` (recursive)."""
    if not folder.is_dir():
        return {}
    return {p.stem: p for p in sorted(folder.rglob("*")) if p.is_file() and p.suffix.lower() in AUDIO_SUFFIXES}


def parse_sprsound(data: Path | str, *, test_set: str = "inter") -> pd.DataFrame:
    """Every annotated event of the train and chosen test recordings, one row each.

    Columns: recording, subject, split, test_set, start, end (seconds), label (index into CLASSES),
    json_path, audio_path (None when absent). `df.attrs['warnings']` / `['notes']` tell what was skipped.
    """
    if test_set not in TEST_SETS:
        raise ConfigError(f"SPRSound test_set must be one of {', '.join(TEST_SETS)}, got {test_set!r}")
    data = Path(data).expanduser()
    train_json, test_json = data / "train_json", data / "test_json"
    if not train_json.is_dir():
        raise DataError(
            f"{data}: SPRSound folder train_json/ not found; pass the folder holding train_wav/, train_json/, "
            "test_wav/, test_json/ (github SJTU-YONGFU-RESEARCH-GRP/SPRSound)"
        )
    warnings: list[str] = []
    notes: list[str] = []
    rows: list[tuple] = []
    unknown: dict[str, int] = {}
    bad_times = 0
    sources = [("train", train_json, data / "train_wav")]
    if test_json.is_dir():
        sources.append(("test", test_json, data / "test_wav"))
    else:
        warnings.append(f"{data}: no test_json/ folder; only the training split is loaded")
    for split, json_root, wav_root in sources:
        audio = _audio_index(wav_root)
        files = sorted(json_root.rglob("*.json"))
        if not files:
            raise DataError(f"{json_root}: no .json annotation files; check the SPRSound download")
        subsets = {p: _test_subset(p, json_root) for p in files} if split == "test" else {}
        if split == "test" and test_set != "all":
            if any(subsets.values()):
                files = [p for p in files if subsets[p] == test_set]
                if not files:
                    raise DataError(f"{json_root}: no {test_set}-patient test files found; use test_set='all' or check the folders")
            else:
                notes.append(f"{json_root} has no inter/intra subfolders; all {len(files)} test files used")
        for path in files:
            try:
                record = json.loads(path.read_text(encoding="utf-8-sig"))
                events = record.get("event_annotation", []) or []
            except (json.JSONDecodeError, AttributeError, UnicodeDecodeError) as exc:
                raise DataError(f"{path}: not a SPRSound annotation ({exc.__class__.__name__}); re-download the file") from None
            stem = path.stem
            subject = stem.split("_")[0]
            wav = audio.get(stem)
            for event in events:
                try:
                    kind = str(event["type"])
                    start, end = _milliseconds(event["start"]), _milliseconds(event["end"])
                except (KeyError, TypeError, ValueError):
                    raise DataError(f"{path}: an event lacks a numeric start/end (ms) or a type: {event!r}; fix the file") from None
                label = _CLASS_INDEX.get(_normalise(kind))
                if label is None:
                    unknown[kind] = unknown.get(kind, 0) + 1
                    continue
                if not end > start:
                    bad_times += 1
                    continue
                rows.append((stem, subject, split, subsets.get(path, ""), start, end, label, str(path), None if wav is None else str(wav)))
    if unknown:
        listed = ", ".join(f"{k!r} x{v}" for k, v in sorted(unknown.items()))
        warnings.append(f"skipped events of unknown type: {listed} (known: {', '.join(CLASSES)})")
    if bad_times:
        warnings.append(f"skipped {bad_times} event(s) with end <= start")
    frame = pd.DataFrame(rows, columns=_COLUMNS)
    frame.attrs["warnings"] = warnings
    frame.attrs["notes"] = notes
    return frame


def load_sprsound(
    data: Path | str, *, normal_class: str | None = None, test_set: str = "inter", val_fraction: float = 0.15,
    seed: int = 0,
) -> TaskData:
    """Events with audio as `TaskData`: official train / test (`test_set`), val carved subject-disjointly from train.

    The normal class is `Normal` unless `normal_class` names another.
    """
    frame = parse_sprsound(data, test_set=test_set)
    if frame.empty:
        raise DataError(f"{data}: no usable SPRSound events found; check the train_json/ and test_json/ files")
    missing = sorted(frame.loc[frame["audio_path"].isna(), "recording"].unique().tolist())
    usable = frame[frame["audio_path"].notna()]
    if usable.empty:
        raise DataError(f"{data}: no .wav found for any annotated recording; put the audio in train_wav/ and test_wav/")
    items = segment_items(usable, frame.groupby(["split", "recording"]).cumcount(), "subject")
    warnings = list(frame.attrs.get("warnings", []))
    if missing:
        warnings.append(f"audio missing for {len(missing)} annotated recording(s); their events are not used")
    td = finish_task("sprsound", CLASSES, items, official=True, source=str(data), val_fraction=val_fraction,
                     seed=seed, notes=list(frame.attrs.get("notes", [])), warnings=warnings, missing_audio=missing,
                     all_cycles=frame)
    if normal_class is not None:
        td.normal_class = resolve_normal_class(td.classes, normal_class, "Normal", "sprsound")
    return td
