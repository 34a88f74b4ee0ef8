"""SPRSound as published, end to end on CPU: finetune reads the miniature repository as it is, the
record-level task reports the challenge score (recomputed here), and predict uses the JSON events and
flags recordings unlike the training audio."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from m2dx_clinic.config import load_recipe
from m2dx_clinic.evaluation.ood import NO_PROFILE_NOTE
from m2dx_clinic.finetune import finetune
from m2dx_clinic.predict import predict
from m2dx_clinic.recipes import FinetuneRecipe

from conftest import write_wav
from sprsound_layout import EXPECTED_EVENTS, EXPECTED_RECORDS, INTER, SR, build_published


def _recipe(out: Path) -> FinetuneRecipe:
    return load_recipe(FinetuneRecipe, "tiny_finetune", [
        f"run.out='{out / 'run'}'", f"data.cache_dir='{out / 'cache'}'", "optim.epochs=1", "run.repeats=2",
        "data.cycle_seconds=2.0", "run.num_workers=0", "run.bootstrap=10", "data.val_fraction=0.2"])


@pytest.fixture(scope="module")
def published(tmp_path_factory) -> Path:
    return build_published(tmp_path_factory.mktemp("SPRSound"))


@pytest.fixture(scope="module")
def event_run(tmp_path_factory, published, tiny_ckpt) -> Path:
    out = tmp_path_factory.mktemp("ft_events")
    return finetune(_recipe(out), task="sprsound", data=published, checkpoint=tiny_ckpt, progress=False).run_dir


def test_finetune_reads_the_published_layout_and_accounts_for_everything(event_run):
    metrics = json.loads((event_run / "metrics.json").read_text())
    accounting = metrics["data_accounting"]
    for kind in ("recordings", "events"):
        assert {k: accounting[kind][k] for k in ("read", "used", "dropped")} == EXPECTED_EVENTS[kind]
    assert sum(metrics["items"].values()) == EXPECTED_EVENTS["events"]["used"]
    assert any("start after the end of their audio" in w for w in metrics["warnings"])
    pred = pd.read_csv(event_run / "predictions.csv")
    assert set(pred.loc[pred["split"] == "test", "recording"]) == {n for n, _, ev, _ in INTER if ev}


def _official_by_hand(true: np.ndarray, pred: np.ndarray, normal: int) -> float:
    abnormal = true != normal
    se = float(np.sum((pred == true) & abnormal)) / float(np.sum(abnormal))
    sp = float(np.sum((pred == true) & ~abnormal)) / float(np.sum(~abnormal))
    harmonic = 0.0 if se + sp == 0 else 2 * se * sp / (se + sp)
    return ((se + sp) / 2 + harmonic) / 2


def test_record_level_task_reports_the_challenge_score(tmp_path, published, tiny_ckpt):
    run = finetune(_recipe(tmp_path), task="sprsound-2-2", data=published, checkpoint=tiny_ckpt,
                   progress=False).run_dir
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["classes"] == ["Normal", "CAS", "DAS", "CAS & DAS", "Poor Quality"]
    assert {k: metrics["data_accounting"]["recordings"][k] for k in ("read", "used", "dropped")} == EXPECTED_RECORDS
    official = metrics["official"]
    assert official["name"] == "sprsound" and len(official["runs"]) == 2
    pred = pd.read_csv(run / "predictions.csv")
    test = pred[pred["split"] == "test"]
    assert set(test["true_label"]) == {"Normal", "DAS", "Poor Quality"}
    scores = []
    for repeat, rows in test.groupby("repeat"):
        by_hand = _official_by_hand(rows["true_index"].to_numpy(), rows["pred_index"].to_numpy(), 0)
        assert official["runs"][int(repeat)]["test"]["score"] == pytest.approx(by_hand)
        scores.append(by_hand)
    assert official["aggregate"]["score"]["mean"] == pytest.approx(np.mean(scores))
    for block in official["runs"]:
        s = block["test"]
        assert s["as"] == pytest.approx((s["se"] + s["sp"]) / 2)


def _tone(seconds: float, sr: int, amplitude: float = 0.1, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(int(sr * seconds)) / sr
    return (amplitude * np.sin(2 * np.pi * 240 * t) + 0.02 * rng.standard_normal(t.size)).astype(np.float32)


def test_predict_uses_json_events_and_flags_recordings_unlike_the_training_audio(event_run, published, tmp_path):
    wavs = published / "BioCAS2022" / "test2022_wav"
    in_dist = [wavs / f"{name}.wav" for name, _, _, _ in INTER]
    short = write_wav(tmp_path / "new" / "short.wav", _tone(0.2, SR), SR)
    rng = np.random.default_rng(1)
    loud = write_wav(tmp_path / "new" / "loud_4k.wav", (0.9 * rng.standard_normal(4000 * 2)).clip(-1, 1)
                     .astype(np.float32), 4000)
    result = predict(event_run / "best.pt", [*in_dist, short, loud], tmp_path / "out", progress=False)
    seg = pd.read_csv(tmp_path / "out" / "segments.csv", keep_default_na=False)
    rec = pd.read_csv(tmp_path / "out" / "recordings.csv", keep_default_na=False).set_index("recording")
    # the JSON events drive the segments in auto mode (the Poor Quality record has none: windows)
    for name, _, events, _ in INTER:
        rows = seg[seg["recording"] == str(wavs / f"{name}.wav")]
        if events:
            assert rows["source"].eq("annotations").all() and len(rows) == len(events)
            assert sorted(rows["start"]) == sorted(float(s) / 1000 for s, _, _ in events)
        else:
            assert rows["source"].eq("window").all()
    for path in in_dist:
        assert rec.loc[str(path), "flags"] == ""
    assert "too short" in rec.loc[str(short), "flags"]
    assert "unseen sample rate" in rec.loc[str(loud), "flags"]
    assert result.summary["audio_profile"] is True
    assert {f["path"] for f in result.summary["flagged"]} == {str(short), str(loud)}


def test_a_classifier_without_a_profile_still_predicts_with_a_note(event_run, published, tmp_path):
    raw = torch.load(event_run / "best.pt", weights_only=True)
    profile = raw["m2dx"].pop("audio_profile")
    assert set(profile) >= {"sample_rates", "duration_s", "logmel_mean", "logmel_std"}
    metrics = json.loads((event_run / "metrics.json").read_text())
    assert set(profile["sample_rates"]) == {str(SR)} and profile["segments"] == metrics["items"]["train"]
    assert 0.5 <= profile["duration_s"]["q00"] <= profile["duration_s"]["q100"] <= 1.0  # fixture events: 0.6-0.9 s
    text = json.dumps(profile)
    assert "4100000" not in text and "/" not in text  # aggregate numbers only: no names, paths or subjects
    old = tmp_path / "old.pt"
    torch.save(raw, old)
    short = write_wav(tmp_path / "short.wav", _tone(0.2, SR), SR)
    result = predict(old, [short], tmp_path / "out", progress=False)
    assert result.summary["training_audio"] == NO_PROFILE_NOTE and result.summary["flagged"] == []
    assert pd.read_csv(tmp_path / "out" / "segments.csv", keep_default_na=False)["flags"].eq("").all()
