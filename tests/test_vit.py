"""The encoder: positional table from the method's words, published key names, chunked encoding (docs/METHOD.md)."""

from __future__ import annotations

import math
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from m2dx_clinic.models.vit import AudioViT, ViTConfig, is_encoder_key, resize_pos_grid, sincos_2d


def tiny(input_size=(80, 200), patch_size=(16, 4)) -> AudioViT:
    torch.manual_seed(0)
    model = AudioViT(ViTConfig(input_size=input_size, patch_size=patch_size, embed_dim=64, depth=2, num_heads=4))
    return model.eval()


# ---------------------------------------------------------------------------- positions
def numpy_sincos_table(dim: int, grid_f: int, grid_t: int) -> np.ndarray:
    """Written from docs/METHOD.md, "Encoder": per axis a D/2 embedding [sin(pos*w), cos(pos*w)], w_k = 1/10000^(k/(D/4)), k < D/4;
    the first D/2 dims encode time, the last D/2 frequency; rows f-major; a zero CLS row first."""
    quarter = dim // 4
    omega = np.array([1.0 / 10000 ** (k / quarter) for k in range(quarter)])
    table = np.zeros((1 + grid_f * grid_t, dim))
    for f in range(grid_f):
        for t in range(grid_t):
            row = 1 + f * grid_t + t
            table[row, :quarter] = np.sin(t * omega)
            table[row, quarter : 2 * quarter] = np.cos(t * omega)
            table[row, 2 * quarter : 3 * quarter] = np.sin(f * omega)
            table[row, 3 * quarter :] = np.cos(f * omega)
    return table


@pytest.mark.parametrize("dim, grid_f, grid_t", [(64, 5, 50), (768, 5, 50), (32, 1, 7), (512, 5, 38)])
def test_sincos_2d_matches_spec(dim, grid_f, grid_t):
    ours = sincos_2d(dim, grid_f, grid_t)
    assert ours.shape == (1, 1 + grid_f * grid_t, dim)
    assert ours.dtype == torch.float32
    np.testing.assert_allclose(ours[0].numpy(), numpy_sincos_table(dim, grid_f, grid_t), atol=1e-6)
    assert torch.count_nonzero(ours[0, 0]) == 0
    no_cls = sincos_2d(dim, grid_f, grid_t, cls_token=False)
    assert torch.equal(no_cls[0], ours[0, 1:])


# ---------------------------------------------------------------------------- published layout
def test_vit_base_state_dict_keys_and_shapes():
    start = time.perf_counter()
    model = AudioViT(ViTConfig())
    assert time.perf_counter() - start < 5.0  # ~1 s normally; generous for a loaded CI box
    state = model.state_dict()
    assert state["pos_embed"].shape == (1, 251, 768)
    assert state["cls_token"].shape == (1, 1, 768)
    assert state["patch_embed.proj.weight"].shape == (768, 1, 16, 4)
    assert state["patch_embed.proj.bias"].shape == (768,)
    assert state["blocks.11.attn.qkv.weight"].shape == (2304, 768)
    assert state["blocks.11.attn.qkv.bias"].shape == (2304,)
    assert state["blocks.0.mlp.fc1.weight"].shape == (3072, 768)
    assert state["blocks.0.mlp.fc2.weight"].shape == (768, 3072)
    assert state["norm.weight"].shape == (768,)
    assert state["norm_stats"].shape == (2,)
    assert state["norm_stats"].tolist() == pytest.approx([-7.1, 4.2])
    assert "blocks.12.norm1.weight" not in state
    per_block = {k.split(".", 2)[2] for k in state if k.startswith("blocks.0.")}
    assert per_block == {
        f"{m}.{p}" for m in ("norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2") for p in ("weight", "bias")
    }
    assert all(is_encoder_key(k) for k in state)
    assert model.frame_feature_dim == 3840
    # positions are fixed, not trained
    assert "pos_embed" not in dict(model.named_parameters())
    torch.testing.assert_close(state["pos_embed"], sincos_2d(768, 5, 50))


