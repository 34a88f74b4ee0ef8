"""Calibration (ECE, Brier, temperature scaling) and subgroup metrics, checked against this file's own code."""

from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from m2dx_clinic.evaluation.calibration import apply_temperature, calibration_report, fit_temperature
from m2dx_clinic.evaluation.subgroups import group_metrics, subgroup_report


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def _draw(n: int, seed: int, sharpen: float) -> tuple[np.ndarray, np.ndarray]:
    """Labels drawn from softmax(z) (so softmax(z) is calibrated); the model reports softmax(sharpen * z)."""
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(n, 3)) * 1.5
    truth = _softmax(z)
    labels = np.array([rng.choice(3, p=p) for p in truth])
    return _softmax(sharpen * z), labels


def _ece(probs: np.ndarray, labels: np.ndarray, bins: int = 10) -> float:
    conf, correct = probs.max(1), (probs.argmax(1) == labels).astype(float)
    edges = np.linspace(0, 1, bins + 1)
    total = 0.0
    for lo, hi in zip(edges[:-1], edges[1:]):
        inside = (conf >= lo) & ((conf < hi) | (hi == 1.0))
        if inside.any():
            total += inside.mean() * abs(correct[inside].mean() - conf[inside].mean())
    return total


def test_an_over_confident_model_is_better_calibrated_on_held_out_data_after_scaling():
    val_probs, val_labels = _draw(3000, seed=1, sharpen=3.0)
    test_probs, test_labels = _draw(3000, seed=2, sharpen=3.0)
    fitted = fit_temperature(val_probs, val_labels)
    assert fitted["temperature"] == pytest.approx(3.0, rel=0.15)  # it undoes the sharpening
    assert fitted["nll_after"] < fitted["nll_before"]
    scaled = apply_temperature(test_probs, fitted["temperature"])
    before, after = _ece(test_probs, test_labels), _ece(scaled, test_labels)
    assert after < before / 2
    assert calibration_report(scaled, test_labels, 0)["ece"] == pytest.approx(after, abs=1e-9)
    assert (scaled.argmax(1) == test_probs.argmax(1)).all()  # scaling never changes the decision by class


def test_a_calibrated_model_keeps_a_temperature_near_one():
    probs, labels = _draw(4000, seed=3, sharpen=1.0)
    assert fit_temperature(probs, labels)["temperature"] == pytest.approx(1.0, abs=0.12)


def test_temperature_is_softmax_of_log_probabilities_over_t():
    probs = _softmax(np.array([[2.0, 0.5, -1.0], [0.0, 0.0, 3.0]]))
    expected = _softmax(np.log(probs) / 2.5)
    np.testing.assert_allclose(apply_temperature(probs, 2.5), expected, atol=1e-12)
    assert fit_temperature(probs, [0, 0]) is None  # one class: nothing to fit


def test_ece_and_brier_by_hand():
    probs = np.array([[0.9, 0.1], [0.8, 0.2], [0.3, 0.7], [0.45, 0.55]])
    labels = np.array([0, 1, 1, 0])
    report = calibration_report(probs, labels, normal=0, bins=10)
    # top-label: bin [0.9, 1.0]: conf 0.9, right; [0.8, 0.9): 0.8, wrong; [0.7, 0.8): 0.7, right; [0.5, 0.6): 0.55, wrong
    assert report["ece"] == pytest.approx((0.1 + 0.8 + 0.3 + 0.55) / 4)
    assert report["brier"] == pytest.approx((2 * 0.01 + 2 * 0.64 + 2 * 0.09 + 2 * 0.3025) / 4)
    p_abn, y = probs[:, 1], (labels != 0).astype(float)
    assert report["brier_abnormal"] == pytest.approx(((p_abn - y) ** 2).mean())
    assert report["bins"] == 10 and sum(row["n"] for row in report["reliability"]) == 4


def test_subgroup_metrics_match_sklearn_with_ties():
    rng = np.random.default_rng(0)
    probs = _softmax(np.round(rng.normal(size=(200, 3)), 1))  # rounded: many tied P(abnormal)
    labels = rng.integers(0, 3, size=200)
    got = group_metrics(probs, labels, normal=0)
    assert got["auroc_abnormal"] == pytest.approx(roc_auc_score(labels != 0, 1 - probs[:, 0]), abs=1e-12)
    pred = probs.argmax(1)
    sp = (pred[labels == 0] == 0).mean()
    se = (pred[labels != 0] == labels[labels != 0]).mean()
    assert got["score"] == pytest.approx((sp + se) / 2)


def test_a_group_far_below_the_rest_is_flagged_and_a_tiny_one_only_noted():
    rng = np.random.default_rng(1)
    n = 600
    labels = rng.integers(0, 2, size=n)
    subjects = [f"s{i % 60}" for i in range(n)]
    device = ["bad" if i % 60 < 15 else "good" for i in range(n)]
    device[0:3] = ["tiny"] * 3  # subject s0 only, on 3 segments
    p_abn = np.where(labels == 1, 0.8, 0.2) + rng.normal(scale=0.05, size=n)
    bad = np.asarray(device) == "bad"
    p_abn[bad] = rng.uniform(size=bad.sum())  # no signal on the bad device
    probs = np.stack([1 - p_abn, p_abn], axis=1).clip(0, 1)
    report = subgroup_report(probs, labels, subjects, {"device": device}, normal=0, resamples=100, seed=0)
    groups = report["groupings"]["device"]["groups"]
    assert groups["bad"]["judgement"] == "below the rest" and groups["good"]["judgement"] == "ok"
    assert groups["tiny"]["judgement"] == "too small to judge"
    assert any("device = bad" in w for w in report["warnings"]) and not any("tiny" in w for w in report["warnings"])
    assert any("device = tiny" in n for n in report["notes"])
    assert groups["bad"]["n"] == int(bad.sum()) and groups["bad"]["rest"]["n"] == n - int(bad.sum())
    assert not math.isnan(groups["bad"]["ci95"]["score"][0])


def test_no_temperature_from_separable_or_tiny_validation():
    separable = np.array([[0.6, 0.4]] * 20 + [[0.4, 0.6]] * 20)
    labels = np.array([0] * 20 + [1] * 20)
    assert fit_temperature(separable, labels) is None  # NLL keeps falling as T -> 0: the search hits its bound
    probs, y = _draw(29, seed=4, sharpen=3.0)
    assert fit_temperature(probs, y) is None  # fewer than 30 items
