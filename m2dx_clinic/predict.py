"""Classifying new recordings with a fine-tuned classifier: the library behind `m2dx predict`.

The end of the journey: a team fine-tuned in order to use the model. Each recording is cut into
segments (`inference.plan_segments`: its annotation file found by the task registry, ICBHI `.txt`, SPRSound `.json`;
the start/end of a CSV manifest; or sliding windows of
the model's segment length), every segment goes through exactly the training path (read at the
model's rate, fitted to the segment length with the training padding, the same log-mel, per-sample
normalisation with the encoder's statistics) and the classifier; a run folder with several repeats
averages their probabilities. The operating point chosen on validation flags abnormal segments.

One bad file never costs the batch: it is named in one line, every other recording is written.
A recording unlike the classifier's training audio (`evaluation.ood`: far too short, an unseen sample
rate, log-mel statistics far outside) is classified anyway and flagged (the `flags` columns).
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd
import torch

from ._version import __version__
from .audio import audio_info
from .checkpoint.classifier import (LoadedClassifier, candidate_folder, classifier_files, find_classifier,
                                    load_classifier)
from .data.segment_cache import prepare_segments, readable_rows
from .data.segments import Segment
from .errors import AudioError, CheckpointError, ConfigError, M2DXError
from .evaluation import ood
from .evaluation.calibration import apply_temperature
from .fileio import atomic_write_csv, atomic_write_json
from .inference import (Recording, SegmentMode, collect_inputs, mean_probabilities,  # noqa: F401 (Recording: re-exported)
                        plan_segments, too_short)
from .progress import console, make_progress
from .models.cpu_kernels import use_fast_cpu_kernels
from .runtime import keep_freed_cpu_memory, pick_amp, pick_device



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
        return ModelSet([member], member.operating_point, str(member.path), _temperature(member.meta))
    find_classifier(path)  # a folder that is not a fine-tuning run: one clear line
    members = [load_classifier(f) for f in classifier_files(path)]
    for other in members[1:]:
        if (other.classes, other.frontend, other.segment_seconds, other.pad) != \
                (members[0].classes, members[0].frontend, members[0].segment_seconds, members[0].pad):
            raise CheckpointError(f"{other.path}: another class list, front-end or segment rule than "
                                  f"{members[0].path}; a run's repeats must agree (pass one with --repeat)")
    point, temperature = members[0].operating_point, _temperature(members[0].meta)
    if len(members) > 1:  # the ensemble's own point and temperature, fitted on its averaged validation probabilities
        try:
            ensemble = json.loads((path / "metrics.json").read_text(encoding="utf-8"))["ensemble"]
            point = ensemble["operating_point"]
        except (OSError, ValueError, KeyError, TypeError):
            raise CheckpointError(f"{path}: metrics.json is missing or damaged, so the ensemble's operating point "
                                  "is unknown; pass one repeat with --repeat") from None
        temperature = _temperature(ensemble)
    return ModelSet(members, point, str(path), temperature)


def _temperature(block: dict[str, Any]) -> float | None:
    """The temperature a classifier file's metadata or a run's ensemble block carries (None: not fitted)."""
    value = (block.get("calibration") or {}).get("temperature") if isinstance(block, dict) else None
    return float(value) if isinstance(value, (int, float)) and value > 0 else None


def _ood_flags(profile: dict[str, Any] | None, items: list[Segment], lms: torch.Tensor, rate: int,
               duration: float, frontend: Any) -> list[list[str]]:
    """Per kept segment, what puts it outside the classifier's training audio (`evaluation.ood`)."""
    if not profile:
        return [[] for _ in items]
    lengths = [(it.end if it.end is not None else duration) - (it.start or 0.0) for it in items]
    stats = ood.segment_statistics(lms, lengths, frontend.frames_per_second)
    return [ood.flag_segment(profile, duration=d, sample_rate=rate, mean=m, std=sd)
            for d, (m, sd) in zip(lengths, stats)]


def probabilities(models: ModelSet, lms: torch.Tensor, *, device: torch.device, batch_size: int,
                  amp_dtype: torch.dtype | None = None) -> np.ndarray:
    """Mean class probabilities [N, K] of the model set on raw log-mel [N, n_mels, frames] (per-sample normalised),
    after the set's temperature when it has one (what its operating point was chosen on)."""
    probs = mean_probabilities([m.model for m in models.members], lms, device=device, batch_size=batch_size,
                               amp_dtype=amp_dtype)
    return apply_temperature(probs, models.temperature) if models.temperature else probs


