"""The log-mel front-end against nnAudio (what the published checkpoints were trained on) and audio loading.

Parity matters because a front-end that differs from the checkpoints' (e.g. torchaudio's default
HTK mel scale) silently degrades every downstream number; the loader tests pin the user-facing
errors and the resampling/downmix rules of docs/METHOD.md, "Front-end".
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from m2dx_clinic.audio import LOG_EPS, FrontEndConfig, LogMelSpectrogram, audio_info, list_audio_files, load_audio
from m2dx_clinic.errors import AudioError

nnaudio_features = pytest.importorskip("nnAudio.features")

TOLERANCE = 3e-3
POWER_FLOOR = 1e-6


def reference_lms(wave: torch.Tensor, cfg: FrontEndConfig) -> torch.Tensor:
    """The reference implementation's front-end: nnAudio MelSpectrogram then log(x + float32 eps)."""
    mel = nnaudio_features.MelSpectrogram(
        sr=cfg.sample_rate, n_fft=cfg.n_fft, win_length=cfg.win_length, hop_length=cfg.hop_length,
        n_mels=80, fmin=50, fmax=cfg.f_max, center=True, power=2.0, verbose=False,
    )
    with torch.no_grad():
        power = mel(wave.float().unsqueeze(0))[0]
    return (power + np.finfo(np.float32).eps).log()


