"""A miniature of the published SPRSound repository (github SJTU-YONGFU-RESEARCH-GRP/SPRSound), written by hand.

BioCAS2022/{train2022_wav, train2022_json, test2022_wav, test2022_json/{inter_test_json, intra_test_json}},
BioCAS2023/{test2023_wav, test2023_json}, BioCAS2024/{test2024_wav, test2024_json} (no record labels).
Times are strings in milliseconds, as released. `EXPECTED` is what a reader must count.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from conftest import write_wav

SR = 8000
SECONDS = 2.0

# (name, record label, events [(start ms, end ms, type)], audio?)
TRAIN = [
    ("41000001_3.1_0_p1_101", "Normal", [("0", "700", "Normal"), ("800", "1500", "Normal")], True),
    ("41000002_4.2_1_p2_102", "CAS", [("0", "900", "Wheeze"), ("1000", "1800", "Normal")], True),
    ("41000003_5.0_0_p3_103", "DAS", [("100", "900", "Fine Crackle"), ("1000", "1900", "Coarse Crackle")], True),
    ("41000004_2.5_1_p4_104", "CAS & DAS", [("0", "800", "Wheeze+Crackle"), ("900", "1700", "Rhonchi")], True),
    ("41000005_6.0_0_p1_105", "Normal", [("200", "1000", "Normal"), ("1200", "2400", "Normal")], True),  # clipped
    ("41000006_1.2_1_p2_106", "CAS", [("0", "800", "Stridor"), ("2500", "3100", "Wheeze")], True),  # 2nd past end
    ("41000007_7.3_0_p3_107", "Poor Quality", [], True),  # poor quality, no events
    ("41000008_3.3_1_p4_108", "Normal", [("0", "600", "Normal")], False),  # no audio
    ("41000009_8.0_0_p1_109", "DAS", [("0", "900", "Fine Crackle"), ("1000", "1600", "Normal")], True),
    ("41000010_2.0_1_p2_110", "Normal", [("0", "800", "Normal"), ("900", "1800", "Normal")], True),
    ("41000011_4.4_0_p3_111", "Poor Quality", [("0", "800", "Normal")], True),  # poor quality with an event
    ("41000012_5.5_1_p4_112", "CAS", [("0", "900", "Rhonchi"), ("1000", "1800", "Wheeze")], True),
]
INTER = [
    ("42000001_3.0_0_p1_201", "Normal", [("0", "800", "Normal"), ("900", "1700", "Normal")], True),
    ("42000002_4.0_1_p2_202", "DAS", [("0", "700", "Coarse Crackle"), ("800", "1600", "Normal")], True),
    ("42000003_5.0_0_p3_203", "Poor Quality", [], True),
]
INTRA = [
    ("41000001_3.1_0_p3_301", "CAS", [("0", "900", "Wheeze")], True),
    ("41000002_4.2_1_p4_302", "Normal", [("100", "1000", "Normal")], True),
]
Y2023 = [
    ("00014365_4.3_1_p4_7545", "CAS & DAS", [("0", "900", "Wheeze+Crackle"), ("1000", "1900", "Normal")], True),
    ("00014366_2.3_0_p1_7546", "Normal", [("0", "900", "Normal")], True),
]
Y2024 = [("00015105_5.3_0_p1_25271", None, [("0", "900", "Normal"), ("1000", "1800", "Rhonchi")], True)]

# What the event-level task (test set 2022-inter) must report.
EXPECTED_EVENTS = {
    "recordings": {"read": 15, "used": 12, "dropped": {"no audio file": 1, "poor quality, no events": 2}},
    "events": {"read": 24, "used": 22, "dropped": {"recording dropped: no audio file": 1,
                                                   "starts after the audio ends": 1}},
    "clipped": 1,
}
# Record level (2-2), same test set: every recording with audio is used, Poor Quality included.
EXPECTED_RECORDS = {"read": 15, "used": 14, "dropped": {"no audio file": 1}}


def _tone(seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(int(SR * SECONDS)) / SR
    return (0.1 * np.sin(2 * np.pi * (200 + 20 * seed) * t) + 0.02 * rng.standard_normal(t.size)).astype(np.float32)


def _write(json_dir: Path, wav_dir: Path, rows: list, seed: int) -> int:
    json_dir.mkdir(parents=True, exist_ok=True)
    for name, label, events, audio in rows:
        record = {"event_annotation": [{"start": s, "end": e, "type": t} for s, e, t in events]}
        if label is not None:
            record = {"record_annotation": label, **record}
        (json_dir / f"{name}.json").write_text(json.dumps(record))
        if audio:
            write_wav(wav_dir / f"{name}.wav", _tone(seed), SR)
        seed += 1
    return seed


def build_published(root: Path) -> Path:
    """The miniature repository under `root`; returns `root`."""
    y22 = root / "BioCAS2022"
    seed = _write(y22 / "train2022_json", y22 / "train2022_wav", TRAIN, 0)
    seed = _write(y22 / "test2022_json" / "inter_test_json", y22 / "test2022_wav", INTER, seed)
    seed = _write(y22 / "test2022_json" / "intra_test_json", y22 / "test2022_wav", INTRA, seed)
    seed = _write(root / "BioCAS2023" / "test2023_json", root / "BioCAS2023" / "test2023_wav", Y2023, seed)
    _write(root / "BioCAS2024" / "test2024_json", root / "BioCAS2024" / "test2024_wav", Y2024, seed)
    (root / "README.md").write_text("# SPRSound miniature\n")
    return root
