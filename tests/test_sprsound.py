"""SPRSound loader on tiny synthetic JSON + wav files in the public folder layout."""

from __future__ import annotations

import json
import shutil
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
    assert len(train) == 18  # the 19th event's recording has no audio: counted as dropped, not listed
    assert frame.attrs["ledger"].dropped["recordings"] == {"no audio file": 1}
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
    assert any("1 subject(s)" in w and "1 in train/test" in w for w in intra.warnings)  # intra-patient test shares patients by design
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
    with pytest.raises(DataError, match="elsewhere: not a folder"):
        parse_sprsound(tmp_path / "elsewhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no SPRSound training annotations found"):
        parse_sprsound(tmp_path / "empty")


# ---------------------------------------------------------------------------- the published layout
from sprsound_layout import EXPECTED_EVENTS, EXPECTED_RECORDS, SR as PUBLISHED_SR, build_published  # noqa: E402


@pytest.fixture(scope="module")
def published(tmp_path_factory) -> Path:
    return build_published(tmp_path_factory.mktemp("SPRSound"))


def _accounting_matches(accounting: dict, expected: dict) -> None:
    for kind in ("recordings", "events"):
        assert {k: accounting[kind][k] for k in ("read", "used", "dropped")} == expected[kind], kind
    assert accounting["events_clipped_at_audio_end"] == expected["clipped"]


def test_published_layout_from_the_root_counts_every_recording_and_event(published):
    td = load_task("sprsound", published, val_fraction=0.2)
    _accounting_matches(td.accounting, EXPECTED_EVENTS)
    used = len(td.items)
    assert used == EXPECTED_EVENTS["events"]["used"]
    assert {it.recording for it in td.split("test")} == {"42000001_3.0_0_p1_201", "42000002_4.0_1_p2_202"}
    late = [w for w in td.warnings if "start after the end of their audio" in w]
    assert len(late) == 1 and "41000006_1.2_1_p2_106: event 1 starts at 2.5 s, the audio ends at 2.00 s" in late[0]
    assert any("clipped" in w for w in td.warnings)
    clipped = [it for it in td.items if it.recording == "41000005_6.0_0_p1_105" and it.start == 1.2]
    assert clipped and clipped[0].end == pytest.approx(2.0)  # 2400 ms clipped at the 2-s audio end
    assert td.missing_audio == ["41000008_3.3_1_p4_108"]
    assert any("also present: 2022-intra, 2023, 2024" in n for n in td.notes)
    info = inspect_task(td)
    json.dumps(info)
    assert info["accounting"]["recordings"]["dropped"]["poor quality, no events"] == 2
    assert "starts after the audio ends" in info["accounting"]["examples"]


@pytest.mark.parametrize("test_set, expected", [
    ("inter", {"42000001_3.0_0_p1_201", "42000002_4.0_1_p2_202"}),
    ("intra", {"41000001_3.1_0_p3_301", "41000002_4.2_1_p4_302"}),
    ("2023", {"00014365_4.3_1_p4_7545", "00014366_2.3_0_p1_7546"}),
    ("2024", {"00015105_5.3_0_p1_25271"}),
])
def test_each_years_test_set_is_found(published, test_set, expected):
    td = load_sprsound(published, test_set=test_set, val_fraction=0.2)
    assert {it.recording for it in td.split("test")} == expected


def test_a_years_folder_and_the_flat_layout_both_work(published, tmp_path):
    year = load_task("sprsound", published / "BioCAS2022", val_fraction=0.2)
    assert {it.recording for it in year.split("test")} == {"42000001_3.0_0_p1_201", "42000002_4.0_1_p2_202"}
    later = load_task("sprsound", published / "BioCAS2023", val_fraction=0.2)  # test only: trains on 2022
    assert any("BioCAS2023 has no training set; training recordings from BioCAS2022/" in n for n in later.notes)
    assert len(later.split("test")) == 3
    with pytest.raises(ConfigError, match="2025"):
        load_sprsound(published, test_set="2025")
    lone = tmp_path / "BioCAS2023"
    shutil.copytree(published / "BioCAS2023", lone)  # a test-only year with no other year beside it
    with pytest.raises(DataError, match="no SPRSound training annotations"):
        load_sprsound(lone)


def test_record_level_tasks_use_record_annotation(published):
    rec = load_task("sprsound-2-2", published, val_fraction=0.2)
    assert rec.classes == ["Normal", "CAS", "DAS", "CAS & DAS", "Poor Quality"]
    assert {k: rec.accounting["recordings"][k] for k in ("read", "used", "dropped")} == EXPECTED_RECORDS
    assert all(it.start is None and it.end is None for it in rec.items)
    by_name = {it.recording: rec.classes[it.label] for it in rec.items}
    assert by_name["41000007_7.3_0_p3_107"] == "Poor Quality" and by_name["41000004_2.5_1_p4_104"] == "CAS & DAS"
    ternary = load_task("sprsound-2-1", published, val_fraction=0.2)
    names = {it.recording: ternary.classes[it.label] for it in ternary.items}
    assert names["41000004_2.5_1_p4_104"] == "Adventitious" and names["41000007_7.3_0_p3_107"] == "Poor Quality"
    assert names["41000001_3.1_0_p1_101"] == "Normal"
    no_labels = load_sprsound(published, test_set="2024", task="sprsound-2-2", val_fraction=0.2)
    assert no_labels.accounting["recordings"]["dropped"] == {"no audio file": 1, "no record label": 1}
    assert not no_labels.split("test")


def test_names_without_a_patient_number_are_warned(tmp_path):
    root = tmp_path / "anon"
    for i in range(12):
        add_recording(root, "train", f"rec{i:03d}", [("0", "800", "Normal"), ("900", "1500", "Wheeze")])
    add_recording(root, "test", "rec900", [("0", "800", "Normal")])
    td = load_sprsound(root, val_fraction=0.0)
    assert any("13 recording(s) have no patient number" in w for w in td.warnings)
    assert any("12 training recording(s) have no subject id" in w for w in td.warnings)


def test_event_past_the_end_of_the_audio_is_named_by_load_audio(tmp_path):
    from m2dx_clinic.audio import load_audio
    from m2dx_clinic.errors import AudioError

    path = write_wav(tmp_path / "a.wav", np.full(2 * PUBLISHED_SR, 0.1, dtype=np.float32), PUBLISHED_SR)
    with pytest.raises(AudioError, match="starts at 2.5 s, after the audio ends"):
        load_audio(path, start=2.5, end=3.0)


def test_official_score_is_the_challenge_definition():
    from m2dx_clinic.metrics import sprsound_scores

    # Normal 0, CAS 1, DAS 2, CAS & DAS 3, Poor Quality 4
    true = [0, 0, 0, 0, 1, 1, 2, 3, 4, 4]
    pred = [0, 0, 0, 1, 1, 2, 2, 3, 4, 0]
    out = sprsound_scores(true, pred, normal_class=0, num_classes=5)
    se, sp = 4 / 6, 3 / 4  # exact class on the six non-normal records (Poor Quality included); normal 3 of 4
    assert out["se"] == pytest.approx(se) and out["sp"] == pytest.approx(sp)
    assert out["as"] == pytest.approx((se + sp) / 2)
    assert out["hs"] == pytest.approx(2 * se * sp / (se + sp))
    assert out["score"] == pytest.approx(((se + sp) / 2 + 2 * se * sp / (se + sp)) / 2)
    assert sprsound_scores([0, 1], [1, 0], num_classes=2)["hs"] == 0.0
