"""Checkpoint I/O: published layouts, geometry from names and shapes, safety, and M2D restore (docs/METHOD.md, "Checkpoints")."""

from __future__ import annotations

import argparse
import datetime as dt
import os
from pathlib import Path

import pytest
import torch

from m2dx_clinic.checkpoint import (
    EVAR_PREFIX,
    atomic_torch_save,
    build_m2d_from,
    checkpoint_folder_name,
    filter_checkpoint,
    list_checkpoints,
    load_checkpoint_file,
    peek_checkpoint,
    strict_load,
    training_checkpoint,
)
from m2dx_clinic.errors import CheckpointError
from m2dx_clinic.weights import load_encoder, open_checkpoint
from m2dx_clinic.models.m2d import M2D, PredictorConfig
from m2dx_clinic.models.vit import AudioViT, ViTConfig

TINY = ViTConfig(input_size=(80, 40), patch_size=(16, 4), embed_dim=64, depth=2, num_heads=4)
# Without our `m2dx` metadata the head count is not in the weights: the loader assumes dim // 64 = 1.
TINY_H1 = ViTConfig(input_size=(80, 40), patch_size=(16, 4), embed_dim=64, depth=2, num_heads=1)
PRED = PredictorConfig(dim=32, depth=1, num_heads=1)
DATE = dt.date(2023, 5, 29)


def make_model(config: ViTConfig = TINY, seed: int = 0, norm_stats=(-5.5, 3.25)) -> M2D:
    torch.manual_seed(seed)
    model = M2D(config, PRED, norm_stats=norm_stats)
    with torch.no_grad():  # make the target differ from the online encoder so restoring it is observable
        for p in model.target_blocks.parameters():
            p.add_(0.01 * torch.randn_like(p))
    return model.eval()


def features(encoder: AudioViT, seed: int = 5) -> torch.Tensor:
    torch.manual_seed(seed)
    lms = torch.randn(2, 1, 80, 93)
    with torch.no_grad():
        return encoder.encode_lms(lms)


def save_published(tmp_path: Path, obj, folder: str, epoch: int = 300) -> Path:
    return atomic_torch_save(obj, tmp_path / folder / f"checkpoint-{epoch}.pth")


# ---------------------------------------------------------------------------- round trips
def test_round_trip_in_published_folder_naming(tmp_path):
    model = make_model()
    name = checkpoint_folder_name(TINY, offline=False, date=DATE)
    assert name == "m2d_vit_d64l2-80x40p16x4p16k-230529"
    assert checkpoint_folder_name(ViTConfig(), offline=True, date=DATE, tag="icbhi r0.3") == (
        "m2d_x_vit_base-80x200p16x4p16k-230529-icbhi_r0.3"
    )
    ckpt = training_checkpoint(model, epoch=7, optimizer={"state": {}}, scaler=None,
                               args={"optim": {"blr": 3e-4}, "mask_ratio": 0.7}, meta={"note": "x"})
    path = save_published(tmp_path, ckpt, name, epoch=7)
    assert not list(path.parent.glob(".*tmp*"))
    assert list_checkpoints(tmp_path) == [(7, path)]

    loaded = open_checkpoint(path.parent)  # a folder resolves to its latest checkpoint
    assert isinstance(loaded.raw["args"], argparse.Namespace)
    assert loaded.raw["args"].optim_blr == pytest.approx(3e-4)
    assert loaded.epoch == 7
    assert loaded.vit_config == TINY  # exact, including num_heads, from our metadata
    encoder = load_encoder(path)
    assert not encoder.training
    torch.testing.assert_close(features(encoder), features(model), rtol=0, atol=0)
    assert encoder.norm_stats.tolist() == pytest.approx([-5.5, 3.25])


def _layouts(model: M2D) -> dict[str, dict]:
    state = {k: v.clone() for k, v in model.state_dict().items()}
    enc = model.encoder_state_dict()
    evar = {EVAR_PREFIX + k: v for k, v in enc.items()}
    evar["module.ar.runtime.head.weight"] = torch.randn(4, 320)
    evar["module.ar.runtime.head.bias"] = torch.zeros(4)
    return {
        "full": {"model": state, "optimizer": None, "epoch": 300, "scaler": None,
                 "args": argparse.Namespace(model="m2d_vit_base", input_size=[80, 40])},
        "bare": state,
        "encoder_only": enc,
        "evar": evar,
        "ddp": {"module." + k: v for k, v in state.items()},
    }


