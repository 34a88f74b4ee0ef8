"""ICBHI scores on hand-made predictions with hand-computed confusion matrices, and CIs on known numbers."""

from __future__ import annotations

import json
import math

import pytest

from m2dx_clinic.metrics import aggregate_runs, icbhi_scores, t_critical_95


def test_icbhi_scores_hand_computed():
    # true:  N N N N C C W B B
    # pred:  N N C N C W W B N
    y_true = [0, 0, 0, 0, 1, 1, 2, 3, 3]
    y_pred = [0, 0, 1, 0, 1, 2, 2, 3, 0]
    m = icbhi_scores(y_true, y_pred)
    assert m["confusion_matrix"] == [
        [3, 1, 0, 0],
        [0, 1, 1, 0],
        [0, 0, 1, 0],
        [1, 0, 0, 1],
    ]
    assert m["sp"] == pytest.approx(3 / 4)
    assert m["se"] == pytest.approx(3 / 5)  # C->C, W->W, B->B exact
    assert m["score"] == pytest.approx((0.75 + 0.6) / 2)
    assert m["accuracy"] == pytest.approx(6 / 9)
    assert m["se_2class"] == pytest.approx(4 / 5)  # C->W also counts; B->N does not
    assert m["score_2class"] == pytest.approx((0.75 + 0.8) / 2)
    assert m["per_class_recall"] == pytest.approx({0: 0.75, 1: 0.5, 2: 1.0, 3: 0.5})
    assert (m["n"], m["n_normal"], m["n_abnormal"]) == (9, 4, 5)
    json.dumps(m)


def test_normal_class_not_zero_and_num_classes():
    # normal is class 2 here; class 3 never occurs but num_classes makes the matrix 4x4.
    m = icbhi_scores([2, 2, 0, 1], [2, 0, 0, 2], normal_class=2, num_classes=4)
    assert len(m["confusion_matrix"]) == 4
    assert m["sp"] == pytest.approx(0.5)
    assert m["se"] == pytest.approx(0.5)
    assert m["se_2class"] == pytest.approx(0.5)
    assert math.isnan(m["per_class_recall"][3])


def test_no_abnormal_or_no_normal_items_give_nan():
    only_normal = icbhi_scores([0, 0, 0], [0, 1, 0], num_classes=4)
    assert only_normal["sp"] == pytest.approx(2 / 3)
    assert math.isnan(only_normal["se"]) and math.isnan(only_normal["score"])
    assert math.isnan(only_normal["se_2class"])
    only_abnormal = icbhi_scores([1, 2], [1, 1], num_classes=4)
    assert math.isnan(only_abnormal["sp"])
    assert only_abnormal["se"] == pytest.approx(0.5)
    assert only_abnormal["se_2class"] == pytest.approx(1.0)
    empty = icbhi_scores([], [], num_classes=4)
    assert math.isnan(empty["accuracy"]) and empty["n"] == 0


def test_bad_inputs_raise():
    with pytest.raises(ValueError):
        icbhi_scores([0, 1], [0])
    with pytest.raises(ValueError):
        icbhi_scores([0, 4], [0, 1], num_classes=4)


def test_aggregate_runs_known_ci():
    runs = [{"sp": v, "se": v / 2, "score": 0.5, "accuracy": math.nan} for v in (0.1, 0.2, 0.3, 0.4, 0.5)]
    agg = aggregate_runs(runs)
    assert agg["sp"]["mean"] == pytest.approx(0.3)
    assert agg["sp"]["std"] == pytest.approx(0.158113883, rel=1e-6)
    assert agg["sp"]["n"] == 5
    # t(0.975, 4) = 2.776445; half-width = t * s / sqrt(n)
    assert agg["sp"]["ci95"] == pytest.approx(2.776445 * 0.158113883 / math.sqrt(5), rel=1e-5)
    assert agg["se"]["mean"] == pytest.approx(0.15)
    assert agg["score"]["std"] == 0 and agg["score"]["ci95"] == 0
    assert agg["accuracy"]["n"] == 0 and math.isnan(agg["accuracy"]["mean"])
    single = aggregate_runs([{"sp": 0.7}], keys=("sp",))
    assert single["sp"]["n"] == 1 and math.isnan(single["sp"]["ci95"])


def test_t_table_matches_scipy():
    for df in (1, 4, 19, 30):
        assert t_critical_95(df, use_scipy=False) == pytest.approx(t_critical_95(df), abs=1e-3)
    assert t_critical_95(35, use_scipy=False) == 2.042  # between rows: the larger (safer) value
    assert t_critical_95(500, use_scipy=False) == 1.960
