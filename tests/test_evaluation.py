"""Judging a classifier: the classical baseline beside every result (recomputed here with our own
scikit-learn fit), clinical metrics recomputed from predictions.csv, seeded bootstrap CIs, the
operating point, warnings that fire when they should, and the model card."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import average_precision_score, roc_auc_score
from sklearn.preprocessing import StandardScaler

from m2dx_clinic import finetune as ft
from m2dx_clinic.audio import FrontEndConfig, LogMelSpectrogram
from m2dx_clinic.config import load_recipe
from m2dx_clinic.data.segments import load_fixed_length
from m2dx_clinic.data.tasks import load_task
from m2dx_clinic.evaluation.checks import result_warnings
from m2dx_clinic.evaluation.clinical import choose_operating_point, clinical_report
from m2dx_clinic.fileio import to_jsonable
from m2dx_clinic.metrics import icbhi_scores
from m2dx_clinic.models.vit import ViTConfig
from m2dx_clinic.recipes import FinetuneRecipe

from conftest import write_wav

TINY = ViTConfig(embed_dim=64, depth=2, num_heads=4)


@pytest.fixture(scope="module")
def tone_task(tmp_path_factory) -> Path:
    """A task with a known answer: 'normal' is noise, 'tone' is the same noise plus a 1 kHz tone."""
    root = tmp_path_factory.mktemp("tone")
    rng = np.random.default_rng(0)
    rows = []
    t = np.arange(16000 * 2) / 16000
    for subject in range(24):
        for k in range(2):
            label = "tone" if (subject + k) % 2 else "normal"
            wave = 0.05 * rng.standard_normal(t.size) + (0.3 * np.sin(2 * np.pi * 1000 * t) if label == "tone" else 0)
            name = f"s{subject:02d}_{k}.wav"
            write_wav(root / name, wave)
            rows.append(f"{name},{label},s{subject:02d}")
    csv = root / "labels.csv"
    csv.write_text("path,label,subject\n" + "\n".join(rows) + "\n")
    return csv


def _recipe(tmp_path: Path, *extra: str) -> FinetuneRecipe:
    return load_recipe(FinetuneRecipe, "tiny_finetune", [
        f"run.out='{tmp_path / 'run'}'", f"data.cache_dir='{tmp_path / 'cache'}'", "optim.epochs=1",
        "data.cycle_seconds=2.0", "run.num_workers=0", "run.bootstrap=50", *extra])


def _own_baseline_test_score(task: str, data: Path, recipe: FinetuneRecipe, metrics: dict) -> float:
    """The baseline recomputed independently: our own features, C chosen on val, sklearn's own fit."""
    td = load_task(task, data, val_fraction=recipe.data.val_fraction, seed=recipe.run.seed)
    splits = ft.select_splits(td, recipe, score_test=True)  # the same items (and subsets) the run used
    mel = LogMelSpectrogram(FrontEndConfig())
    k, normal = len(td.classes), td.normal_class

    def features(split: str) -> tuple[np.ndarray, np.ndarray]:
        rows, labels = [], []
        for it in splits[split]:
            wave = load_fixed_length(it, 16000, length_s=recipe.data.cycle_seconds, pad=recipe.data.pad)
            lms = mel(wave).numpy().astype(np.float64)
            rows.append(np.concatenate([lms.mean(1), lms.std(1), np.diff(lms, axis=1).std(1)]))
            labels.append(it.label)
        return np.array(rows), np.array(labels)

    (xtr, ytr), (xva, yva), (xte, yte) = features("train"), features("val"), features("test")
    scaler = StandardScaler().fit(xtr)

    def fit(c: float) -> LogisticRegression:
        return LogisticRegression(C=c, max_iter=2000).fit(scaler.transform(xtr), ytr)

    best_c, best = None, None
    for c in (0.001, 0.01, 0.1, 1.0, 10.0, 100.0):
        s = icbhi_scores(yva, fit(c).predict(scaler.transform(xva)), normal_class=normal, num_classes=k)
        key = (s["score"], s["accuracy"])
        if best is None or key > best:
            best_c, best = c, key
    assert best_c == metrics["baseline"]["C"]
    return icbhi_scores(yte, fit(best_c).predict(scaler.transform(xte)), normal_class=normal, num_classes=k)["score"]