@pytest.mark.parametrize("layout", ["full", "bare", "encoder_only", "evar", "ddp"])
def test_foreign_layouts_load(tmp_path, layout):
    model = make_model(TINY_H1)
    path = save_published(tmp_path, _layouts(model)[layout], "some_run")  # no geometry in the name
    encoder = load_encoder(path)
    assert encoder.config == TINY_H1  # geometry inferred from the tensor shapes
    torch.testing.assert_close(features(encoder), features(model), rtol=0, atol=0)
    assert encoder.norm_stats.tolist() == pytest.approx([-5.5, 3.25])
    state = filter_checkpoint(load_checkpoint_file(path))
    assert not any(k.startswith(("module.", "head")) for k in state)


# ---------------------------------------------------------------------------- geometry
def test_geometry_from_folder_name(tmp_path):
    cfg = ViTConfig(input_size=(80, 200), patch_size=(16, 4), embed_dim=64, depth=2, num_heads=1)
    model = make_model(cfg)
    path = save_published(tmp_path, model.state_dict(), "m2d_vit_base-80x200p16x4-230529")
    loaded = open_checkpoint(path)
    assert loaded.vit_config == cfg
    torch.testing.assert_close(features(load_encoder(path)), features(model), rtol=0, atol=0)

    p32 = save_published(tmp_path, model.state_dict(), "m2d_vit_base-80x200p16x4p32k-240101-tag")
    assert open_checkpoint(p32).vit_config.sample_rate == 32000


def test_geometry_from_shapes_when_name_is_silent(tmp_path):
    cfg = ViTConfig(input_size=(80, 64), patch_size=(16, 16), embed_dim=64, depth=3, num_heads=1, mlp_ratio=2.0)
    torch.manual_seed(0)
    enc = AudioViT(cfg)
    path = save_published(tmp_path, enc.state_dict(), "run_without_geometry", epoch=1)
    assert open_checkpoint(path).vit_config == cfg


def test_folder_name_contradicting_shapes_is_refused(tmp_path):
    model = make_model(TINY_H1)
    path = save_published(tmp_path, model.state_dict(), "m2d_vit_base-80x608p16x16-221006-mr7")
    with pytest.raises(CheckpointError, match="folder name says 80x608"):
        load_encoder(path)


def test_norm_stats_default_when_absent(tmp_path):
    state = make_model(TINY_H1).encoder_state_dict()
    del state["norm_stats"]
    encoder = load_encoder(save_published(tmp_path, state, "plain"))
    assert encoder.norm_stats.tolist() == pytest.approx([-7.1, 4.2])


def test_missing_and_unexpected_keys_are_listed(tmp_path):
    state = make_model(TINY_H1).encoder_state_dict()
    del state["blocks.1.attn.proj.weight"]
    state["blocks.0.attn.extra_scale"] = torch.ones(1)
    with pytest.raises(CheckpointError) as info:
        load_encoder(save_published(tmp_path, state, "broken"))
    text = str(info.value)
    assert "missing keys: blocks.1.attn.proj.weight" in text
    assert "unexpected keys: blocks.0.attn.extra_scale" in text
    assert "broken" in text

    own = AudioViT(TINY_H1).state_dict()
    own["norm.weight"] = torch.ones(3)
    with pytest.raises(CheckpointError, match="shape mismatch: norm.weight"):
        strict_load(AudioViT(TINY_H1), own, "x.pth")


def test_missing_patch_embed_is_a_clear_error(tmp_path):
    path = save_published(tmp_path, {"foo": torch.zeros(3)}, "not_m2d")
    with pytest.raises(CheckpointError, match="patch_embed.proj.weight"):
        load_encoder(path)


