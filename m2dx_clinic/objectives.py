"""Training objectives and schedules: M2D / M2D-X pre-training and the fine-tuning loss.

Everything here is a pure function of its inputs: masking (with an optional explicit generator so
tests and parity checks can pass the mask in), the normalised-cosine loss, the offline tasks, the
fine-tuning cross-entropy with class weights, and the learning-rate / EMA schedules as functions
of the iteration (docs/METHOD.md, "Pre-training" and "Fine-tuning").
"""

from __future__ import annotations

import math
from typing import Protocol, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


# ---------------------------------------------------------------------------- masking
def random_masking(
    batch: int, num_patches: int, mask_ratio: float, device: torch.device | str = "cpu",
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, int]:
    """Per-sample random unstructured masking -> (ids_shuffle [B, L], len_keep).

    ids_shuffle[:, :len_keep] are the visible patches, the rest are masked (in shuffle order).
    len_keep = int(L * (1 - mask_ratio)), as in the reference.
    """
    len_keep = int(num_patches * (1 - mask_ratio))
    noise = torch.rand(batch, num_patches, device=device, generator=generator)
    return torch.argsort(noise, dim=1), len_keep


def gather_tokens(x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """x [B, L, D], ids [B, K] -> [B, K, D]."""
    return torch.gather(x, 1, ids.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


# ---------------------------------------------------------------------------- losses
def standardize(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Per-token standardisation over the feature dim: (x - mean) / sqrt(var + eps)."""
    mean = x.mean(dim=-1, keepdim=True)
    var = x.var(dim=-1, keepdim=True)
    return (x - mean) / (var + eps).sqrt()


def norm_cosine_loss(pred: torch.Tensor, target: torch.Tensor, standardize_target: bool = True) -> torch.Tensor:
    """Mean over tokens of 2 - 2 cos(pred, target), target standardised first; computed in float32."""
    pred, target = pred.float(), target.float()
    if standardize_target:
        target = standardize(target)
    pred = F.normalize(pred, dim=-1)
    target = F.normalize(target, dim=-1)
    return (2 - 2 * (pred * target).sum(dim=-1)).mean()


# ---------------------------------------------------------------------------- offline tasks
class OfflineTask(Protocol):
    """What the M2D-X offline branch learns. `out_dim` sizes the `offline_predictor`."""

    name: str
    out_dim: int

    def targets(self, batch: dict, teacher_input: torch.Tensor) -> torch.Tensor | None: ...

    def loss(self, offline_features: torch.Tensor, targets: torch.Tensor) -> torch.Tensor: ...


class TeacherTask:
    """Regularisation / distillation: match a frozen encoder's per-frame features [B, T', F*D]."""

    name = "teacher"

    def __init__(self, teacher: nn.Module):
        self.teacher = teacher.eval()
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        self.out_dim = teacher.frame_feature_dim

    @torch.no_grad()
    def targets(self, batch: dict, teacher_input: torch.Tensor) -> torch.Tensor:
        return self.teacher.encode_lms(teacher_input)

    def loss(self, offline_features: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        if offline_features.shape[1] != targets.shape[1]:
            raise ValueError(
                f"teacher time resolution {targets.shape[1]} != student {offline_features.shape[1]}; "
                "the teacher must use the same patch width and input length"
            )
        return norm_cosine_loss(offline_features, targets)


class LabelsTask:
    """Supervised offline task: mean over time -> logits; CE for single-label, BCE for multi-hot."""

    name = "labels"

    def __init__(self, num_classes: int, multi_label: bool = False):
        self.out_dim = num_classes
        self.multi_label = multi_label

    def targets(self, batch: dict, teacher_input: torch.Tensor) -> torch.Tensor:
        return batch["label"]

    def loss(self, offline_features: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        logits = offline_features.float().mean(dim=1)
        if self.multi_label:
            return F.binary_cross_entropy_with_logits(logits, targets.float())
        return F.cross_entropy(logits, targets.long())


# ---------------------------------------------------------------------------- fine-tuning loss
def soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, class_weights: torch.Tensor | None = None) -> torch.Tensor:
    """Per-sample CE with soft targets [B, K]: -sum_c y_c w_c log p_c (w = 1 without class weights)."""
    log_p = F.log_softmax(logits.float(), dim=-1)
    if class_weights is not None:
        targets = targets * class_weights.to(targets.dtype)[None, :]
    return -(targets * log_p).sum(dim=-1)


def inverse_frequency_weights(labels: Sequence[int], num_classes: int) -> torch.Tensor:
    """w_c = N / (K_present * n_c), so the average weight over training items is 1; absent classes get 0."""
    counts = np.bincount(np.asarray(labels, dtype=int), minlength=num_classes).astype(np.float64)
    present = counts > 0
    weights = np.zeros(num_classes)
    weights[present] = counts.sum() / (present.sum() * counts[present])
    return torch.tensor(weights, dtype=torch.float32)



# ---------------------------------------------------------------------------- schedules
def lr_at(epoch_progress: float, base_lr: float, warmup_epochs: float, total_epochs: float, min_lr: float = 0.0) -> float:
    """Linear warm-up then half-cycle cosine to `min_lr`; `epoch_progress` is fractional epochs done."""
    if warmup_epochs > 0 and epoch_progress < warmup_epochs:
        return base_lr * epoch_progress / warmup_epochs
    span = max(total_epochs - warmup_epochs, 1e-12)
    t = min(max((epoch_progress - warmup_epochs) / span, 0.0), 1.0)
    return min_lr + (base_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * t))


def ema_decay_at(iteration: int, total_iterations: int, start: float = 0.99995, end: float = 0.99999) -> float:
    """EMA momentum, linear from `start` to `end` over the data iterations of the run."""
    if total_iterations <= 0:
        return end
    t = min(max(iteration / total_iterations, 0.0), 1.0)
    return start + (end - start) * t


def effective_lr(blr: float, batch_size: int, accum_steps: int, world_size: int = 1) -> float:
    """lr = blr * effective_batch / 256 (the MAE/M2D scaling rule)."""
    return blr * batch_size * accum_steps * world_size / 256.0
