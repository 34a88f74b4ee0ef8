"""M2D and M2D-X pre-training networks (docs/METHOD.md, "Pre-training").

`M2D` subclasses the encoder so the online encoder's keys stay at the top level of the state dict
(`blocks.*`, `norm.*`, ...) exactly as in the published checkpoints. Beside it live the predictor
(`decoder_*`, `mask_token`), the EMA target network (`target_blocks`, `target_norm`) and, for
M2D-X, the `offline_predictor` that maps stacked per-frame online features to the offline task.

One forward pass takes normalised log-mel and a masking (ids_shuffle, len_keep) and returns the
predictions for the masked patches, their EMA targets and, for M2D-X, per-frame offline features.
"""

from __future__ import annotations

import torch
from torch import nn

from ..config import PredictorConfig  # plain data, declared beside the recipes; importable from here as before
from ..objectives import gather_tokens
from .vit import (
    DEFAULT_NORM_STATS,
    AudioViT,
    ViTConfig,
    init_linear_and_norm,
    is_encoder_key,
    make_blocks,
    sincos_2d,
)


class M2D(AudioViT):
    """Online encoder + predictor + EMA target encoder; with `offline_dim`, the M2D-X offline predictor."""

    def __init__(
        self,
        config: ViTConfig = ViTConfig(),
        predictor: PredictorConfig = PredictorConfig(),
        offline_dim: int | None = None,
        norm_stats: tuple[float, float] = DEFAULT_NORM_STATS,
    ):
        super().__init__(config, norm_stats)
        self.predictor_config = predictor
        d, p = config.embed_dim, predictor.dim
        self.mask_token = nn.Parameter(torch.zeros(1, 1, p))
        self.decoder_embed = nn.Linear(d, p)
        self.register_buffer("decoder_pos_embed", sincos_2d(p, *config.grid_size), persistent=True)
        self.decoder_blocks = make_blocks(p, predictor.depth, predictor.num_heads, predictor.mlp_ratio)
        self.decoder_norm = nn.LayerNorm(p, eps=1e-6)
        self.decoder_pred = nn.Linear(p, d)
        self.target_blocks = make_blocks(d, config.depth, config.num_heads, config.mlp_ratio)
        self.target_norm = nn.LayerNorm(d, eps=1e-6)
        self.offline_predictor = nn.Linear(self.frame_feature_dim, offline_dim) if offline_dim else None
        nn.init.normal_(self.mask_token, std=0.02)
        for module in [self.decoder_embed, *self.decoder_blocks.modules(), self.decoder_norm, self.decoder_pred]:
            init_linear_and_norm(module)
        if self.offline_predictor is not None:
            init_linear_and_norm(self.offline_predictor)
        self.copy_online_to_target()

    # ----------------------------------------------------------------- target network
    @torch.no_grad()
    def copy_online_to_target(self) -> None:
        """Target = online (at initialisation and after loading a base checkpoint without target keys)."""
        self.target_blocks.load_state_dict(self.blocks.state_dict())
        self.target_norm.load_state_dict(self.norm.state_dict())
        for p in [*self.target_blocks.parameters(), *self.target_norm.parameters()]:
            p.requires_grad_(False)

    def ema_pairs(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """(target, online) parameter lists for the EMA update: blocks and final norm only."""
        target = [*self.target_blocks.parameters(), *self.target_norm.parameters()]
        online = [*self.blocks.parameters(), *self.norm.parameters()]
        return target, online

    @torch.no_grad()
    def update_target(self, decay: float) -> None:
        """target <- decay * target + (1 - decay) * online, one fused pass over all tensors (no host sync)."""
        target, online = self.ema_pairs()
        torch._foreach_lerp_(target, [o.detach() for o in online], 1.0 - decay)

    # ----------------------------------------------------------------- forward parts
    def encode_visible(self, patches: torch.Tensor, ids_visible: torch.Tensor) -> torch.Tensor:
        """Visible patch tokens (with positions) -> encoder output [B, 1+Lv, D] (CLS first)."""
        return self.run_blocks(gather_tokens(patches, ids_visible))

    def predict_masked(self, encoded: torch.Tensor, ids_shuffle: torch.Tensor, ids_restore: torch.Tensor,
                       len_keep: int) -> torch.Tensor:
        """Predictor: encoder output [B, 1+Lv, D] -> predictions for the masked patches [B, Lm, D] (shuffle order).

        `ids_restore` [B, L] is the inverse permutation of `ids_shuffle` [B, L].
        """
        x = self.decoder_embed(encoded)  # [B, 1+Lv, P]
        b, n_patches = ids_shuffle.shape
        mask_tokens = self.mask_token.to(x.dtype).expand(b, n_patches - len_keep, -1)
        shuffled = torch.cat([x[:, 1:, :], mask_tokens], dim=1)  # [B, L, P] in shuffle order
        unshuffled = gather_tokens(shuffled, ids_restore)  # [B, L, P] in patch order
        x = torch.cat([x[:, :1, :], unshuffled], dim=1) + self.decoder_pos_embed.to(x.dtype)
        for block in self.decoder_blocks:
            x = block(x)
        x = self.decoder_pred(self.decoder_norm(x))[:, 1:, :]  # drop CLS -> [B, L, D]
        return gather_tokens(x, ids_shuffle[:, len_keep:])

    @torch.no_grad()
    def target_features(self, patches: torch.Tensor, ids_masked: torch.Tensor) -> torch.Tensor:
        """EMA target over the masked patch embeddings only (CLS prepended, then dropped) -> [B, Lm, D]."""
        x = gather_tokens(patches, ids_masked)
        x = torch.cat([self.cls_with_pos(x.shape[0]).to(x.dtype), x], dim=1)
        for block in self.target_blocks:
            x = block(x)
        return self.target_norm(x)[:, 1:, :]

    def offline_features(
        self, encoded: torch.Tensor, predicted: torch.Tensor, ids_restore: torch.Tensor
    ) -> torch.Tensor:
        """M2D-X: [visible outputs, predictions] in patch order -> [B, T', F*D] -> offline_predictor -> [B, T', off_dim]."""
        z = torch.cat([encoded[:, 1:, :], predicted.to(encoded.dtype)], dim=1)  # shuffle order
        z = gather_tokens(z, ids_restore)  # patch order
        return self.offline_predictor(self.stack_frequency(z))

    def forward(
        self, lms: torch.Tensor, ids_shuffle: torch.Tensor, len_keep: int
    ) -> dict[str, torch.Tensor]:
        """Normalised log-mel [B, 1, F_mel, T] + masking -> predictions, targets (and offline features)."""
        patches = self.embed_patches(lms)  # [B, L, D]
        ids_restore = torch.argsort(ids_shuffle, dim=1)  # one inverse permutation for the predictor and M2D-X
        encoded = self.encode_visible(patches, ids_shuffle[:, :len_keep])
        predicted = self.predict_masked(encoded, ids_shuffle, ids_restore, len_keep)
        out = {"predicted": predicted, "target": self.target_features(patches.detach(), ids_shuffle[:, len_keep:])}
        if self.offline_predictor is not None:
            out["offline"] = self.offline_features(encoded, predicted, ids_restore)
        return out

    def encoder_state_dict(self) -> dict[str, torch.Tensor]:
        """Only the encoder keys (the `_enconly` layout)."""
        return {k: v for k, v in self.state_dict().items() if is_encoder_key(k)}
