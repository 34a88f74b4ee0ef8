"""The yardstick beside every result: log-mel statistics + logistic regression, and the chance references.

A small-data team's first question is "is the deep model better than the simple thing?". The simple
thing here is what an audio engineer would try first: per mel band, the mean and standard deviation
of each segment's log-mel and the standard deviation of its frame-to-frame change (240 numbers for
80 bands), standardised, into a multinomial logistic regression. It is fitted on exactly the items
and fixed-length segments the deep model saw (the already decoded tensors, no second decode), with
the same class weighting, and its regularisation C is chosen on the validation split.

Chance: a model that always says "normal" (Sp 1, Se 0, Score 0.5), and one that guesses at random
with the training class frequencies (its expected Sp, Se and Score are computed exactly).
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np
import torch

from .linear import C_GRID, fit_linear  # noqa: F401 (C_GRID: re-exported)


def logmel_statistics(lms: Any, chunk_rows: int = 64) -> np.ndarray:
    """Raw log-mel [N, n_mels, frames] -> [N, 3 * n_mels]: per-band mean, std, and std of the frame delta.

    Computed `chunk_rows` segments at a time (in float64, as one pass over the whole split would),
    so a split read from the segment cache is never held in memory at once; every row's numbers are
    the same whatever the chunking.
    """
    n = len(lms)
    out: np.ndarray | None = None
    for start in range(0, n, chunk_rows):
        x = lms[start:start + chunk_rows]
        x = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
        x = x.astype(np.float64, copy=False)
        feats = np.concatenate([x.mean(axis=-1), x.std(axis=-1), np.diff(x, axis=-1).std(axis=-1)], axis=1)
        if out is None:
            out = np.empty((n, feats.shape[1]), dtype=np.float64)
        out[start:start + len(feats)] = feats
    if out is None:
        n_mels = lms.shape[1] if len(getattr(lms, "shape", ())) > 1 else 0
        return np.zeros((0, 3 * n_mels), dtype=np.float64)
    return out


def fit_baseline(lms: dict[str, torch.Tensor], labels: dict[str, Sequence[int]], *, num_classes: int, normal: int,
                 balanced: bool, seed: int = 0) -> dict[str, Any]:
    """Fit on train, choose C on val (best ICBHI Score, ties to the stronger regularisation), predict every split.

    Returns the chosen C, the C grid's validation scores, probabilities [N, K] per split (classes
    absent from training get probability 0) and the fit itself (`evaluation.linear.LinearFit`, what a
    baseline classifier file stores). Without a validation split, C = 1.
    """
    feats = {split: logmel_statistics(x) for split, x in lms.items() if len(x)}
    fitted = fit_linear(feats, labels, num_classes=num_classes, normal=normal, balanced=balanced, seed=seed)
    probs = {split: fitted.probabilities(f) for split, f in feats.items()}
    out = {"C": fitted.C, "val_grid": fitted.val_grid, "probs": probs, "features": int(feats["train"].shape[1]),
           "fit": fitted}
    if fitted.C is None:
        return {**out, "note": "a single class in the training split"}
    return {**out, "class_weight": fitted.class_weight}


def chance_references(train_labels: Sequence[int], eval_labels: Sequence[int], *, num_classes: int,
                      normal: int) -> dict[str, dict[str, float]]:
    """Expected Sp / Se / Score / accuracy of always-normal and of guessing with the training class prior."""
    train = np.bincount(np.asarray(train_labels, dtype=int), minlength=num_classes).astype(np.float64)
    prior = train / train.sum()
    counts = np.bincount(np.asarray(eval_labels, dtype=int), minlength=num_classes).astype(np.float64)
    n_abnormal = counts.sum() - counts[normal]
    guess_sp = float(prior[normal])
    guess_se = float(sum(counts[c] * prior[c] for c in range(num_classes) if c != normal) / n_abnormal) \
        if n_abnormal else math.nan
    guess_acc = float((counts * prior).sum() / counts.sum()) if counts.sum() else math.nan
    always_acc = float(counts[normal] / counts.sum()) if counts.sum() else math.nan
    return {
        "always_normal": {"sp": 1.0 if counts[normal] else math.nan, "se": 0.0 if n_abnormal else math.nan,
                          "score": 0.5, "accuracy": always_acc, "auroc_abnormal": 0.5},
        "class_prior": {"sp": guess_sp, "se": guess_se, "score": (guess_sp + guess_se) / 2, "accuracy": guess_acc,
                        "auroc_abnormal": 0.5},
    }
