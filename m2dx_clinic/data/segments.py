"""A segment of a recording, the one CSV manifest format, and fitting a segment to a fixed length.

Everything the toolkit trains on, scores or classifies is a `Segment`: a whole audio file, or its
[start, end) seconds, with what is known about it (subject, split, class). Pre-training lists them
from a folder or a manifest, labelled tasks build them from their annotations, `m2dx predict`
from the files it is given. The manifest (`path,label,subject,split,start,end`, only `path`
required) is read and written here and nowhere else, so every command accepts the same CSV and
reports its problems the same way: one line naming the CSV, the line (the header is line 1) and
the fix.

Fixed-length segments are the ICBHI protocol (docs/METHOD.md, "Fine-tuning"): a cycle longer than
the length keeps its first seconds, a shorter one is repeated with short fades (or zero padded).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import pandas as pd
import torch

from ..audio import NO_AUDIO_FILES, list_audio_files, load_audio
from ..errors import ConfigError, DataError, one_line
from ..fileio import atomic_write_text

SPLITS = ("train", "val", "test")
MANIFEST_COLUMNS = ("path", "label", "subject", "split", "start", "end")
PAD_MODES = ("circular", "zero")
_EMPTY = {"", "nan", "none", "null", "na", "n/a"}
_LISTED = 5  # problems named in one message; the rest are counted


@dataclass(frozen=True)
class Segment:
    """One piece of audio: a whole file (start = end = None) or its [start, end) seconds.

    `label` is a class index into the list of whoever made the segment (a task's `classes`, a
    manifest's `classes`), None when unlabelled; `split` is train / val / test, or None outside a task.
    """

    path: Path
    start: float | None = None
    end: float | None = None
    label: int | None = None
    subject: str | None = None
    split: str | None = None
    item_id: str = ""  # stable name of the segment (`<recording>#<nnn>`), e.g. in predictions.csv
    recording: str = ""

    def __post_init__(self) -> None:
        if self.split is not None and self.split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {self.split!r}")

    @property
    def duration(self) -> float | None:
        """Segment length in seconds when both bounds are known (None for whole files)."""
        if self.start is None or self.end is None:
            return None
        return self.end - self.start

    def describe(self) -> str:
        """Path plus the segment range, for messages."""
        if self.start is None and self.end is None:
            return str(self.path)
        lo = "0" if self.start is None else f"{self.start:g}"
        hi = "end" if self.end is None else f"{self.end:g}"
        return f"{self.path} [{lo}-{hi} s]"


# ============================================================================ the manifest
@dataclass
class Manifest:
    """A read manifest: its segments (manifest order), the sorted label names and each row's CSV line."""

    path: Path
    segments: list[Segment]
    classes: list[str]
    lines: list[int]
    columns: list[str] = field(default_factory=list)


def line_of(row: int) -> int:
    """CSV line of data row `row` (0-based): the header is line 1."""
    return row + 2


def _missing(value: str) -> bool:
    return value.strip().lower() in _EMPTY


def _listing(items: Sequence[str]) -> str:
    shown = ", ".join(items[:_LISTED])
    return shown + (f" and {len(items) - _LISTED} more" if len(items) > _LISTED else "")


def _seconds(csv_path: Path, row: int, column: str, text: str) -> float | None:
    if _missing(text):
        return None
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value < 0:
        raise DataError(f"{csv_path}: line {line_of(row)}: {column}={text!r} is not a time in seconds >= 0; "
                        "fix the value or leave it empty")
    return value


def _read_table(csv_path: Path, required: Sequence[str]) -> pd.DataFrame:
    if not csv_path.is_file():
        raise DataError(f"{csv_path}: CSV not found; pass a CSV with columns {','.join(required)} "
                        "(optional " + ",".join(c for c in MANIFEST_COLUMNS if c not in required) + ")")
    try:
        table = pd.read_csv(csv_path, dtype=str, keep_default_na=False, skipinitialspace=True, encoding="utf-8-sig")
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise DataError(f"{csv_path}: cannot read as CSV ({one_line(exc)}); "
                        "save it as comma-separated UTF-8 with a header row") from None
    table.columns = [str(c).strip().lower() for c in table.columns]
    for column in required:
        if column not in table.columns:
            found = ", ".join(table.columns) or "none"
            raise DataError(f"{csv_path}: missing column {column!r} (found: {found}); "
                            f"the header row needs {','.join(required)}")
    if table.empty:
        raise DataError(f"{csv_path}: no data rows; add one row per audio file ({','.join(required)})")
    return table


def read_manifest(csv_path: str | Path, *, required: Sequence[str] = ("path",)) -> Manifest:
    """Read a manifest; every problem is a one-line DataError naming the CSV, the line and the fix.

    Relative paths are relative to the CSV's folder (a data set moves as a whole); all missing files
    are reported together. An empty `label` / `subject` / `split` cell means "not given" (None);
    a column in `required` must be filled on every row.
    """
    csv_path = Path(csv_path).expanduser()
    table = _read_table(csv_path, required)
    column = {name: [str(v).strip() for v in table[name]] if name in table.columns else None
              for name in MANIFEST_COLUMNS}
    base = csv_path.parent
    for name in required:
        for row, text in enumerate(column[name] or []):
            if _missing(text):
                what = {"path": "give the audio file of every row", "label": "give every row a class name",
                        "subject": "fill it in or drop the subject column"}.get(name, "fill it in")
                raise DataError(f"{csv_path}: line {line_of(row)}: empty {name}; {what}")
    paths: list[Path] = []
    missing: list[str] = []
    for row, text in enumerate(column["path"] or []):
        if not text:
            raise DataError(f"{csv_path}: line {line_of(row)}: empty path; give the audio file of every row")
        path = Path(text).expanduser()
        path = path if path.is_absolute() else base / path
        if not path.is_file():
            missing.append(f"{text} (line {line_of(row)})")
        paths.append(path)
    if missing:
        raise DataError(f"{csv_path}: {len(missing)} audio file(s) not found: {_listing(missing)}; "
                        f"fix the paths (relative paths are relative to {base})")
    labels = column["label"]
    classes = sorted({lab for lab in labels if not _missing(lab)}) if labels else []
    segments: list[Segment] = []
    for row, path in enumerate(paths):
        start = _seconds(csv_path, row, "start", column["start"][row]) if column["start"] else None
        end = _seconds(csv_path, row, "end", column["end"][row]) if column["end"] else None
        if end is not None and end <= (start or 0.0):
            raise DataError(f"{csv_path}: line {line_of(row)}: start {start or 0.0} >= end {end}; "
                            "the segment must have end > start")
        split = column["split"][row].lower() if column["split"] else ""
        if split and not _missing(split) and split not in SPLITS:
            raise DataError(f"{csv_path}: line {line_of(row)}: split {split!r} is not train/val/test; "
                            "fix it or drop the split column")
        label = labels[row] if labels else ""
        subject = column["subject"][row] if column["subject"] else ""
        text = column["path"][row]
        segments.append(Segment(
            path=path, start=start, end=end,
            label=None if _missing(label) else classes.index(label),
            subject=None if _missing(subject) else subject,
            split=None if _missing(split) else split,
            item_id=f"{Path(text).stem}#{line_of(row)}", recording=text,
        ))
    return Manifest(csv_path, segments, classes, [line_of(r) for r in range(len(paths))], list(table.columns))


def read_manifest_column(csv_path: str | Path, column: str) -> dict[int, str | None]:
    """One extra column of a manifest by CSV line (the line numbers `read_manifest` gives its rows); empty = None.

    A column the CSV lacks is one line naming the columns it has (e.g. `m2dx evaluate --subgroup`).
    """
    csv_path = Path(csv_path).expanduser()
    table = _read_table(csv_path, ("path",))
    name = column.strip().lower()
    if name not in table.columns:
        raise DataError(f"{csv_path}: no column {column!r} (found: {', '.join(table.columns)}); "
                        "name one of them, or add the column")
    return {line_of(row): None if _missing(str(v)) else str(v).strip() for row, v in enumerate(table[name])}


def write_manifest(segments: Sequence[Segment], classes: Sequence[str], out_csv: str | Path,
                   *, columns: Sequence[str] = MANIFEST_COLUMNS) -> Path:
    """Segments as a manifest CSV (absolute paths) with the given columns, written atomically."""
    rows = []
    for seg in segments:
        values = {"path": str(Path(seg.path).resolve()),
                  "label": classes[seg.label] if seg.label is not None else "",
                  "subject": seg.subject or "", "split": seg.split or "", "start": seg.start, "end": seg.end}
        rows.append({c: values[c] for c in columns})
    return atomic_write_text(out_csv, pd.DataFrame(rows, columns=list(columns)).to_csv(index=False))


def list_segments(source: str | Path) -> list[Segment]:
    """Segments from a folder (every audio file below it, sorted) or a manifest CSV."""
    source = Path(source).expanduser()
    if source.is_dir():
        files = list_audio_files(source)
        if not files:
            raise DataError(
                f"{source}: {NO_AUDIO_FILES}; put the recordings there or pass a CSV manifest with a 'path' column"
            )
        return [Segment(path=p) for p in files]
    if source.is_file():
        if source.suffix.lower() != ".csv":
            raise DataError(f"{source}: expected a folder of audio files or a .csv manifest; pass one of those")
        return read_manifest(source).segments
    raise DataError(f"{source}: not found; pass a folder of audio files or a CSV manifest with a 'path' column")


# ============================================================================ fixed-length segments
def fixed_length(
    wave: torch.Tensor,
    sr: int,
    *,
    length_s: float = 8.0,
    pad: str = "circular",
    fade_samples: int | None = None,
) -> torch.Tensor:
    """Make a segment exactly `round(length_s * sr)` samples long (the common ICBHI preparation).

    Longer segments keep their first `length_s` seconds. Shorter ones are padded:
    - 'zero': zeros appended after the segment.
    - 'circular': the segment is repeated back to back and the result cut to length. At every join,
      the last f samples of the earlier copy are multiplied by a linear fade-out
      (f-1)/f, (f-2)/f, ..., 0 and the first f samples of the next copy by the fade-in
      0, 1/f, ..., (f-1)/f, where f = fade_samples (default sr // 16), capped at half the segment
      length. The very start of the first copy and the final cut are not faded.
    A segment that already has the target length is returned unchanged.
    """
    if pad not in PAD_MODES:
        raise ConfigError(f"cycle padding must be 'circular' or 'zero', got {pad!r}")
    if wave.dim() != 1:
        raise ValueError(f"fixed_length expects a 1-D waveform, got shape {tuple(wave.shape)}")
    target = int(round(length_s * sr))
    n = wave.shape[0]
    if n == 0:
        raise ValueError("cannot pad an empty segment")
    if n >= target:
        return wave[:target].clone()
    if pad == "zero":
        return torch.cat([wave, wave.new_zeros(target - n)])
    f = sr // 16 if fade_samples is None else int(fade_samples)
    f = max(0, min(f, n // 2))
    copies = -(-target // n)  # ceil
    tiled = wave.repeat(copies)
    if f > 0:
        fade_in = torch.arange(f, dtype=wave.dtype, device=wave.device) / f
        fade_out = fade_in.flip(0)
        for k in range(1, copies):
            join = k * n
            tiled[join - f : join] *= fade_out
            tiled[join : join + f] *= fade_in
    return tiled[:target]


def load_fixed_length(segment: Segment, sample_rate: int = 16000, *, length_s: float = 8.0,
                      pad: str = "circular") -> torch.Tensor:
    """Read a segment at `sample_rate` and fit it to `length_s` seconds [samples]."""
    wave = load_audio(segment.path, sample_rate, start=segment.start, end=segment.end)
    return fixed_length(wave, sample_rate, length_s=length_s, pad=pad)
