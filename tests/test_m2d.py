"""M2D / M2D-X: loss parity against an independent re-computation from the method's formulas, and the
training rules around it (masking, EMA, schedules, parameter groups, gradient flow) (docs/METHOD.md, "Pre-training").

The independent path uses the model only as a holder of weights: patchify by reshape + matmul,
masking by plain indexing, unshuffle by scatter, positions from the numpy sin-cos table written
from docs/METHOD.md. Only the transformer blocks are called as modules (their internals are timm's).
"""

from __future__ import annotations

import math

import pytest
import torch

from m2dx_clinic import objectives
from m2dx_clinic.models.m2d import M2D, PredictorConfig
from m2dx_clinic.models.vit import AudioViT, ViTConfig, param_groups

from test_vit import numpy_sincos_table

CFG = ViTConfig(input_size=(80, 40), patch_size=(16, 4), embed_dim=64, depth=2, num_heads=4)
PRED = PredictorConfig(dim=32, depth=2, num_heads=2)
GRID_F, GRID_T = 5, 10
L = GRID_F * GRID_T
B = 3


def make_model(offline: bool = True) -> M2D:
    torch.manual_seed(0)
    model = M2D(CFG, PRED, offline_dim=GRID_F * CFG.embed_dim if offline else None)
    with torch.no_grad():  # a target that differs from the online encoder, as mid-training
        for p in [*model.target_blocks.parameters(), *model.target_norm.parameters()]:
            p.add_(0.05 * torch.randn_like(p))
        model.cls_token.normal_(std=0.5)
        model.mask_token.normal_(std=0.5)
    return model.eval()  # no dropout anyway; eval for clarity


def fixed_inputs() -> tuple[torch.Tensor, torch.Tensor, int]:
    gen = torch.Generator().manual_seed(1234)
    lms = torch.randn(B, 1, 80, 40, generator=gen)
    ids_shuffle, len_keep = objectives.random_masking(B, L, 0.7, generator=gen)
    return lms, ids_shuffle, len_keep


# ---------------------------------------------------------------------------- independent M2D(-X)
def layer_norm(x: torch.Tensor, ln: torch.nn.LayerNorm) -> torch.Tensor:
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + 1e-6) * ln.weight + ln.bias


def linear(x: torch.Tensor, layer: torch.nn.Linear) -> torch.Tensor:
    return x @ layer.weight.T + layer.bias


def unshuffle(shuffled: torch.Tensor, ids_shuffle: torch.Tensor) -> torch.Tensor:
    """Put slot j of the shuffled sequence back at patch index ids_shuffle[b, j]."""
    out = torch.empty_like(shuffled)
    for b in range(shuffled.shape[0]):
        out[b, ids_shuffle[b]] = shuffled[b]
    return out


