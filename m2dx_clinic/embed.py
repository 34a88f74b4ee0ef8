"""Audio files -> M2D features on disk: the library behind `m2dx embed`.

A user with a trained (or published) encoder wants per-frame features or one clip vector per file
for their own downstream tools. This module runs exactly the pipeline the checkpoints were trained
with (the published front-end, the checkpoint's own `norm_stats`, chunked encoding; docs/METHOD.md), so the
features match what fine-tuning and evaluation see. One bad file must not cost the whole batch:
audio problems are collected and reported, every other file is still written.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .audio import FrontEndConfig, LogMelSpectrogram, load_audio
from .weights import load_encoder
from .errors import AudioError
from .fileio import atomic_save_npy
from .inference import audio_files, min_seconds, too_short
from .models.vit import AudioViT
from .progress import make_progress
from .runtime import pick_device


@dataclass
class EmbedResult:
    """What `embed_files` did: files written, inputs that failed (with the reason), and notes.

    `notes` tells the user about output names that had to be changed (two inputs with one stem),
    so nothing is silently overwritten.
    """

    written: list[Path] = field(default_factory=list)
    failed: list[tuple[Path, str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def frontend_for(encoder: AudioViT) -> LogMelSpectrogram:
    """The log-mel front-end matching the encoder's sample rate (16 kHz or the `p32k` variant)."""
    return LogMelSpectrogram(FrontEndConfig.for_sample_rate(encoder.config.sample_rate))


def min_samples(frontend: LogMelSpectrogram) -> int:
    """Shortest waveform (samples) the front-end accepts (`inference.min_seconds`, the one rule)."""
    return math.ceil(min_seconds(frontend.config) * frontend.config.sample_rate - 1e-9)


def encode_waveform(
    encoder: AudioViT, wave: torch.Tensor, frontend: LogMelSpectrogram | None = None,
    adjust_pos: bool = False,
) -> torch.Tensor:
    """Waveform at the encoder's sample rate -> per-frame features (front-end + normalise + encode).

    `wave` is [samples] (-> [T', F*D]) or [B, samples] (-> [B, T', F*D]). Kept free of `no_grad`
    so callers that fine-tune can backpropagate through it; wrap it in `torch.inference_mode()`
    for pure feature extraction. Pass a prebuilt `frontend` to avoid rebuilding the mel filters
    for every call.
    """
    single = wave.dim() == 1
    if single:
        wave = wave.unsqueeze(0)
    if wave.dim() != 2:
        raise ValueError(f"expected a waveform [samples] or [B, samples], got shape {tuple(wave.shape)}")
    frontend = frontend if frontend is not None else frontend_for(encoder)
    if wave.shape[-1] < min_samples(frontend):
        raise ValueError(
            f"waveform of {wave.shape[-1]} samples is too short for the front-end "
            f"(at least {min_samples(frontend)} needed for its reflect padding)"
        )
    device = next(encoder.parameters()).device
    frontend = frontend.to(device)
    lms = frontend(wave.to(device))  # [B, 80, frames]
    lms = encoder.normalize(lms).unsqueeze(1)  # [B, 1, 80, frames]
    features = encoder.encode_lms(lms, adjust_pos=adjust_pos)
    return features[0] if single else features


def output_names(files: list[Path]) -> tuple[list[str], list[str]]:
    """A unique `.npy` name per input: `<stem>.npy`, later duplicates `<parent>__<stem>.npy`.

    The first file with a stem keeps the plain name (what users expect for the common case of
    unique names); later ones get their parent folder prefixed, plus a counter if even that clashes.
    Returns the names and a note for each renamed file.
    """
    names: list[str] = []
    notes: list[str] = []
    used: set[str] = set()
    for path in files:
        name = f"{path.stem}.npy"
        if name in used:
            base = f"{path.parent.name}__{path.stem}"
            name = f"{base}.npy"
            counter = 2
            while name in used:
                name = f"{base}__{counter}.npy"
                counter += 1
            notes.append(f"{path}: another input has the same stem {path.stem!r}; written as {name}")
        used.add(name)
        names.append(name)
    return names, notes


def embed_files(
    checkpoint: str | Path,
    inputs: list[Path],
    out_dir: Path,
    *,
    clip: bool = False,
    device: str = "auto",
    progress: bool = True,
) -> EmbedResult:
    """Encode every audio file in `inputs` (files or folders) and write one `.npy` per file into `out_dir`.

    Per-frame features are float32 [T', F*D] (T' = ceil(frames / patch width)); with `clip=True`
    the mean over time [F*D]. Unusable audio is collected in `result.failed` and the run goes on;
    checkpoint problems raise `CheckpointError` at once since nothing could be encoded.
    """
    dev = pick_device(device)  # "auto": CUDA when present, like every other command
    encoder = load_encoder(checkpoint).to(dev)
    frontend = frontend_for(encoder).to(dev)
    sample_rate = encoder.config.sample_rate
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    files, empty = audio_files(list(inputs))
    failed = [(path, f"{path}: {why}") for path, why in empty]
    names, notes = output_names(files)
    result = EmbedResult(failed=failed, notes=notes)

    def process(path: Path, name: str) -> None:
        try:
            wave = load_audio(path, sample_rate)
        except AudioError as exc:
            result.failed.append((path, str(exc)))
            return
        if (short := too_short(path, wave.shape[-1] / sample_rate, frontend.config)) is not None:
            result.failed.append((path, str(short)))
            return
        with torch.inference_mode():
            features = encode_waveform(encoder, wave, frontend)
            if clip:
                features = features.mean(dim=0)
        array = features.float().cpu().numpy().astype(np.float32, copy=False)
        result.written.append(atomic_save_npy(out_dir / name, array))  # an interrupted run leaves no half file

    with make_progress(show=progress and bool(files)) as bar:
        task = bar.add_task("embedding", total=len(files), status="")
        for path, name in zip(files, names):
            bar.update(task, status=path.name)
            process(path, name)
            bar.advance(task)
    return result
