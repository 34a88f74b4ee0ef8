"""Warnings a reviewer would raise about a result, in words a user acts on.

Each check looks at predictions that were already made (validation and test probabilities, the
baseline's scores, the class counts); none of them changes a number. They end up in metrics.json,
the console summary, the report and the model card.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import numpy as np

FEW_ITEMS = 10  # below this many validation items in a class, its recall is too noisy to select on


def recall_ci_halfwidth(n: int) -> float:
    """Half-width of a 95% CI of a proportion near 50% measured on n items (the widest case)."""
    return 1.96 * math.sqrt(0.25 / n) if n > 0 else math.inf


def result_warnings(*, classes: Sequence[str], normal: int, splits: dict[str, tuple[np.ndarray, np.ndarray]],
                    model_val_score: float | None, baseline_val_score: float | None,
                    chance: dict[str, dict[str, float]] | None, test_score: float | None,
                    baseline_test_score: float | None = None,
                    test_operating: dict[str, Any] | None = None) -> list[str]:
    """`splits` maps val / test to (probabilities [N, K], labels [N]) of the model that is reported;
    `test_operating` is the test block's values at the operating point (op_sensitivity, op_ppv, ...)."""
    out: list[str] = []
    for split, (probs, labels) in splits.items():
        if len(labels) == 0:
            continue
        predicted = np.unique(np.asarray(probs).argmax(axis=1))
        if len(predicted) == 1 and len(labels) > 1:
            out.append(f"the model predicts a single class ({classes[int(predicted[0])]}) for every {split} item: "
                       "it has not learned to separate the classes")
        counts = np.bincount(np.asarray(labels, dtype=int), minlength=len(classes))
        absent = [classes[c] for c in range(len(classes)) if counts[c] == 0]
        if absent:
            out.append(f"class(es) {', '.join(absent)} absent from the {split} split: their recall cannot be measured there")
        if split == "val":
            for c in range(len(classes)):
                if 0 < counts[c] < FEW_ITEMS:
                    out.append(f"class {classes[c]} has only {counts[c]} validation item(s): a recall measured on "
                               f"them has a 95% CI of about ±{100 * recall_ci_halfwidth(int(counts[c])):.0f} points, "
                               "too wide to select a model on")
    if chance and test_score is not None and math.isfinite(test_score):
        level = max(v["score"] for v in chance.values() if math.isfinite(v.get("score", math.nan)))
        if test_score <= level + 1e-12:
            out.append(f"test Score {100 * test_score:.1f}% is at or below chance ({100 * level:.1f}%: always "
                       "'normal' or guessing with the class frequencies)")
    if (model_val_score is not None and baseline_val_score is not None and math.isfinite(model_val_score)
            and math.isfinite(baseline_val_score) and model_val_score < baseline_val_score):
        out.append(f"the model's validation Score {100 * model_val_score:.1f}% is below the log-mel statistics + "
                   f"logistic regression baseline's {100 * baseline_val_score:.1f}%: the deep model does not beat "
                   "the simple thing on this data yet")
    if (test_score is not None and baseline_test_score is not None and math.isfinite(test_score)
            and math.isfinite(baseline_test_score) and test_score < baseline_test_score):
        out.append(f"the model's test Score {100 * test_score:.1f}% is below the log-mel statistics + logistic "
                   f"regression baseline's {100 * baseline_test_score:.1f}%: on unseen subjects the simple thing "
                   "does better")
    out.extend(operating_point_warnings(test_operating))
    return out


def operating_point_warnings(values: dict[str, Any] | None) -> list[str]:
    """An operating point that never fires on the test split, or whose PPV cannot be measured there."""
    if not values:
        return []
    se, ppv = summary_value(values, "op_sensitivity"), summary_value(values, "op_ppv")
    out = []
    if se == 0.0:
        out.append("at the operating point chosen on validation the model flags NO abnormal test segment "
                   "(test sensitivity 0): the threshold does not carry over; choose it on more validation "
                   "subjects or set run.target_sensitivity")
    elif ppv is None and "op_ppv" in values:
        out.append("at the operating point no test segment is flagged abnormal, so the PPV is undefined: "
                   "the threshold is above every test P(abnormal)")
    return out


def warn_identical(values: Sequence[float], what: str, text: Callable[[float], str] = lambda v: f"{100 * v:.2f}%") -> list[str]:
    """A warning when every value is the same (e.g. every tuning trial scored alike: nothing was learned)."""
    finite = [v for v in values if v is not None and math.isfinite(v)]
    if len(finite) >= 2 and max(finite) - min(finite) < 1e-9:
        return [f"every {what} was the same ({text(finite[0])}): the search compared nothing; check that the "
                "model learns at all (more epochs, a higher learning rate, a better checkpoint)"]
    return []


def summary_value(block: dict[str, Any] | None, key: str) -> float | None:
    """A finite number from a metrics block, else None."""
    if not isinstance(block, dict):
        return None
    value = block.get(key)
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None
