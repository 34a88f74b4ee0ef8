"""Using a trained model on audio: the one path from inputs to class probabilities or embeddings.

Fine-tuning's evaluation, `m2dx predict`, `m2dx embed` and the report's probe all go through here,
so a segment is planned, fitted, normalised and batched the same way wherever a model is applied:
- inputs -> audio files (`audio_files`, `collect_inputs`); a folder without audio is a failure;
- recordings -> segments (`plan_segments`: annotations found by the task registry, CSV ranges, or
  windows), refused when shorter than the front-end accepts (`too_short`), and their log-mels
  (`read_recording`, the host's share of prediction, read ahead of the model by `default_read_workers`);
- raw log-mel batches -> probabilities or embeddings, per-sample normalised, under one autocast rule;
- the classifier(s) a user names -> a `ModelSet` (one file, or a run's repeats averaged, with the
  operating point and temperature they were chosen with), applied by `model_set_probabilities`.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Literal, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .audio import NO_AUDIO_FILES, FrontEndConfig, audio_info, list_audio_files
from .checkpoint.classifier import LoadedClassifier, candidate_folder, classifier_files, find_classifier, load_classifier
from .data.segment_cache import SegmentArrays, prepare_segments, readable_rows
from .data.segments import Segment, read_manifest
from .data.tasks import find_annotations
from .errors import AudioError, CheckpointError, DataError
from .evaluation.calibration import apply_temperature
from .models.classifier import Classifier
from .models.vit import AudioViT
from .runtime import autocast, pick_device

SegmentMode = Literal["auto", "annotations", "window"]
MIN_WINDOW_FRACTION = 0.5  # a last, partial window shorter than this fraction of a window is dropped
AnnotationReader = Callable[[Path], tuple[list[tuple[float, float]], Path] | None]


# ---------------------------------------------------------------------------- inputs -> audio files
def audio_files(inputs: Sequence[str | Path]) -> tuple[list[Path], list[tuple[Path, str]]]:
    """Files stay as given (a missing one is reported by its reader), folders become their audio files.

    Returns the files and, per folder without audio, (folder, why): nothing is silently skipped.
    """
    files: list[Path] = []
    failed: list[tuple[Path, str]] = []
    for item in inputs:
        item = Path(item).expanduser()
        if item.is_dir():
            found = list_audio_files(item)
            if not found:
                failed.append((item, NO_AUDIO_FILES))
            files.extend(found)
        else:
            files.append(item)
    return files, failed


@dataclass
class Recording:
    """One input audio file and the segments a CSV manifest gave for it (empty: decide per mode)."""

    path: Path
    ranges: list[tuple[float | None, float | None]] = field(default_factory=list)


def collect_inputs(inputs: Sequence[str | Path]) -> tuple[list[Recording], list[tuple[str, str]]]:
    """Files, folders (recursive) and CSV manifests (`path[,start,end]`) -> recordings, in input order."""
    out: dict[Path, Recording] = {}
    failed: list[tuple[str, str]] = []
    for item in inputs:
        item = Path(item).expanduser()
        if item.suffix.lower() == ".csv" and item.is_file():
            for seg in read_manifest(item).segments:
                rec = out.setdefault(seg.path, Recording(seg.path))
                if seg.start is not None or seg.end is not None:
                    rec.ranges.append((seg.start, seg.end))
            continue
        files, empty = audio_files([item])
        failed += [(str(path), why) for path, why in empty]
        for f in files:
            out.setdefault(f, Recording(f))
    return list(out.values()), failed


# ---------------------------------------------------------------------------- recordings -> segments
def min_seconds(frontend: FrontEndConfig) -> float:
    """Shortest audio the centred STFT accepts: its reflect padding of n_fft/2 needs more samples than that."""
    return (frontend.n_fft // 2 + 1) / frontend.sample_rate


def too_short(path: Path, seconds: float, frontend: FrontEndConfig) -> AudioError | None:
    """The one-line refusal of audio shorter than `min_seconds`, or None when it is long enough."""
    if seconds >= min_seconds(frontend):
        return None
    return AudioError(path, f"too short ({seconds * 1000:.1f} ms; at least {min_seconds(frontend) * 1000:.1f} ms); "
                            "remove it or record longer")


def plan_segments(recording: Recording, duration: float, *, mode: SegmentMode, window: float, hop: float,
                  annotations: AnnotationReader = find_annotations) -> tuple[list[tuple[float, float | None]], str]:
    """The (start, end) seconds to classify and where they came from: annotations, csv or window.

    `annotations` is the corpora's reader of an annotation file beside the audio (the task registry's).
    """
    found = annotations(recording.path) if mode in ("auto", "annotations") and not recording.ranges else None
    inside = [(s, min(e, duration)) for s, e in found[0] if s < duration] if found is not None else []
    if inside:  # segments starting after the audio ends are left out, ends past it clipped
        return inside, "annotations"
    if mode == "annotations" and found is not None:
        raise DataError(f"{found[1]}: no annotated segment inside the {duration:.2f} s of {recording.path.name}; "
                        "use --segments window (or auto)")
    if mode == "annotations":
        raise DataError(f"{recording.path}: no annotation beside it (ICBHI {recording.path.stem}.txt, or SPRSound "
                        f"{recording.path.stem}.json beside it or in the matching *_json folder); "
                        "use --segments window (or auto)")
    if mode == "auto" and recording.ranges:
        return [(start or 0.0, end) for start, end in recording.ranges], "csv"
    return _windows(duration, window, hop), "window"


@dataclass
class ReadRecording:
    """One recording made ready for the model on the host: its planned segments and their log-mels."""

    path: Path
    source: str  # where the segments came from: annotations, csv or window
    rate: int
    duration: float
    items: list[Segment]
    lms: torch.Tensor  # [S, n_mels, frames] raw log-mel of the readable segments
    keep: np.ndarray  # [S_planned] bool: which planned segments were readable


def read_recording(rec: Recording, *, head: LoadedClassifier, mode: SegmentMode, window: float,
                   hop: float) -> ReadRecording:
    """Decode, plan and compute the log-mels of one recording exactly as in training (the host's share of the
    work, run by `runtime.read_ahead` threads in predict). An unreadable recording raises its one-line error."""
    rate, duration = audio_info(rec.path)
    if (short := too_short(rec.path, duration, head.frontend)) is not None:
        raise short
    plan, source = plan_segments(rec, duration, mode=mode, window=window, hop=hop)
    items = [Segment(rec.path, start=s, end=e, item_id=f"{rec.path.stem}#{i:03d}") for i, (s, e) in enumerate(plan)]
    problems: list[str] = []
    lms = prepare_segments(items, frontend=head.frontend, length_s=head.segment_seconds, pad=head.pad,
                           cache_dir=None, problems=problems, remember=False, progress=False)
    keep = readable_rows(lms).numpy()
    if not keep.any():
        raise AudioError(rec.path, problems[0].split(": ", 1)[-1] if problems else "no readable segment")
    kept = [it for it, k in zip(items, keep) if k]
    return ReadRecording(rec.path, source, rate, duration, kept, lms[torch.from_numpy(keep)], keep)


def default_read_workers(device: torch.device) -> int:
    """Threads reading recordings ahead of the model. On a GPU the host's decoding and log-mels are the work
    the device waits for, so up to 8 spare cores read. On a CPU the model needs the same cores: reading ahead
    there measured slower (2 cores: tiny model 0.77 -> 1.03 s, ViT-B 17.3 -> 18.1 s for the same files;
    BENCHMARKS.md), so none does."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(8, cores - 1)) if device.type == "cuda" else 0


