"""The one linear classifier on fixed features: standardise -> multinomial logistic regression, C chosen on validation.

Three users, one implementation: the linear evaluation of a frozen encoder (clip embeddings), the
log-mel statistics baseline (`evaluation.baseline`) and the report's linear probe (`report.probe`).
scikit-learn fits; what comes out is plain arrays (`LinearFit`: the standardisation and the
coefficients), so a classifier file stores them as tensors and never a pickled estimator, and the
probabilities a run reports are computed from those arrays, as the shipped classifier computes them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from ..metrics import icbhi_scores

C_GRID = (0.001, 0.01, 0.1, 1.0, 10.0, 100.0)
ABSENT_LOGIT = -1.0e4  # the logit of a class the training split never showed: probability 0 in float32 too


@dataclass
class LinearFit:
    """A fitted standardise + logistic-regression classifier as arrays (K = all task classes, F = features)."""

    mean: np.ndarray  # [F] feature means of the training split
    scale: np.ndarray  # [F] feature standard deviations (1 where a feature is constant, as scikit-learn does)
    coef: np.ndarray  # [K, F] on standardised features; rows of absent classes are 0
    intercept: np.ndarray  # [K]; ABSENT_LOGIT for classes absent from training
    C: float | None  # the chosen inverse regularisation (None: a single training class, no fit)
    val_grid: dict[str, float] = field(default_factory=dict)  # validation Score per C tried
    class_weight: str = "none"

    def logits(self, x: np.ndarray) -> np.ndarray:
        """Features [N, F] -> logits [N, K] (float64)."""
        return ((np.asarray(x, dtype=np.float64) - self.mean) / self.scale) @ self.coef.T + self.intercept

    def probabilities(self, x: np.ndarray) -> np.ndarray:
        """Features [N, F] -> class probabilities [N, K] (float64 softmax of `logits`)."""
        z = self.logits(x)
        z -= z.max(axis=1, keepdims=True)
        e = np.exp(z)
        return e / e.sum(axis=1, keepdims=True)

    def folded(self) -> tuple[np.ndarray, np.ndarray]:
        """(weight [K, F], bias [K]) acting on raw features: the standardisation folded into one linear layer."""
        weight = self.coef / self.scale
        return weight, self.intercept - weight @ self.mean

    def describe(self) -> dict[str, Any]:
        """Plain values for metrics.json and classifier metadata."""
        return {"C": self.C, "val_grid": dict(self.val_grid), "features": int(self.mean.shape[0]),
                "class_weight": self.class_weight}


def _as_fit(model: Any, num_classes: int, c: float | None, grid: dict[str, float], balanced: bool) -> LinearFit:
    """A scikit-learn pipeline (StandardScaler, LogisticRegression) -> arrays over all K classes."""
    scaler, lr = model[0], model[-1]
    present = np.asarray(lr.classes_, dtype=int)
    n_features = scaler.mean_.shape[0]
    coef = np.zeros((num_classes, n_features))
    intercept = np.full(num_classes, ABSENT_LOGIT)
    if len(present) == 2:  # binary: P(second) = sigmoid(w.x + b) = softmax([0, w.x + b])
        coef[present[1]] = lr.coef_[0]
        intercept[present[0]], intercept[present[1]] = 0.0, lr.intercept_[0]
    else:
        coef[present] = lr.coef_
        intercept[present] = lr.intercept_
    return LinearFit(mean=scaler.mean_.astype(np.float64), scale=scaler.scale_.astype(np.float64), coef=coef,
                     intercept=intercept, C=c, val_grid=grid, class_weight="balanced" if balanced else "none")


def fit_linear(features: dict[str, np.ndarray], labels: dict[str, Sequence[int]], *, num_classes: int, normal: int,
               balanced: bool, seed: int = 0, c_grid: Sequence[float] = C_GRID, max_iter: int = 2000) -> LinearFit:
    """Fit on `features['train']`; choose C on 'val' (best ICBHI Score, then accuracy; ties to the smaller C).

    Without a validation split (or with a one-value grid) C is the grid's value nearest 1. One training
    class: no fit, that class everywhere.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    x_train = np.asarray(features["train"], dtype=np.float64)
    y_train = np.asarray(labels["train"], dtype=int)
    present = np.unique(y_train)
    if len(present) < 2:
        mean = x_train.mean(axis=0) if len(x_train) else np.zeros(x_train.shape[1])
        intercept = np.full(num_classes, ABSENT_LOGIT)
        intercept[int(present[0])] = 0.0
        return LinearFit(mean, np.ones_like(mean), np.zeros((num_classes, x_train.shape[1])), intercept, None,
                         class_weight="balanced" if balanced else "none")

    def fit(c: float) -> Any:
        model = make_pipeline(StandardScaler(), LogisticRegression(
            C=c, max_iter=max_iter, class_weight="balanced" if balanced else None, random_state=seed))
        return model.fit(x_train, y_train)

    grid: dict[str, float] = {}
    has_val = "val" in features and len(features["val"]) > 0
    best_c, best_key = min(c_grid, key=lambda c: abs(math.log10(c))), None
    if has_val and len(c_grid) > 1:
        y_val = np.asarray(labels["val"], dtype=int)
        for c in c_grid:
            pred = _as_fit(fit(c), num_classes, c, {}, balanced).logits(features["val"]).argmax(axis=1)
            s = icbhi_scores(y_val, pred, normal_class=normal, num_classes=num_classes)
            key = (s["score"] if math.isfinite(s["score"]) else -math.inf, s["accuracy"])
            grid[str(c)] = key[0]
            if best_key is None or key > best_key:  # strictly better only: ties keep the stronger regularisation
                best_c, best_key = c, key
    return _as_fit(fit(best_c), num_classes, best_c, grid, balanced)
