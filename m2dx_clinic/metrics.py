"""ICBHI-style scores (Sp, Se, Score, accuracy, 2-class variant), corpora's official scores, CIs over runs.

The protocols are in docs/METHOD.md, "ICBHI protocol" and "SPRSound".

Values are fractions in [0, 1]; the report layer multiplies by 100. A split with no normal (or no
abnormal) items gives NaN for the quantity that cannot be computed instead of a crash or a fake 0.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence

import numpy as np
from sklearn.metrics import confusion_matrix

# Two-sided 95 % Student-t critical values t_{0.975, df}, used only when scipy is unavailable.
_T975 = {
    1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262,
    10: 2.228, 11: 2.201, 12: 2.179, 13: 2.160, 14: 2.145, 15: 2.131, 16: 2.120, 17: 2.110,
    18: 2.101, 19: 2.093, 20: 2.086, 21: 2.080, 22: 2.074, 23: 2.069, 24: 2.064, 25: 2.060,
    26: 2.056, 27: 2.052, 28: 2.048, 29: 2.045, 30: 2.042, 40: 2.021, 60: 2.000, 120: 1.980,
}


def _ratio(num: float, den: float) -> float:
    return float(num) / float(den) if den > 0 else math.nan


def icbhi_scores(
    y_true: Sequence[int] | np.ndarray,
    y_pred: Sequence[int] | np.ndarray,
    *,
    normal_class: int = 0,
    num_classes: int | None = None,
) -> dict:
    """Sp, Se (exact abnormal class), Score, accuracy, 2-class Se/Score, per-class recall, confusion matrix.

    Sp = correct normal / all normal; Se = abnormal items predicted as their exact class / all abnormal;
    se_2class counts any abnormal prediction on an abnormal item as correct. Rows of the confusion
    matrix are true classes, columns predictions.
    """
    true = np.asarray(y_true, dtype=int).ravel()
    pred = np.asarray(y_pred, dtype=int).ravel()
    if true.shape != pred.shape:
        raise ValueError(f"y_true and y_pred differ in length: {true.size} vs {pred.size}")
    if num_classes is None:
        num_classes = int(max(true.max(initial=-1), pred.max(initial=-1), normal_class)) + 1
    for name, arr in (("y_true", true), ("y_pred", pred)):
        if arr.size and (arr.min() < 0 or arr.max() >= num_classes):
            raise ValueError(f"{name} has class indices outside 0..{num_classes - 1}")
    if not 0 <= normal_class < num_classes:
        raise ValueError(f"normal_class {normal_class} outside 0..{num_classes - 1}")
    labels = list(range(num_classes))
    cm = confusion_matrix(true, pred, labels=labels) if true.size else np.zeros((num_classes, num_classes), dtype=int)
    abnormal = [c for c in labels if c != normal_class]
    n_normal = int(cm[normal_class].sum())
    n_abnormal = int(cm[abnormal].sum()) if abnormal else 0
    correct_abnormal = int(sum(cm[c, c] for c in abnormal))
    any_abnormal = int(sum(cm[c].sum() - cm[c, normal_class] for c in abnormal))
    sp = _ratio(cm[normal_class, normal_class], n_normal)
    se = _ratio(correct_abnormal, n_abnormal)
    se2 = _ratio(any_abnormal, n_abnormal)
    return {
        "sp": sp,
        "se": se,
        "score": (sp + se) / 2,
        "accuracy": _ratio(np.trace(cm), cm.sum()),
        "se_2class": se2,
        "score_2class": (sp + se2) / 2,
        "per_class_recall": {c: _ratio(cm[c, c], cm[c].sum()) for c in labels},
        "confusion_matrix": cm.astype(int).tolist(),
        "n": int(cm.sum()),
        "n_normal": n_normal,
        "n_abnormal": n_abnormal,
    }


def sprsound_scores(
    y_true: Sequence[int] | np.ndarray,
    y_pred: Sequence[int] | np.ndarray,
    *,
    normal_class: int = 0,
    num_classes: int | None = None,
) -> dict:
    """The SPRSound challenge's scores (BioCAS 2022/2023, every task): SE, SP, AS, HS and Score.

    SE = items of every non-normal class (Poor Quality included) predicted as their exact class / all
    of them; SP = correct normal / all normal; AS = (SE + SP) / 2; HS = 2 SE SP / (SE + SP);
    Score = (AS + HS) / 2. NaN where a side is empty; HS is 0 when SE + SP is 0.
    """
    base = icbhi_scores(y_true, y_pred, normal_class=normal_class, num_classes=num_classes)
    se, sp = base["se"], base["sp"]
    average = (se + sp) / 2
    harmonic = math.nan if math.isnan(se) or math.isnan(sp) else (2 * se * sp / (se + sp) if se + sp > 0 else 0.0)
    return {"se": se, "sp": sp, "as": average, "hs": harmonic, "score": (average + harmonic) / 2,
            "n": base["n"], "n_normal": base["n_normal"], "n_abnormal": base["n_abnormal"]}


# A corpus's own published score, by the name a task carries in `TaskData.official_metric`.
OFFICIAL_SCORES = {"sprsound": sprsound_scores}


def official_block(
    name: str,
    labels: Mapping[str, Sequence[int]],
    repeats: Sequence[Mapping[str, object]],
    *,
    normal_class: int,
    num_classes: int,
    aggregate_split: str = "test",
) -> dict:
    """A corpus's official scores of a run: per repeat and split (argmax of each repeat's probabilities [N, K]),
    their mean and CI over repeats on `aggregate_split`, and the repeats' averaged probabilities ('ensemble')."""
    score = OFFICIAL_SCORES[name]
    runs, sums = [], {}
    for probs_by_split in repeats:
        row = {}
        for split, probs in probs_by_split.items():
            if probs is None or split not in labels:
                continue
            p = np.asarray(probs, dtype=np.float64)
            row[split] = score(labels[split], p.argmax(axis=1), normal_class=normal_class, num_classes=num_classes)
            sums[split] = sums.get(split, 0) + p
        runs.append(row)
    ensemble = {split: score(labels[split], (total / len(repeats)).argmax(axis=1), normal_class=normal_class,
                             num_classes=num_classes) for split, total in sums.items()}
    chosen = [r[aggregate_split] for r in runs if aggregate_split in r]
    return {"name": name, "runs": runs, "aggregate_split": aggregate_split,
            "aggregate": aggregate_runs(chosen, ("se", "sp", "as", "hs", "score")), "ensemble": ensemble}