def _windows(duration: float, window: float, hop: float) -> list[tuple[float, float | None]]:
    starts = [0.0]
    while starts[-1] + hop < duration - 1e-9:
        starts.append(starts[-1] + hop)
    kept = [s for i, s in enumerate(starts) if i == 0 or duration - s >= MIN_WINDOW_FRACTION * window]
    return [(s, min(s + window, duration)) for s in kept]


# ---------------------------------------------------------------------------- batches -> outputs
def _batches(lms: SegmentArrays | np.ndarray | torch.Tensor, batch_size: int,
             device: torch.device) -> Iterator[torch.Tensor]:
    """Raw log-mel rows [B, n_mels, frames] (float32, on `device`), `batch_size` at a time."""
    for start in range(0, len(lms), batch_size):
        chunk = lms[start:start + batch_size]
        chunk = chunk if isinstance(chunk, torch.Tensor) else torch.as_tensor(np.asarray(chunk), dtype=torch.float32)
        yield chunk.to(device, non_blocking=True)


@torch.inference_mode()
def class_probabilities(model: Classifier | torch.nn.Module, lms: SegmentArrays | torch.Tensor, *, batch_size: int,
                        device: torch.device, amp_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Class probabilities [N, K] (float32, CPU) for raw log-mel [N, n_mels, frames].

    Each sample is normalised on its own with the model's fixed statistics (`model.normalize`), so the result does
    not depend on `batch_size` or on which other samples share the batch.
    """
    was_training = model.training
    model.eval()
    probs = []
    for x in _batches(lms, batch_size, device):
        with autocast(device, amp_dtype):
            logits = model(model.normalize(x).unsqueeze(1))  # [B, K]
        probs.append(F.softmax(logits.float(), dim=-1).cpu())
    model.train(was_training)
    return torch.cat(probs) if probs else torch.zeros(0, model.num_classes)


def mean_probabilities(models: Sequence[Classifier], lms: SegmentArrays | torch.Tensor, *, device: torch.device,
                       batch_size: int, amp_dtype: torch.dtype | None = None) -> np.ndarray:
    """The ensemble's mean class probabilities [N, K] (float64): each model's, averaged."""
    total = sum(class_probabilities(m.to(device), lms, batch_size=batch_size, device=device,
                                    amp_dtype=amp_dtype).double().numpy() for m in models)
    return total / len(models)


@torch.inference_mode()
def clip_embeddings(encoder: AudioViT, lms: np.ndarray | torch.Tensor, *, norm_stats: Sequence[float] | None = None,
                    batch_size: int = 32, device: str | torch.device | None = None,
                    amp_dtype: torch.dtype | None = None, adjust_pos: bool = False) -> np.ndarray:
    """Raw log-mel [N, n_mels, frames] -> one vector per clip [N, F*D]: mean over time of `encode_lms`.

    `norm_stats` (mean, std) overrides the encoder's own buffer; the report normalises every
    checkpoint of a run the way the training loop fed it, so their embeddings are comparable.
    """
    dev = pick_device(device)
    encoder = encoder.to(dev).eval()
    out = []
    for x in _batches(lms, batch_size, dev):
        x = x.unsqueeze(1)  # [B, 1, n_mels, frames]
        x = (x - float(norm_stats[0])) / float(norm_stats[1]) if norm_stats is not None else encoder.normalize(x)
        with autocast(dev, amp_dtype):
            features = encoder.encode_lms(x, adjust_pos=adjust_pos)  # [B, T', F*D]
        out.append(features.mean(dim=1).float().cpu().numpy())
    return np.concatenate(out, axis=0) if out else np.zeros((0, encoder.frame_feature_dim), dtype=np.float32)


# ---------------------------------------------------------------------------- the classifier(s) a user names
@dataclass
class ModelSet:
    """The classifier(s) to apply: one file, or every repeat of a run (averaged), with one operating point."""

    members: list[LoadedClassifier]
    operating_point: dict[str, Any] | None
    source: str
    temperature: float | None = None  # temperature scaling fitted on validation (`evaluation.calibration`); None: none

    @property
    def first(self) -> LoadedClassifier:
        return self.members[0]


def load_model_set(model: str | Path, *, repeat: int | None = None, candidate: str | None = None) -> ModelSet:
    """`model` is a classifier file or a fine-tuning run folder (all repeats averaged, or `repeat` K); a
    comparison folder (`--mode compare`) stands for its recommended candidate's run folder, or `candidate`'s."""
    path = candidate_folder(model, candidate)
    if path.is_file() or repeat is not None:
        member = load_classifier(find_classifier(path, repeat))
        return ModelSet([member], member.operating_point, str(member.path), stored_temperature(member.meta))
    find_classifier(path)  # a folder that is not a fine-tuning run: one clear line
    members = [load_classifier(f) for f in classifier_files(path)]
    for other in members[1:]:
        if (other.classes, other.frontend, other.segment_seconds, other.pad) != \
                (members[0].classes, members[0].frontend, members[0].segment_seconds, members[0].pad):
            raise CheckpointError(f"{other.path}: another class list, front-end or segment rule than "
                                  f"{members[0].path}; a run's repeats must agree (pass one with --repeat)")
    point, temperature = members[0].operating_point, stored_temperature(members[0].meta)
    if len(members) > 1:  # the ensemble's own point and temperature, fitted on its averaged validation probabilities
        try:
            ensemble = json.loads((path / "metrics.json").read_text(encoding="utf-8"))["ensemble"]
            point = ensemble["operating_point"]
        except (OSError, ValueError, KeyError, TypeError):
            raise CheckpointError(f"{path}: metrics.json is missing or damaged, so the ensemble's operating point "
                                  "is unknown; pass one repeat with --repeat") from None
        temperature = stored_temperature(ensemble)
    return ModelSet(members, point, str(path), temperature)


def stored_temperature(block: dict[str, Any]) -> float | None:
    """The temperature a classifier file's metadata or a run's ensemble block carries (None: not fitted)."""
    value = (block.get("calibration") or {}).get("temperature") if isinstance(block, dict) else None
    return float(value) if isinstance(value, (int, float)) and value > 0 else None


def model_set_probabilities(models: ModelSet, lms: torch.Tensor, *, device: torch.device, batch_size: int,
                            amp_dtype: torch.dtype | None = None) -> np.ndarray:
    """Mean class probabilities [N, K] of the model set on raw log-mel [N, n_mels, frames] (per-sample normalised),
    after the set's temperature when it has one (what its operating point was chosen on)."""
    probs = mean_probabilities([m.model for m in models.members], lms, device=device, batch_size=batch_size,
                               amp_dtype=amp_dtype)
    return apply_temperature(probs, models.temperature) if models.temperature else probs
