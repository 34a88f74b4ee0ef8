"""`embed_files` end to end on a tiny checkpoint in the published layout: outputs, failures, parity."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import numpy as np
import pytest
import torch

from m2dx_clinic.audio import FrontEndConfig, LogMelSpectrogram, load_audio
from m2dx_clinic.checkpoint import atomic_torch_save, checkpoint_folder_name, training_checkpoint
from m2dx_clinic.weights import load_encoder
from m2dx_clinic.embed import EmbedResult, embed_files, encode_waveform, output_names
from m2dx_clinic.models.m2d import M2D, PredictorConfig
from m2dx_clinic.models.vit import ViTConfig

TINY = ViTConfig(input_size=(80, 40), patch_size=(16, 4), embed_dim=64, depth=2, num_heads=4)


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    model = M2D(TINY, PredictorConfig(dim=32, depth=1, num_heads=2), norm_stats=(-6.0, 3.5))
    folder = tmp_path_factory.mktemp("ckpt") / checkpoint_folder_name(TINY, offline=False, date=dt.date(2024, 5, 14))
    ckpt = training_checkpoint(model, epoch=3, optimizer=None, scaler=None, args={"lr": 1e-4}, meta={})
    return atomic_torch_save(ckpt, folder / "checkpoint-3.pth")


def _noise(seconds: float, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).uniform(-0.5, 0.5, int(16000 * seconds)).astype(np.float32)


def test_embed_files_writes_features_and_collects_failures(tiny_checkpoint, wav_writer, tmp_path):
    a = wav_writer("in/a.wav", _noise(1.3, 1))  # 131 frames -> chunks 40*3 + 11 (padded to 12) -> 33 time steps
    wav_writer("in/b.wav", _noise(0.5, 2))  # 51 frames -> padded 52 -> 13
    bad = tmp_path / "in" / "bad.wav"
    bad.write_bytes(b"this is not audio")
    out = tmp_path / "out"

    result = embed_files(tiny_checkpoint, [tmp_path / "in"], out, progress=False)

    assert isinstance(result, EmbedResult)
    assert sorted(p.name for p in result.written) == ["a.npy", "b.npy"]
    assert [p for p, _ in result.failed] == [bad]
    assert str(bad) in result.failed[0][1]
    fa, fb = np.load(out / "a.npy"), np.load(out / "b.npy")
    assert fa.dtype == np.float32 and fb.dtype == np.float32
    assert fa.shape == (33, 5 * 64)
    assert fb.shape == (13, 5 * 64)
    assert not list(out.glob(".*tmp*")), "temporary files must not be left behind"

    # parity with a manual front-end + normalisation + encoder computation
    encoder = load_encoder(tiny_checkpoint)
    assert encoder.norm_stats.tolist() == pytest.approx([-6.0, 3.5])
    wave = load_audio(a, 16000)
    lms = LogMelSpectrogram(FrontEndConfig())(wave)
    lms = ((lms - (-6.0)) / 3.5)[None, None]
    with torch.no_grad():
        expected = encoder.encode_lms(lms)[0].numpy()
    np.testing.assert_allclose(fa, expected, rtol=1e-5, atol=1e-5)

    # the reusable helper gives the same
    with torch.no_grad():
        helper = encode_waveform(encoder, wave)
        batched = encode_waveform(encoder, wave[None])
    np.testing.assert_allclose(helper.numpy(), expected, rtol=1e-5, atol=1e-5)
    assert batched.shape == (1, 33, 320)


def test_embed_clip_mean_and_stem_clash(tiny_checkpoint, wav_writer, tmp_path):
    one = wav_writer("x/rec.wav", _noise(0.6, 3))
    two = wav_writer("y/rec.wav", _noise(0.7, 4))
    out = tmp_path / "clip"
    result = embed_files(tiny_checkpoint, [one, two], out, clip=True, progress=False)
    assert [p.name for p in result.written] == ["rec.npy", "y__rec.npy"]
    assert result.failed == []
    assert any("y__rec.npy" in note for note in result.notes)
    v1 = np.load(out / "rec.npy")
    assert v1.shape == (320,) and v1.dtype == np.float32

    frames = embed_files(tiny_checkpoint, [one], tmp_path / "frames", progress=False)
    per_frame = np.load(frames.written[0])
    np.testing.assert_allclose(v1, per_frame.mean(axis=0), rtol=1e-5, atol=1e-6)


def test_missing_short_and_empty_folder_are_failures(tiny_checkpoint, wav_writer, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    missing = tmp_path / "nope.wav"
    short = wav_writer("short.wav", _noise(0.01, 5))  # 160 samples: below the STFT's reflect padding
    ok = wav_writer("ok.wav", _noise(0.02, 6))  # 320 samples: 3 frames -> one time step
    result = embed_files(tiny_checkpoint, [missing, empty, short, ok], tmp_path / "o", progress=True)
    assert [p.name for p in result.written] == ["ok.npy"]
    assert np.load(result.written[0]).shape == (1, 320)
    assert {p for p, _ in result.failed} == {missing, empty, short}
    assert "too short" in dict(result.failed)[short]
    encoder = load_encoder(tiny_checkpoint)
    with pytest.raises(ValueError, match="too short"):
        encode_waveform(encoder, torch.zeros(100))


def test_output_names_disambiguates_repeatedly():
    names, notes = output_names([Path("a/s.wav"), Path("b/s.wav"), Path("c/b/s.flac"), Path("d/t.wav")])
    assert names == ["s.npy", "b__s.npy", "b__s__2.npy", "t.npy"]
    assert len(notes) == 2


def test_embed_command_defaults_to_auto_device_and_names_each_bad_file(tiny_checkpoint, wav_writer, tmp_path):
    """The CLI's default `--device auto` resolves like every command's; a bad file is one line, exit 2."""
    import os
    import subprocess
    import sys

    good = wav_writer("good.wav", _noise(1.0, 3))
    bad = tmp_path / "notes.wav"
    bad.write_text("not audio")
    cmd = [sys.executable, "-m", "m2dx_clinic", "embed", "-c", str(tiny_checkpoint), "--clip"]
    env = {**os.environ, "M2DX_NO_PROGRESS": "1"}
    ok = subprocess.run([*cmd, str(good), "--out", str(tmp_path / "a")], capture_output=True, text=True, env=env)
    assert ok.returncode == 0, ok.stderr
    assert np.load(tmp_path / "a" / "good.npy").shape == (5 * 64,)  # F*D of the 80-mel, 16-row patches
    failed = subprocess.run([*cmd, str(good), str(bad), "--out", str(tmp_path / "b")], capture_output=True,
                            text=True, env=env)
    assert failed.returncode == 2 and "Traceback" not in failed.stderr
    errors = [line for line in failed.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith(f"error: {bad}: cannot read audio")  # named once in front
    assert (tmp_path / "b" / "good.npy").exists()  # the good file is still written
