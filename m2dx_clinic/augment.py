"""Fine-tuning augmentations on normalised log-mel batches: SpecAugment masks and mixup.

Both act on the batch after per-sample normalisation, on the training device, and draw from the
generators the fine-tuning loop passes in, so a repeat is reproducible from its seed.
"""

from __future__ import annotations

import numpy as np
import torch


def spec_augment(x: torch.Tensor, freq_mask: int, time_mask: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """One frequency and one time mask per sample, widths uniform in 0..max, set to 0 (= the mean after normalisation)."""
    if freq_mask <= 0 and time_mask <= 0:
        return x
    b, _, n_mels, n_frames = x.shape
    for size, max_width, axis in ((n_mels, freq_mask, 2), (n_frames, time_mask, 3)):
        if max_width <= 0:
            continue
        max_width = min(max_width, size)
        width = torch.randint(0, max_width + 1, (b,), generator=generator)
        start = (torch.rand(b, generator=generator) * (size - width + 1).float()).long()
        pos = torch.arange(size)[None, :]
        hit = (pos >= start[:, None]) & (pos < (start + width)[:, None])  # [B, size]
        shape = (b, 1, size, 1) if axis == 2 else (b, 1, 1, size)
        x = x * (~hit).reshape(shape).to(x.device, x.dtype)  # a [B,1,F,1] or [B,1,1,T] mask: tiny to move
    return x


def mixup(x: torch.Tensor, y: torch.Tensor, alpha: float, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Mix each sample with a random partner of the same batch (one lambda ~ Beta(alpha, alpha) per batch)."""
    if alpha <= 0 or x.shape[0] < 2:
        return x, y
    lam = float(rng.beta(alpha, alpha))
    perm = torch.from_numpy(rng.permutation(x.shape[0])).to(x.device)
    return lam * x + (1 - lam) * x[perm], lam * y + (1 - lam) * y[perm]
