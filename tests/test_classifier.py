"""The fine-tuning model: shapes, head, frozen patch embedding and layer-wise lr decay groups."""

from __future__ import annotations

import pytest
import torch

from m2dx_clinic.models.classifier import Classifier
from m2dx_clinic.models.vit import AudioViT, ViTConfig

TINY = ViTConfig(embed_dim=64, depth=2, num_heads=4)  # 80x200 input, 16x4 patches -> F = 5


def tiny_classifier(num_classes: int = 4, **kwargs) -> Classifier:
    torch.manual_seed(0)
    return Classifier(AudioViT(TINY), num_classes, **kwargs).eval()


@pytest.mark.parametrize("frames", [200, 801, 37])
def test_logits_and_features_shapes(frames):
    model = tiny_classifier()
    x = torch.randn(3, 1, 80, frames)
    with torch.no_grad():
        assert model.features(x).shape == (3, 5 * 64)
        assert model(x).shape == (3, 4)


def test_adjust_pos_one_pass_matches_shape_and_differs_from_chunks():
    chunked, one_pass = tiny_classifier(), tiny_classifier(adjust_pos=True)
    x = torch.randn(2, 1, 80, 400)
    with torch.no_grad():
        a, b = chunked(x), one_pass(x)
    assert a.shape == b.shape == (2, 4)
    assert not torch.allclose(a, b)  # a different encoding path really ran


def test_head_is_linear_named_head_with_small_init():
    model = Classifier(AudioViT(TINY), 3, head_init_std=0.01)
    assert isinstance(model.head, torch.nn.Linear)
    assert model.head.weight.shape == (3, 5 * 64)
    assert model.head.weight.abs().max() <= 0.02 + 1e-7  # truncated at 2 std
    assert torch.all(model.head.bias == 0)
    assert "head.weight" in dict(model.named_parameters())


def test_needs_two_classes():
    with pytest.raises(ValueError):
        Classifier(AudioViT(TINY), 1)


def test_layer_ids():
    model = tiny_classifier()
    assert model.layer_id("encoder.patch_embed.proj.weight") == 0
    assert model.layer_id("encoder.cls_token") == 0
    assert model.layer_id("encoder.blocks.0.attn.qkv.weight") == 1
    assert model.layer_id("encoder.blocks.1.mlp.fc2.bias") == 2
    assert model.layer_id("encoder.norm.weight") == 3
    assert model.layer_id("head.weight") == 3


def test_layer_decay_groups_scale_lr_and_skip_decay_for_biases():
    model = tiny_classifier()
    groups = model.param_groups(lr=1.0, weight_decay=0.05, layer_decay=0.5)
    by_name = {}
    for group in groups:
        for name in group["names"]:
            by_name[name] = group
    expected_scale = {0: 0.125, 1: 0.25, 2: 0.5, 3: 1.0}  # 0.5 ** (depth + 1 - layer)
    for name, param in model.named_parameters():
        group = by_name[name]
        layer = model.layer_id(name)
        assert group["lr"] == pytest.approx(expected_scale[layer]), name
        assert group["lr_scale"] == pytest.approx(expected_scale[layer])
        no_decay = param.ndim <= 1 or name.endswith(".bias") or name == "encoder.cls_token"
        assert group["weight_decay"] == (0.0 if no_decay else 0.05), name
    # every trainable parameter exactly once
    listed = [id(p) for g in groups for p in g["params"]]
    assert len(listed) == len(set(listed)) == sum(1 for _ in model.parameters())
    torch.optim.AdamW(groups)  # the groups are valid optimiser input


def test_no_layer_decay_gives_one_lr():
    groups = tiny_classifier().param_groups(lr=3e-4, weight_decay=0.0, layer_decay=1.0)
    assert {g["lr"] for g in groups} == {3e-4}


def test_freeze_patch_embed_leaves_it_out_of_the_groups():
    model = tiny_classifier()
    model.freeze_patch_embed()
    assert not any(p.requires_grad for p in model.encoder.patch_embed.parameters())
    names = [n for g in model.param_groups(1e-3, 0.0, 0.75) for n in g["names"]]
    assert not any(n.startswith("encoder.patch_embed.") for n in names)
    assert "head.weight" in names and "encoder.cls_token" in names


def test_bad_layer_decay():
    with pytest.raises(ValueError):
        tiny_classifier().param_groups(1e-3, 0.0, 0.0)
