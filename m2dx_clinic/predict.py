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

Here: the options, the loop and one recording's path through the model. The model set and the batched
probabilities are `inference`'s (the same for evaluate, export and review); the rows, the summary and
the words of the decision rule are `predict_outputs`'.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Sequence

import torch

from .audio import audio_info
from .checkpoint.classifier import LoadedClassifier
from .data.segment_cache import prepare_segments, readable_rows
from .data.segments import Segment
from .errors import AudioError, ConfigError, M2DXError
from .evaluation import ood
from .inference import (ModelSet, Recording, SegmentMode, collect_inputs, load_model_set,  # noqa: F401 (re-exported)
                        model_set_probabilities, plan_segments, too_short)
from .models.cpu_kernels import use_fast_cpu_kernels
from .predict_outputs import (ClassifiedRecording, PredictionTable, PredictResult, decision_rule,  # noqa: F401
                              describe_recording, write_outputs)
from .progress import console, make_progress
from .runtime import keep_freed_cpu_memory, pick_amp, pick_device

probabilities = model_set_probabilities  # the name `predict` has always offered (`inference.model_set_probabilities`)


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
    _check_options(segments, batch_size, amp)
    models = load_model_set(model, repeat=repeat, candidate=candidate)
    window, hop = _window_and_hop(models.first, window_seconds, hop_seconds)
    dev = pick_device(device)
    amp_dtype = pick_amp(amp, dev) if amp != "off" else None
    use_fast_cpu_kernels([member.model for member in models.members], dev, amp_dtype)
    keep_freed_cpu_memory(dev)
    recordings, failed = collect_inputs(inputs)
    table = PredictionTable(models)
    t0 = time.perf_counter()
    with make_progress(show=progress and bool(recordings)) as bar:
        task = bar.add_task("classifying", total=len(recordings), status="")
        for index, rec in enumerate(recordings):
            try:
                table.add(classify_recording(models, rec, mode=segments, window=window, hop=hop, device=dev,
                                             batch_size=batch_size, amp_dtype=amp_dtype))
            except M2DXError as exc:  # one bad file never costs the batch
                failed.append((str(rec.path), str(exc).removeprefix(f"{rec.path}: ")))
                bar.advance(task)
                continue
            elapsed = max(time.perf_counter() - t0, 1e-9)
            bar.update(task, advance=1,
                       status=f"{(index + 1) / elapsed:.1f} rec/s, {table.audio_seconds / elapsed:.0f}x real time")
    elapsed = time.perf_counter() - t0
    if progress:
        console.print(ood.describe(models.first.meta.get("audio_profile")))
        for path, why in table.flagged:
            console.print(f"[yellow]unlike the training audio:[/] {path}: {', '.join(why)}")
    run = {"segments_mode": segments, "window_seconds": window, "hop_seconds": hop, "device": str(dev),
           "amp": amp_dtype}
    return write_outputs(Path(out_dir), table, failed, run=run, seconds=elapsed)


def classify_recording(models: ModelSet, rec: Recording, *, mode: SegmentMode, window: float, hop: float,
                       device: torch.device, batch_size: int, amp_dtype: torch.dtype | None) -> ClassifiedRecording:
    """One recording through exactly the training path: its segments, their probabilities, and what in them is
    unlike the classifier's training audio. An unreadable recording raises its one-line M2DXError."""
    head = models.first
    rate, duration = audio_info(rec.path)
    if (short := too_short(rec.path, duration, head.frontend)) is not None:
        raise short
    plan, source = plan_segments(rec, duration, mode=mode, window=window, hop=hop)
    items = [Segment(rec.path, start=s, end=e, item_id=f"{rec.path.stem}#{i:03d}") for i, (s, e) in enumerate(plan)]
    problems: list[str] = []
    lms = prepare_segments(items, frontend=head.frontend, length_s=head.segment_seconds, pad=head.pad,
                           cache_dir=None, problems=problems, remember=False)
    keep = readable_rows(lms).numpy()
    if not keep.any():
        raise AudioError(rec.path, problems[0].split(": ", 1)[-1] if problems else "no readable segment")
    kept_lms = lms[torch.from_numpy(keep)]
    probs = model_set_probabilities(models, kept_lms, device=device, batch_size=batch_size, amp_dtype=amp_dtype)
    kept = [it for it, k in zip(items, keep) if k]
    flags = ood.flag_segments(head.meta.get("audio_profile"), kept, kept_lms, sample_rate=rate, duration=duration,
                              frames_per_second=head.frontend.frames_per_second)
    return ClassifiedRecording(rec.path, source, duration, kept, probs, int((~keep).sum()), flags)


def _check_options(segments: str, batch_size: int, amp: str) -> None:
    if segments not in ("auto", "annotations", "window"):
        raise ConfigError(f"--segments {segments!r}: use auto, annotations or window")
    if batch_size < 1:
        raise ConfigError(f"--batch-size must be >= 1, got {batch_size}")
    if amp not in ("off", "auto", "bf16", "fp16"):
        raise ConfigError(f"--amp {amp!r}: use off, auto, bf16 or fp16")


def _window_and_hop(head: LoadedClassifier, window_seconds: float | None,
                    hop_seconds: float | None) -> tuple[float, float]:
    """Sliding windows default to the classifier's segment length, hopping by a whole window."""
    window = float(window_seconds) if window_seconds is not None else head.segment_seconds
    hop = float(hop_seconds) if hop_seconds is not None else window
    if not (window > 0 and hop > 0 and math.isfinite(window) and math.isfinite(hop)):
        raise ConfigError(f"--window-seconds and --hop-seconds must be positive numbers, got {window} / {hop}")
    return window, hop
