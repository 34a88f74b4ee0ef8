"""The fine-tuned classifier file: everything needed to classify a recording, without the run folder.

Layout (a `torch.save` dict, loadable with `weights_only=True` and the same allow-list as the
published checkpoints):
- `model`: the encoder under the published keys (`cls_token`, `pos_embed`, `blocks.*`, `norm_stats`,
  ...), so `m2dx embed -c FILE` and the reference loaders read the fine-tuned encoder as they read
  any M2D checkpoint; the file sits in a folder named by the published convention for them;
- `head`: the linear head (`weight` [classes, F*D], `bias` [classes]);
- `epoch`: the selected epoch;
- `m2dx`: plain metadata: format and package version, class names and the normal class, norm stats,
  front-end settings, the segment rule (seconds, padding, chunked vs adjusted positions), geometry,
  the resolved recipe, the operating point, the temperature fitted on validation (`calibration`, None
  when too few validation items; the operating point was chosen after it), a fingerprint of the training
  data, the scores.

A linear-evaluation file (`m2dx finetune --mode linear`) is the same layout: the frozen encoder and
the logistic regression folded into `head`; its `standardise` (mean, scale) and `logistic` (coef,
intercept) tensors keep the fit as it was made. A baseline file (`--mode baseline`, metadata
`classifier_kind = "baseline"`) has no encoder: `model` holds `baseline.*` (norm stats, feature
standardisation) of `models.baseline.LogMelStatsClassifier`, `head` its logistic regression.

`load_classifier(path)` returns a ready model with its metadata; `classifier_weights` /
`classifier_from_weights` are the pickle-free view used by the safetensors export.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..audio import FrontEndConfig
from ..errors import CheckpointError
from ..fileio import atomic_torch_save
from ..models.baseline import LogMelStatsClassifier
from ..models.classifier import Classifier
from ..models.vit import ViTConfig
from .loading import META_KEY, encoder_from_state, filter_checkpoint, infer_vit_config, load_checkpoint_file, strict_load
from .names import checkpoint_folder_name

CLASSIFIER_FORMAT = "m2dx-classifier"
CLASSIFIER_VERSION = 1
ENCODER_PREFIX = "encoder."
BASELINE_PREFIX = "baseline."
COMPARISON_FILE = "candidates.json"  # in a `m2dx finetune --mode compare` folder: candidate -> its run folder


@dataclass
class LoadedClassifier:
    """A classifier file, loaded: the model (eval mode, CPU) and what it needs to be applied correctly."""

    path: Path
    model: Classifier | LogMelStatsClassifier
    meta: dict[str, Any]

    @property
    def kind(self) -> str:
        """full (fine-tuned encoder), linear (frozen encoder + logistic regression) or baseline (log-mel statistics)."""
        return str(self.meta.get("classifier_kind") or "full")

    @property
    def classes(self) -> list[str]:
        return list(self.meta["classes"])

    @property
    def normal_index(self) -> int:
        return int(self.meta["normal_class_index"])

    @property
    def frontend(self) -> FrontEndConfig:
        return FrontEndConfig(**self.meta["frontend"])

    @property
    def segment_seconds(self) -> float:
        return float(self.meta["segment"]["seconds"])

    @property
    def pad(self) -> str:
        return str(self.meta["segment"]["pad"])

    @property
    def operating_point(self) -> dict[str, Any] | None:
        point = self.meta.get("operating_point")
        return point if isinstance(point, dict) else None

    def describe(self) -> str:
        """One line: classes, geometry, segment rule."""
        if isinstance(self.model, LogMelStatsClassifier):
            return (f"{self.path.name}: {len(self.classes)} classes ({', '.join(self.classes)}; normal "
                    f"{self.classes[self.normal_index]}), log-mel statistics baseline (no encoder), "
                    f"{self.segment_seconds:g}-s segments ({self.pad} padding)")
        cfg = self.model.encoder.config
        return (f"{self.path.name}: {len(self.classes)} classes ({', '.join(self.classes)}; normal "
                f"{self.classes[self.normal_index]}), {cfg.embed_dim}-d x {cfg.depth} encoder, "
                f"{self.segment_seconds:g}-s segments ({self.pad} padding)")


def classifier_folder_name(config: ViTConfig, offline: bool = True) -> str:
    """The published folder convention with a `classifier` tag, so reference loaders read the geometry."""
    return checkpoint_folder_name(config, offline=offline, tag="classifier")


def classifier_weights(model: Classifier | LogMelStatsClassifier) -> dict[str, torch.Tensor]:
    """Flat tensors: the encoder's published keys (a baseline: `baseline.*`) plus `head.weight` / `head.bias`."""
    if isinstance(model, LogMelStatsClassifier):
        body = {BASELINE_PREFIX + k: v for k, v in model.state_dict().items() if not k.startswith("head.")}
    else:
        body = model.encoder.state_dict()
    out = {k: v.detach().to("cpu").contiguous().clone() for k, v in body.items()}
    out["head.weight"] = model.head.weight.detach().to("cpu").contiguous().clone()
    out["head.bias"] = model.head.bias.detach().to("cpu").contiguous().clone()
    return out


