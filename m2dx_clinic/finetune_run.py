"""The records a fine-tuning run passes between its loop (`finetune`) and its outputs (`finetune_outputs`).

They live apart from both so each side imports them without importing the other.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .audio import FrontEndConfig
from .data.segment_cache import SegmentArrays
from .data.segments import Segment
from .data.task_data import TaskData
from .models.vit import AudioViT
from .provenance import Provenance
from .recipes import FinetuneRecipe
from .rundir import RunLock
from .weights import ResolvedCheckpoint


@dataclass
class RepeatOutcome:
    """What one fine-tuning repeat produced (best weights only kept for the first repeat)."""

    repeat: int
    seed: int
    selected_epoch: int
    val: dict[str, Any] | None
    test: dict[str, Any] | None
    epochs: list[dict[str, Any]]
    val_probs: torch.Tensor | None
    test_probs: torch.Tensor | None
    best_state: dict[str, torch.Tensor] | None
    classifier: Path | None = None  # the repeat's classifier file, once written
    kind: str = "full"  # full (fine-tuned), linear (frozen encoder + logistic regression) or baseline (log-mel)
    extra_meta: dict[str, Any] | None = None  # what the classifier file says besides `classifier_meta`
    extra_tensors: dict[str, dict[str, torch.Tensor]] | None = None  # stored beside the model (the fit's arrays)


@dataclass
class Prepared:
    """Everything shared by the repeats of one run."""

    recipe: FinetuneRecipe
    encoder: AudioViT
    classes: list[str]
    normal_class: int
    lms: dict[str, SegmentArrays | torch.Tensor]  # raw log-mel per split, [N, n_mels, frames]
    labels: dict[str, list[int]]
    device: torch.device
    amp_dtype: torch.dtype | None


@dataclass
class FinetuneRun:
    """A checked, ready run: the task and its splits, the encoder on its device, the prepared segments."""

    prepared: Prepared
    task_data: TaskData
    splits: dict[str, list[Segment]]
    run_dir: Path
    notes: list[str]
    task: str
    data: Path
    checkpoint: ResolvedCheckpoint  # the base checkpoint, resolved and loaded once (`weights.load_base`)
    score_test: bool
    lock: RunLock
    inputs: dict[str, str]  # fingerprint of what the run is made from (the report reuses a run only on a match)
    provenance: Provenance  # what shipped files say about where the run came from
    started: float = field(default_factory=time.time)

    @property
    def frontend(self) -> FrontEndConfig:
        """The pre-training front-end of the encoder's sample rate (the only one a run uses)."""
        return FrontEndConfig.for_sample_rate(self.prepared.encoder.config.sample_rate)

    @property
    def command(self) -> str:
        return f"m2dx finetune --task {self.task} --data {self.data} --checkpoint {self.checkpoint.given}"
