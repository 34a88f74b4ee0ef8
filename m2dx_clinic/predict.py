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

import functools
import math
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from .checkpoint.classifier import LoadedClassifier
from .errors import ConfigError, M2DXError
from .evaluation import ood
from .inference import (ModelSet, ReadRecording, Recording, SegmentMode, collect_inputs,  # noqa: F401 (re-exported)
                        default_read_workers, load_model_set, model_set_probabilities, read_recording)
from .models.cpu_kernels import use_fast_cpu_kernels
from .predict_outputs import (ClassifiedRecording, PredictionTable, PredictResult, decision_rule,  # noqa: F401
                              describe_recording, write_outputs)
from .progress import console, make_progress
from .runtime import keep_freed_cpu_memory, pick_amp, pick_device, read_ahead

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
    read_workers: int | None = None,
    progress: bool = True,
) -> PredictResult:
    """Classify every input recording and write segments.csv, recordings.csv and summary.json to `out_dir`.
    `read_workers`: threads decoding the next recordings meanwhile (None: `default_read_workers`; 0: none)."""
    _check_options(segments, batch_size, amp, read_workers)
    models = load_model_set(model, repeat=repeat, candidate=candidate)
    window, hop = _window_and_hop(models.first, window_seconds, hop_seconds)
    dev, amp_dtype = _prepare_device(models, device, amp)
    recordings, failed = collect_inputs(inputs)
    table = PredictionTable(models)
    read = functools.partial(read_recording, head=models.first, mode=segments, window=window, hop=hop)
    workers = default_read_workers(dev) if read_workers is None else read_workers
    t0 = time.perf_counter()
    with make_progress(show=progress and bool(recordings)) as bar:
        task = bar.add_task("classifying", total=len(recordings), status="")

        def classify_waiting() -> None:  # one forward pass over several recordings' segments
            for done in classify(models, waiting, device=dev, batch_size=batch_size, amp_dtype=amp_dtype):
                table.add(done)
                elapsed = max(time.perf_counter() - t0, 1e-9)
                bar.update(task, advance=1, status=f"{len(table.recordings) / elapsed:.1f} rec/s, "
                                                    f"{table.audio_seconds / elapsed:.0f}x real time")
            waiting.clear()

        waiting: list[ReadRecording] = []
        # the next recordings are decoded and turned into log-mels while the model works on the earlier ones
        for rec, reading in read_ahead(read, recordings, workers=workers):
            try:
                waiting.append(reading.result())
            except M2DXError as exc:  # one bad file never costs the batch
                failed.append((str(rec.path), str(exc).removeprefix(f"{rec.path}: ")))
                bar.advance(task)
                continue
            if sum(len(r.items) for r in waiting) >= batch_size:
                classify_waiting()
        classify_waiting()
    elapsed = time.perf_counter() - t0
    if progress:
        _say_flagged(models, table)
    run = {"segments_mode": segments, "window_seconds": window, "hop_seconds": hop, "device": str(dev),
           "amp": amp_dtype, "read_workers": workers}
    return write_outputs(Path(out_dir), table, failed, run=run, seconds=elapsed)


def classify(models: ModelSet, reads: Sequence[ReadRecording], *, device: torch.device, batch_size: int,
             amp_dtype: torch.dtype | None) -> list[ClassifiedRecording]:
    """Read recordings' probabilities, batched across recordings (a short recording alone would leave the
    device idle), and what in each is unlike the classifier's training audio."""
    if not reads:
        return []
    head = models.first
    lms = torch.cat([r.lms for r in reads])  # [sum S, n_mels, frames]
    probs = model_set_probabilities(models, lms, device=device, batch_size=batch_size, amp_dtype=amp_dtype)
    ends = np.cumsum([len(r.items) for r in reads])
    out = []
    for read, part in zip(reads, np.split(probs, ends[:-1])):  # part: [S, K] of this recording
        flags = ood.flag_segments(head.meta.get("audio_profile"), read.items, read.lms, sample_rate=read.rate,
                                  duration=read.duration, frames_per_second=head.frontend.frames_per_second)
        out.append(ClassifiedRecording(read.path, read.source, read.duration, read.items, part,
                                       int((~read.keep).sum()), flags))
    return out


def _prepare_device(models: ModelSet, device: str, amp: str) -> tuple[torch.device, torch.dtype | None]:
    """The device and autocast dtype, with the CPU kernels and allocator set for inference there."""
    dev = pick_device(device)
    amp_dtype = pick_amp(amp, dev) if amp != "off" else None
    use_fast_cpu_kernels([member.model for member in models.members], dev, amp_dtype)
    keep_freed_cpu_memory(dev)
    return dev, amp_dtype


def _say_flagged(models: ModelSet, table: PredictionTable) -> None:
    console.print(ood.describe(models.first.meta.get("audio_profile")))
    for path, why in table.flagged:
        console.print(f"[yellow]unlike the training audio:[/] {path}: {', '.join(why)}")


def _check_options(segments: str, batch_size: int, amp: str, read_workers: int | None) -> None:
    if segments not in ("auto", "annotations", "window"):
        raise ConfigError(f"--segments {segments!r}: use auto, annotations or window")
    if batch_size < 1:
        raise ConfigError(f"--batch-size must be >= 1, got {batch_size}")
    if amp not in ("off", "auto", "bf16", "fp16"):
        raise ConfigError(f"--amp {amp!r}: use off, auto, bf16 or fp16")
    if read_workers is not None and read_workers < 0:
        raise ConfigError(f"--read-workers must be >= 0 (0: read in the main thread), got {read_workers}")


def _window_and_hop(head: LoadedClassifier, window_seconds: float | None,
                    hop_seconds: float | None) -> tuple[float, float]:
    """Sliding windows default to the classifier's segment length, hopping by a whole window."""
    window = float(window_seconds) if window_seconds is not None else head.segment_seconds
    hop = float(hop_seconds) if hop_seconds is not None else window
    if not (window > 0 and hop > 0 and math.isfinite(window) and math.isfinite(hop)):
        raise ConfigError(f"--window-seconds and --hop-seconds must be positive numbers, got {window} / {hop}")
    return window, hop
