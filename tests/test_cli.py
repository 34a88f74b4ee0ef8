"""The CLI as a user meets it: one-line errors with exit code 2, safe loading, downloads, pre-training edge cases."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

from m2dx_clinic import checkpoint as ckpt_io
from m2dx_clinic.weights import load_encoder
from m2dx_clinic.config import load_recipe
from m2dx_clinic.demo_data import demo_noise_dir, make_demo_icbhi
from m2dx_clinic.models.m2d import M2D
from m2dx_clinic.models.vit import ViTConfig
from m2dx_clinic.pretrain import start_run
from m2dx_clinic.recipes import PretrainRecipe
from m2dx_clinic.runtime import TrainingDiverged
from local_http import LocalServer

M2DX = [sys.executable, "-m", "m2dx_clinic"]


def run_cli(*args: str, env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([*M2DX, *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "M2DX_NO_PROGRESS": "1", **(env or {})})


def assert_one_line_error(proc: subprocess.CompletedProcess, *needles: str) -> None:
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    last = [ln for ln in proc.stderr.splitlines() if ln.strip()][-1]
    assert last.startswith("error: ")
    for needle in needles:
        assert needle in last, last


class _Exploit:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_crafted_pickle_is_refused_without_running(tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "m2d_vit_base-80x200p16x4-230529" / "checkpoint-1.pth"
    evil.parent.mkdir()
    torch.save({"model": {}, "args": _Exploit(marker)}, evil)
    wav = tmp_path / "a.wav"
    import numpy as np
    import soundfile as sf

    sf.write(wav, np.random.default_rng(0).normal(0, 0.1, 16000).astype("float32"), 16000)
    proc = run_cli("embed", "-c", str(evil), "-o", str(tmp_path / "out"), str(wav))
    assert_one_line_error(proc, str(evil), "refused")
    assert not marker.exists()


def test_finetune_bad_manifest_is_one_line(tmp_path):
    bad = tmp_path / "labels.csv"
    bad.write_text("file,label\nx.wav,normal\n")
    ckpt = _tiny_checkpoint(tmp_path)
    proc = run_cli("finetune", "--task", "csv", "--data", str(bad), "--checkpoint", str(ckpt),
                   "--recipe", "tiny_finetune", "--out", str(tmp_path / "ft"))
    assert_one_line_error(proc, str(bad), "path")
    assert not (tmp_path / "ft" / "metrics.json").exists()


def test_unknown_recipe_key_and_unknown_weights_name(tmp_path):
    proc = run_cli("further-pretrain", "--recipe", "tiny_cpu", "--data", str(tmp_path), "--set", "optim.bogus=1")
    assert_one_line_error(proc, "optim.bogus")
    proc = run_cli("weights", "download", "m2d_vit_base-80x200p16x4-23052")
    assert_one_line_error(proc, "m2d_vit_base-80x200p16x4-230529", "m2dx weights list")


def test_weights_download_through_the_cli(http_server: LocalServer, tmp_path):
    name = "m2d_vit_base-80x200p16x4-230529"
    cfg = ViTConfig(embed_dim=64, depth=2, num_heads=1)
    buf = io.BytesIO()
    torch.save(ckpt_io.training_checkpoint(M2D(cfg), epoch=300, optimizer=None, scaler=None, args={"a": 1},
                                           meta={}), buf)
    payload = io.BytesIO()
    with zipfile.ZipFile(payload, "w") as zf:
        zf.writestr(f"{name}/checkpoint-300.pth", buf.getvalue())
    http_server.put(f"{name}.zip", payload.getvalue())
    env = {"M2DX_WEIGHTS_BASE_URL": http_server.url, "M2DX_WEIGHTS": str(tmp_path / "weights")}
    proc = run_cli("weights", "download", name, env=env)
    assert proc.returncode == 0, proc.stderr
    path = tmp_path / "weights" / name / "checkpoint-300.pth"
    assert path.is_file()
    listing = run_cli("weights", "list", env=env).stdout + run_cli("weights", "list", env=env).stderr
    assert name in listing and "github.com/nttcslab/m2d/releases/download" in listing
    # the published name now resolves to the cached file for every command
    assert load_encoder(path).config.input_size == (80, 200)


def _tiny_checkpoint(tmp_path: Path) -> Path:
    cfg = ViTConfig(embed_dim=64, depth=2, num_heads=4)
    path = tmp_path / ckpt_io.checkpoint_folder_name(cfg, True) / "checkpoint-1.pth"
    ckpt_io.atomic_torch_save(ckpt_io.training_checkpoint(M2D(cfg), epoch=1, optimizer=None, scaler=None,
                                                          args={}, meta={}), path)
    return path


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("demo")
    make_demo_icbhi(root, num_patients=4, recordings_per_patient=1, seconds=6)
    return root


def test_labels_offline_task_trains_from_a_manifest(tmp_path, demo_dir):
    rows = ["path,label,subject"]
    for wav in sorted((demo_dir / "ICBHI_final_database").glob("*.wav")):
        rows.append(f"{wav},{'even' if int(wav.name[:3]) % 2 == 0 else 'odd'},{wav.name[:3]}")
    manifest = tmp_path / "m.csv"
    manifest.write_text("\n".join(rows) + "\n")
    recipe = load_recipe(PretrainRecipe, "tiny_cpu", [
        f"data.data={manifest}", "data.noise=\"\"", f"run.out={tmp_path / 'run'}", f"data.cache_dir={tmp_path / 'c'}",
        "objective.offline_task=labels", "data.min_ds_size=32", "optim.batch_size=8", "optim.epochs=1"])
    run = start_run(recipe, progress=False)
    ckpt = ckpt_io.LoadedCheckpoint(ckpt_io.list_checkpoints(run)[-1][1])
    assert ckpt.state["offline_predictor.weight"].shape[0] == 2
    assert ckpt.meta["label_names"] == ["even", "odd"]


def test_nan_loss_stops_with_a_clear_error_and_keeps_the_last_good_checkpoint(tmp_path, demo_dir, monkeypatch):
    recipe = load_recipe(PretrainRecipe, "tiny_cpu", [
        f"data.data={demo_dir / 'ICBHI_final_database'}", f"data.noise={demo_noise_dir()}",
        f"run.out={tmp_path / 'run'}", f"data.cache_dir={tmp_path / 'c'}", "data.min_ds_size=32",
        "optim.batch_size=8", "optim.accum_steps=1", "optim.epochs=3", "run.log_every=1"])
    import m2dx_clinic.pretrain as pretrain

    real = pretrain.m2dx_losses
    calls = {"n": 0}

    def poisoned(*args, **kwargs):
        losses = real(*args, **kwargs)
        calls["n"] += 1
        if calls["n"] > 4:  # epoch 1 (4 steps) is fine, then the loss turns NaN
            losses["loss"] = losses["loss"] * float("nan")
        return losses

    monkeypatch.setattr(pretrain, "m2dx_losses", poisoned)
    with pytest.raises(TrainingDiverged, match="checkpoint-1.pth"):
        start_run(recipe, progress=False)
    saved = ckpt_io.list_checkpoints(tmp_path / "run")
    assert [e for e, _ in saved] == [1]
    enc = load_encoder(saved[0][1])
    assert all(torch.isfinite(p).all() for p in enc.state_dict().values())


@pytest.mark.slow
def test_vit_base_two_step_cpu_run_saves_the_published_layout(tmp_path, demo_dir):
    """A ViT-B checkpoint from a 2-step CPU run has exactly the published ViT-B keys and shapes."""
    run = tmp_path / "run"
    proc = run_cli("further-pretrain", "--recipe", "icbhi_m2dx", "--base", "", "--data",
                   str(demo_dir / "ICBHI_final_database"), "--noise", str(demo_noise_dir()), "--out", str(run),
                   "--max-steps", "2", "--batch-size", "2", "--device", "cpu",
                   "--set", "optim.accum_steps=1", "--set", "data.min_ds_size=8", "--set", "data.loader_workers=0",
                   "--set", "data.norm_stats_samples=32", "--set", f"data.cache_dir={tmp_path / 'c'}",
                   "--set", "run.report_on_save=false", timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (epoch, path), = ckpt_io.list_checkpoints(run)
    assert path.parent.name.startswith("m2d_x_vit_base-80x200p16x4p16k-")
    raw = ckpt_io.load_checkpoint_file(path)
    state = raw["model"]
    expected = {
        "cls_token": (1, 1, 768), "pos_embed": (1, 251, 768), "patch_embed.proj.weight": (768, 1, 16, 4),
        "blocks.11.attn.qkv.weight": (2304, 768), "blocks.11.mlp.fc1.weight": (3072, 768), "norm.weight": (768,),
        "norm_stats": (2,), "mask_token": (1, 1, 512), "decoder_embed.weight": (512, 768),
        "decoder_pos_embed": (1, 251, 512), "decoder_blocks.7.attn.qkv.weight": (1536, 512),
        "decoder_pred.weight": (768, 512), "target_blocks.11.mlp.fc2.weight": (768, 3072),
        "target_norm.weight": (768,), "offline_predictor.weight": (3840, 3840),
    }
    for key, shape in expected.items():
        assert tuple(state[key].shape) == shape, key
    assert not any(k.startswith(("module.", "_orig_mod.")) for k in state)
    assert sum(k.startswith("blocks.") for k in state) == 12 * 12
    assert isinstance(raw["args"].__dict__, dict) and raw["epoch"] == epoch
    encoder = load_encoder(path)
    assert encoder.frame_feature_dim == 3840
    assert json.loads((run / "environment.json").read_text())["device"] == "cpu"
