"""The linear probe: a cheap, label-aware check of which checkpoint's features separate the classes best.

StandardScaler + balanced logistic regression (the linear evaluation's `evaluation.linear`) on mean-pooled clip embeddings of the task's training
split, scored on its subject-disjoint validation split (never the test split: the probe picks a
checkpoint, so the test split must stay unseen). Minutes instead of a fine-tune per checkpoint.
The cycles are the fine-tuning loop's own cached fixed-length segments (`data.segment_cache`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from ..audio import FrontEndConfig
from ..data.segment_cache import SegmentArrays, prepare_segments, readable_rows
from ..errors import DataError
from ..evaluation.linear import fit_linear
from ..metrics import icbhi_scores
from ..models.vit import AudioViT
from ..inference import clip_embeddings


class ProbeSet:
    """The task's train + val cycles as raw log-mel, prepared once per report and shared by all checkpoints.

    Test items are never read. Items whose audio cannot be read are skipped and listed in `skipped`.
    `cache_dir` is the fine-tuning segment cache, so cycles a fine-tune already decoded are reused.
    """

    def __init__(self, task_data: Any, *, cycle_seconds: float = 8.0, pad: str = "circular",
                 cache_dir: Path | None = None, progress: bool = False):
        self.task_data = task_data
        self.cycle_seconds = cycle_seconds
        self.pad = pad
        self.cache_dir = cache_dir
        self.progress = progress
        self.skipped: list[str] = []
        self._by_frontend: dict[FrontEndConfig, tuple[SegmentArrays, np.ndarray, np.ndarray]] = {}

    def arrays(self, frontend: FrontEndConfig) -> tuple[SegmentArrays, np.ndarray, np.ndarray]:
        """(lms float32 [N, n_mels, frames] read on access, labels [N], is_train [N]) of the readable train/val cycles."""
        if frontend in self._by_frontend:
            return self._by_frontend[frontend]
        items = [it for it in self.task_data.items if it.split in ("train", "val")]
        self.skipped = []
        # No live bar unless asked: the report may run inside the training loop's own live display.
        lms = prepare_segments(items, frontend=frontend, length_s=self.cycle_seconds, pad=self.pad,
                               cache_dir=self.cache_dir, progress=self.progress, description="probe: reading cycles",
                               problems=self.skipped)
        keep = readable_rows(lms)
        if not bool(keep.any()):
            raise DataError("no train/val cycle of the task could be read; the probe needs labelled audio")
        labels = np.asarray([int(it.label) for it in items], dtype=int)[keep.numpy()]
        is_train = np.asarray([it.split == "train" for it in items], dtype=bool)[keep.numpy()]
        result = (lms.subset(keep), labels, is_train)
        self._by_frontend[frontend] = result
        return result


def _probe_predictions(features: np.ndarray, labels: np.ndarray, is_train: np.ndarray, task_data: Any,
                       seed: int) -> np.ndarray:
    """Validation predictions of the probe: the linear evaluation's fit (`evaluation.linear`), C = 1, balanced."""
    fitted = fit_linear({"train": features[is_train]}, {"train": labels[is_train]},
                        num_classes=len(task_data.classes), normal=int(task_data.normal_class), balanced=True,
                        seed=seed, c_grid=(1.0,), max_iter=1000)
    return fitted.logits(features[~is_train]).argmax(axis=1)


def probe_scores(
    encoder: AudioViT,
    task_data: Any,
    *,
    probe_set: ProbeSet | None = None,
    norm_stats: Sequence[float] | None = None,
    device: str | torch.device | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """Linear-probe Sp / Se / Score / accuracy on the subject-disjoint validation split.

    StandardScaler + LogisticRegression(class_weight='balanced') on mean-pooled clip embeddings of
    the training split: a cheap, label-aware check of which checkpoint's features separate the
    classes best, minutes instead of a fine-tune per checkpoint. Raises DataError when the split
    cannot support a probe (no validation items, fewer than two training classes).
    """
    probe_set = probe_set or ProbeSet(task_data)
    frontend = FrontEndConfig.for_sample_rate(encoder.config.sample_rate)
    lms, labels, is_train = probe_set.arrays(frontend)
    if not is_train.any() or is_train.all():
        raise DataError("the probe needs items in both the train and the validation split of the task")
    if len(np.unique(labels[is_train])) < 2:
        raise DataError("the training split has a single class; a linear probe needs at least two")
    emb = clip_embeddings(encoder, lms, norm_stats=norm_stats, device=device)
    pred = _probe_predictions(emb, labels, is_train, task_data, seed)
    scores = icbhi_scores(labels[~is_train], pred, normal_class=int(task_data.normal_class),
                          num_classes=len(task_data.classes))
    return {"sp": scores["sp"], "se": scores["se"], "score": scores["score"], "accuracy": scores["accuracy"],
            "n_train": int(is_train.sum()), "n_val": int((~is_train).sum()), "n_normal": scores["n_normal"],
            "n_abnormal": scores["n_abnormal"]}


def probe_baseline(task_data: Any, probe_set: ProbeSet, frontend: FrontEndConfig, seed: int = 0) -> dict[str, Any]:
    """The probe's yardstick: the same classifier on log-mel statistics instead of the checkpoint's embeddings.

    Same cycles, same scaler + balanced logistic regression, only the features differ (per-band
    log-mel mean, std and delta std). A checkpoint whose probe does not beat it has not yet learned
    more than band energies tell.
    """
    from ..evaluation.baseline import logmel_statistics

    lms, labels, is_train = probe_set.arrays(frontend)
    if not is_train.any() or is_train.all() or len(np.unique(labels[is_train])) < 2:
        raise DataError("the probe baseline needs two training classes and a validation split")
    feats = logmel_statistics(lms)
    pred = _probe_predictions(feats, labels, is_train, task_data, seed)
    scores = icbhi_scores(labels[~is_train], pred, normal_class=int(task_data.normal_class),
                          num_classes=len(task_data.classes))
    return {"sp": scores["sp"], "se": scores["se"], "score": scores["score"], "n_normal": scores["n_normal"],
            "n_abnormal": scores["n_abnormal"],
            "method": "per-band log-mel mean / std / delta std -> standardise -> balanced logistic regression"}