def spec_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Target standardised per token ((t-mean)/sqrt(var+1e-6), unbiased var as the reference), both L2-normalised, 2-2cos."""
    t = (target - target.mean(-1, keepdim=True)) / torch.sqrt(target.var(-1, keepdim=True, unbiased=True) + 1e-6)
    t = t / t.norm(dim=-1, keepdim=True)
    p = pred / pred.norm(dim=-1, keepdim=True)
    return (2 - 2 * (p * t).sum(-1)).mean()


def independent_forward(model: M2D, lms: torch.Tensor, ids_shuffle: torch.Tensor, len_keep: int) -> dict:
    d, pf, pt = CFG.embed_dim, *CFG.patch_size
    pos = torch.from_numpy(numpy_sincos_table(d, GRID_F, GRID_T)).float()  # [1+L, D], CLS row zero
    dec_pos = torch.from_numpy(numpy_sincos_table(PRED.dim, GRID_F, GRID_T)).float()

    # patchify: [B,1,80,T] -> [B, F, pf, T', pt] -> f-major tokens of pf*pt pixels -> linear projection
    pixels = lms.reshape(B, GRID_F, pf, GRID_T, pt).permute(0, 1, 3, 2, 4).reshape(B, L, pf * pt)
    w = model.patch_embed.proj.weight.reshape(d, pf * pt)
    patches = pixels @ w.T + model.patch_embed.proj.bias + pos[1:]
    cls = model.cls_token[0, 0] + pos[0]

    def run(blocks, norm, tokens):
        x = torch.cat([cls.expand(tokens.shape[0], 1, d), tokens], dim=1)
        for block in blocks:
            x = block(x)
        return layer_norm(x, norm)

    visible_ids, masked_ids = ids_shuffle[:, :len_keep], ids_shuffle[:, len_keep:]
    visible = torch.stack([patches[b, visible_ids[b]] for b in range(B)])
    encoded = run(model.blocks, model.norm, visible)  # [B, 1+Lv, D]

    # predictor
    x = linear(encoded, model.decoder_embed)
    masks = model.mask_token[0, 0].expand(B, L - len_keep, PRED.dim)
    full = unshuffle(torch.cat([x[:, 1:], masks], dim=1), ids_shuffle)
    x = torch.cat([x[:, :1], full], dim=1) + dec_pos
    for block in model.decoder_blocks:
        x = block(x)
    x = linear(layer_norm(x, model.decoder_norm), model.decoder_pred)[:, 1:]
    predicted = torch.stack([x[b, masked_ids[b]] for b in range(B)])  # masked, in shuffle order

    # target over the masked patch embeddings only, no gradient
    with torch.no_grad():
        masked = torch.stack([patches[b, masked_ids[b]] for b in range(B)])
        target = run(model.target_blocks, model.target_norm, masked)[:, 1:]

    # M2D-X: [visible outputs, predictions] in patch order -> [B,F,T',D] -> [B,T',F*D] -> offline predictor
    z = unshuffle(torch.cat([encoded[:, 1:], predicted], dim=1), ids_shuffle)
    z = z.reshape(B, GRID_F, GRID_T, d).permute(0, 2, 1, 3).reshape(B, GRID_T, GRID_F * d)
    offline = linear(z, model.offline_predictor)
    return {"predicted": predicted, "target": target, "offline": offline}


def teacher_model() -> AudioViT:
    torch.manual_seed(7)
    return AudioViT(CFG).eval()


def test_loss_parity_m2d_and_offline():
    model = make_model(offline=True)
    lms, ids_shuffle, len_keep = fixed_inputs()
    assert len_keep == int(L * 0.3) == 15
    teacher = teacher_model()
    task = objectives.TeacherTask(teacher)
    assert task.out_dim == GRID_F * CFG.embed_dim

    with torch.no_grad():
        out = model(lms, ids_shuffle, len_keep)
        teacher_targets = task.targets({}, lms)
        lib_m2d = objectives.norm_cosine_loss(out["predicted"], out["target"])
        lib_off = task.loss(out["offline"], teacher_targets)
        ref = independent_forward(model, lms, ids_shuffle, len_keep)
        torch.testing.assert_close(teacher_targets, teacher.encode_lms(lms))

    assert out["predicted"].shape == (B, L - len_keep, CFG.embed_dim)
    assert out["target"].shape == (B, L - len_keep, CFG.embed_dim)
    assert out["offline"].shape == (B, GRID_T, GRID_F * CFG.embed_dim)
    for key in ("predicted", "target", "offline"):
        torch.testing.assert_close(out[key], ref[key], rtol=1e-5, atol=1e-5, msg=key)
    ref_m2d = spec_loss(ref["predicted"], ref["target"])
    ref_off = spec_loss(ref["offline"], teacher_targets)
    assert lib_m2d.item() == pytest.approx(ref_m2d.item(), rel=1e-5)
    assert lib_off.item() == pytest.approx(ref_off.item(), rel=1e-5)
    assert 0.0 < lib_m2d.item() < 4.0 and 0.0 < lib_off.item() < 4.0


def test_plain_m2d_has_no_offline_output():
    model = make_model(offline=False)
    lms, ids_shuffle, len_keep = fixed_inputs()
    with torch.no_grad():
        out = model(lms, ids_shuffle, len_keep)
    assert set(out) == {"predicted", "target"}
    assert model.offline_predictor is None


def test_teacher_task_rejects_mismatched_time_resolution():
    task = objectives.TeacherTask(teacher_model())
    with pytest.raises(ValueError, match="time resolution"):
        task.loss(torch.randn(1, 10, 320), torch.randn(1, 12, 320))


def test_norm_cosine_loss_extremes():
    x = torch.randn(4, 6, 16)
    standardized = (x - x.mean(-1, keepdim=True)) / x.std(-1, keepdim=True)
    assert objectives.norm_cosine_loss(standardized, x).item() == pytest.approx(0.0, abs=1e-5)
    assert objectives.norm_cosine_loss(-standardized, x).item() == pytest.approx(4.0, abs=1e-5)


# ---------------------------------------------------------------------------- masking
@pytest.mark.parametrize("num_patches, ratio", [(250, 0.7), (250, 0.6), (190, 0.6), (50, 0.75), (7, 0.5)])
def test_masking_partition(num_patches, ratio):
    gen = torch.Generator().manual_seed(0)
    ids, len_keep = objectives.random_masking(4, num_patches, ratio, generator=gen)
    assert len_keep == int(num_patches * (1 - ratio))
    assert ids.shape == (4, num_patches)
    for row in ids:
        visible, masked = set(row[:len_keep].tolist()), set(row[len_keep:].tolist())
        assert not visible & masked
        assert visible | masked == set(range(num_patches))
    assert not torch.equal(ids[0], ids[1])  # per-sample masks
    again, _ = objectives.random_masking(4, num_patches, ratio, generator=torch.Generator().manual_seed(0))
    assert torch.equal(ids, again)


# ---------------------------------------------------------------------------- EMA / target
def test_update_target_ema_on_target_only():
    model = make_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    decay = 0.9
    model.update_target(decay)
    after = model.state_dict()
    for key, old in before.items():
        if key.startswith(("target_blocks.", "target_norm.")):
            online_key = key.replace("target_blocks.", "blocks.").replace("target_norm.", "norm.")
            expected = decay * old + (1 - decay) * before[online_key]
            torch.testing.assert_close(after[key], expected, rtol=1e-6, atol=1e-7, msg=key)
            assert not torch.equal(after[key], old) or torch.equal(old, before[online_key])
        else:
            assert torch.equal(after[key], old), f"{key} must not change in the EMA update"


def test_copy_online_to_target():
    model = make_model()
    model.copy_online_to_target()
    for (name, t), o in zip(model.target_blocks.named_parameters(), model.blocks.parameters()):
        assert torch.equal(t, o), name
        assert not t.requires_grad
    assert torch.equal(model.target_norm.weight, model.norm.weight)
    assert all(not p.requires_grad for p in model.target_norm.parameters())


# ---------------------------------------------------------------------------- schedules
def test_lr_schedule():
    base, warm, total, floor = 1e-3, 4.0, 10.0, 1e-5
    assert objectives.lr_at(0.0, base, warm, total, floor) == 0.0
    assert objectives.lr_at(1.0, base, warm, total, floor) == pytest.approx(base / 4)
    assert objectives.lr_at(2.0, base, warm, total, floor) == pytest.approx(base / 2)
    assert objectives.lr_at(4.0, base, warm, total, floor) == pytest.approx(base)
    assert objectives.lr_at(7.0, base, warm, total, floor) == pytest.approx(floor + (base - floor) / 2)
    t = (8.5 - warm) / (total - warm)
    assert objectives.lr_at(8.5, base, warm, total, floor) == pytest.approx(
        floor + (base - floor) * 0.5 * (1 + math.cos(math.pi * t))
    )
    assert objectives.lr_at(10.0, base, warm, total, floor) == pytest.approx(floor)
    assert objectives.lr_at(12.0, base, warm, total, floor) == pytest.approx(floor)
    assert objectives.lr_at(5.0, base, 0.0, total) == pytest.approx(base * 0.5 * (1 + math.cos(math.pi / 2)))


def test_ema_schedule_and_effective_lr():
    assert objectives.ema_decay_at(0, 1000) == pytest.approx(0.99995)
    assert objectives.ema_decay_at(1000, 1000) == pytest.approx(0.99999)
    assert objectives.ema_decay_at(500, 1000) == pytest.approx(0.99997)
    assert objectives.ema_decay_at(250, 1000, start=0.9, end=1.0) == pytest.approx(0.925)
    assert objectives.ema_decay_at(5000, 1000) == pytest.approx(0.99999)
    assert objectives.effective_lr(3e-4, 64, 2) == pytest.approx(1.5e-4)  # ICBHI: 64 x 2 -> 128
    assert objectives.effective_lr(3e-4, 256, 1, world_size=8) == pytest.approx(2.4e-3)


# ---------------------------------------------------------------------------- optimiser groups, gradients
def test_param_groups():
    model = make_model()
    model.patch_embed.proj.weight.requires_grad_(False)  # e.g. frozen patch embedding
    decay, no_decay = param_groups(model, 0.05)
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    names = {id(p): n for n, p in model.named_parameters()}
    decay_names = {names[id(p)] for p in decay["params"]}
    no_decay_names = {names[id(p)] for p in no_decay["params"]}
    assert not decay_names & no_decay_names
    assert "blocks.0.attn.qkv.weight" in decay_names
    assert "decoder_pred.weight" in decay_names
    assert "offline_predictor.weight" in decay_names
    for n in ("blocks.0.attn.qkv.bias", "blocks.0.norm1.weight", "norm.weight", "decoder_norm.weight",
              "patch_embed.proj.bias", "offline_predictor.bias"):
        assert n in no_decay_names, n
    assert all(n.endswith(".bias") or model.get_parameter(n).ndim <= 1 for n in no_decay_names)
    everything = decay_names | no_decay_names
    assert "patch_embed.proj.weight" not in everything
    assert not any(n.startswith(("target_blocks.", "target_norm.")) for n in everything)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert everything == trainable


def test_gradients_reach_online_and_predictor_not_target():
    model = make_model().train()
    lms, ids_shuffle, len_keep = fixed_inputs()
    out = model(lms, ids_shuffle, len_keep)
    teacher = torch.randn(B, GRID_T, GRID_F * CFG.embed_dim)
    loss = objectives.norm_cosine_loss(out["predicted"], out["target"]) + objectives.norm_cosine_loss(
        out["offline"], teacher
    )
    loss.backward()
    for name in ("patch_embed.proj.weight", "blocks.0.attn.qkv.weight", "blocks.1.mlp.fc2.weight", "norm.weight",
                 "cls_token", "decoder_embed.weight", "decoder_blocks.1.mlp.fc1.weight", "decoder_pred.weight",
                 "mask_token", "offline_predictor.weight"):
        grad = model.get_parameter(name).grad
        assert grad is not None and grad.abs().sum() > 0, name
    for name, p in [*model.target_blocks.named_parameters(), *model.target_norm.named_parameters()]:
        assert p.grad is None, name
    assert not out["target"].requires_grad