def t_critical_95(df: int, *, use_scipy: bool = True) -> float:
    """Two-sided 95 % Student-t critical value; scipy when present, else the table (conservative between rows)."""
    if df < 1:
        return math.nan
    if use_scipy:
        try:
            from scipy.stats import t

            return float(t.ppf(0.975, df))
        except ImportError:  # pragma: no cover - scipy ships with scikit-learn
            pass
    if df in _T975:
        return _T975[df]
    lower = [k for k in _T975 if k < df]
    if df > max(_T975):
        return 1.960
    return _T975[max(lower)]  # the next smaller df has the larger (safer) value


def aggregate_runs(
    runs: Iterable[Mapping[str, float]],
    keys: Sequence[str] = ("sp", "se", "score", "accuracy"),
) -> dict[str, dict[str, float]]:
    """Mean, sample std (ddof=1), n and 95 % CI half-width (t * std / sqrt(n)) per key over runs.

    NaN values (e.g. a run whose split had no abnormal items) are left out of that key's n.
    """
    runs = list(runs)
    out: dict[str, dict[str, float]] = {}
    for key in keys:
        values = np.array([float(r[key]) for r in runs if key in r], dtype=float)
        values = values[np.isfinite(values)]
        n = int(values.size)
        mean = float(values.mean()) if n else math.nan
        std = float(values.std(ddof=1)) if n > 1 else math.nan
        half = t_critical_95(n - 1) * std / math.sqrt(n) if n > 1 else math.nan
        out[key] = {"mean": mean, "std": std, "n": n, "ci95": float(half)}
    return out


def probability_scores(probs: "torch.Tensor", labels: Sequence[int], *, normal_class: int,
                       num_classes: int) -> dict:
    """ICBHI scores of argmax predictions of probabilities [N, K] plus their mean cross-entropy ('loss').

    What every epoch of fine-tuning and every linear-evaluation or baseline fit reports per split.
    """
    import torch

    y = torch.as_tensor(list(labels), dtype=torch.long)
    pred = probs.argmax(dim=1)
    scores = icbhi_scores(y.numpy(), pred.numpy(), normal_class=normal_class, num_classes=num_classes)
    picked = probs[torch.arange(len(y)), y] if len(y) else torch.zeros(0)
    scores["loss"] = float(-(picked.clamp_min(1e-12).log()).mean()) if len(y) else math.nan
    return scores
