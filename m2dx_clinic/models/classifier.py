"""The fine-tuning model: an M2D encoder, mean over time, one linear head (docs/METHOD.md, "Fine-tuning").

The input is normalised log-mel [B, 1, 80, T] of any length. The encoder turns it into per-frame
features [B, T', F*D] (chunks of the trained width, or one pass with resized positions), the frames
are averaged into one clip vector and a single `Linear(F*D -> classes)` named `head` gives the
logits. Keeping the head this small is what the paper evaluates: the quality of the pre-trained
representation, not a big classifier on top.

`param_groups` implements layer-wise learning-rate decay: layers near the input move less than the
head, which protects what pre-training learned when labelled data is scarce.
"""

from __future__ import annotations

import re

import torch
from torch import nn

from .vit import AudioViT

_BLOCK = re.compile(r"^blocks\.(\d+)\.")
_EMBEDDING_NAMES = ("cls_token", "pos_embed")


class Classifier(nn.Module):
    """Encoder + mean over time + `head`. Parameter names: `encoder.*` (published keys) and `head.*`."""

    def __init__(
        self,
        encoder: AudioViT,
        num_classes: int,
        *,
        adjust_pos: bool = False,
        head_init_std: float = 0.01,
    ):
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"a classifier needs at least 2 classes, got {num_classes}")
        self.encoder = encoder
        self.num_classes = int(num_classes)
        self.adjust_pos = bool(adjust_pos)
        self.head = nn.Linear(encoder.frame_feature_dim, self.num_classes)
        # A small head start keeps the first updates from wrecking the encoder through large gradients.
        nn.init.trunc_normal_(self.head.weight, std=head_init_std, a=-2 * head_init_std, b=2 * head_init_std)
        nn.init.zeros_(self.head.bias)

    @property
    def depth(self) -> int:
        return len(self.encoder.blocks)

    def normalize(self, lms: torch.Tensor) -> torch.Tensor:
        """Raw log-mel -> the input `forward` takes, with the encoder's fixed statistics (every classifier has one)."""
        return self.encoder.normalize(lms)

    def features(self, lms: torch.Tensor) -> torch.Tensor:
        """Normalised log-mel [B, 1, F_mel, T] -> clip embedding [B, F*D] (mean of the per-frame features)."""
        frames = self.encoder.encode_lms(lms, adjust_pos=self.adjust_pos)
        return frames.mean(dim=1)

    def forward(self, lms: torch.Tensor) -> torch.Tensor:
        """Normalised log-mel [B, 1, F_mel, T] -> logits [B, classes]."""
        return self.head(self.features(lms))

    # ----------------------------------------------------------------- training helpers
    def freeze_patch_embed(self) -> None:
        """Stop training the patch projection (the paper's fine-tuning setting)."""
        for param in self.encoder.patch_embed.parameters():
            param.requires_grad_(False)

    def layer_id(self, name: str) -> int:
        """0 for patch embedding / CLS / positions, i+1 for `blocks.i`, depth+1 for the final norm and head."""
        local = name[len("encoder."):] if name.startswith("encoder.") else name
        if local.startswith("patch_embed.") or local in _EMBEDDING_NAMES:
            return 0
        match = _BLOCK.match(local)
        if match:
            return int(match.group(1)) + 1
        return self.depth + 1

    def param_groups(self, lr: float, weight_decay: float, layer_decay: float = 1.0) -> list[dict]:
        """Optimiser groups with layer-wise lr decay and no weight decay on biases / 1-D parameters.

        The CLS token is not decayed either (as in MAE / timm): shrinking it towards zero only
        moves the sequence's summary token away from what pre-training learned.

        Layer l gets lr * layer_decay ** (depth + 1 - l) (the head and final norm get the full lr).
        Each group carries `lr_scale` so a schedule can set `group['lr'] = lr_t * group['lr_scale']`.
        Frozen parameters are left out so the optimiser never holds state for them.
        """
        if not 0.0 < layer_decay <= 1.0:
            raise ValueError(f"layer_decay must be in (0, 1], got {layer_decay}")
        top = self.depth + 1
        groups: dict[tuple[int, bool], dict] = {}
        for name, param in self.named_parameters():
            if not param.requires_grad:
                continue
            layer = self.layer_id(name)
            local = name[len("encoder."):] if name.startswith("encoder.") else name
            no_decay = param.ndim <= 1 or name.endswith(".bias") or local in _EMBEDDING_NAMES
            key = (layer, no_decay)
            if key not in groups:
                scale = layer_decay ** (top - layer)
                groups[key] = {
                    "params": [],
                    "names": [],
                    "lr": lr * scale,
                    "lr_scale": scale,
                    "weight_decay": 0.0 if no_decay else weight_decay,
                    "layer_id": layer,
                }
            groups[key]["params"].append(param)
            groups[key]["names"].append(name)
        return [groups[k] for k in sorted(groups)]
