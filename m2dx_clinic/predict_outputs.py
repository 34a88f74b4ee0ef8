"""What `m2dx predict` writes: one row per segment, one per recording, and the summary that explains them.

`predict` classifies; this module only turns its results into segments.csv, recordings.csv and
summary.json, and words the one decision rule the same way in the files, on the console
(`describe_recording`) and in the review page.
"""

from __future__ import annotations

import datetime as _dt
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from ._version import __version__
from .data.segments import Segment
from .evaluation import ood
from .fileio import atomic_write_csv, atomic_write_json
from .inference import ModelSet


@dataclass
class ClassifiedRecording:
    """One recording's readable segments, their probabilities [S, K] and their out-of-distribution flags."""

    path: Path
    source: str  # where the segments came from: annotations, csv or window
    duration: float
    items: list[Segment]
    probs: np.ndarray
    skipped: int  # segments that could not be read
    flags: list[list[str]]


@dataclass
class PredictResult:
    out_dir: Path
    segments: pd.DataFrame
    recordings: pd.DataFrame
    failed: list[tuple[str, str]]
    summary: dict[str, Any]


@dataclass
class PredictionTable:
    """The rows of segments.csv and recordings.csv, filled one recording at a time, and what summary.json counts."""

    models: ModelSet
    segments: list[dict[str, Any]] = field(default_factory=list)
    recordings: list[dict[str, Any]] = field(default_factory=list)
    sources: dict[str, str] = field(default_factory=dict)  # recording -> where its segments came from
    flagged: list[tuple[str, list[str]]] = field(default_factory=list)  # recordings unlike the training audio
    audio_seconds: float = 0.0

    @property
    def threshold(self) -> float | None:
        """The operating point's threshold on P(abnormal), or None (then the most probable class decides)."""
        return self.models.operating_point["threshold"] if self.models.operating_point else None

    def add(self, rec: ClassifiedRecording) -> None:
        classes, normal = self.models.first.classes, self.models.first.normal_index
        name = str(rec.path)
        self.sources[name] = rec.source
        self.audio_seconds += rec.duration
        abnormal_p = 1.0 - rec.probs[:, normal]
        flags = abnormal_p >= self.threshold if self.threshold is not None else rec.probs.argmax(axis=1) != normal
        rec_flags = sorted({f.split(" (")[0] for fl in rec.flags for f in fl})
        if rec_flags:
            self.flagged.append((name, rec_flags))
        for it, p, pa, flag, why in zip(rec.items, rec.probs, abnormal_p, flags, rec.flags):
            self.segments.append({"recording": name, "segment": int(it.item_id.rsplit("#", 1)[1]),
                                  "start": it.start, "end": it.end if it.end is not None else rec.duration,
                                  "source": rec.source, **{f"prob_{c}": float(v) for c, v in zip(classes, p)},
                                  "predicted": classes[int(p.argmax())], "p_abnormal": float(pa),
                                  "abnormal": bool(flag), "flags": "; ".join(why)})
        mean = rec.probs.mean(axis=0)
        self.recordings.append({"recording": name, "segments": int(len(rec.probs)), "source": rec.source,
                                "duration_s": rec.duration, **{f"mean_prob_{c}": float(v) for c, v in zip(classes, mean)},
                                "abnormal_fraction": float(np.mean(flags)), "max_p_abnormal": float(abnormal_p.max()),
                                "predicted": classes[int(mean.argmax())],
                                "skipped_segments": rec.skipped, "flags": "; ".join(rec_flags)})


def write_outputs(out_dir: Path, table: PredictionTable, failed: list[tuple[str, str]], *, run: dict[str, Any],
                  seconds: float) -> PredictResult:
    """segments.csv, recordings.csv and summary.json in `out_dir`; `run` holds the options the summary repeats
    (segments_mode, window_seconds, hop_seconds, device, amp)."""
    seg_frame, rec_frame = pd.DataFrame(table.segments), pd.DataFrame(table.recordings)
    atomic_write_csv(out_dir / "segments.csv", seg_frame)
    atomic_write_csv(out_dir / "recordings.csv", rec_frame)
    summary = summarize(table, failed, run=run, seconds=seconds)
    atomic_write_json(out_dir / "summary.json", summary)
    return PredictResult(out_dir, seg_frame, rec_frame, failed, summary)


def summarize(table: PredictionTable, failed: list[tuple[str, str]], *, run: dict[str, Any],
              seconds: float) -> dict[str, Any]:
    """summary.json: which classifier, which rule, what was classified, what failed or looked unlike training."""
    models, head, threshold = table.models, table.models.first, table.threshold
    classes, profile = head.classes, head.meta.get("audio_profile")
    return {
        "model": models.source,
        "classifier_files": [str(m.path) for m in models.members],
        "classifier_kind": head.kind,
        "ensemble": len(models.members) > 1,
        "classes": classes, "normal_class": classes[head.normal_index],
        "operating_point": models.operating_point,
        "abnormal_rule": f"P(abnormal) >= {threshold:.6g}" if threshold is not None else "most probable class is not normal",
        "temperature": models.temperature,
        **decision_rule(threshold),
        "segments_mode": run["segments_mode"], "window_seconds": run["window_seconds"],
        "hop_seconds": run["hop_seconds"],
        "segment_rule": head.meta.get("segment"), "segment_sources": table.sources,
        "recordings": len(table.recordings), "segments": len(table.segments),
        "failed": [{"path": p, "problem": why} for p, why in failed],
        "training_audio": ood.describe(profile), "audio_profile": bool(profile),
        "flagged": [{"path": p, "flags": why} for p, why in table.flagged],
        "audio_seconds": table.audio_seconds, "seconds": seconds,
        "recordings_per_s": len(table.recordings) / seconds if seconds > 0 else None,
        "real_time_factor": table.audio_seconds / seconds if seconds > 0 else None,
        "device": run["device"], "amp": {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[run["amp"]],
        "read_workers": run.get("read_workers"),
        "package_version": __version__,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }


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
