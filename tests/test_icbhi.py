"""ICBHI 2017: parsing (synthetic layouts and the real annotations), cycle preparation, inspect."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from m2dx_clinic.data.icbhi import CLASSES, load_icbhi, parse_icbhi
from m2dx_clinic.data.segments import load_fixed_length
from m2dx_clinic.data.inspection import inspect_task, render_inspect
from m2dx_clinic.errors import DataError

from conftest import write_wav

SR = 4000


def build_icbhi(root: Path, *, nested: bool = True, crlf: bool = True) -> Path:
    """Six small recordings of five patients; 104's audio is missing; 105 uses the split-file name quirk."""
    folder = root / "ICBHI_final_database" if nested else root
    folder.mkdir(parents=True, exist_ok=True)
    recs = {
        "101_1b1_Al_sc_Meditron": ("train", [(0.0, 0.5, 0, 0), (0.5, 1.2, 1, 0)]),
        "102_1b1_Ar_sc_Meditron": ("train", [(0.1, 0.9, 0, 1), (0.9, 1.8, 1, 1)]),
        "103_2b2_Ar_mc_LittC2SE": ("train", [(0.2, 1.0, 0, 0)]),
        "104_1b1_Ll_sc_Litt3200": ("test", [(0.0, 1.0, 1, 0)]),
        "105_1b1_Tc_sc_LittC2SE": ("train", [(0.0, 1.5, 0, 0)]),
        "106_1b1_Pl_sc_Meditron": ("test", [(0.0, 0.7, 0, 0), (0.7, 1.9, 0, 1)]),
    }
    eol = "\r\n" if crlf else "\n"
    split_lines = []
    rng = np.random.default_rng(0)
    for rec, (split, cycles) in recs.items():
        text = eol.join(f"{a}\t{b}\t{c}\t{w}" for a, b, c, w in cycles) + eol
        (folder / f"{rec}.txt").write_text(text, newline="")
        if not rec.startswith("104"):
            write_wav(folder / f"{rec}.wav", rng.uniform(-0.3, 0.3, 2 * SR).astype(np.float32), SR)
        name = "105_1b1_Tc_sc_Meditron" if rec.startswith("105") else rec
        split_lines.append(f"{name}\t{split}")
    (root / "ICBHI_challenge_train_test.txt").write_text(eol.join(split_lines) + eol, newline="")
    return root


def test_parse_synthetic_nested_layout(tmp_path):
    frame = parse_icbhi(build_icbhi(tmp_path))
    assert len(frame) == 9 and frame["recording"].nunique() == 6
    assert frame["label"].tolist() == [0, 1, 2, 3, 0, 1, 0, 0, 2]
    assert frame.groupby("split").size().to_dict() == {"test": 3, "train": 6}
    quirk = frame[frame["recording"] == "105_1b1_Tc_sc_LittC2SE"]
    assert quirk["split"].tolist() == ["train"]
    assert any("105_1b1_Tc_sc_LittC2SE matched split entry 105_1b1_Tc_sc_Meditron" in n for n in frame.attrs["notes"])
    assert frame.loc[frame["recording"] == "104_1b1_Ll_sc_Litt3200", "audio_path"].isna().all()
    assert frame["patient"].iloc[0] == "101"


def test_load_icbhi_flat_layout_reports_missing_audio(tmp_path):
    td = load_icbhi(build_icbhi(tmp_path, nested=False, crlf=False), val_fraction=0.3, seed=0)
    assert td.classes == CLASSES and td.normal_class == 0 and td.official_split
    assert td.missing_audio == ["104_1b1_Ll_sc_Litt3200"]
    assert len(td.items) == 8
    assert any("audio missing for 1 of 6" in w for w in td.warnings)
    assert len(td.split("val")) > 0
    assert set(td.subjects("val")).isdisjoint(td.subjects("train"))
    item = td.items[0]
    assert item.item_id == "101_1b1_Al_sc_Meditron#000" and item.start == 0.0 and item.end == 0.5
    assert item.recording == "101_1b1_Al_sc_Meditron" and item.subject == "101"
    wave = load_fixed_length(item, 16000, length_s=1.0)
    assert wave.shape == (16000,)


