"""SPRSound loader on tiny synthetic JSON + wav files in the public folder layout."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from m2dx_clinic.data.inspection import inspect_task
from m2dx_clinic.data.sprsound import CLASSES, load_sprsound, parse_sprsound
from m2dx_clinic.data.tasks import load_task
from m2dx_clinic.errors import ConfigError, DataError

from conftest import write_wav

SR = 8000


def add_recording(root: Path, split_folder: str, name: str, events: list, *, sub: str = "", audio: bool = True) -> None:
    json_dir = root / f"{split_folder}_json" / (f"{sub}_{split_folder}_json" if sub else "")
    json_dir.mkdir(parents=True, exist_ok=True)
    record = {"record_annotation": "Normal", "event_annotation": [{"start": s, "end": e, "type": t} for s, e, t in events]}
    (json_dir / f"{name}.json").write_text(json.dumps(record))
    if audio:
        wav_dir = root / f"{split_folder}_wav" / (f"{sub}_{split_folder}_wav" if sub else "")
        write_wav(wav_dir / f"{name}.wav", np.full(2 * SR, 0.1, dtype=np.float32), SR)


def build_sprsound(root: Path, *, nested_test: bool = True) -> Path:
    for patient in range(6):
        add_recording(
            root, "train", f"{40 + patient}_{patient}_0_p1_1",
            [("0", "800", "Normal"), (900, 1500, "Fine Crackle"), ("1500", "1900", "Wheeze+Crackle")],
        )
    add_recording(root, "train", "49_1_0_p2_1", [("0", "500", "Stridor")], audio=False)
    inter, intra = ("inter", "intra") if nested_test else ("", "")
    add_recording(root, "test", "70_0_1_p1_1", [("0", "1000", "Rhonchi"), ("1000", "1500", "Coarse Crackle")], sub=inter)
    add_recording(root, "test", "40_3_0_p3_1", [("100", "900", "Wheeze")], sub=intra)  # patient 40 is also in train
    return root


def test_parse_events_and_classes(tmp_path):
    frame = parse_sprsound(build_sprsound(tmp_path), test_set="all")
    assert len(CLASSES) == 7 and CLASSES[0] == "Normal"
    train = frame[frame["split"] == "train"]
    assert len(train) == 19
    first = train.iloc[:3]
    assert first["start"].tolist() == [0.0, 0.9, 1.5] and first["end"].tolist() == [0.8, 1.5, 1.9]
    assert first["label"].tolist() == [0, 5, 6]
    assert first["subject"].iloc[0] == "40"
    test = frame[frame["split"] == "test"].sort_values("start")
    assert sorted(test["label"].tolist()) == [1, 2, 4]
    assert set(test["test_set"]) == {"inter", "intra"}


def test_inter_intra_all_and_leakage_warning(tmp_path):
    root = build_sprsound(tmp_path)
    inter = load_sprsound(root, test_set="inter", val_fraction=0.2)
    assert {it.recording for it in inter.split("test")} == {"70_0_1_p1_1"}
    assert not any("more than one split" in w for w in inter.warnings)
    assert inter.missing_audio == ["49_1_0_p2_1"]
    assert set(inter.subjects("val")).isdisjoint(inter.subjects("train"))
    intra = load_sprsound(root, test_set="intra")
    assert {it.recording for it in intra.split("test")} == {"40_3_0_p3_1"}
    assert any("40 (train/test)" in w for w in intra.warnings)  # intra-patient test shares patients by design
    assert "40" not in intra.subjects("val")
    everything = load_sprsound(root, test_set="all")
    assert len(everything.split("test")) == 3
    with pytest.raises(ConfigError):
        load_sprsound(root, test_set="both")


def test_flat_test_folder_and_load_task(tmp_path):
    root = build_sprsound(tmp_path, nested_test=False)
    td = load_task("sprsound", root, normal_class="normal")
    assert len(td.split("test")) == 3 and td.classes[td.normal_class] == "Normal"
    assert any("no inter/intra subfolders" in n for n in td.notes)
    info = inspect_task(td)
    json.dumps(info)
    assert info["sample_rates"] == {"8000": 8}


def test_unknown_type_warned_bad_json_and_missing_folder(tmp_path):
    root = build_sprsound(tmp_path)
    add_recording(root, "train", "46_0_0_p1_1", [("0", "500", "Squawk"), ("600", "600", "Normal")])
    frame = parse_sprsound(root)
    assert any("'Squawk' x1" in w for w in frame.attrs["warnings"])
    assert any("end <= start" in w for w in frame.attrs["warnings"])
    (root / "train_json" / "bad.json").write_text("{not json")
    with pytest.raises(DataError, match="bad.json"):
        parse_sprsound(root)
    with pytest.raises(DataError, match="train_json/ not found"):
        parse_sprsound(tmp_path / "elsewhere")
