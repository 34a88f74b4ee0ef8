"""The M2D audio encoder: a ViT over log-mel patches with fixed 2-D sin-cos positions.

Paper: Niizumi et al., "Masked Modeling Duo: Towards a Universal Audio Pre-training Framework",
IEEE/ACM TASLP 2024 (https://arxiv.org/abs/2404.06095).

Module and parameter names equal the published checkpoints' keys (`cls_token`, `pos_embed`,
`patch_embed.proj`, `blocks.N.*` from timm's `Block`, `norm`, `norm_stats`), so a published
`state_dict` loads with `strict=True` after `checkpoint.filter_checkpoint`.
Token order is frequency-major: token index = f * T' + t (Conv2d output flattened).
"""

from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import Block
from torch import nn

from ..config import ViTConfig  # plain data, declared beside the recipes; importable from here as before

DEFAULT_NORM_STATS = (-7.1, 4.2)  # AudioSet log-mel mean/std of the 2022 models (docs/METHOD.md)


def sincos_1d(embed_dim: int, positions: torch.Tensor) -> torch.Tensor:
    """[N] positions -> [N, embed_dim] = [sin(pos*omega), cos(pos*omega)], omega_k = 1/10000^(k/(D/2))."""
    assert embed_dim % 2 == 0
    omega = torch.arange(embed_dim // 2, dtype=torch.float64) / (embed_dim / 2.0)
    omega = 1.0 / 10000**omega
    angles = positions.to(torch.float64).reshape(-1)[:, None] * omega[None, :]
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)


