"""Clinical metrics of class probabilities: per-class precision / recall / F1, AUROC, AP, an operating point.

A screening team reads a classifier as "abnormal or not": the probability of abnormal is
P(abnormal) = 1 - P(normal), a threshold on it is the operating point (chosen on the validation
split, never on test), and at that point sensitivity, specificity, PPV and NPV are what a clinician
asks for. The ICBHI Score stays beside them for comparison with the literature.

Confidence intervals are a bootstrap over SUBJECTS (patients; recordings when a task has no
subject ids): recordings of one patient are not independent, so resampling cycles would make the
intervals too narrow. The bootstrap is seeded, so the same predictions give the same intervals.
Every function takes plain arrays, so a test can recompute each number from predictions.csv.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np
from sklearn.metrics import average_precision_score, precision_recall_fscore_support, roc_auc_score, roc_curve

from ..metrics import icbhi_scores


def p_abnormal(probs: np.ndarray, normal: int) -> np.ndarray:
    """P(abnormal) = 1 - P(normal class) for probabilities [N, K]."""
    return 1.0 - np.asarray(probs, dtype=np.float64)[:, normal]


def _auc(truth: np.ndarray, score: np.ndarray) -> float:
    """AUROC, NaN when only one kind of item is present (it is undefined, not 0.5)."""
    if truth.all() or not truth.any():
        return math.nan
    return float(roc_auc_score(truth, score))


def _ap(truth: np.ndarray, score: np.ndarray) -> float:
    if not truth.any():
        return math.nan
    return float(average_precision_score(truth, score))


def choose_operating_point(probs: np.ndarray, labels: Sequence[int], normal: int, *,
                           target_sensitivity: float = 0.0) -> dict[str, Any] | None:
    """A threshold on P(abnormal), from validation predictions; None when the split has only one kind.

    `target_sensitivity` 0 = maximum Youden J (Se + Sp - 1); otherwise the HIGHEST threshold whose
    sensitivity reaches the target (the best specificity that keeps the sensitivity asked for).
    An item is flagged abnormal when P(abnormal) >= threshold.
    """
    truth = np.asarray(labels) != normal
    if truth.all() or not truth.any():
        return None
    score = p_abnormal(probs, normal)
    fpr, tpr, thresholds = roc_curve(truth, score, drop_intermediate=False)
    fpr, tpr, thresholds = fpr[1:], tpr[1:], thresholds[1:]  # the first point (threshold inf) flags nothing
    if target_sensitivity > 0:
        reaching = np.flatnonzero(tpr >= target_sensitivity)
        index = int(reaching[0])  # thresholds decrease: the first that reaches the target is the highest
        method = f"sensitivity >= {target_sensitivity:g} on validation"
    else:
        index = int(np.argmax(tpr - fpr))  # the first maximum: the highest threshold among ties
        method = "maximum Youden J on validation"
    return {"threshold": float(thresholds[index]), "method": method, "target_sensitivity": float(target_sensitivity),
            "val_sensitivity": float(tpr[index]), "val_specificity": float(1.0 - fpr[index]),
            "n_val": int(truth.size)}


def at_threshold(probs: np.ndarray, labels: Sequence[int], normal: int, threshold: float) -> dict[str, float]:
    """Normal-vs-abnormal sensitivity, specificity, PPV and NPV with P(abnormal) >= threshold flagged."""
    truth = np.asarray(labels) != normal
    flagged = p_abnormal(probs, normal) >= threshold
    tp, fp = int((flagged & truth).sum()), int((flagged & ~truth).sum())
    fn, tn = int((~flagged & truth).sum()), int((~flagged & ~truth).sum())

    def ratio(a: int, b: int) -> float:
        return a / b if b else math.nan

    return {"sensitivity": ratio(tp, tp + fn), "specificity": ratio(tn, tn + fp), "ppv": ratio(tp, tp + fp),
            "npv": ratio(tn, tn + fn), "tp": tp, "fp": fp, "tn": tn, "fn": fn}


def point_metrics(probs: np.ndarray, labels: Sequence[int], classes: Sequence[str], normal: int,
                  threshold: float | None) -> dict[str, float]:
    """Every scalar metric of one set of predictions, flat (`recall/crackle`, `op_ppv`, ...) for the bootstrap."""
    probs = np.asarray(probs, dtype=np.float64)
    y = np.asarray(labels, dtype=int)
    k = len(classes)
    pred = probs.argmax(axis=1)
    icbhi = icbhi_scores(y, pred, normal_class=normal, num_classes=k)
    out = {key: float(icbhi[key]) for key in ("sp", "se", "score", "accuracy")}
    precision, recall, f1, _ = precision_recall_fscore_support(y, pred, labels=list(range(k)), zero_division=np.nan)
    for c, name in enumerate(classes):
        present = bool((y == c).any())
        out[f"precision/{name}"] = float(precision[c])
        out[f"recall/{name}"] = float(recall[c]) if present else math.nan
        out[f"f1/{name}"] = float(f1[c]) if present else math.nan
        out[f"auroc/{name}"] = _auc(y == c, probs[:, c])
        out[f"ap/{name}"] = _ap(y == c, probs[:, c])
    abnormal = y != normal
    out["auroc_abnormal"] = _auc(abnormal, p_abnormal(probs, normal))
    out["ap_abnormal"] = _ap(abnormal, p_abnormal(probs, normal))
    if threshold is not None:
        op = at_threshold(probs, y, normal, threshold)
        out.update({f"op_{key}": op[key] for key in ("sensitivity", "specificity", "ppv", "npv")})
    return out


def bootstrap_intervals(probs: np.ndarray, labels: Sequence[int], groups: Sequence[str], classes: Sequence[str],
                        normal: int, threshold: float | None, *, resamples: int, seed: int) -> dict[str, list[float]]:
    """95% percentile intervals of every `point_metrics` value, resampling whole subjects with replacement."""
    if resamples <= 0:
        return {}
    probs, y = np.asarray(probs, dtype=np.float64), np.asarray(labels, dtype=int)
    groups = np.asarray([str(g) for g in groups])
    unique, inverse = np.unique(groups, return_inverse=True)
    members = [np.flatnonzero(inverse == g) for g in range(len(unique))]
    rng = np.random.default_rng(seed)
    draws: dict[str, list[float]] = {}
    for _ in range(resamples):
        chosen = rng.integers(0, len(unique), size=len(unique))
        idx = np.concatenate([members[g] for g in chosen])
        for key, value in point_metrics(probs[idx], y[idx], classes, normal, threshold).items():
            draws.setdefault(key, []).append(value)
    out = {}
    for key, values in draws.items():
        arr = np.asarray(values, dtype=np.float64)
        arr = arr[np.isfinite(arr)]
        out[key] = [float(np.percentile(arr, 2.5)), float(np.percentile(arr, 97.5))] if arr.size else [math.nan, math.nan]
    return out


def clinical_report(probs: np.ndarray, labels: Sequence[int], groups: Sequence[str], classes: Sequence[str],
                    normal: int, threshold: float | None, *, resamples: int = 0, seed: int = 0) -> dict[str, Any]:
    """Point estimates with their bootstrap CIs, nested for metrics.json: `{"values": {...}, "ci95": {...}}`."""
    values = point_metrics(probs, labels, classes, normal, threshold)
    return {"values": values,
            "ci95": bootstrap_intervals(probs, labels, groups, classes, normal, threshold, resamples=resamples, seed=seed),
            "n": int(len(labels)), "subjects": int(len(set(map(str, groups)))), "bootstrap": int(resamples),
            "bootstrap_seed": int(seed), "threshold": threshold}