def test_quirk_not_matched_when_ambiguous(tmp_path):
    root = build_icbhi(tmp_path)
    with open(root / "ICBHI_challenge_train_test.txt", "a") as f:
        f.write("105_1b1_Tc_sc_AKGC417L\ttest\n")  # a second candidate for 105_1b1_Tc
    frame = parse_icbhi(root)
    assert "105_1b1_Tc_sc_LittC2SE" not in set(frame["recording"])
    assert any("not in ICBHI_challenge_train_test.txt" in w for w in frame.attrs["warnings"])


def test_missing_files_are_one_line_data_errors(tmp_path):
    root = build_icbhi(tmp_path)
    (root / "ICBHI_challenge_train_test.txt").unlink()
    with pytest.raises(DataError, match="ICBHI_challenge_train_test.txt not found") as err:
        parse_icbhi(root)
    assert "\n" not in str(err.value)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no ICBHI annotations"):
        parse_icbhi(tmp_path / "empty")
    bad = build_icbhi(tmp_path / "bad")
    (bad / "ICBHI_final_database" / "101_1b1_Al_sc_Meditron.txt").write_text("0.1\t0.5\t2\t0\n")
    with pytest.raises(DataError, match=r"101_1b1_Al_sc_Meditron.txt: line 1"):
        parse_icbhi(bad)


def test_inspect_synthetic(tmp_path):
    td = load_icbhi(build_icbhi(tmp_path), val_fraction=0.3)
    info = inspect_task(td)
    json.dumps(info)
    assert info["sample_rates"] == {"4000": 5}
    assert info["missing_audio"] == ["104_1b1_Ll_sc_Litt3200"]
    assert info["all_annotations"]["total"]["cycles"] == 9
    assert info["all_annotations"]["train"]["crackle"] == 1
    assert info["durations_s"]["count"] == 8
    assert info["durations_s"]["max"] == pytest.approx(1.5)
    assert info["durations_s"]["total"] == pytest.approx(0.5 + 0.7 + 0.8 + 0.9 + 0.8 + 1.5 + 0.7 + 1.2)
    render_inspect(info)


# --- the real annotations in ../shared/data ----------------------------------------------------


@pytest.mark.realdata
def test_real_icbhi_counts_match_readme(icbhi_dir):
    frame = parse_icbhi(icbhi_dir)
    assert frame["recording"].nunique() == 920 and len(frame) == 6898
    by_split = frame.groupby("split").size().to_dict()
    assert by_split == {"train": 4142, "test": 2756}
    counts = frame.groupby(["split", "label"]).size()
    assert [int(counts["train"][c]) for c in range(4)] == [2063, 1215, 501, 363]
    assert [int(counts["test"][c]) for c in range(4)] == [1579, 649, 385, 143]
    assert frame.groupby("split")["recording"].nunique().to_dict() == {"train": 539, "test": 381}
    assert frame.loc[frame["recording"] == "226_1b1_Pl_sc_LittC2SE", "split"].unique().tolist() == ["train"]
    assert frame["audio_path"].notna().groupby(frame["recording"]).first().sum() == 118


@pytest.mark.realdata
def test_real_icbhi_task_and_inspect(icbhi_dir):
    td = load_icbhi(icbhi_dir)
    assert len(td.missing_audio) == 802 and len(td.items) == 1065
    counts = td.counts()
    assert counts.loc["test"].tolist() == [403, 57, 77, 12, 549]
    assert counts.loc["train", "total"] + counts.loc["val", "total"] == 516
    assert set(td.subjects("val")).isdisjoint(td.subjects("train") + td.subjects("test"))
    # the two patients the official split shares, counted but not named (the warning reaches the model card)
    overlap = [w for w in td.warnings if "more than one split" in w]
    assert len(overlap) == 1 and "2 subject(s)" in overlap[0] and "2 in train/test" in overlap[0]
    assert "156" not in overlap[0] and "218" not in overlap[0]
    info = inspect_task(td)
    json.dumps(info)
    assert info["all_annotations"]["total"] == {
        "recordings": 920, "subjects": 126, "cycles": 6898,
        "normal": 3642, "crackle": 1864, "wheeze": 886, "both": 506,
    }
    assert info["sample_rates"] == {"4000": 45, "10000": 6, "16000": 67}
    assert info["recordings"] == 118 and info["subjects"] == 44