def sincos_2d(embed_dim: int, grid_f: int, grid_t: int, cls_token: bool = True) -> torch.Tensor:
    """Fixed 2-D sin-cos table [1 (+1), F*T', D]: first D/2 dims encode time, last D/2 frequency."""
    assert embed_dim % 4 == 0, "embed_dim must be divisible by 4 for 2-D sin-cos positions"
    t_pos, f_pos = torch.meshgrid(torch.arange(grid_t), torch.arange(grid_f), indexing="xy")  # each [F, T']
    emb = torch.cat([sincos_1d(embed_dim // 2, t_pos), sincos_1d(embed_dim // 2, f_pos)], dim=1)  # [F*T', D]
    if cls_token:
        emb = torch.cat([torch.zeros(1, embed_dim, dtype=emb.dtype), emb], dim=0)
    return emb.float().unsqueeze(0)


def resize_pos_grid(pos_grid: torch.Tensor, grid_f: int, new_t: int) -> torch.Tensor:
    """[1, F*T', D] patch positions -> [1, F*new_t, D] by bicubic interpolation along time (no antialias)."""
    d = pos_grid.shape[-1]
    old_t = pos_grid.shape[1] // grid_f
    if old_t == new_t:
        return pos_grid
    grid = pos_grid.reshape(1, grid_f, old_t, d).permute(0, 3, 1, 2).float()
    grid = F.interpolate(grid, size=(grid_f, new_t), mode="bicubic", align_corners=False)
    return grid.permute(0, 2, 3, 1).reshape(1, grid_f * new_t, d).to(pos_grid.dtype)


class PatchEmbed(nn.Module):
    """Non-overlapping Conv2d patches of the log-mel image; any width that is a multiple of the patch width."""

    def __init__(self, patch_size: tuple[int, int], embed_dim: int):
        super().__init__()
        self.patch_size = tuple(patch_size)
        self.proj = nn.Conv2d(1, embed_dim, kernel_size=self.patch_size, stride=self.patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.proj(x)  # [B, D, F, T']
        return x.flatten(2).transpose(1, 2)  # [B, F*T', D], frequency-major


def make_blocks(dim: int, depth: int, num_heads: int, mlp_ratio: float) -> nn.ModuleList:
    """Pre-norm timm Blocks as in the published models (qkv bias, LayerNorm eps 1e-6)."""
    norm = partial(nn.LayerNorm, eps=1e-6)
    return nn.ModuleList(
        Block(dim, num_heads, mlp_ratio=mlp_ratio, qkv_bias=True, norm_layer=norm) for _ in range(depth)
    )


class AudioViT(nn.Module):
    """The M2D encoder. `forward_features` works on normalised log-mel [B, 1, 80, T]."""

    def __init__(self, config: ViTConfig = ViTConfig(), norm_stats: tuple[float, float] = DEFAULT_NORM_STATS):
        super().__init__()
        self.config = config
        d = config.embed_dim
        self.patch_embed = PatchEmbed(config.patch_size, d)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d))
        self.register_buffer("pos_embed", sincos_2d(d, *config.grid_size), persistent=True)
        self.blocks = make_blocks(d, config.depth, config.num_heads, config.mlp_ratio)
        self.norm = nn.LayerNorm(d, eps=1e-6)
        self.register_buffer("norm_stats", torch.tensor(norm_stats, dtype=torch.float32), persistent=True)
        self._init_encoder_weights()

    # ----------------------------------------------------------------- init
    def _init_encoder_weights(self) -> None:
        """MAE-style init: xavier for linear layers and the patch projection, N(0, 0.02) for CLS."""
        w = self.patch_embed.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.normal_(self.cls_token, std=0.02)
        for module in [*self.blocks.modules(), self.norm]:
            init_linear_and_norm(module)

    # ----------------------------------------------------------------- geometry
    @property
    def grid_f(self) -> int:
        return self.config.grid_size[0]

    @property
    def embed_dim(self) -> int:
        return self.config.embed_dim

    @property
    def frame_feature_dim(self) -> int:
        """Per-frame feature size: F stacked tokens of D dims (3840 for ViT-B, F=5)."""
        return self.grid_f * self.config.embed_dim

    def patch_positions(self, num_t: int, adjust_pos: bool = False) -> torch.Tensor:
        """Positional table for a grid F x num_t (without CLS): the first columns, or bicubic resize."""
        pos = self.pos_embed[:, 1:, :]
        trained_t = self.config.grid_size[1]
        if num_t == trained_t:
            return pos
        if num_t < trained_t and not adjust_pos:
            d = pos.shape[-1]
            return pos.reshape(1, self.grid_f, trained_t, d)[:, :, :num_t, :].reshape(1, -1, d)
        if not adjust_pos:
            raise ValueError(
                f"input has {num_t} time patches but the model was trained on {trained_t}; "
                "use chunked encoding or adjust_pos=True"
            )
        return resize_pos_grid(pos, self.grid_f, num_t)

    # ----------------------------------------------------------------- forward
    def embed_patches(self, x: torch.Tensor, adjust_pos: bool = False) -> torch.Tensor:
        """[B, 1, F_mel, T] -> patch tokens with positions [B, F*T', D] (no CLS)."""
        tokens = self.patch_embed(x)
        num_t = tokens.shape[1] // self.grid_f
        return tokens + self.patch_positions(num_t, adjust_pos).to(tokens.dtype)

    def cls_with_pos(self, batch: int) -> torch.Tensor:
        return (self.cls_token + self.pos_embed[:, :1, :]).expand(batch, -1, -1)

    def run_blocks(self, tokens: torch.Tensor) -> torch.Tensor:
        """Prepend CLS, run the encoder blocks and the final norm: [B, N, D] -> [B, 1+N, D]."""
        x = torch.cat([self.cls_with_pos(tokens.shape[0]).to(tokens.dtype), tokens], dim=1)
        for block in self.blocks:
            x = block(x)
        return self.norm(x)

    def forward_features(self, x: torch.Tensor, adjust_pos: bool = False) -> torch.Tensor:
        """Normalised log-mel [B, 1, F_mel, T] (T a multiple of the patch width) -> [B, 1+F*T', D] with CLS."""
        return self.run_blocks(self.embed_patches(x, adjust_pos))

    def stack_frequency(self, tokens: torch.Tensor) -> torch.Tensor:
        """[B, F*T', D] (frequency-major) -> per-frame features [B, T', F*D]."""
        b, n, d = tokens.shape
        return tokens.reshape(b, self.grid_f, n // self.grid_f, d).permute(0, 2, 1, 3).reshape(b, -1, self.grid_f * d)

    def normalize(self, lms: torch.Tensor) -> torch.Tensor:
        """Raw log-mel -> (lms - mean) / std with this model's `norm_stats`."""
        mean, std = self.norm_stats[0], self.norm_stats[1]
        return (lms - mean) / std

    def encode_lms(self, lms: torch.Tensor, adjust_pos: bool = False) -> torch.Tensor:
        """Normalised log-mel [B, 1, F_mel, T] of any length -> per-frame features [B, T', F*D] (docs/METHOD.md, "Using an encoder").

        The input is cut into chunks of the trained width; the last chunk is padded to a multiple of
        the patch width; chunks are encoded without masking and concatenated in time. With
        `adjust_pos=True` the whole input goes through in one pass with resized positions instead.
        """
        patch_t = self.config.patch_size[1]
        unit = self.config.input_size[1]
        total = lms.shape[-1]
        pad = (patch_t - (total % unit % patch_t)) % patch_t
        if pad:
            lms = F.pad(lms, (0, pad))
        if adjust_pos:
            return self.stack_frequency(self.forward_features(lms, adjust_pos=True)[:, 1:, :])
        chunks = []
        for start in range(0, lms.shape[-1], unit):
            tokens = self.forward_features(lms[..., start : start + unit])[:, 1:, :]
            chunks.append(self.stack_frequency(tokens))
        return torch.cat(chunks, dim=1)

    def forward(self, lms: torch.Tensor) -> torch.Tensor:
        """Normalised log-mel -> per-frame features [B, T', F*D]."""
        return self.encode_lms(lms)



ENCODER_TOP_KEYS = ("cls_token", "pos_embed", "norm_stats")
ENCODER_PREFIXES = ("patch_embed.", "blocks.", "norm.")


def is_encoder_key(key: str) -> bool:
    """True for the keys an encoder-only (`_enconly`) checkpoint keeps."""
    return key in ENCODER_TOP_KEYS or key.startswith(ENCODER_PREFIXES)


def init_linear_and_norm(module: nn.Module) -> None:
    """xavier-uniform Linear weights with zero bias; unit LayerNorm (the MAE / M2D initialisation)."""
    if isinstance(module, nn.Linear):
        nn.init.xavier_uniform_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: no decay for biases and 1-D parameters (norms); frozen parameters left out (the M2D optimiser)."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if param.ndim <= 1 or name.endswith(".bias"):
            no_decay.append(param)
        else:
            decay.append(param)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def flops_per_token_forward(config: ViTConfig) -> float:
    """Approximate forward FLOPs per token of the encoder (2 * params in matmuls + attention), for MFU."""
    d, depth = config.embed_dim, config.depth
    n = config.num_patches + 1
    per_block = 2 * (4 * d * d + 2 * d * int(d * config.mlp_ratio)) + 2 * 2 * n * d
    return float(per_block * depth)
