"""The common task record: subject-disjoint validation carving, leakage checks, `load_task` dispatch."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from m2dx_clinic.data.segments import Segment
from m2dx_clinic.data.task_data import TaskData, carve_validation, check_leakage
from m2dx_clinic.data.tasks import load_task
from m2dx_clinic.errors import ConfigError, DataError


def make_items(train_subjects: int, per_subject: int = 4, test_subjects=("t1", "t2")) -> list[Segment]:
    items = []
    for s in range(train_subjects):
        for k in range(per_subject):
            items.append(Segment(Path(f"s{s}.wav"), label=k % 2, subject=f"s{s}", split="train", item_id=f"s{s}#{k}"))
    for s in test_subjects:
        items.append(Segment(Path(f"{s}.wav"), label=0, subject=s, split="test", item_id=f"{s}#0"))
    return items


def subjects_by_split(items):
    out: dict[str, set] = {}
    for it in items:
        out.setdefault(it.split, set()).add(it.subject)
    return out


def test_carve_validation_is_subject_disjoint_and_deterministic():
    items = make_items(20)
    carved, notes = carve_validation(items, val_fraction=0.15, seed=0)
    again, _ = carve_validation(items, val_fraction=0.15, seed=0)
    assert [it.split for it in carved] == [it.split for it in again]
    by = subjects_by_split(carved)
    assert by["val"] and not (by["val"] & by["train"]) and not (by["val"] & by["test"])
    n_val = sum(it.split == "val" for it in carved)
    assert n_val == 12  # 15 % of 80 items, whole subjects of 4 items
    assert check_leakage(carved, official=False) == []
    assert any("validation carved" in n for n in notes)


def test_carve_keeps_subjects_shared_with_test_in_train():
    items = make_items(6, test_subjects=("s0", "s1", "t1"))  # s0, s1 leak (as in an official split)
    for seed in range(5):
        carved, _ = carve_validation(items, val_fraction=0.5, seed=seed)
        by = subjects_by_split(carved)
        assert by["val"].isdisjoint({"s0", "s1"})
        assert by["val"].isdisjoint(by["test"]) and by["val"].isdisjoint(by["train"])


def test_carve_needs_two_training_subjects():
    with pytest.raises(DataError, match="at least 2"):
        carve_validation(make_items(1), val_fraction=0.15)
    unchanged, notes = carve_validation(make_items(1), val_fraction=0.0)
    assert all(it.split != "val" for it in unchanged) and notes == []
    with pytest.raises(ConfigError):
        carve_validation(make_items(3), val_fraction=1.0)


def test_existing_val_split_is_kept():
    items = make_items(3)
    items[0] = Segment(Path("x.wav"), label=0, subject="v", split="val", item_id="x")
    carved, _ = carve_validation(items, val_fraction=0.5)
    assert carved == items


def test_leakage_official_warns_other_errors():
    items = [
        Segment(Path("a.wav"), label=0, subject="156", split="train", item_id="a"),
        Segment(Path("b.wav"), label=0, subject="156", split="test", item_id="b"),
        Segment(Path("c.wav"), label=1, subject="218", split="train", item_id="c"),
        Segment(Path("d.wav"), label=1, subject="218", split="test", item_id="d"),
        Segment(Path("e.wav"), label=1, subject="101", split="test", item_id="e"),
    ]
    warnings = check_leakage(items, official=True)
    assert len(warnings) == 1 and "2 subject(s)" in warnings[0] and "2 in train/test" in warnings[0]
    assert "156" not in warnings[0] and "218" not in warnings[0]  # shipped in the model card: no subject ids
    with pytest.raises(DataError, match=r"my\.csv: 2 subject\(s\).*156.*218"):
        check_leakage(items, official=False, source="my.csv")
    assert check_leakage(items[4:], official=False) == []


def test_taskdata_helpers():
    items = make_items(2, per_subject=3)
    td = TaskData("toy", ["normal", "odd"], 0, items)
    counts = td.counts()
    assert list(counts.index) == ["train", "test"]
    assert list(counts.columns) == ["normal", "odd", "total"]
    assert counts.loc["train"].tolist() == [4, 2, 6]
    assert counts.loc["test"].tolist() == [2, 0, 2]
    assert td.subjects("train") == ["s0", "s1"]
    assert td.subjects() == ["s0", "s1", "t1", "t2"]
    assert len(td.split("test")) == 2
    with pytest.raises(ValueError):
        td.split("dev")
    with pytest.raises(ValueError):
        Segment(Path("x.wav"), label=0, subject="s", split="dev", item_id="x")


def test_load_task_dispatch_and_errors(tmp_path, wav_writer):
    with pytest.raises(ConfigError, match="unknown task"):
        load_task("esc50", tmp_path)
    wave = np.sin(np.linspace(0, 100, 1600)).astype(np.float32) * 0.1
    lines = ["path,label,subject"]
    for s in range(6):
        wav_writer(f"s{s}.wav", wave)
        lines.append(f"s{s}.wav,{'normal' if s % 2 else 'crackle'},p{s}")
    (tmp_path / "data.csv").write_text("\n".join(lines) + "\n")
    td = load_task("CSV", tmp_path / "data.csv", val_fraction=0.2, seed=1)
    assert td.classes == ["normal", "crackle"] and td.normal_class == 0
    assert not td.official_split
    assert check_leakage(td.items, official=False) == []
    with pytest.raises(DataError):
        load_task("icbhi", tmp_path / "nowhere")
