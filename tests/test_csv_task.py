"""The user's own CSV task: paths, classes, normal class, splits, and one-line errors naming the line."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from m2dx_clinic.data.csv_task import load_csv_task
from m2dx_clinic.errors import ConfigError, DataError

from conftest import write_wav

TONE = (0.1 * np.sin(np.linspace(0, 200, 8000))).astype(np.float32)


def make_csv(root: Path, header: str, rows: list[str], *, audio: bool = True, name: str = "data.csv") -> Path:
    """Write the CSV and a wav for every path in the first column (unless audio=False)."""
    if audio:
        for row in rows:
            path = Path(row.split(",")[0])
            if not path.is_absolute():
                write_wav(root / path, TONE)
    csv = root / name
    csv.write_text("\n".join([header, *rows]) + "\n")
    return csv


def test_auto_split_is_subject_disjoint(tmp_path):
    rows = [f"audio/p{s}_{k}.wav,{'normal' if k else 'wheeze'},p{s}" for s in range(10) for k in range(2)]
    td = load_csv_task(make_csv(tmp_path, "path,label,subject", rows), val_fraction=0.15, seed=3)
    assert td.classes == ["normal", "wheeze"] and td.normal_class == 0
    counts = td.counts()
    assert counts.loc["test", "total"] == 4  # 20 % of 10 subjects x 2 files
    subjects = {s: set(td.subjects(s)) for s in ("train", "val", "test")}
    assert not (subjects["train"] & subjects["test"]) and not (subjects["val"] & (subjects["train"] | subjects["test"]))
    assert td.items[0].path == tmp_path / "audio" / "p0_0.wav"
    assert td.items[0].item_id == "p0_0#2"
    assert any("subject-disjoint train/test split" in n for n in td.notes)


def test_no_subject_column_warns_and_uses_files(tmp_path):
    rows = [f"f{i}.wav,{'normal' if i % 2 else 'crackle'}" for i in range(8)]
    td = load_csv_task(make_csv(tmp_path, "path,label", rows))
    assert any("no subject column" in w for w in td.warnings)
    assert len(td.subjects()) == 8


def test_split_column_segments_and_absolute_paths(tmp_path):
    absolute = tmp_path / "abs" / "x.wav"
    write_wav(absolute, TONE)
    rows = [
        "a.wav,Normal,s1,train,0,0.2",
        "a.wav,murmur,s1,train,0.2,0.4",
        "b.wav,murmur,s2,Train,,",
        "c.wav,Normal,s3,val,0.1,",
        f"{absolute},murmur,s4,test,,0.3",
    ]
    td = load_csv_task(make_csv(tmp_path, "path,label,subject,split,start,end", rows))
    assert td.classes == ["Normal", "murmur"]
    assert [it.split for it in td.items] == ["train", "train", "train", "val", "test"]  # val given: not carved
    assert (td.items[0].start, td.items[0].end) == (0.0, 0.2)
    assert (td.items[2].start, td.items[2].end) == (None, None)
    assert (td.items[3].start, td.items[3].end) == (0.1, None)
    assert td.items[4].path == absolute


def test_normal_class_option(tmp_path):
    rows = [f"f{i}.wav,{'healthy' if i % 2 else 'sick'},p{i}" for i in range(10)]
    csv = make_csv(tmp_path, "path,label,subject", rows)
    with pytest.raises(DataError, match=r"no label is called 'normal'; pass --normal-class NAME with one of: healthy, sick"):
        load_csv_task(csv)
    with pytest.raises(ConfigError, match="'normal' is not one of the labels"):
        load_csv_task(csv, normal_class="normal")
    td = load_csv_task(csv, normal_class="sick")
    assert td.classes == ["sick", "healthy"] and td.normal_class == 0
    assert [it.label for it in td.items[:2]] == [0, 1]
    with pytest.raises(DataError, match=r"line 2: unknown label 'sick'"):
        load_csv_task(csv, normal_class="healthy", classes=["healthy", "ill"])


@pytest.mark.parametrize(
    ("header", "rows", "pattern"),
    [
        ("path,subject", ["a.wav,s1"], r"missing column 'label' \(found: path, subject\)"),
        ("path,label,subject", ["a.wav,normal,s1", "b.wav,,s2"], r"line 3: empty label"),
        ("path,label,subject,split", ["a.wav,normal,s1,train", "b.wav,normal,s2,dev"], r"line 3: split 'dev' is not train/val/test"),
        ("path,label,subject,start,end", ["a.wav,normal,s1,1.0,0.5"], r"line 2: start 1.0 >= end 0.5"),
        ("path,label,subject,start,end", ["a.wav,normal,s1,x,"], r"line 2: start='x' is not a time"),
        (
            "path,label,subject,split",
            ["a.wav,normal,s1,train", "b.wav,normal,s2,train", "c.wav,crackle,s1,test"],
            r"1 subject\(s\) appear in more than one split: s1 \(train/test\)",
        ),
    ],
)
def test_errors_name_csv_line_and_fix(tmp_path, header, rows, pattern):
    csv = make_csv(tmp_path, header, rows)
    with pytest.raises(DataError, match=pattern) as err:
        load_csv_task(csv)
    message = str(err.value)
    assert message.startswith(str(csv)) and "\n" not in message


def test_missing_audio_lists_up_to_five(tmp_path):
    rows = [f"gone{i}.wav,normal,s{i}" for i in range(7)]
    csv = make_csv(tmp_path, "path,label,subject", rows, audio=False)
    with pytest.raises(DataError) as err:
        load_csv_task(csv)
    message = str(err.value)
    assert "7 audio file(s) not found" in message and "gone4.wav (line 6)" in message
    assert "gone5.wav" not in message and "and 2 more" in message
    assert f"relative to {tmp_path}" in message


def test_too_few_subjects(tmp_path):
    csv = make_csv(tmp_path, "path,label,subject", ["a.wav,normal,s1", "b.wav,crackle,s1"])
    with pytest.raises(DataError, match="at least 2"):
        load_csv_task(csv)
    with pytest.raises(DataError, match="CSV not found"):
        load_csv_task(tmp_path / "nope.csv")
