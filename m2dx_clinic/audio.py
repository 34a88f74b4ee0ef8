"""Audio loading and the log-mel front-end that the published M2D checkpoints expect.

The published models were trained on nnAudio's mel spectrogram, which uses the Slaney mel scale
with Slaney area normalisation (librosa's defaults). torchaudio's defaults (HTK scale, no norm)
give different features, so every option is spelled out here (docs/METHOD.md, "Front-end").
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
import torchaudio

from .errors import AudioError, one_line

SAMPLE_RATE = 16000
LOG_EPS = float(torch.finfo(torch.float32).eps)  # 1.1920929e-07, as in the reference front-end
AUDIO_SUFFIXES = (".wav", ".flac", ".ogg", ".mp3", ".aiff", ".aif")
NO_AUDIO_FILES = "no audio files (.wav/.flac/.ogg/.mp3/.aiff) in this folder or below"


@dataclass(frozen=True)
class FrontEndConfig:
    """Log-mel settings; `for_sample_rate` gives the two published variants (16 kHz, 32 kHz)."""

    sample_rate: int = 16000
    n_fft: int = 400
    win_length: int = 400
    hop_length: int = 160
    n_mels: int = 80
    f_min: float = 50.0
    f_max: float = 8000.0

    @classmethod
    def for_sample_rate(cls, sample_rate: int) -> "FrontEndConfig":
        if sample_rate == 16000:
            return cls()
        if sample_rate == 32000:
            return cls(32000, 800, 800, 320, 80, 50.0, 16000.0)
        raise ValueError(f"no published front-end for {sample_rate} Hz (use 16000 or 32000)")

    @property
    def frames_per_second(self) -> float:
        return self.sample_rate / self.hop_length

    def num_frames(self, num_samples: int) -> int:
        """Frames produced for `num_samples` samples (center=True): 1 + floor(n / hop)."""
        return 1 + num_samples // self.hop_length


class LogMelSpectrogram(torch.nn.Module):
    """Waveform [..., samples] -> log-mel [..., n_mels, frames] exactly as the checkpoints expect."""

    def __init__(self, config: FrontEndConfig = FrontEndConfig()):
        super().__init__()
        self.config = config
        self.mel = torchaudio.transforms.MelSpectrogram(
            sample_rate=config.sample_rate,
            n_fft=config.n_fft,
            win_length=config.win_length,
            hop_length=config.hop_length,
            f_min=config.f_min,
            f_max=config.f_max,
            n_mels=config.n_mels,
            window_fn=torch.hann_window,  # periodic Hann, as scipy's get_window("hann")
            power=2.0,
            center=True,
            pad_mode="reflect",
            norm="slaney",
            mel_scale="slaney",
        )

    def forward(self, waveform: torch.Tensor) -> torch.Tensor:
        # The STFT runs in float32 even under autocast: low-power bins are sensitive to precision.
        with torch.autocast(device_type=waveform.device.type, enabled=False):
            power = self.mel(waveform.float())
        return (power + LOG_EPS).log()


def _check_samples(path: str | Path, samples: np.ndarray) -> None:
    if samples.size == 0:
        raise AudioError(path, "the file holds no samples (zero length); remove it or re-export it")
    if not np.isfinite(samples).all():
        raise AudioError(path, "the audio contains NaN or Inf samples; re-export it as PCM")
    if not np.any(samples):
        raise AudioError(path, "the audio is all zeros (silent); remove it from the data")


def resample(waveform: torch.Tensor, orig_sr: int, new_sr: int) -> torch.Tensor:
    """Resample with torchaudio's band-limited sinc interpolation (identity when rates match)."""
    if orig_sr == new_sr:
        return waveform
    return torchaudio.functional.resample(waveform, orig_sr, new_sr)


def audio_info(path: str | Path) -> tuple[int, float]:
    """(sample_rate, duration in seconds) from the header only; raises AudioError when unreadable."""
    try:
        info = sf.info(str(path))
    except Exception as exc:  # soundfile raises several types (LibsndfileError, RuntimeError, ...)
        raise AudioError(path, f"cannot read audio ({one_line(exc)}); check the file is wav/flac/ogg/mp3") from None
    return int(info.samplerate), float(info.duration)


def load_audio(
    path: str | Path,
    sample_rate: int = SAMPLE_RATE,
    start: float | None = None,
    end: float | None = None,
) -> torch.Tensor:
    """Read any soundfile-readable file as mono float32 at `sample_rate`, optionally a [start, end) segment in seconds.

    Raises AudioError naming the file for unreadable, empty, non-finite or all-zero audio.
    """
    path = Path(path)
    if not path.is_file():
        raise AudioError(path, "file not found; check the path")
    try:
        with sf.SoundFile(str(path)) as f:
            file_sr = f.samplerate
            first = 0 if start is None else max(0, int(round(start * file_sr)))
            last = f.frames if end is None else min(f.frames, int(round(end * file_sr)))
            if start is not None and f.frames and first >= f.frames:
                raise AudioError(path, f"the segment starts at {start:g} s, after the audio ends "
                                       f"({f.frames / file_sr:.2f} s); fix or drop that annotation")
            if first > 0:
                f.seek(min(first, f.frames))
            data = f.read(max(0, last - first), dtype="float32", always_2d=True)
    except AudioError:
        raise
    except Exception as exc:
        raise AudioError(path, f"cannot read audio ({one_line(exc)}); check the file is wav/flac/ogg/mp3") from None
    samples = data.mean(axis=1) if data.shape[1] > 1 else data[:, 0]
    _check_samples(path, samples)
    wave = resample(torch.from_numpy(np.ascontiguousarray(samples)), file_sr, sample_rate)
    return wave.contiguous()


def list_audio_files(root: str | Path) -> list[Path]:
    """All audio files under `root` (recursive, sorted, by suffix)."""
    root = Path(root)
    return sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in AUDIO_SUFFIXES)