@pytest.mark.parametrize(
    "input_size, patch, grid",
    [((80, 64), (16, 16), (5, 4)), ((80, 40), (16, 4), (5, 10)), ((80, 20), (80, 2), (1, 10))],
)
def test_forward_shapes_per_patch_size(input_size, patch, grid):
    model = tiny(input_size, patch)
    assert model.config.grid_size == grid
    x = torch.randn(2, 1, *input_size)
    with torch.no_grad():
        tokens = model.forward_features(x)
        frames = model.encode_lms(x)
    assert tokens.shape == (2, 1 + grid[0] * grid[1], 64)
    assert frames.shape == (2, grid[1], grid[0] * 64)
    # stacking: frame t holds the F tokens of column t, frequency-major
    t = 3
    expected = torch.cat([tokens[:, 1 + f * grid[1] + t] for f in range(grid[0])], dim=-1)
    torch.testing.assert_close(frames[:, t], expected)


# ---------------------------------------------------------------------------- chunked encoding
def encode_one_chunk(model: AudioViT, chunk: torch.Tensor) -> torch.Tensor:
    """Manual single-chunk path: pad to the patch width, patch + first positional columns, blocks, stack."""
    pt = model.config.patch_size[1]
    width = chunk.shape[-1]
    padded = math.ceil(width / pt) * pt
    chunk = F.pad(chunk, (0, padded - width))
    tokens = model.patch_embed(chunk)
    n_t = padded // pt
    grid_f, trained_t = model.config.grid_size
    pos = model.pos_embed[:, 1:].reshape(1, grid_f, trained_t, -1)[:, :, :n_t].reshape(1, grid_f * n_t, -1)
    out = model.run_blocks(tokens + pos)[:, 1:]
    return out.reshape(chunk.shape[0], grid_f, n_t, -1).permute(0, 2, 1, 3).reshape(chunk.shape[0], n_t, -1)


@pytest.mark.parametrize("frames", [450, 400, 203, 57, 3])
def test_chunked_encoding_equals_per_chunk(frames):
    model = tiny()
    torch.manual_seed(1)
    lms = torch.randn(2, 1, 80, frames)
    with torch.no_grad():
        out = model.encode_lms(lms)
        expected = torch.cat([encode_one_chunk(model, lms[..., s : s + 200]) for s in range(0, frames, 200)], dim=1)
    padded = frames + (-frames % 4)
    assert out.shape == (2, math.ceil(padded / 4), 5 * 64)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_short_input_uses_first_positional_columns():
    model = tiny()
    x = torch.randn(1, 1, 80, 40)
    with torch.no_grad():
        got = model.forward_features(x)
        tokens = model.patch_embed(x)
        pos = model.pos_embed[0, 1:].reshape(5, 50, 64)[:, :10].reshape(1, 50, 64)
        expected = model.run_blocks(tokens + pos)
    torch.testing.assert_close(got, expected)
    with pytest.raises(ValueError, match="adjust_pos"):
        model.forward_features(torch.randn(1, 1, 80, 240))


def test_adjust_pos_uses_bicubic_resized_positions():
    model = tiny()
    frames = 450  # -> padded 452 -> 113 time patches in one pass
    lms = torch.randn(1, 1, 80, frames)
    with torch.no_grad():
        out = model.encode_lms(lms, adjust_pos=True)
        grid = model.pos_embed[:, 1:].reshape(1, 5, 50, 64).permute(0, 3, 1, 2)
        resized = F.interpolate(grid, size=(5, 113), mode="bicubic", align_corners=False)
        pos = resized.permute(0, 2, 3, 1).reshape(1, 5 * 113, 64)
        torch.testing.assert_close(resize_pos_grid(model.pos_embed[:, 1:], 5, 113), pos)
        tokens = model.patch_embed(F.pad(lms, (0, 2)))
        expected = model.stack_frequency(model.run_blocks(tokens + pos)[:, 1:])
    assert out.shape == (1, 113, 320)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