def save_classifier(model: Classifier | LogMelStatsClassifier, meta: dict[str, Any], path: Path, *, epoch: int,
                    extra: dict[str, dict[str, torch.Tensor]] | None = None) -> Path:
    """Write one classifier file atomically (see the module docstring); `extra`: more named groups of tensors."""
    weights = classifier_weights(model)
    head = {"weight": weights.pop("head.weight"), "bias": weights.pop("head.bias")}
    meta = {"format": CLASSIFIER_FORMAT, "format_version": CLASSIFIER_VERSION, **meta}
    groups = {name: {k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()}
              for name, tensors in (extra or {}).items()}
    return atomic_torch_save({"model": weights, "head": head, "epoch": int(epoch), **groups, META_KEY: meta}, path)


def classifier_from_weights(weights: dict[str, torch.Tensor], meta: dict[str, Any], source: str) -> Classifier:
    """A ready Classifier (eval, CPU) from flat weights + metadata; a mismatch is one CheckpointError line."""
    if meta.get("classifier_kind") == "baseline":
        return _baseline_from_weights(weights, meta, source)
    encoder_state = {k: v for k, v in weights.items() if not k.startswith("head.")}
    encoder = encoder_from_state(infer_vit_config(encoder_state, None, meta), encoder_state, source)
    head_weight = weights.get("head.weight")
    if head_weight is None or "head.bias" not in weights:
        raise CheckpointError(f"{source}: no classifier head in this file; pass a file that m2dx finetune wrote")
    classes = meta.get("classes") or []
    if int(head_weight.shape[0]) != len(classes):
        raise CheckpointError(f"{source}: the head has {head_weight.shape[0]} outputs but the file names "
                              f"{len(classes)} classes; the file is damaged, re-run m2dx finetune")
    segment = meta.get("segment") or {}
    model = Classifier(encoder, len(classes), adjust_pos=segment.get("positions") == "adjusted")
    strict_load(model.head, {"weight": head_weight, "bias": weights["head.bias"]}, source)
    return model.eval()


def _baseline_from_weights(weights: dict[str, torch.Tensor], meta: dict[str, Any],
                           source: str) -> LogMelStatsClassifier:
    """The log-mel statistics baseline of a baseline classifier file (no encoder)."""
    classes = meta.get("classes") or []
    n_mels = int((meta.get("frontend") or {}).get("n_mels", 0))
    if n_mels < 1 or len(classes) < 2:
        raise CheckpointError(f"{source}: a baseline classifier without its front-end or classes; re-run m2dx finetune")
    model = LogMelStatsClassifier(n_mels, len(classes))
    state = {k[len(BASELINE_PREFIX):]: v for k, v in weights.items() if k.startswith(BASELINE_PREFIX)}
    state.update({k: v for k, v in weights.items() if k.startswith("head.")})
    strict_load(model, state, source)
    return model.eval()