def test_baseline_beside_the_model_on_a_known_answer(tone_task, tiny_ckpt, tmp_path):
    recipe = _recipe(tmp_path)
    result = ft.finetune(recipe, task="csv", data=tone_task, checkpoint=tiny_ckpt, progress=False)
    metrics = json.loads((result.run_dir / "metrics.json").read_text())
    base = metrics["baseline"]
    assert base["features"] == 240 and set(base) >= {"val", "test", "operating_point", "C"}
    assert base["test"]["values"]["score"] == pytest.approx(1.0)  # a tone is trivially separable by band energy
    assert base["test"]["values"]["score"] == pytest.approx(_own_baseline_test_score("csv", tone_task, recipe, metrics))
    # chance, computed by hand: always-normal, and guessing with the training class frequencies
    td = load_task("csv", tone_task)
    train = np.bincount([it.label for it in ft.select_splits(td, recipe, score_test=True)["train"]], minlength=2)
    prior = train / train.sum()
    chance = metrics["chance"]
    assert chance["always_normal"]["score"] == 0.5 and chance["always_normal"]["se"] == 0.0
    assert chance["class_prior"]["sp"] == pytest.approx(prior[0]) and chance["class_prior"]["se"] == pytest.approx(prior[1])
    # the same block in the model card
    card = (result.run_dir / "MODEL_CARD.md").read_text()
    assert "baseline" in card and "not a diagnostic device".lower() in card.lower() and "always normal" in card


def test_clinical_metrics_recompute_from_predictions_csv(tone_task, tiny_ckpt, tmp_path):
    result = ft.finetune(_recipe(tmp_path, "run.repeats=2"), task="csv", data=tone_task, checkpoint=tiny_ckpt,
                         progress=False)
    metrics = json.loads((result.run_dir / "metrics.json").read_text())
    pred = pd.read_csv(result.run_dir / "predictions.csv")
    classes = metrics["classes"]
    cols = [f"prob_{c}" for c in classes]
    for split in ("val", "test"):
        rows = pred[pred["split"] == split]
        ens = rows.groupby("item_id", sort=False)[cols].mean()  # the ensemble of the repeats
        truth = rows.groupby("item_id", sort=False)["true_index"].first().to_numpy()
        stored = metrics["ensemble"][split]["values"]
        assert stored["auroc_abnormal"] == pytest.approx(roc_auc_score(truth != 0, 1 - ens[cols[0]]))
        assert stored["ap_abnormal"] == pytest.approx(average_precision_score(truth != 0, 1 - ens[cols[0]]))
        assert stored["auroc/tone"] == pytest.approx(roc_auc_score(truth == 1, ens["prob_tone"]))
        s = icbhi_scores(truth, ens.to_numpy().argmax(1), normal_class=0, num_classes=2)
        assert stored["score"] == pytest.approx(s["score"])
    # the operating point was chosen on validation and is what the test block used
    val = pred[pred["split"] == "val"].groupby("item_id", sort=False)
    point = choose_operating_point(val[cols].mean().to_numpy(), val["true_index"].first().to_numpy(), 0)
    assert metrics["ensemble"]["operating_point"]["threshold"] == pytest.approx(point["threshold"])
    test = pred[pred["split"] == "test"].groupby("item_id", sort=False)
    probs, truth = test[cols].mean().to_numpy(), test["true_index"].first().to_numpy()
    flagged = 1 - probs[:, 0] >= point["threshold"]
    tp = (flagged & (truth == 1)).sum()
    stored = metrics["ensemble"]["test"]["values"]
    assert stored["op_sensitivity"] == pytest.approx(tp / (truth == 1).sum())
    assert stored["op_ppv"] == pytest.approx(tp / flagged.sum() if flagged.any() else math.nan, nan_ok=True)
    # bootstrap over subjects: seeded, so the stored intervals recompute exactly
    groups = test["subject"].first().to_numpy()
    again = clinical_report(probs, truth, groups, classes, 0, point["threshold"], resamples=50, seed=0)
    assert to_jsonable(again["ci95"]) == metrics["ensemble"]["test"]["ci95"]  # JSON stores NaN as null
    assert (result.run_dir / "roc_pr.png").stat().st_size > 10_000


