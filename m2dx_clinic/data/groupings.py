"""The subgroups a labelled data set allows: which device, chest location, sex, age band or manifest column
each segment belongs to.

A classifier that is good on average can fail on one stethoscope or one patient group (docs/METHOD.md,
"Subgroups"). The groupings come from what the data already says:
- `device` and `chest_location`: the fields of ICBHI recording names (`data.icbhi.recording_fields`);
- `sex` and `age_band`: the ICBHI demographic file, found beside the recordings;
- any manifest column the user names (`m2dx evaluate --subgroup COLUMN`).
A grouping is kept only when it is known for at least one segment; unknown values stay None.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from .icbhi import age_band, find_demographics, read_demographics, recording_fields
from .segments import Segment, read_manifest_column

GroupValues = list[str | None]  # one value per segment, None = not known


def _recording_name(item: Segment) -> str:
    return Path(item.recording).name if item.recording else Path(item.path).name


def icbhi_groupings(items: Sequence[Segment]) -> dict[str, GroupValues]:
    """device, chest_location (from names) and sex, age_band (demographic file) of ICBHI-named segments."""
    fields = [recording_fields(_recording_name(it)) or recording_fields(Path(it.path).name) for it in items]
    out: dict[str, GroupValues] = {}
    if any(fields):
        out["device"] = [f["device"] if f else None for f in fields]
        out["chest_location"] = [f["chest_location"] if f else None for f in fields]
    files = {p for it, f in zip(items, fields) if f and (p := find_demographics(Path(it.path))) is not None}
    if files:
        people: dict[str, dict] = {}
        for path in sorted(files):
            people.update(read_demographics(path))
        facts = [people.get(f["patient"]) if f else None for f in fields]
        out["sex"] = [{"F": "female", "M": "male"}.get(str(p["sex"])) if p else None for p in facts]
        out["age_band"] = [age_band(p["age"]) if p else None for p in facts]  # type: ignore[arg-type]
    return {name: values for name, values in out.items() if any(v is not None for v in values)}


def manifest_groupings(items: Sequence[Segment], csv_path: Path, columns: Sequence[str]) -> dict[str, GroupValues]:
    """Each named manifest column, per segment (segments carry their CSV line in `item_id`, `<stem>#<line>`)."""
    out: dict[str, GroupValues] = {}
    for column in columns:
        by_line = read_manifest_column(csv_path, column)
        out[column.strip().lower()] = [by_line.get(int(it.item_id.rsplit("#", 1)[1])) for it in items]
    return out


def item_groupings(items: Sequence[Segment], *, manifest: Path | None = None,
                   columns: Sequence[str] = ()) -> dict[str, GroupValues]:
    """Every grouping the data has, by name, one value per item: the ICBHI ones, then the manifest columns asked for."""
    return {**icbhi_groupings(items), **(manifest_groupings(items, manifest, columns) if manifest and columns else {})}
