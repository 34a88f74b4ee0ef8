"""Calibration of class probabilities: does "P = 0.8" come true 8 times in 10?

A clinician reads a probability as a frequency, so a classifier is scored on it, not only on its
ranking (docs/METHOD.md, "Calibration"):
- ECE (expected calibration error), top-label: items binned by their highest probability into
  `bins` equal-width bins on [0, 1]; ECE = sum over bins of (items in bin / N) * |accuracy - mean
  confidence|. The same on P(abnormal) vs "is abnormal" (`ece_abnormal`).
- Brier score: mean over items of sum over classes of (p_k - y_k)^2 (0 is perfect; 2 the worst),
  and the binary Brier of P(abnormal).
- Temperature scaling: one number T > 0, p_T = softmax(log p / T), fitted by minimising the negative
  log-likelihood on the VALIDATION split (at least `MIN_TEMPERATURE_ITEMS` items, else none is fitted;
  an optimum at the search bounds, from separable or degenerate validation, is not used either).
  T > 1 softens an over-confident model. It never changes the most probable class of an item.
Every function takes plain arrays, so a test can recompute each number from predictions.csv.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np

DEFAULT_BINS = 10
MIN_TEMPERATURE_ITEMS = 30  # fewer validation items: no temperature is fitted (one number, but not from noise)
BINNING = "equal-width bins on [0, 1]"
_FLOOR = 1e-12  # log of a zero probability


def _bin_table(confidence: np.ndarray, correct: np.ndarray, bins: int) -> list[dict[str, Any]]:
    """Per bin [lo, hi): items, mean confidence, observed frequency (the last bin includes 1.0)."""
    edges = np.linspace(0.0, 1.0, bins + 1)
    index = np.clip(np.digitize(confidence, edges[1:-1], right=False), 0, bins - 1)
    rows = []
    for b in range(bins):
        inside = index == b
        n = int(inside.sum())
        rows.append({"lo": float(edges[b]), "hi": float(edges[b + 1]), "n": n,
                     "confidence": float(confidence[inside].mean()) if n else math.nan,
                     "observed": float(correct[inside].mean()) if n else math.nan})
    return rows


def _ece(table: list[dict[str, Any]], total: int) -> float:
    if not total:
        return math.nan
    return float(sum(row["n"] / total * abs(row["observed"] - row["confidence"]) for row in table if row["n"]))


def calibration_report(probs: np.ndarray, labels: Sequence[int], normal: int, *,
                       bins: int = DEFAULT_BINS) -> dict[str, Any]:
    """ECE (top-label and P(abnormal)), Brier (multi-class and P(abnormal)) and the reliability tables."""
    probs = np.asarray(probs, dtype=np.float64)  # [N, K]
    y = np.asarray(labels, dtype=int)
    n, k = probs.shape if probs.ndim == 2 else (0, 0)
    onehot = np.eye(k)[y] if n else np.zeros((0, k))
    confidence, predicted = (probs.max(axis=1), probs.argmax(axis=1)) if n else (np.zeros(0), np.zeros(0, int))
    top = _bin_table(confidence, (predicted == y).astype(np.float64), bins)
    p_abn = 1.0 - probs[:, normal] if n else np.zeros(0)
    abnormal = (y != normal).astype(np.float64)
    abn = _bin_table(p_abn, abnormal, bins)
    return {"bins": int(bins), "binning": BINNING, "n": int(n),
            "ece": _ece(top, n), "brier": float(((probs - onehot) ** 2).sum(axis=1).mean()) if n else math.nan,
            "ece_abnormal": _ece(abn, n), "brier_abnormal": float(((p_abn - abnormal) ** 2).mean()) if n else math.nan,
            "reliability": top, "reliability_abnormal": abn}


def apply_temperature(probs: np.ndarray, temperature: float) -> np.ndarray:
    """softmax(log p / T) for probabilities [N, K]: the same ranking of classes within an item, softer or sharper."""
    logp = np.log(np.clip(np.asarray(probs, dtype=np.float64), _FLOOR, 1.0)) / float(temperature)
    logp -= logp.max(axis=1, keepdims=True)
    out = np.exp(logp)
    return out / out.sum(axis=1, keepdims=True)


def _nll(probs: np.ndarray, y: np.ndarray, temperature: float) -> float:
    scaled = apply_temperature(probs, temperature)
    return float(-np.log(np.clip(scaled[np.arange(len(y)), y], _FLOOR, 1.0)).mean())


def fit_temperature(probs: np.ndarray, labels: Sequence[int], *, low: float = 0.05, high: float = 20.0,
                    min_items: int = MIN_TEMPERATURE_ITEMS) -> dict[str, Any] | None:
    """The T minimising validation NLL (a bounded search over log T); None with fewer than `min_items` items,
    one class, or an optimum at a bound."""
    from scipy.optimize import minimize_scalar

    probs = np.asarray(probs, dtype=np.float64)
    y = np.asarray(labels, dtype=int)
    if len(y) < max(min_items, 2) or len(np.unique(y)) < 2:
        return None
    found = minimize_scalar(lambda log_t: _nll(probs, y, math.exp(log_t)), bounds=(math.log(low), math.log(high)),
                            method="bounded", options={"xatol": 1e-6})
    temperature = float(math.exp(found.x))
    if min(abs(found.x - math.log(low)), abs(found.x - math.log(high))) < 1e-3:
        return None  # the search ran into a bound: separable or degenerate validation, no temperature to trust
    return {"temperature": temperature, "fitted_on": "validation", "n": int(len(y)), "at_bound": False,
            "nll_before": _nll(probs, y, 1.0), "nll_after": _nll(probs, y, temperature),
            "method": "temperature scaling: softmax(log p / T), T minimising the validation negative log-likelihood"}


def calibration_block(raw: np.ndarray, labels: Sequence[int], normal: int, temperature: float | None) -> dict[str, Any]:
    """What metrics.json says about one scored split: `before_scaling` and `after_scaling` with a temperature,
    else `uncalibrated`."""
    if not temperature:
        return {"uncalibrated": calibration_report(raw, labels, normal)}
    return {"temperature": float(temperature), "before_scaling": calibration_report(raw, labels, normal),
            "after_scaling": calibration_report(apply_temperature(raw, temperature), labels, normal)}


def shipped_report(block: dict[str, Any]) -> dict[str, Any]:
    """Of a `calibration_block`, the report of the probabilities the classifier ships: after its temperature when
    one was fitted, else the unscaled ones ({} for an empty block)."""
    return block.get("after_scaling") or block.get("uncalibrated") or {}