def assert_parity(wave: torch.Tensor, cfg: FrontEndConfig) -> None:
    with torch.no_grad():
        ours = LogMelSpectrogram(cfg)(wave)
    ref = reference_lms(wave, cfg)
    assert ours.shape == ref.shape == (80, 1 + wave.shape[-1] // cfg.hop_length)
    loud = ref.exp() > POWER_FLOOR
    assert loud.any()
    diff = (ours - ref).abs()[loud].max().item()
    assert diff <= TOLERANCE, f"max |log-mel difference| {diff:.2e} > {TOLERANCE}"


def test_log_eps_is_float32_machine_epsilon():
    assert LOG_EPS == pytest.approx(1.1920929e-07, rel=1e-6)


@pytest.mark.parametrize("sample_rate", [16000, 32000])
def test_parity_white_noise(sample_rate):
    cfg = FrontEndConfig.for_sample_rate(sample_rate)
    gen = torch.Generator().manual_seed(sample_rate)
    wave = torch.rand(int(sample_rate * 1.37), generator=gen) * 1.6 - 0.8  # length not a multiple of hop
    assert_parity(wave, cfg)


@pytest.mark.parametrize("sample_rate", [16000, 32000])
@pytest.mark.parametrize("freq", [60.0, 440.0, 3000.0, 7500.0])
def test_parity_pure_tones(sample_rate, freq):
    cfg = FrontEndConfig.for_sample_rate(sample_rate)
    t = torch.arange(int(sample_rate * 0.8) + 17, dtype=torch.float64) / sample_rate
    wave = (0.5 * torch.sin(2 * math.pi * freq * t)).float()
    assert_parity(wave, cfg)


@pytest.mark.realdata
@pytest.mark.parametrize("sample_rate", [16000, 32000])
def test_parity_real_recording(icbhi_dir, sample_rate):
    files = sorted((icbhi_dir / "ICBHI_final_database").glob("*.wav")) or sorted(
        (icbhi_dir / "ICBHI_final_database").glob("*.flac")
    )
    if not files:
        pytest.skip("no ICBHI recordings found")
    wave = load_audio(files[0], sample_rate, start=0.0, end=10.0)
    assert wave.shape[0] == 10 * sample_rate
    assert_parity(wave, FrontEndConfig.for_sample_rate(sample_rate))


def test_frontend_shapes_and_frames():
    cfg = FrontEndConfig()
    assert cfg.num_frames(16000) == 101
    assert cfg.num_frames(16159) == 101
    assert cfg.num_frames(16160) == 102
    out = LogMelSpectrogram(cfg)(torch.randn(2, 3, 4000) * 0.1)
    assert out.shape == (2, 3, 80, 26)
    assert FrontEndConfig.for_sample_rate(32000).frames_per_second == 100
    with pytest.raises(ValueError):
        FrontEndConfig.for_sample_rate(22050)


# ---------------------------------------------------------------------------- bad audio
def _assert_audio_error(path: Path, match: str | None = None) -> AudioError:
    with pytest.raises(AudioError) as info:
        load_audio(path)
    assert str(path) in str(info.value)
    if match:
        assert match in str(info.value)
    return info.value


def test_unreadable_file(tmp_path):
    path = tmp_path / "garbage.wav"
    path.write_bytes(b"RIFF not really a wave file" * 10)
    _assert_audio_error(path, "cannot read")
    with pytest.raises(AudioError, match="garbage.wav"):
        audio_info(path)


def test_empty_wav(tmp_path):
    path = tmp_path / "empty.wav"
    sf.write(str(path), np.zeros(0, dtype=np.float32), 16000, subtype="PCM_16")
    _assert_audio_error(path, "zero length")


def test_nan_samples(tmp_path):
    path = tmp_path / "nan.wav"
    samples = np.random.default_rng(0).uniform(-0.5, 0.5, 1600).astype(np.float32)
    samples[100] = np.nan
    sf.write(str(path), samples, 16000, subtype="FLOAT")
    _assert_audio_error(path, "NaN")


def test_all_zero(tmp_path, wav_writer):
    path = wav_writer("silent.wav", np.zeros(1600, dtype=np.float32))
    _assert_audio_error(path, "zeros")


def test_missing_file(tmp_path):
    _assert_audio_error(tmp_path / "does_not_exist.wav", "not found")


# ---------------------------------------------------------------------------- downmix, resampling, segments
def test_multichannel_downmix_is_channel_mean(tmp_path):
    rng = np.random.default_rng(1)
    stereo = rng.uniform(-0.5, 0.5, (1600, 3)).astype(np.float32)
    path = tmp_path / "three.wav"
    sf.write(str(path), stereo, 16000, subtype="FLOAT")
    wave = load_audio(path)
    assert wave.dtype == torch.float32 and wave.shape == (1600,)
    np.testing.assert_allclose(wave.numpy(), stereo.mean(axis=1), rtol=0, atol=1e-7)


@pytest.mark.parametrize("orig_sr, seconds", [(44100, 1.0), (44100, 0.37), (8000, 0.55)])
def test_resampled_to_16k_with_the_right_length(tmp_path, orig_sr, seconds):
    n = int(orig_sr * seconds)
    t = np.arange(n) / orig_sr
    tone = (0.5 * np.sin(2 * np.pi * 1000.0 * t)).astype(np.float32)
    path = tmp_path / f"tone_{orig_sr}.wav"
    sf.write(str(path), tone, orig_sr, subtype="FLOAT")
    wave = load_audio(path, 16000)
    assert wave.shape[0] == math.ceil(n * 16000 / orig_sr)
    # the 1 kHz tone survives: its spectrum peaks at 1 kHz after resampling
    spectrum = np.abs(np.fft.rfft(wave.numpy() * np.hanning(wave.shape[0])))
    peak_hz = np.argmax(spectrum) * 16000 / wave.shape[0]
    assert abs(peak_hz - 1000.0) < 16000 / wave.shape[0] * 1.5


def test_segment_start_end(tmp_path):
    samples = np.random.default_rng(2).uniform(-0.5, 0.5, 32000).astype(np.float32)
    path = tmp_path / "seg.wav"
    sf.write(str(path), samples, 16000, subtype="FLOAT")
    seg = load_audio(path, start=0.5, end=1.25)
    np.testing.assert_array_equal(seg.numpy(), samples[8000:20000])
    tail = load_audio(path, start=1.5)
    np.testing.assert_array_equal(tail.numpy(), samples[24000:])
    head = load_audio(path, end=5.0)  # past the end: clipped to the file
    assert head.shape[0] == 32000


def test_list_audio_files(tmp_path, wav_writer):
    noise = np.random.default_rng(3).uniform(-0.1, 0.1, 160).astype(np.float32)
    wav_writer("b/x.wav", noise)
    wav_writer("a.WAV", noise)
    (tmp_path / "notes.txt").write_text("no")
    found = list_audio_files(tmp_path)
    assert [p.relative_to(tmp_path).as_posix() for p in found] == ["a.WAV", "b/x.wav"]
