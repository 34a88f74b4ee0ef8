"""What the training audio looked like, and flags for recordings that do not look like it.

A fine-tuned classifier file carries an *audio profile* of its training split (`build_profile`): the
sample rates met, the segment durations and a cheap summary of the log-mel input (each segment's mean
and standard deviation over time and frequency, summarised by quantiles). Only aggregate numbers are
kept: no recording name, path or subject, so the file can be shared.

At prediction, `flag_segment` compares one segment with the profile and names what is far outside it
(docs/METHOD.md, "Out-of-distribution flags"); `flag_segments` does it for a recording's segments. A flag never stops a prediction; it tells the reader
that the model was not trained on audio like this.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import torch

from ..audio import audio_info
from ..errors import AudioError

PROFILE_VERSION = 1
QUANTILES = (0.0, 0.01, 0.05, 0.25, 0.5, 0.75, 0.95, 0.99, 1.0)
SHORT_FRACTION = 0.5  # shorter than half the training 5th-percentile duration: "too short"
MIN_WIDTH = 1.0  # log-mel statistics: the allowed margin is at least this (natural-log units)
NO_PROFILE_NOTE = ("the classifier file records no training-audio profile (made before profiles existed); "
                   "recordings are not checked against the training data")


def segment_statistics(lms: Sequence[torch.Tensor] | torch.Tensor, durations: Sequence[float | None],
                       frames_per_second: float) -> np.ndarray:
    """[N, 2] mean and std of each raw log-mel [n_mels, frames] over the frames its segment really fills.

    Only the frames that hold the segment itself count (its duration, when known), not the padding
    that fits it to the model's length. `lms` is a stacked tensor or any sequence of [n_mels, frames].
    """
    out = np.zeros((len(lms), 2), dtype=np.float64)
    for i in range(len(lms)):
        item = lms[i]
        total = item.shape[-1]
        d = durations[i]
        frames = total if d is None or not math.isfinite(d) else max(1, min(total, math.ceil(d * frames_per_second)))
        part = item[:, :frames].detach().float().cpu()
        out[i] = (float(part.mean()), float(part.std(unbiased=False)))
    return out


def profile_of(items: Sequence[Any], lms: Sequence[torch.Tensor] | torch.Tensor, frames_per_second: float) -> dict:
    """The profile of training `items` (Segments) and their raw log-mels, reading audio headers only."""
    headers: dict[Any, tuple[int, float] | None] = {}
    for it in items:
        if it.path not in headers:
            try:
                headers[it.path] = audio_info(it.path)
            except AudioError:
                headers[it.path] = None
    durations = []
    for it in items:
        header = headers[it.path]
        if it.duration is not None:
            durations.append(it.duration)
        else:
            durations.append(None if header is None else header[1] - (it.start or 0.0))
    rates = [h[0] for h in headers.values() if h is not None]
    return build_profile(rates, durations, segment_statistics(lms, durations, frames_per_second))


def _quantiles(values: Sequence[float]) -> dict[str, float] | None:
    array = np.asarray([v for v in values if v is not None and math.isfinite(v)], dtype=np.float64)
    if array.size == 0:
        return None
    return {f"q{round(q * 100):02d}": float(np.quantile(array, q)) for q in QUANTILES}


def build_profile(sample_rates: Iterable[int], durations: Sequence[float | None], stats: np.ndarray,
                  *, devices: Iterable[str] = ()) -> dict[str, Any]:
    """The training audio's profile: recording sample rates (counts), segment durations and log-mel statistics."""
    rates = Counter(int(r) for r in sample_rates)
    device_counts = Counter(str(d) for d in devices if d)
    return {
        "version": PROFILE_VERSION,
        "segments": int(len(durations)),
        "sample_rates": {str(rate): int(n) for rate, n in sorted(rates.items())},
        "devices": {name: int(n) for name, n in sorted(device_counts.items())} or None,
        "duration_s": _quantiles([d for d in durations if d is not None]),
        "logmel_mean": _quantiles(stats[:, 0].tolist()) if len(stats) else None,
        "logmel_std": _quantiles(stats[:, 1].tolist()) if len(stats) else None,
    }


def _outside(value: float, q: dict[str, float] | None) -> str | None:
    """'low' / 'high' when `value` lies beyond the 1-99 % range by more than its width (at least MIN_WIDTH)."""
    if q is None or not math.isfinite(value):
        return None
    width = max(q["q99"] - q["q01"], MIN_WIDTH)
    if value < q["q01"] - width:
        return "low"
    if value > q["q99"] + width:
        return "high"
    return None


def flag_segment(profile: dict[str, Any] | None, *, duration: float | None, sample_rate: int | None,
                 mean: float, std: float) -> list[str]:
    """Short names of what puts one segment far outside the training audio (empty: nothing)."""
    if not profile:
        return []
    flags = []
    durations = profile.get("duration_s")
    if duration is not None and durations and duration < SHORT_FRACTION * durations["q05"]:
        flags.append(f"too short ({duration:.2f} s; training segments {durations['q05']:.2f}-{durations['q95']:.2f} s)")
    rates = profile.get("sample_rates") or {}
    if sample_rate is not None and rates and str(int(sample_rate)) not in rates:
        flags.append(f"unseen sample rate ({int(sample_rate)} Hz; training {', '.join(rates)} Hz)")
    for name, value, key in (("level", mean, "logmel_mean"), ("spread", std, "logmel_std")):
        side = _outside(value, profile.get(key))
        if side:
            q = profile[key]
            flags.append(f"log-mel {name} far too {side} ({value:.2f}; training {q['q01']:.2f} to {q['q99']:.2f})")
    return flags


def flag_segments(profile: dict[str, Any] | None, items: Sequence[Any], lms: torch.Tensor, *, sample_rate: int,
                  duration: float, frames_per_second: float) -> list[list[str]]:
    """Per segment of one recording (`items`: Segments with start / end, `lms`: their raw log-mels), what puts
    it outside the classifier's training audio; an open end means the end of the recording (`duration`)."""
    if not profile:
        return [[] for _ in items]
    lengths = [(it.end if it.end is not None else duration) - (it.start or 0.0) for it in items]
    stats = segment_statistics(lms, lengths, frames_per_second)
    return [flag_segment(profile, duration=d, sample_rate=sample_rate, mean=m, std=sd)
            for d, (m, sd) in zip(lengths, stats)]


def describe(profile: dict[str, Any] | None) -> str:
    """One line on what the classifier was trained on, for the console and summaries."""
    if not profile:
        return NO_PROFILE_NOTE
    rates = ", ".join(f"{r} Hz" for r in profile.get("sample_rates") or {}) or "unknown rates"
    d = profile.get("duration_s")
    span = f"{d['q05']:.2f}-{d['q95']:.2f} s (5-95 %)" if d else "unknown durations"
    return f"trained on {profile.get('segments', 0)} segments at {rates}, {span}"