def test_collapse_warning_fires_on_a_model_forced_to_predict_one_class(tone_task, tiny_ckpt, tmp_path, monkeypatch):
    real = ft.class_probabilities

    def always_normal(model, lms, **kwargs):
        probs = real(model, lms, **kwargs)
        forced = torch.zeros_like(probs)
        forced[:, 0] = 1.0
        return forced

    monkeypatch.setattr(ft, "class_probabilities", always_normal)
    result = ft.finetune(_recipe(tmp_path), task="csv", data=tone_task, checkpoint=tiny_ckpt, progress=False)
    warnings = json.loads((result.run_dir / "metrics.json").read_text())["warnings"]
    assert any("predicts a single class (normal) for every test item" in w for w in warnings)
    assert any("at or below chance" in w for w in warnings)
    assert any("below the log-mel statistics + logistic regression baseline" in w for w in warnings)
    assert "single class" in (result.run_dir / "MODEL_CARD.md").read_text()


def test_result_warnings_unit():
    probs = np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4]])
    labels = np.array([0, 1, 0])
    assert result_warnings(classes=["n", "a"], normal=0, splits={"test": (probs, labels)}, model_val_score=0.8,
                           baseline_val_score=0.7, chance=None, test_score=0.9) == []
    few = result_warnings(classes=["n", "a", "b"], normal=0, splits={"val": (probs, labels)}, model_val_score=0.6,
                          baseline_val_score=0.7, chance={"x": {"score": 0.5}}, test_score=0.5)
    assert any("b absent from the val split" in w for w in few)
    assert any("only 2 validation item(s)" in w and "±69 points" in w for w in few)
    assert any("below the log-mel" in w for w in few) and any("at or below chance" in w for w in few)


def test_bootstrap_is_seeded_and_resamples_subjects():
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 3, 120)
    probs = rng.dirichlet(np.ones(3), 120)
    groups = [f"p{i // 4}" for i in range(120)]  # 30 subjects of 4 items
    a = clinical_report(probs, labels, groups, ["n", "c", "w"], 0, 0.5, resamples=40, seed=7)
    b = clinical_report(probs, labels, groups, ["n", "c", "w"], 0, 0.5, resamples=40, seed=7)
    c = clinical_report(probs, labels, groups, ["n", "c", "w"], 0, 0.5, resamples=40, seed=8)
    assert a["ci95"] == b["ci95"] and a["ci95"]["auroc_abnormal"] != c["ci95"]["auroc_abnormal"]
    lo, hi = a["ci95"]["auroc_abnormal"]
    assert lo < a["values"]["auroc_abnormal"] < hi and a["subjects"] == 30
    assert a["values"]["auroc_abnormal"] == pytest.approx(roc_auc_score(labels != 0, 1 - probs[:, 0]))


def test_target_sensitivity_operating_point():
    rng = np.random.default_rng(0)
    labels = np.r_[np.zeros(50, int), np.ones(50, int)]
    p_abn = np.clip(np.r_[rng.normal(0.3, 0.15, 50), rng.normal(0.7, 0.15, 50)], 0, 1)
    probs = np.c_[1 - p_abn, p_abn]
    youden = choose_operating_point(probs, labels, 0)
    high = choose_operating_point(probs, labels, 0, target_sensitivity=0.95)
    assert high["val_sensitivity"] >= 0.95 and high["threshold"] <= youden["threshold"]
    flagged = p_abn >= high["threshold"]
    assert flagged[labels == 1].mean() == pytest.approx(high["val_sensitivity"])
    assert choose_operating_point(probs[:50], labels[:50], 0) is None  # no abnormal item: no point


@pytest.mark.realdata
@pytest.mark.slow
def test_baseline_on_the_shared_icbhi_subset(icbhi_dir, tiny_ckpt, tmp_path):
    recipe = _recipe(tmp_path, "data.max_items_per_split=96", "data.cycle_seconds=8.0")
    result = ft.finetune(recipe, task="icbhi", data=icbhi_dir, checkpoint=tiny_ckpt, progress=False)
    metrics = json.loads((result.run_dir / "metrics.json").read_text())
    base = metrics["baseline"]
    assert all(metrics["items"][s] > 0 for s in ("train", "val", "test"))
    assert base["test"]["values"]["score"] == pytest.approx(
        _own_baseline_test_score("icbhi", icbhi_dir, recipe, metrics))
    assert len(base["test"]["ci95"]["score"]) == 2 and base["val"]["ci95"] == {}
    assert metrics["chance"]["always_normal"]["score"] == 0.5
