"""ICBHI 2017: cycle annotations and the official per-file split (docs/METHOD.md, "ICBHI protocol").

The official split is per recording, not per patient, so two patients (156, 218) sit on both sides;
it is kept as published (for comparable scores) and the overlap is reported as a warning.
"""

from __future__ import annotations

import math
import re
from typing import NamedTuple
from pathlib import Path

import pandas as pd

from ..audio import AUDIO_SUFFIXES
from ..errors import DataError
from .task_data import TaskData, check_leakage, finish_task, resolve_normal_class, segment_items

CLASSES = ["normal", "crackle", "wheeze", "both"]
SPLIT_FILE = "ICBHI_challenge_train_test.txt"
ANNOTATION_FOLDER = "ICBHI_final_database"
# patient_index_location_mode_device, e.g. 101_1b1_Al_sc_Meditron
_RECORDING_NAME = re.compile(r"^(\d+)_([^_]+)_([^_]+)_([^_]+)_([^_]+)$")
_COLUMNS = ["recording", "patient", "split", "start", "end", "crackle", "wheeze", "label", "audio_path"]


def annotation_dir(data: Path) -> Path:
    """The folder holding `<rec>.txt`: `DATA/ICBHI_final_database` or DATA itself."""
    data = Path(data).expanduser()
    if not data.is_dir():
        raise DataError(f"{data}: ICBHI folder not found; pass the folder that holds {ANNOTATION_FOLDER}/ and {SPLIT_FILE}")
    nested = data / ANNOTATION_FOLDER
    if nested.is_dir():
        return nested
    if any(_RECORDING_NAME.match(p.stem) for p in data.glob("*.txt")):
        return data
    raise DataError(
        f"{data}: no ICBHI annotations found (expected {ANNOTATION_FOLDER}/<recording>.txt); "
        "unzip ICBHI_final_database.zip from the ICBHI challenge site into this folder"
    )


def read_split_file(path: Path) -> dict[str, str]:
    """`<rec>\\t<train|test>` lines -> {rec: split}; CRLF and blank lines are fine."""
    out: dict[str, str] = {}
    for number, line in enumerate(path.read_text(encoding="utf-8-sig").splitlines(), start=1):
        fields = line.split()
        if not fields:
            continue
        if len(fields) != 2 or fields[1].lower() not in ("train", "test"):
            raise DataError(f"{path}: line {number} is {line.strip()!r}, expected '<recording> <train|test>'; restore the official file")
        out[fields[0]] = fields[1].lower()
    if not out:
        raise DataError(f"{path}: the split file is empty; restore the official {SPLIT_FILE}")
    return out


def read_annotation(path: Path) -> list[tuple[float, float, int, int]]:
    """`start end crackle wheeze` per line (tabs or spaces, maybe CRLF) -> list of tuples."""
    cycles = []
    for number, line in enumerate(path.read_text(encoding="utf-8-sig").splitlines(), start=1):
        fields = line.split()
        if not fields:
            continue
        try:
            if len(fields) != 4:
                raise ValueError
            start, end = float(fields[0]), float(fields[1])
            crackle, wheeze = int(fields[2]), int(fields[3])
            if crackle not in (0, 1) or wheeze not in (0, 1) or not end > start:
                raise ValueError
        except ValueError:
            raise DataError(
                f"{path}: line {number} is {line.strip()!r}, expected 'start end crackle(0/1) wheeze(0/1)' "
                "with end > start; fix or restore the annotation file"
            ) from None
        cycles.append((start, end, crackle, wheeze))
    return cycles


def _find_split_file(data: Path, ann_dir: Path) -> Path:
    for candidate in (data / SPLIT_FILE, ann_dir / SPLIT_FILE):
        if candidate.is_file():
            return candidate
    raise DataError(
        f"{data}: {SPLIT_FILE} not found; put the official split file from the ICBHI challenge site in this folder"
    )


