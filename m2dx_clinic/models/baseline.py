"""The log-mel statistics baseline as a model: what `evaluation.baseline` fits, applied by torch.

Same input as every classifier of the package (the normalised log-mel segment [B, 1, n_mels, T],
normalised with the stored `norm_stats`), so `m2dx predict`, the ONNX export and the fine-tuning
run's evaluation apply it by the same path. It undoes the normalisation, takes per band the mean,
the standard deviation and the standard deviation of the frame-to-frame change (3 * n_mels numbers,
`evaluation.baseline.logmel_statistics`), standardises them and applies the logistic regression.
Every number is a buffer or a parameter: a classifier file stores it as tensors, never a pickle.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch
from torch import nn


class LogMelStatsClassifier(nn.Module):
    """Normalised log-mel [B, 1, n_mels, T] -> logits [B, K] through log-mel statistics and a logistic regression."""

    def __init__(self, n_mels: int, num_classes: int, norm_stats: Sequence[float] = (0.0, 1.0)):
        super().__init__()
        self.n_mels = int(n_mels)
        self.num_classes = int(num_classes)
        self.register_buffer("norm_stats", torch.tensor([float(v) for v in norm_stats]))  # [2]: mean, std
        self.register_buffer("feature_mean", torch.zeros(3 * self.n_mels))  # [3M]
        self.register_buffer("feature_scale", torch.ones(3 * self.n_mels))  # [3M]
        self.head = nn.Linear(3 * self.n_mels, self.num_classes)  # on standardised features

    @classmethod
    def from_fit(cls, fitted: Any, *, norm_stats: Sequence[float]) -> "LogMelStatsClassifier":
        """From an `evaluation.linear.LinearFit` on `logmel_statistics` features."""
        features = int(np.asarray(fitted.mean).shape[0])
        model = cls(features // 3, int(np.asarray(fitted.coef).shape[0]), norm_stats)
        with torch.no_grad():
            model.feature_mean.copy_(torch.from_numpy(np.asarray(fitted.mean)).float())
            model.feature_scale.copy_(torch.from_numpy(np.asarray(fitted.scale)).float())
            model.head.weight.copy_(torch.from_numpy(np.asarray(fitted.coef)).float())
            model.head.bias.copy_(torch.from_numpy(np.asarray(fitted.intercept)).float())
        return model.eval()

    def normalize(self, lms: torch.Tensor) -> torch.Tensor:
        """Raw log-mel -> (lms - mean) / std with the stored `norm_stats` (the input every classifier takes)."""
        return (lms - self.norm_stats[0]) / self.norm_stats[1]

    def features(self, lms: torch.Tensor) -> torch.Tensor:
        """Normalised log-mel [B, 1, M, T] -> per-band mean, std, delta std [B, 3M] of the raw log-mel."""
        raw = lms[:, 0].float() * self.norm_stats[1] + self.norm_stats[0]  # [B, M, T]
        delta = raw[..., 1:] - raw[..., :-1]  # [B, M, T-1]
        return torch.cat([raw.mean(dim=-1), raw.std(dim=-1, correction=0), delta.std(dim=-1, correction=0)], dim=1)

    def forward(self, lms: torch.Tensor) -> torch.Tensor:
        """Normalised log-mel [B, 1, M, T] -> logits [B, K]."""
        return self.head((self.features(lms) - self.feature_mean) / self.feature_scale)
