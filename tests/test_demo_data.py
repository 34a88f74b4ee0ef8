"""Synthetic ICBHI-layout demo data: deterministic, parseable, both abnormal classes on each side."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import soundfile as sf

from m2dx_clinic.data.segments import list_segments
from m2dx_clinic.demo_data import demo_noise_dir, make_demo_csv, make_demo_icbhi
from m2dx_clinic.errors import ConfigError, DataError

SMALL = dict(num_patients=4, recordings_per_patient=2, seconds=7.0)


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_gives_identical_bytes(tmp_path):
    a = make_demo_icbhi(tmp_path / "a", **SMALL, seed=3)
    b = make_demo_icbhi(tmp_path / "b", **SMALL, seed=3)
    c = make_demo_icbhi(tmp_path / "c", **SMALL, seed=4)
    assert a == tmp_path / "a"
    assert _files(a) == _files(b)
    assert _files(a) != _files(c)
    # Rewriting in place is allowed and gives the same bytes.
    before = _files(a)
    make_demo_icbhi(a, **SMALL, seed=3)
    assert _files(a) == before


def test_layout_is_parseable(tmp_path):
    root = make_demo_icbhi(tmp_path, num_patients=6, recordings_per_patient=2, seconds=9.0)
    db = root / "ICBHI_final_database"
    wavs = sorted(db.glob("*.wav"))
    assert len(wavs) == 12
    split = dict(line.split("\t") for line in (root / "ICBHI_challenge_train_test.txt").read_text().splitlines())
    assert set(split) == {p.stem for p in wavs}
    assert set(split.values()) == {"train", "test"}
    patients = {side: {name.split("_")[0] for name, s in split.items() if s == side} for side in ("train", "test")}
    assert not patients["train"] & patients["test"]
    classes = {"train": set(), "test": set()}
    for wav in wavs:
        name = wav.stem
        pid, index, loc, mode, device = name.split("_")
        assert pid.isdigit() and mode == "sc" and device == "Meditron"
        info = sf.info(str(wav))
        assert info.samplerate == 16000 and info.channels == 1 and info.subtype == "PCM_16"
        lines = (db / f"{name}.txt").read_text().splitlines()
        assert lines
        previous_end = 0.0
        for line in lines:
            fields = line.split("\t")
            assert len(fields) == 4
            start, end, crackle, wheeze = float(fields[0]), float(fields[1]), int(fields[2]), int(fields[3])
            assert previous_end <= start < end <= info.duration and 2.0 <= end - start <= 4.0 + 1e-6
            assert crackle in (0, 1) and wheeze in (0, 1)
            classes[split[name]].add(crackle + 2 * wheeze)
            previous_end = end
    for side in ("train", "test"):
        assert classes[side] & {1, 3} and classes[side] & {2, 3}, f"{side} lacks crackle or wheeze cycles"


def test_default_split_and_normal_share(tmp_path):
    root = make_demo_icbhi(tmp_path)
    split = (root / "ICBHI_challenge_train_test.txt").read_text().splitlines()
    assert len(split) == 24
    train = sum(line.endswith("train") for line in split)
    assert 0.5 <= train / len(split) <= 0.7
    labels = [
        tuple(line.split("\t")[2:])
        for p in (root / "ICBHI_final_database").glob("*.txt")
        for line in p.read_text().splitlines()
    ]
    normal = sum(lab == ("0", "0") for lab in labels) / len(labels)
    assert 0.35 <= normal <= 0.7


def test_demo_csv_manifest(tmp_path):
    manifest = make_demo_csv(tmp_path)
    rows = list(csv.DictReader(manifest.open()))
    assert list(rows[0]) == ["path", "label", "subject"]
    assert {r["label"] for r in rows} == {"healthy", "crackles", "wheezes"}
    segments = list_segments(manifest)
    assert len(segments) == len(rows) == 24 and all(s.path.is_file() for s in segments)
    assert segments[0].subject == rows[0]["subject"]


def test_refuses_foreign_folder_and_bad_arguments(tmp_path):
    db = tmp_path / "ICBHI_final_database"
    db.mkdir()
    (db / "999_1b1_Al_sc_Litt3200.txt").write_text("0\t1\t0\t0\n")
    with pytest.raises(DataError, match="other recordings"):
        make_demo_icbhi(tmp_path, **SMALL)
    assert (db / "999_1b1_Al_sc_Litt3200.txt").exists()
    with pytest.raises(ConfigError):
        make_demo_icbhi(tmp_path / "x", num_patients=1)
    with pytest.raises(ConfigError):
        make_demo_icbhi(tmp_path / "x", seconds=1.0)


def test_bundled_noise_clips():
    folder = demo_noise_dir()
    clips = sorted(folder.glob("*.flac"))
    assert len(clips) == 8
    rows = list(csv.DictReader((folder / "ATTRIBUTION.csv").open()))
    assert sorted(r["file"] for r in rows) == [p.name for p in clips]
    assert {r["license"] for r in rows} == {"CC0"} and len({r["category"] for r in rows}) == 8
    assert sum(p.stat().st_size for p in folder.iterdir()) < 1_000_000
    for p in clips:
        info = sf.info(str(p))
        assert info.samplerate == 16000 and info.channels == 1