def _match_split_names(recordings: list[str], split_map: dict[str, str]) -> tuple[dict[str, str], list[str], list[str]]:
    """Map each annotation name to a split-file name: exact first, then unique patient_index_location.

    Returns (mapping rec -> split-file name, notes, unmatched recordings).
    """
    mapping: dict[str, str] = {}
    notes: list[str] = []
    unmatched: list[str] = []
    exact = set(recordings)
    spare: dict[str, list[str]] = {}
    for name in split_map:
        if name not in exact:
            spare.setdefault("_".join(name.split("_")[:3]), []).append(name)
    for rec in recordings:
        if rec in split_map:
            mapping[rec] = rec
            continue
        options = spare.get("_".join(rec.split("_")[:3]), [])
        if len(options) == 1:
            mapping[rec] = options[0]
            notes.append(f"annotation {rec} matched split entry {options[0]} by patient_index_location")
        else:
            unmatched.append(rec)
    return mapping, notes, unmatched


def _audio_for(ann_dir: Path, rec: str) -> Path | None:
    for suffix in (".wav", ".flac", *[s for s in AUDIO_SUFFIXES if s not in (".wav", ".flac")]):
        candidate = ann_dir / f"{rec}{suffix}"
        if candidate.is_file():
            return candidate
    return None


def parse_icbhi(data: Path | str) -> pd.DataFrame:
    """Every annotated cycle (audio or not), one row each, in recording then time order.

    Columns: recording, patient, split, start, end, crackle, wheeze, label (crackle + 2*wheeze),
    audio_path (str, or None when the audio is absent). `df.attrs['notes']` holds name matches,
    `df.attrs['warnings']` recordings that could not be placed in the split.
    """
    data = Path(data).expanduser()
    ann_dir = annotation_dir(data)
    split_path = _find_split_file(data, ann_dir)
    split_map = read_split_file(split_path)
    ann_files = sorted(p for p in ann_dir.glob("*.txt") if _RECORDING_NAME.match(p.stem))
    if not ann_files:
        raise DataError(f"{ann_dir}: no <recording>.txt annotation files; unzip ICBHI_final_database.zip here")
    recordings = [p.stem for p in ann_files]
    mapping, notes, unmatched = _match_split_names(recordings, split_map)
    warnings = []
    if unmatched:
        shown = ", ".join(unmatched[:5]) + (f" and {len(unmatched) - 5} more" if len(unmatched) > 5 else "")
        warnings.append(f"{len(unmatched)} annotated recording(s) are not in {SPLIT_FILE} and were left out: {shown}")
    used = set(mapping.values())
    orphan = [n for n in split_map if n not in used]
    if orphan:
        notes.append(f"{len(orphan)} split-file entr(y/ies) have no annotation file (e.g. {orphan[0]})")
    rows = []
    for path in ann_files:
        rec = path.stem
        if rec not in mapping:
            continue
        audio = _audio_for(ann_dir, rec)
        patient = rec.split("_")[0]
        split = split_map[mapping[rec]]
        for start, end, crackle, wheeze in read_annotation(path):
            rows.append((rec, patient, split, start, end, crackle, wheeze, crackle + 2 * wheeze, None if audio is None else str(audio)))
    frame = pd.DataFrame(rows, columns=_COLUMNS)
    frame.attrs["notes"] = notes
    frame.attrs["warnings"] = warnings
    frame.attrs["split_file"] = str(split_path)
    return frame


class _SubjectSplit(NamedTuple):
    subject: str
    split: str