def classifier_files(run_dir: Path) -> list[Path]:
    """A fine-tuning run's classifier files, by repeat (`classifiers/<folder>/repeat-<k>.pt`)."""
    found = [(int(p.stem.split("-")[1]), p) for p in Path(run_dir).glob("classifiers/*/repeat-*.pt")
             if p.stem.split("-")[1].isdigit()]
    return [p for _, p in sorted(found)]


def candidate_folder(model: str | Path, candidate: str | None = None) -> Path:
    """A comparison folder (`--mode compare`) -> the run folder of `candidate` (default: the recommended one);
    anything else is returned as given (asking it for a candidate is one line saying why not)."""
    import json

    path = Path(model).expanduser()
    marker = path / COMPARISON_FILE
    if not marker.is_file():
        if candidate is not None:
            raise CheckpointError(f"{path}: --candidate picks a candidate of a m2dx finetune --mode compare run folder, "
                                  "and this is not one; drop --candidate")
        return path
    try:
        info = json.loads(marker.read_text(encoding="utf-8"))
        chosen = candidate or info["recommended"]
        folders = dict(info["candidates"])
    except (OSError, ValueError, KeyError, TypeError):
        raise CheckpointError(f"{marker}: damaged; run m2dx finetune --mode compare again") from None
    if chosen not in folders:
        raise CheckpointError(f"{path}: no candidate {chosen!r}; it has {', '.join(folders)} (--candidate)")
    return path / folders[chosen]


def find_classifier(model: str | Path, repeat: int | None = None) -> Path:
    """A classifier file from a file path, or from a run folder: its `best.pt`, or repeat K's file."""
    path = candidate_folder(model)
    if path.is_file():
        if repeat is not None:
            raise CheckpointError(f"{path}: --repeat picks a repeat of a run folder; pass the run folder, or drop --repeat")
        return path
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such classifier file or run folder; pass RUN_DIR or RUN_DIR/best.pt "
                              "from m2dx finetune")
    files = classifier_files(path)
    if not files:
        raise CheckpointError(f"{path}: not a finished fine-tuning run (no classifiers/*/repeat-*.pt); pass the folder "
                              "that m2dx finetune wrote, or a classifier file")
    if repeat is None:
        return path / "best.pt" if (path / "best.pt").is_file() else files[0]
    chosen = [f for f in files if f.stem == f"repeat-{repeat}"]
    if not chosen:
        raise CheckpointError(f"{path}: no repeat {repeat}; it has repeats {', '.join(f.stem[7:] for f in files)}")
    return chosen[0]


def load_classifier(path: str | Path) -> LoadedClassifier:
    """Load a classifier file that `m2dx finetune` wrote; anything else is one line saying what it is."""
    path = Path(path).expanduser()
    raw = load_checkpoint_file(path)
    meta = raw.get(META_KEY)
    if not isinstance(meta, dict) or meta.get("format") != CLASSIFIER_FORMAT:
        what = "a pre-training checkpoint" if "model" in raw or "pos_embed" in filter_checkpoint(raw) else "not a classifier"
        raise CheckpointError(
            f"{path}: {what}, not a fine-tuned classifier; pass the run folder or classifier file that "
            "m2dx finetune wrote (e.g. RUN/best.pt), or fine-tune this checkpoint first"
        )
    if int(meta.get("format_version", 0)) > CLASSIFIER_VERSION:
        raise CheckpointError(f"{path}: classifier format {meta.get('format_version')} is newer than this "
                              f"package reads ({CLASSIFIER_VERSION}); upgrade m2dx_clinic")
    head = raw.get("head")
    if not isinstance(head, dict):
        raise CheckpointError(f"{path}: no classifier head in this file; pass a file that m2dx finetune wrote")
    weights = {**filter_checkpoint(raw), "head.weight": head.get("weight"), "head.bias": head.get("bias")}
    weights = {k: v for k, v in weights.items() if isinstance(v, torch.Tensor)}
    return LoadedClassifier(path, classifier_from_weights(weights, meta, str(path)), meta)