@dataclass
class PredictResult:
    out_dir: Path
    segments: pd.DataFrame
    recordings: pd.DataFrame
    failed: list[tuple[str, str]]
    summary: dict[str, Any]


def predict(
    model: str | Path,
    inputs: Sequence[str | Path],
    out_dir: str | Path,
    *,
    segments: SegmentMode = "auto",
    window_seconds: float | None = None,
    hop_seconds: float | None = None,
    repeat: int | None = None,
    candidate: str | None = None,
    batch_size: int = 32,
    device: str = "auto",
    amp: str = "off",
    progress: bool = True,
) -> PredictResult:
    """Classify every input recording and write segments.csv, recordings.csv and summary.json to `out_dir`."""
    if segments not in ("auto", "annotations", "window"):
        raise ConfigError(f"--segments {segments!r}: use auto, annotations or window")
    if batch_size < 1:
        raise ConfigError(f"--batch-size must be >= 1, got {batch_size}")
    if amp not in ("off", "auto", "bf16", "fp16"):
        raise ConfigError(f"--amp {amp!r}: use off, auto, bf16 or fp16")
    models = load_model_set(model, repeat=repeat, candidate=candidate)
    head = models.first
    window = float(window_seconds) if window_seconds is not None else head.segment_seconds
    hop = float(hop_seconds) if hop_seconds is not None else window
    if not (window > 0 and hop > 0 and math.isfinite(window) and math.isfinite(hop)):
        raise ConfigError(f"--window-seconds and --hop-seconds must be positive numbers, got {window} / {hop}")
    dev = pick_device(device)
    amp_dtype = pick_amp(amp, dev) if amp != "off" else None
    use_fast_cpu_kernels([member.model for member in models.members], dev, amp_dtype)
    keep_freed_cpu_memory(dev)
    frontend = head.frontend
    classes, normal = head.classes, head.normal_index
    threshold = models.operating_point["threshold"] if models.operating_point else None
    recordings, failed = collect_inputs(inputs)

    profile = head.meta.get("audio_profile")
    flagged: list[tuple[str, list[str]]] = []
    seg_rows: list[dict[str, Any]] = []
    rec_rows: list[dict[str, Any]] = []
    modes: dict[str, str] = {}
    audio_seconds, t0 = 0.0, time.perf_counter()
    with make_progress(show=progress and bool(recordings)) as bar:
        task = bar.add_task("classifying", total=len(recordings), status="")
        for index, rec in enumerate(recordings):
            try:
                rate, duration = audio_info(rec.path)
                if (short := too_short(rec.path, duration, frontend)) is not None:
                    raise short
                plan, source = plan_segments(rec, duration, mode=segments, window=window, hop=hop)
                items = [Segment(rec.path, start=s, end=e, item_id=f"{rec.path.stem}#{i:03d}")
                         for i, (s, e) in enumerate(plan)]
                problems: list[str] = []
                lms = prepare_segments(items, frontend=frontend, length_s=head.segment_seconds, pad=head.pad,
                                       cache_dir=None, problems=problems, remember=False)
                keep = readable_rows(lms).numpy()
                if not keep.any():
                    raise AudioError(rec.path, problems[0].split(": ", 1)[-1] if problems else "no readable segment")
                probs = probabilities(models, lms[torch.from_numpy(keep)], device=dev, batch_size=batch_size,
                                      amp_dtype=amp_dtype)
            except M2DXError as exc:
                failed.append((str(rec.path), str(exc).removeprefix(f"{rec.path}: ")))
                bar.advance(task)
                continue
            modes[str(rec.path)] = source
            audio_seconds += duration
            abnormal_p = 1.0 - probs[:, normal]
            flags = abnormal_p >= threshold if threshold is not None else probs.argmax(axis=1) != normal
            kept_items = [it for it, k in zip(items, keep) if k]
            seg_flags = _ood_flags(profile, kept_items, lms[torch.from_numpy(keep)], rate, duration, frontend)
            rec_flags = sorted({f.split(" (")[0] for fl in seg_flags for f in fl})
            if rec_flags:
                flagged.append((str(rec.path), rec_flags))
            for it, p, pa, flag, why in zip(kept_items, probs, abnormal_p, flags, seg_flags):
                seg_rows.append({"recording": str(rec.path), "segment": int(it.item_id.rsplit("#", 1)[1]),
                                 "start": it.start, "end": it.end if it.end is not None else duration,
                                 "source": source, **{f"prob_{c}": float(v) for c, v in zip(classes, p)},
                                 "predicted": classes[int(p.argmax())], "p_abnormal": float(pa),
                                 "abnormal": bool(flag), "flags": "; ".join(why)})
            mean = probs.mean(axis=0)
            rec_rows.append({"recording": str(rec.path), "segments": int(len(probs)), "source": source,
                             "duration_s": duration, **{f"mean_prob_{c}": float(v) for c, v in zip(classes, mean)},
                             "abnormal_fraction": float(np.mean(flags)), "max_p_abnormal": float(abnormal_p.max()),
                             "predicted": classes[int(mean.argmax())],
                             "skipped_segments": int((~keep).sum()), "flags": "; ".join(rec_flags)})
            elapsed = max(time.perf_counter() - t0, 1e-9)
            bar.update(task, advance=1, status=f"{(index + 1) / elapsed:.1f} rec/s, {audio_seconds / elapsed:.0f}x real time")
    elapsed = time.perf_counter() - t0
    if progress:
        console.print(ood.describe(profile))
        for path, why in flagged:
            console.print(f"[yellow]unlike the training audio:[/] {path}: {', '.join(why)}")
    out_dir = Path(out_dir)
    seg_frame, rec_frame = pd.DataFrame(seg_rows), pd.DataFrame(rec_rows)
    atomic_write_csv(out_dir / "segments.csv", seg_frame)
    atomic_write_csv(out_dir / "recordings.csv", rec_frame)
    summary = {
        "model": models.source,
        "classifier_files": [str(m.path) for m in models.members],
        "classifier_kind": head.kind,
        "ensemble": len(models.members) > 1,
        "classes": classes, "normal_class": classes[normal],
        "operating_point": models.operating_point,
        "abnormal_rule": f"P(abnormal) >= {threshold:.6g}" if threshold is not None else "most probable class is not normal",
        "temperature": models.temperature,
        **decision_rule(threshold),
        "segments_mode": segments, "window_seconds": window, "hop_seconds": hop,
        "segment_rule": head.meta.get("segment"), "segment_sources": modes,
        "recordings": len(rec_rows), "segments": len(seg_rows),
        "failed": [{"path": p, "problem": why} for p, why in failed],
        "training_audio": ood.describe(profile), "audio_profile": bool(profile),
        "flagged": [{"path": p, "flags": why} for p, why in flagged],
        "audio_seconds": audio_seconds, "seconds": elapsed,
        "recordings_per_s": len(rec_rows) / elapsed if elapsed > 0 else None,
        "real_time_factor": audio_seconds / elapsed if elapsed > 0 else None,
        "device": str(dev), "amp": {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[amp_dtype],
        "package_version": __version__,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    atomic_write_json(out_dir / "summary.json", summary)
    return PredictResult(out_dir, seg_frame, rec_frame, failed, summary)


def decision_rule(threshold: float | None) -> dict[str, str]:
    """The one rule that flags a segment abnormal, and the secondary figure with what it means (summary.json)."""
    if threshold is not None:
        return {"decision_rule": f"a segment is flagged abnormal when P(abnormal) >= {threshold:.6g} (the operating "
                                 "point chosen on validation); `abnormal` and `abnormal_fraction` follow it",
                "secondary_figure": "`predicted` is the most probable class (argmax): which abnormal class the "
                                    "model leans to, not whether to flag; it can say normal while segments are flagged"}
    return {"decision_rule": "no operating point is stored: a segment is flagged abnormal when its most probable "
                             "class (argmax) is not the normal class",
            "secondary_figure": "P(abnormal) = 1 - P(normal): how sure the model is, shown without a threshold"}


def describe_recording(row: dict[str, Any], summary: dict[str, Any]) -> str:
    """One line per recording in the decision rule's words: flagged segments first, the most probable class second."""
    rule = f"P(abnormal) >= {summary['operating_point']['threshold']:.3g}" if summary.get("operating_point") \
        else "most probable class not normal"
    return (f"{Path(row['recording']).name}: {100 * row['abnormal_fraction']:.0f} % of {row['segments']} segment(s) "
            f"flagged abnormal ({rule}; max P(abnormal) {row['max_p_abnormal']:.2f}); secondary: most probable class "
            f"on average {row['predicted']} (which class, not whether to flag)")