def load_icbhi(data: Path | str, *, normal_class: str | None = None, val_fraction: float = 0.15,
               seed: int = 0) -> TaskData:
    """Cycles with audio as `TaskData` (official train/test, subject-disjoint val carved from train).

    Recordings whose annotations exist but whose audio is absent are listed in `missing_audio`.
    The normal class is `normal` unless `normal_class` names another.
    """
    frame = parse_icbhi(data)
    with_audio = frame[frame["audio_path"].notna()]
    missing = sorted(frame.loc[frame["audio_path"].isna(), "recording"].unique().tolist())
    if with_audio.empty:
        raise DataError(
            f"{data}: none of the {frame['recording'].nunique()} annotated recordings has audio "
            "(<recording>.wav or .flac next to the .txt); unzip the full ICBHI_final_database.zip"
        )
    items = segment_items(with_audio, frame.groupby("recording").cumcount(), "patient")
    warnings = list(frame.attrs.get("warnings", []))
    if missing:
        warnings.append(f"audio missing for {len(missing)} of {frame['recording'].nunique()} annotated recordings; their cycles are not used")
    # The published overlap (patients 156, 218) is reported even when the audio subset misses it.
    pairs = frame[["patient", "split"]].drop_duplicates()
    official = [_SubjectSplit(str(p), str(s)) for p, s in pairs.itertuples(index=False)]
    warnings.extend(f"all annotations: {w}" for w in check_leakage(official, official=True))
    td = finish_task("icbhi", CLASSES, items, official=True, source=str(data), val_fraction=val_fraction, seed=seed,
                     notes=list(frame.attrs.get("notes", [])), warnings=warnings, missing_audio=missing,
                     all_cycles=frame, leakage_prefix="cycles with audio: ")
    if normal_class is not None:
        td.normal_class = resolve_normal_class(td.classes, normal_class, "normal", "icbhi")
    return td


# ---------------------------------------------------------------------------- what a recording name and the demographic file say
DEMOGRAPHIC_FILE = "demographic_info.txt"
DEVICES = {"Meditron": "Meditron", "Litt3200": "Littmann 3200", "LittC2SE": "Littmann Classic II SE",
           "AKGC417L": "AKG C417L"}
LOCATIONS = {"Tc": "trachea", "Al": "anterior left", "Ar": "anterior right", "Pl": "posterior left",
             "Pr": "posterior right", "Ll": "lateral left", "Lr": "lateral right"}
AGE_BANDS = ((18.0, "<18"), (65.0, "18-64"), (math.inf, "65+"))


def recording_fields(name: str) -> dict[str, str] | None:
    """Patient, chest location and device of an ICBHI recording name (file name or stem); None for other names."""
    match = _RECORDING_NAME.match(Path(name).stem)
    if match is None:
        return None
    patient, _, location, mode, device = match.groups()
    return {"patient": patient, "chest_location": LOCATIONS.get(location, location), "mode": mode,
            "device": DEVICES.get(device, device)}


def age_band(age: float | None) -> str | None:
    """The age band of an age in years (children, adults, 65 and over); None when unknown."""
    if age is None or not math.isfinite(age):
        return None
    return next(band for limit, band in AGE_BANDS if age < limit)


def read_demographics(path: Path) -> dict[str, dict[str, float | str | None]]:
    """`patient age sex adultBMI childWeight childHeight` per line ('NA' = unknown) -> {patient: {age, sex}}."""
    out: dict[str, dict[str, float | str | None]] = {}
    for number, line in enumerate(Path(path).read_text(encoding="utf-8-sig").splitlines(), start=1):
        fields = line.split()
        if not fields:
            continue
        if len(fields) < 3:
            raise DataError(f"{path}: line {number} is {line.strip()!r}, expected 'patient age sex ...'; "
                            f"restore the official {DEMOGRAPHIC_FILE}")
        try:
            age: float | None = float(fields[1])
        except ValueError:
            age = None
        sex = fields[2].upper() if fields[2].upper() in ("F", "M") else None
        out[fields[0]] = {"age": age, "sex": sex}
    return out


def find_demographics(audio: Path) -> Path | None:
    """The ICBHI demographic file in the audio's folder or up to two folders above it (the published layout)."""
    folder = Path(audio).resolve().parent
    for candidate in (folder, *list(folder.parents)[:2]):
        if (candidate / DEMOGRAPHIC_FILE).is_file():
            return candidate / DEMOGRAPHIC_FILE
    return None