# ---------------------------------------------------------------------------- safety
class _Exploit:
    """Pickles as a call to os.system: exactly what a malicious checkpoint would contain."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


def _crafted(tmp_path: Path) -> Path:
    """A checkpoint whose pickle would run `touch tmp_path/pwned` if it were unpickled unsafely."""
    path = tmp_path / "evil" / "checkpoint-1.pth"
    path.parent.mkdir(exist_ok=True)
    torch.save({"model": make_model().state_dict(), "args": _Exploit(f"touch {tmp_path / 'pwned'}")}, str(path))
    return path


def test_crafted_pickle_is_refused_without_running(tmp_path):
    marker = tmp_path / "pwned"
    path = _crafted(tmp_path)
    assert not marker.exists()
    with pytest.raises(CheckpointError, match="refused to load"):
        load_encoder(path)
    with pytest.raises(CheckpointError, match="allow-list"):
        load_checkpoint_file(path)
    assert not marker.exists()


@pytest.mark.parametrize("kind", ["truncated", "garbage", "text", "empty"])
def test_unreadable_files(tmp_path, kind):
    good = save_published(tmp_path, make_model().encoder_state_dict(), "ok", epoch=1)
    data = good.read_bytes()
    bad = tmp_path / f"{kind}.pth"
    payload = {"truncated": data[: len(data) // 2], "garbage": bytes(range(256)) * 8,
               "text": b"hello, I am not a checkpoint", "empty": b""}[kind]
    bad.write_bytes(payload)
    with pytest.raises(CheckpointError, match="not a readable PyTorch checkpoint"):
        load_checkpoint_file(bad)


def test_peek_reads_epoch_and_metadata_without_the_weights(tmp_path):
    model = make_model()
    ckpt = training_checkpoint(model, epoch=4, optimizer=None, scaler=None, args={}, meta={"norm_stats": [-6.0, 4.0]})
    path = save_published(tmp_path, ckpt, checkpoint_folder_name(TINY, offline=False, date=DATE), epoch=4)
    loaded = open_checkpoint(path)
    assert peek_checkpoint(path) == (4, loaded.meta) and loaded.meta["norm_stats"] == [-6.0, 4.0]
    legacy = tmp_path / "legacy.pth"  # the pre-zip format cannot be memory-mapped: read whole instead
    torch.save({"model": model.state_dict(), "epoch": 2}, str(legacy), _use_new_zipfile_serialization=False)
    assert peek_checkpoint(legacy) == (2, {})
    with pytest.raises(CheckpointError, match="allow-list"):  # the safety of the full load is kept
        peek_checkpoint(_crafted(tmp_path))
    assert not (tmp_path / "pwned").exists()


def test_missing_path():
    with pytest.raises(CheckpointError):
        load_encoder("/nonexistent/folder/checkpoint-1.pth")


# ---------------------------------------------------------------------------- M2D restore
def test_build_m2d_from_full_checkpoint_restores_predictor_and_target(tmp_path):
    model = make_model()
    ckpt = training_checkpoint(model, epoch=1, optimizer=None, scaler=None, args={}, meta={})
    path = save_published(tmp_path, ckpt, checkpoint_folder_name(TINY, offline=False, date=DATE), epoch=1)
    restored, notes = build_m2d_from(open_checkpoint(path), offline_dim=None)
    assert notes == []
    assert restored.predictor_config == PRED
    ours, theirs = restored.state_dict(), model.state_dict()
    assert set(ours) == set(theirs)
    for key in theirs:
        torch.testing.assert_close(ours[key], theirs[key], rtol=0, atol=0, msg=key)
    # M2D-X on top: the offline predictor is new, everything else restored
    mx, _ = build_m2d_from(open_checkpoint(path), offline_dim=320)
    assert mx.offline_predictor.weight.shape == (320, 320)
    torch.testing.assert_close(mx.target_blocks[0].mlp.fc1.weight, model.target_blocks[0].mlp.fc1.weight)


def test_build_m2d_from_encoder_only_starts_predictor_fresh(tmp_path):
    model = make_model(TINY_H1)
    path = save_published(tmp_path, model.encoder_state_dict(), "m2d_vit_base-80x40p16x4-230529_enconly")
    restored, notes = build_m2d_from(open_checkpoint(path), offline_dim=320, predictor=PRED)
    assert any("predictor starts fresh" in n for n in notes)
    assert any("target" in n for n in notes)
    torch.testing.assert_close(restored.blocks[1].attn.qkv.weight, model.blocks[1].attn.qkv.weight)
    # the target starts as a copy of the restored online encoder, not of the saved (perturbed) target
    torch.testing.assert_close(restored.target_blocks[0].mlp.fc1.weight, model.blocks[0].mlp.fc1.weight)
    assert restored.predictor_config == PRED
