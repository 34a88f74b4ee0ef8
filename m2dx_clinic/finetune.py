"""Fine-tuning an M2D encoder on a labelled task with ICBHI-style reporting (spec §6, §7).

(The lead wrote the recipe and result types below as the contract other modules use; the loop is
implemented underneath.)

What this module does differently from the common fine-tuning code (spec §7, "known defects"):
- every training sample is used every epoch: the last, partial batch is trained too, and a batch
  split into micro-batches gives exactly the gradient of the whole batch (sum of per-sample losses
  divided by the real number of samples in the batch);
- normalisation is per sample with the FIXED statistics the encoder was pre-trained with
  (`encoder.normalize`), so a prediction never depends on what else is in the batch;
- the front-end is the pre-training front-end (`audio.LogMelSpectrogram` for the encoder's rate);
- the model is selected on a subject-disjoint VALIDATION split and the test split is scored once;
  the literature's best-test-epoch protocol is available but labelled as optimistic everywhere.

Cycles are decoded and turned into log-mel once per run (and cached on disk by content), because
decoding dominates the cost of small fine-tuning runs and tuning trials repeat it otherwise.
"""

from __future__ import annotations

import copy
import hashlib
import io
import json
import math
import time
import tomllib
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal, Sequence

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from .audio import FrontEndConfig, LogMelSpectrogram
from .checkpoint import load_encoder
from .config import save_resolved, to_dict, toml_value
from .data.icbhi import load_cycle
from .data.tasks import LabelledItem, TaskData, load_task, resolve_normal_class
from .errors import ConfigError, DataError
from .fileio import atomic_save_npy, atomic_savefig, atomic_torch_save, atomic_write_json, atomic_write_text
from .metrics import aggregate_runs, icbhi_scores
from .models.classifier import Classifier
from .models.vit import AudioViT
from .objectives import lr_at
from .pretrain import Distributed, TrainingDiverged, pick_amp, pick_device, seed_everything
from .progress import console, environment_facts, make_progress


# ---------------------------------------------------------------------------- recipe
@dataclass
class FtModelSection:
    freeze_patch_embed: bool = True  # paper default
    adjust_pos: bool = False  # one pass over the 8-s cycle with bicubic-resized positions (else chunked)
    layer_decay: float = 1.0  # layer-wise lr decay (1.0 = off)
    head_init_std: float = 0.01


@dataclass
class FtDataSection:
    cycle_seconds: float = 8.0
    pad: Literal["circular", "zero"] = "circular"
    val_fraction: float = 0.15  # subject-disjoint validation carved from the training split
    test_set: Literal["inter", "intra", "all"] = "inter"  # SPRSound only
    cache_dir: str = ""  # log-mel cache of prepared cycles; default <data_root>/cache
    # Smoke runs only: keep at most this many items per split (a fixed seeded subset; 0 = all).
    # Scores from a subset are NOT comparable to published numbers.
    max_items_per_split: int = 0
    disk_cache: bool = True  # keep prepared cycles under <cache_dir>/cycles for later runs / trials


@dataclass
class FtAugmentSection:
    freq_mask: int = 0  # SpecAugment max width in mel bins (0 = off)
    time_mask: int = 0  # SpecAugment max width in frames (0 = off)
    mixup_alpha: float = 0.0  # 0 = off


@dataclass
class FtOptimSection:
    optimizer: Literal["adam", "adamw"] = "adam"
    lr: float = 5e-5
    batch_size: int = 64
    accum_steps: int = 1
    epochs: int = 150
    warmup_epochs: int = 0
    weight_decay: float = 0.0
    class_weighting: Literal["none", "loss", "sampler"] = "none"
    schedule: Literal["constant", "cosine"] = "constant"  # after the warm-up (paper: constant)
    min_lr: float = 0.0  # end of the cosine schedule
    clip_grad: float = 0.0  # max gradient norm (0 = off)


@dataclass
class FtRunSection:
    out: str = ""
    seed: int = 0
    repeats: int = 1
    device: str = "auto"
    amp: Literal["auto", "bf16", "fp16", "off"] = "auto"
    # test-best = the literature protocol, always labelled; last = the final epoch (no validation needed)
    selection: Literal["val", "test-best", "last"] = "val"
    num_workers: int = 0  # threads that decode and prepare cycles (the training data then sits in memory)
    eval_batch_size: int = 64


@dataclass
class FinetuneRecipe:
    name: str = "icbhi_finetune"
    model: FtModelSection = field(default_factory=FtModelSection)
    data: FtDataSection = field(default_factory=FtDataSection)
    augment: FtAugmentSection = field(default_factory=FtAugmentSection)
    optim: FtOptimSection = field(default_factory=FtOptimSection)
    run: FtRunSection = field(default_factory=FtRunSection)


EpochCallback = Callable[[int, dict[str, Any]], None]
"""Called after every epoch with (epoch, validation metrics); may raise (e.g. optuna.TrialPruned) to stop."""


@dataclass
class FinetuneResult:
    run_dir: Path
    runs: list[dict[str, Any]]  # per repeat: selected epoch, val metrics, test metrics (None when not scored)
    aggregate: dict[str, Any]  # mean / std / 95% CI over repeats (test metrics, or val when test not scored)
    selection: str
    aggregate_split: str = "test"  # which split `aggregate` summarises ("test" or "val")
    classes: list[str] = field(default_factory=list)
    normal_class: str = ""


# ---------------------------------------------------------------------------- labels for the protocols
TEST_BEST_LABEL = "test-best (literature protocol; optimistic)"
SELECTION_LABELS = {
    "val": "val (best validation Score; test scored once)",
    "test-best": TEST_BEST_LABEL,
    "last": "last (final epoch; test scored once)",
}
SCORE_KEYS = ("sp", "se", "score", "accuracy")
CYCLE_CACHE_VERSION = 1


def selection_label(selection: str) -> str:
    """The words every output uses for a selection protocol (test-best always says it is optimistic)."""
    return SELECTION_LABELS[selection]


# ---------------------------------------------------------------------------- validation
def validate_recipe(recipe: FinetuneRecipe, *, score_test: bool = True) -> None:
    """Reject impossible settings before anything is loaded or trained (one-line ConfigErrors)."""
    o, d, a, m, r = recipe.optim, recipe.data, recipe.augment, recipe.model, recipe.run
    checks = [
        (o.batch_size >= 1, f"optim.batch_size must be >= 1, got {o.batch_size}"),
        (o.accum_steps >= 1, f"optim.accum_steps must be >= 1, got {o.accum_steps}"),
        (o.accum_steps < 1 or o.batch_size % o.accum_steps == 0,
         f"optim.batch_size {o.batch_size} is not divisible by optim.accum_steps {o.accum_steps}; "
         "pick a batch size that is a multiple of the accumulation steps"),
        (o.lr > 0 and math.isfinite(o.lr), f"optim.lr must be a positive number, got {o.lr}"),
        (o.epochs >= 1, f"optim.epochs must be >= 1, got {o.epochs}"),
        (0 <= o.warmup_epochs <= o.epochs, f"optim.warmup_epochs must be in 0..epochs ({o.epochs}), got {o.warmup_epochs}"),
        (o.weight_decay >= 0, f"optim.weight_decay must be >= 0, got {o.weight_decay}"),
        (o.min_lr >= 0, f"optim.min_lr must be >= 0, got {o.min_lr}"),
        (o.clip_grad >= 0, f"optim.clip_grad must be >= 0 (0 = off), got {o.clip_grad}"),
        (0 < m.layer_decay <= 1, f"model.layer_decay must be in (0, 1], got {m.layer_decay}"),
        (m.head_init_std > 0, f"model.head_init_std must be > 0, got {m.head_init_std}"),
        (d.cycle_seconds > 0, f"data.cycle_seconds must be > 0, got {d.cycle_seconds}"),
        (0 <= d.val_fraction < 1, f"data.val_fraction must be in [0, 1), got {d.val_fraction}"),
        (d.max_items_per_split >= 0, f"data.max_items_per_split must be >= 0 (0 = all), got {d.max_items_per_split}"),
        (a.freq_mask >= 0 and a.time_mask >= 0, "augment.freq_mask and augment.time_mask must be >= 0"),
        (a.mixup_alpha >= 0, f"augment.mixup_alpha must be >= 0 (0 = off), got {a.mixup_alpha}"),
        (r.repeats >= 1, f"run.repeats must be >= 1, got {r.repeats}"),
        (r.num_workers >= 0, f"run.num_workers must be >= 0, got {r.num_workers}"),
        (r.eval_batch_size >= 1, f"run.eval_batch_size must be >= 1, got {r.eval_batch_size}"),
        (score_test or r.selection != "test-best",
         "run.selection=test-best picks the epoch on the test split, which contradicts not scoring the test "
         "split; use run.selection=val"),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)


def _subset(items: list[LabelledItem], limit: int) -> list[LabelledItem]:
    """A fixed, seeded subset (same for every repeat and seed) in the original order; all when limit is 0."""
    if limit <= 0 or len(items) <= limit:
        return list(items)
    keep = np.sort(np.random.default_rng(12345).choice(len(items), size=limit, replace=False))
    return [items[i] for i in keep]


def select_splits(td: TaskData, recipe: FinetuneRecipe, *, score_test: bool) -> dict[str, list[LabelledItem]]:
    """The items of each split this run may touch: train, val, and test only when it will be scored."""
    limit = recipe.data.max_items_per_split
    splits = {"train": _subset(td.split("train"), limit), "val": _subset(td.split("val"), limit)}
    if score_test:
        splits["test"] = _subset(td.split("test"), limit)
    return splits


def validate_splits(td: TaskData, splits: dict[str, list[LabelledItem]], recipe: FinetuneRecipe,
                    *, score_test: bool, has_callback: bool, source: str) -> list[str]:
    """DataErrors for splits the chosen protocol cannot work with; returns notes for the user."""
    notes: list[str] = []
    selection = recipe.run.selection
    if not splits["train"]:
        raise DataError(f"{source}: the training split is empty; check the split file / split column")
    if len(td.classes) < 2:
        raise DataError(f"{source}: the task has {len(td.classes)} class(es); classification needs at least 2")
    if not 0 <= td.normal_class < len(td.classes):
        raise DataError(f"{source}: normal class index {td.normal_class} is outside the {len(td.classes)} classes")
    if selection == "val" and not splits["val"]:
        raise ConfigError(
            f"{source}: run.selection=val needs a validation split but it is empty; "
            "set data.val_fraction > 0 (e.g. 0.15) or use run.selection=last"
        )
    if has_callback and not splits["val"]:
        raise ConfigError(f"{source}: epoch callbacks report validation metrics; set data.val_fraction > 0")
    if score_test and not splits.get("test"):
        if selection == "test-best":
            raise DataError(f"{source}: run.selection=test-best needs a test split but it is empty")
        notes.append("the test split is empty; only validation metrics are reported")
    train_labels = np.bincount([it.label for it in splits["train"]], minlength=len(td.classes))
    missing = [td.classes[c] for c in range(len(td.classes)) if train_labels[c] == 0]
    if missing:
        notes.append(f"no training items for class(es) {', '.join(missing)}; the model cannot learn them")
    if recipe.data.max_items_per_split:
        notes.append(
            f"data.max_items_per_split={recipe.data.max_items_per_split}: a subset was used (smoke run); "
            "scores are not comparable to published numbers"
        )
    return notes


# ---------------------------------------------------------------------------- cycle preparation
def cycle_cache_root(recipe: FinetuneRecipe) -> Path:
    """`<data.cache_dir>/cycles`, default `<data_root>/cache/cycles` (data root: $M2DX_DATA or ~/.cache/m2dx/data)."""
    if recipe.data.cache_dir:
        return Path(recipe.data.cache_dir).expanduser() / "cycles"
    from .data.downloads import data_root

    return data_root() / "cache" / "cycles"


def cycle_key(item: LabelledItem, frontend: FrontEndConfig, length_s: float, pad: str) -> str:
    """Cache key from the file's identity (path, size, mtime) and every setting that changes the result.

    Editing a file changes its size or mtime and so its key; changing the cycle length, padding or
    front-end changes the key too, so a stale entry is never served.
    """
    path = Path(item.path).expanduser().resolve()
    try:
        stat = path.stat()
        size, mtime = stat.st_size, stat.st_mtime_ns
    except OSError:
        size, mtime = -1, -1  # missing: load_cycle raises the proper AudioError below
    payload = {
        "version": CYCLE_CACHE_VERSION,
        "path": str(path),
        "size": size,
        "mtime_ns": mtime,
        "start": item.start,
        "end": item.end,
        "length_s": float(length_s),
        "pad": pad,
        "frontend": asdict(frontend),
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode("utf-8")).hexdigest()


# Stacked log-mel per list of items, kept across calls in this process (tuning trials, repeats).
_MEMORY_CACHE: "OrderedDict[str, torch.Tensor]" = OrderedDict()
MEMORY_CACHE_ENTRIES = 6


def clear_memory_cache() -> None:
    """Forget the in-process cache of prepared splits (tests; freeing memory between studies)."""
    _MEMORY_CACHE.clear()


def prepare_cycles(
    items: Sequence[LabelledItem],
    *,
    frontend: FrontEndConfig,
    length_s: float,
    pad: str,
    cache_dir: Path | None,
    workers: int = 0,
    progress: bool = False,
    description: str = "cycles",
) -> torch.Tensor:
    """Raw (un-normalised) log-mel of every item's prepared cycle, stacked [N, n_mels, frames] float32.

    Each item goes through `icbhi.load_cycle` (cut / padded to `length_s`, circular or zero) and the
    pre-training front-end. Results are cached on disk (when `cache_dir` is given) and the stacked
    tensor in memory, so repeats and tuning trials do not decode the audio again. An unreadable
    file raises `AudioError` here, before training starts.
    """
    keys = [cycle_key(it, frontend, length_s, pad) for it in items]
    split_key = hashlib.sha256("".join(keys).encode("ascii")).hexdigest()
    if split_key in _MEMORY_CACHE:
        _MEMORY_CACHE.move_to_end(split_key)
        return _MEMORY_CACHE[split_key]
    n_frames = frontend.num_frames(int(round(length_s * frontend.sample_rate)))
    out = torch.empty(len(items), frontend.n_mels, n_frames, dtype=torch.float32)
    mel = LogMelSpectrogram(frontend)

    def one(index: int) -> None:
        entry = cache_dir / keys[index][:2] / f"{keys[index]}.npy" if cache_dir is not None else None
        if entry is not None and entry.is_file():
            try:
                array = np.load(entry)
                if array.shape == (frontend.n_mels, n_frames):
                    out[index] = torch.from_numpy(array)
                    return
            except (OSError, ValueError):
                pass  # a damaged entry is simply recomputed
        wave = load_cycle(items[index], frontend.sample_rate, length_s=length_s, pad=pad)
        with torch.no_grad():
            lms = mel(wave)
        out[index] = lms
        if entry is not None:
            atomic_save_npy(entry, lms.numpy().astype(np.float32, copy=False))

    with make_progress(transient=True, show=progress) as bar:
        task = bar.add_task(description, total=len(items), status="")
        if workers > 1:
            with ThreadPoolExecutor(max_workers=workers) as pool:
                for _ in pool.map(one, range(len(items))):
                    bar.advance(task)
        else:
            for i in range(len(items)):
                one(i)
                bar.advance(task)
    _MEMORY_CACHE[split_key] = out
    while len(_MEMORY_CACHE) > MEMORY_CACHE_ENTRIES:
        _MEMORY_CACHE.popitem(last=False)
    return out


# ---------------------------------------------------------------------------- losses and augmentation
def soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, class_weights: torch.Tensor | None = None) -> torch.Tensor:
    """Per-sample CE with soft targets [B, K]: -sum_c y_c w_c log p_c (w = 1 without class weights)."""
    log_p = F.log_softmax(logits.float(), dim=-1)
    if class_weights is not None:
        targets = targets * class_weights.to(targets.dtype)[None, :]
    return -(targets * log_p).sum(dim=-1)


def inverse_frequency_weights(labels: Sequence[int], num_classes: int) -> torch.Tensor:
    """w_c = N / (K_present * n_c), so the average weight over training items is 1; absent classes get 0."""
    counts = np.bincount(np.asarray(labels, dtype=int), minlength=num_classes).astype(np.float64)
    present = counts > 0
    weights = np.zeros(num_classes)
    weights[present] = counts.sum() / (present.sum() * counts[present])
    return torch.tensor(weights, dtype=torch.float32)


def spec_augment(x: torch.Tensor, freq_mask: int, time_mask: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """One frequency and one time mask per sample, widths uniform in 0..max, set to 0 (= the mean after normalisation)."""
    if freq_mask <= 0 and time_mask <= 0:
        return x
    b, _, n_mels, n_frames = x.shape
    for size, max_width, axis in ((n_mels, freq_mask, 2), (n_frames, time_mask, 3)):
        if max_width <= 0:
            continue
        max_width = min(max_width, size)
        width = torch.randint(0, max_width + 1, (b,), generator=generator)
        start = (torch.rand(b, generator=generator) * (size - width + 1).float()).long()
        pos = torch.arange(size)[None, :]
        hit = (pos >= start[:, None]) & (pos < (start + width)[:, None])  # [B, size]
        shape = (b, 1, size, 1) if axis == 2 else (b, 1, 1, size)
        x = x * (~hit).reshape(shape).to(x.device, x.dtype)  # a [B,1,F,1] or [B,1,1,T] mask: tiny to move
    return x


def mixup(x: torch.Tensor, y: torch.Tensor, alpha: float, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Mix each sample with a random partner of the same batch (one lambda ~ Beta(alpha, alpha) per batch)."""
    if alpha <= 0 or x.shape[0] < 2:
        return x, y
    lam = float(rng.beta(alpha, alpha))
    perm = torch.from_numpy(rng.permutation(x.shape[0])).to(x.device)
    return lam * x + (1 - lam) * x[perm], lam * y + (1 - lam) * y[perm]


def backward_batch(
    model: torch.nn.Module,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    *,
    micro_batch: int,
    class_weights: torch.Tensor | None = None,
    amp_dtype: torch.dtype | None = None,
    scaler: Any = None,
) -> tuple[float, int]:
    """Accumulate the gradient of one (possibly partial) batch, `micro_batch` samples at a time.

    Each micro-batch contributes sum(per-sample losses) / n, where n is the real number of samples
    in this batch, so the accumulated gradient equals that of the whole batch in one pass (and a
    short last batch counts each of its samples as much as a full one). Returns (mean loss, samples).
    """
    n = inputs.shape[0]
    device_type = inputs.device.type
    total = torch.zeros((), device=inputs.device)
    for start in range(0, n, micro_batch):
        x = inputs[start:start + micro_batch]
        y = targets[start:start + micro_batch]
        autocast = torch.autocast(device_type, dtype=amp_dtype) if amp_dtype is not None else nullcontext()
        with autocast:
            logits = model(x)
        per_sample = soft_cross_entropy(logits, y, class_weights)
        loss = per_sample.sum() / n
        (scaler.scale(loss) if scaler is not None else loss).backward()
        total += per_sample.detach().sum()
    return float(total) / max(n, 1), n


@torch.inference_mode()
def predict(
    model: Classifier,
    lms: torch.Tensor,
    *,
    batch_size: int,
    device: torch.device,
    amp_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Class probabilities [N, K] (float32, CPU) for raw log-mel [N, n_mels, frames].

    Each sample is normalised on its own with the encoder's fixed statistics, so the result does
    not depend on `batch_size` or on which other samples share the batch.
    """
    was_training = model.training
    model.eval()
    probs = []
    for start in range(0, lms.shape[0], batch_size):
        x = model.encoder.normalize(lms[start:start + batch_size].to(device, non_blocking=True)).unsqueeze(1)
        autocast = torch.autocast(device.type, dtype=amp_dtype) if amp_dtype is not None else nullcontext()
        with autocast:
            logits = model(x)
        probs.append(F.softmax(logits.float(), dim=-1).cpu())
    model.train(was_training)
    if not probs:
        return torch.zeros(0, model.num_classes)
    return torch.cat(probs)


def evaluate(probs: torch.Tensor, labels: Sequence[int], *, normal_class: int, num_classes: int) -> dict[str, Any]:
    """ICBHI scores of argmax predictions plus the mean cross-entropy ('loss')."""
    y = torch.as_tensor(list(labels), dtype=torch.long)
    pred = probs.argmax(dim=1)
    scores = icbhi_scores(y.numpy(), pred.numpy(), normal_class=normal_class, num_classes=num_classes)
    picked = probs[torch.arange(len(y)), y] if len(y) else torch.zeros(0)
    scores["loss"] = float(-(picked.clamp_min(1e-12).log()).mean()) if len(y) else math.nan
    return scores


# ---------------------------------------------------------------------------- one repeat
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


@dataclass
class _Prepared:
    """Everything shared by the repeats of one run."""

    recipe: FinetuneRecipe
    encoder: AudioViT
    classes: list[str]
    normal_class: int
    lms: dict[str, torch.Tensor]
    labels: dict[str, list[int]]
    device: torch.device
    amp_dtype: torch.dtype | None


def _selection_key(metrics: dict[str, Any]) -> tuple[float, float]:
    """Higher is better: the Score, ties (and NaN scores) broken by the lower loss."""
    score = metrics.get("score", math.nan)
    loss = metrics.get("loss", math.nan)
    return (score if math.isfinite(score) else -math.inf, -loss if math.isfinite(loss) else -math.inf)


def _set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)


def _cpu_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A detached CPU copy of the model's weights (kept while training goes on)."""
    return {n: t.detach().to("cpu", copy=True) for n, t in model.state_dict().items()}


def _lr_for(o: FtOptimSection, progress_epochs: float) -> float:
    """Warm-up, then cosine to `min_lr` or (schedule "constant") a cosine to `lr` itself, i.e. flat."""
    return lr_at(progress_epochs, o.lr, o.warmup_epochs, o.epochs, o.min_lr if o.schedule == "cosine" else o.lr)


def build_classifier(encoder: AudioViT, num_classes: int, recipe: FinetuneRecipe) -> Classifier:
    """A fresh classifier around a copy of `encoder` (the loaded encoder stays untouched for the next repeat)."""
    model = Classifier(copy.deepcopy(encoder), num_classes, adjust_pos=recipe.model.adjust_pos,
                       head_init_std=recipe.model.head_init_std)
    if recipe.model.freeze_patch_embed:
        model.freeze_patch_embed()
    return model


def make_optimizer(model: Classifier, o: FtOptimSection, layer_decay: float) -> torch.optim.Optimizer:
    groups = model.param_groups(o.lr, o.weight_decay, layer_decay)
    if o.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=o.lr)
    return torch.optim.Adam(groups, lr=o.lr)


def epoch_order(labels: Sequence[int], num_classes: int, weighting: str, generator: torch.Generator) -> torch.Tensor:
    """Training indices for one epoch: a permutation, or len(train) draws of a class-balanced sampler."""
    n = len(labels)
    if weighting == "sampler":
        counts = np.bincount(np.asarray(labels, dtype=int), minlength=num_classes)
        weights = torch.tensor([1.0 / counts[c] for c in labels], dtype=torch.double)
        sampler = torch.utils.data.WeightedRandomSampler(weights, num_samples=n, replacement=True, generator=generator)
        return torch.tensor(list(sampler), dtype=torch.long)
    return torch.randperm(n, generator=generator)


def train_epoch(
    model: Classifier,
    optimizer: torch.optim.Optimizer,
    lms: torch.Tensor,
    labels: Sequence[int],
    recipe: FinetuneRecipe,
    *,
    epoch: int,
    device: torch.device,
    amp_dtype: torch.dtype | None = None,
    scaler: Any = None,
    class_weights: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    rng: np.random.Generator | None = None,
) -> dict[str, float]:
    """One pass over the training items (every item once, the last partial batch included).

    Returns the mean per-sample training loss, the samples seen and the last learning rate.
    `epoch` is 0-based and only drives the learning-rate schedule.
    """
    o, a = recipe.optim, recipe.augment
    generator = generator if generator is not None else torch.Generator().manual_seed(0)
    rng = rng if rng is not None else np.random.default_rng(0)
    num_classes = model.num_classes
    order = epoch_order(labels, num_classes, o.class_weighting, generator)
    label_tensor = torch.as_tensor(list(labels), dtype=torch.long)
    steps = math.ceil(len(order) / o.batch_size)
    micro = o.batch_size // o.accum_steps
    weights = class_weights.to(device) if class_weights is not None else None
    model.train()
    loss_sum, seen, lr = 0.0, 0, o.lr
    for step in range(steps):
        idx = order[step * o.batch_size:(step + 1) * o.batch_size]
        lr = _lr_for(o, epoch + step / steps)
        _set_lr(optimizer, lr)
        x = model.encoder.normalize(lms[idx].to(device, non_blocking=True)).unsqueeze(1)
        x = spec_augment(x, a.freq_mask, a.time_mask, generator)
        y = F.one_hot(label_tensor[idx], num_classes).float().to(device)
        x, y = mixup(x, y, a.mixup_alpha, rng)
        optimizer.zero_grad(set_to_none=True)
        mean_loss, n = backward_batch(model, x, y, micro_batch=micro, class_weights=weights,
                                      amp_dtype=amp_dtype, scaler=scaler)
        if scaler is not None:
            scaler.unscale_(optimizer)
        if o.clip_grad > 0:
            torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], o.clip_grad)
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        if not math.isfinite(mean_loss):
            raise TrainingDiverged(
                f"training loss became {mean_loss} in epoch {epoch + 1}; lower optim.lr or run with --amp off"
            )
        loss_sum += mean_loss * n
        seen += n
    return {"train_loss": loss_sum / max(seen, 1), "train_samples": seen, "lr": lr}


def _flat(prefix: str, metrics: dict[str, Any] | None) -> dict[str, float]:
    if metrics is None:
        return {}
    return {f"{prefix}_{k}": float(metrics[k]) for k in ("loss", *SCORE_KEYS)}


def run_repeat(
    prep: _Prepared,
    repeat: int,
    *,
    score_test: bool,
    epoch_callback: EpochCallback | None,
    keep_state: bool,
    on_epoch: Callable[[dict[str, Any]], None] | None = None,
    progress: bool = False,
) -> RepeatOutcome:
    """Train one repeat (seed = run.seed + repeat) and select its model by the recipe's protocol."""
    recipe = prep.recipe
    o, r = recipe.optim, recipe.run
    seed = r.seed + repeat
    seed_everything(seed)
    generator = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    k = len(prep.classes)
    model = build_classifier(prep.encoder, k, recipe).to(prep.device)
    optimizer = make_optimizer(model, o, recipe.model.layer_decay)
    scaler = torch.amp.GradScaler("cuda") if prep.amp_dtype == torch.float16 else None
    class_weights = inverse_frequency_weights(prep.labels["train"], k) if o.class_weighting == "loss" else None
    has_val = len(prep.labels["val"]) > 0
    has_test = score_test and len(prep.labels.get("test", [])) > 0
    test_every_epoch = r.selection == "test-best"
    # A CPU copy of the selected weights (~350 MB for ViT-B) only when something uses it, and for
    # "last" only once, after the loop: the model then already holds the selected weights.
    need_state = keep_state or (has_test and not test_every_epoch)
    snapshot_each_best = need_state and r.selection != "last"

    def score(split: str) -> tuple[dict[str, Any], torch.Tensor]:
        probs = predict(model, prep.lms[split], batch_size=r.eval_batch_size, device=prep.device, amp_dtype=prep.amp_dtype)
        return evaluate(probs, prep.labels[split], normal_class=prep.normal_class, num_classes=k), probs

    best_key: tuple[float, float] | None = None
    best: dict[str, Any] = {}
    rows: list[dict[str, Any]] = []
    with make_progress(transient=True, show=progress) as bar:
        task = bar.add_task(f"fine-tune {repeat + 1}/{r.repeats}", total=o.epochs, status="")
        for epoch in range(o.epochs):
            t0 = time.perf_counter()
            stats = train_epoch(model, optimizer, prep.lms["train"], prep.labels["train"], recipe, epoch=epoch,
                                device=prep.device, amp_dtype=prep.amp_dtype, scaler=scaler,
                                class_weights=class_weights, generator=generator, rng=rng)
            val_metrics, val_probs = score("val") if has_val else (None, None)
            test_metrics, test_probs = score("test") if (test_every_epoch and has_test) else (None, None)
            row = {"repeat": repeat, "seed": seed, "epoch": epoch + 1, **stats,
                   **_flat("val", val_metrics), **_flat("test", test_metrics)}
            if r.selection == "val":
                key = _selection_key(val_metrics)
            elif r.selection == "test-best":
                key = _selection_key(test_metrics)
            else:
                key = (float(epoch), 0.0)
            improved = best_key is None or key > best_key
            if improved:
                best_key = key
                best = {
                    "epoch": epoch + 1,
                    "val": val_metrics,
                    "val_probs": val_probs,
                    "test": test_metrics,
                    "test_probs": test_probs,
                    "state": _cpu_state(model) if snapshot_each_best else None,
                }
            row["seconds"] = time.perf_counter() - t0
            rows.append(row)
            if on_epoch is not None:
                on_epoch(row)
            status = f"loss {stats['train_loss']:.4f}"
            if val_metrics is not None:
                status += f"  val Score {100 * val_metrics['score']:.2f}"
            bar.update(task, advance=1, status=status)
            if epoch_callback is not None and val_metrics is not None:
                epoch_callback(epoch + 1, dict(val_metrics))
    if need_state and best["state"] is None:
        best["state"] = _cpu_state(model)
    # The selected weights score the test split once (test-best already has its test predictions).
    if has_test and not test_every_epoch:
        model.load_state_dict(best["state"])
        best["test"], best["test_probs"] = score("test")
    for row in rows:
        row["selected"] = row["epoch"] == best["epoch"]
    return RepeatOutcome(
        repeat=repeat,
        seed=seed,
        selected_epoch=best["epoch"],
        val=best["val"],
        test=best["test"] if has_test else None,
        epochs=rows,
        val_probs=best["val_probs"],
        test_probs=best["test_probs"] if has_test else None,
        best_state=best["state"] if keep_state else None,
    )


# ---------------------------------------------------------------------------- outputs
def _named_metrics(metrics: dict[str, Any] | None, classes: list[str]) -> dict[str, Any] | None:
    if metrics is None:
        return None
    out = dict(metrics)
    out["per_class_recall"] = {classes[int(c)]: v for c, v in metrics["per_class_recall"].items()}
    return out


def default_run_dir(recipe: FinetuneRecipe) -> Path:
    base = Path("runs") / f"{recipe.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    path, n = base, 2
    while path.exists():
        path, n = base.with_name(f"{base.name}-{n}"), n + 1
    return path


def predictions_frame(outcomes: Sequence[RepeatOutcome], splits: dict[str, list[LabelledItem]],
                      classes: list[str], selection: str) -> pd.DataFrame:
    """One row per scored item of each repeat's selected model (val rows, then test rows)."""
    frames = []
    label = selection_label(selection)
    for out in outcomes:
        for split, probs in (("val", out.val_probs), ("test", out.test_probs)):
            if probs is None or split not in splits:
                continue
            items = splits[split]
            pred = probs.argmax(dim=1).numpy()
            frame = pd.DataFrame({
                "repeat": out.repeat,
                "seed": out.seed,
                "epoch": out.selected_epoch,
                "split": split,
                "item_id": [it.item_id for it in items],
                "recording": [it.recording for it in items],
                "subject": [it.subject for it in items],
                "true_index": [it.label for it in items],
                "true_label": [classes[it.label] for it in items],
                "pred_index": pred,
                "pred_label": [classes[p] for p in pred],
            })
            for c, name in enumerate(classes):
                frame[f"prob_{name}"] = probs[:, c].numpy().astype(np.float64)
            frame["selection"] = label
            frames.append(frame)
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def _write_csv(frame: pd.DataFrame, path: Path) -> None:
    buffer = io.StringIO()
    frame.to_csv(buffer, index=False, float_format="%.8g")
    atomic_write_text(path, buffer.getvalue())


def plot_confusion(matrix: np.ndarray, classes: list[str], title: str, path: Path) -> None:
    from matplotlib.figure import Figure  # pyplot-free, as the report's plots: no global backend switch

    fig = Figure(figsize=(1.2 * len(classes) + 2.5, 1.2 * len(classes) + 2))
    ax = fig.subplots()
    ax.imshow(matrix, cmap="Blues")
    ax.set_xticks(range(len(classes)), classes, rotation=45, ha="right")
    ax.set_yticks(range(len(classes)), classes)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title(title, fontsize=9)
    peak = matrix.max() if matrix.size else 0
    for i in range(matrix.shape[0]):
        for j in range(matrix.shape[1]):
            ax.text(j, i, str(int(matrix[i, j])), ha="center", va="center",
                    color="white" if peak and matrix[i, j] > peak / 2 else "black")
    atomic_savefig(fig, path, format="png", dpi=120, bbox_inches="tight")


def plot_learning_curves(epochs: pd.DataFrame, title: str, path: Path) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4))
    ax_loss, ax_score = fig.subplots(1, 2)
    for repeat, rows in epochs.groupby("repeat"):
        ax_loss.plot(rows["epoch"], rows["train_loss"], marker=".", label=f"train (repeat {repeat})")
        if "val_loss" in rows:
            ax_loss.plot(rows["epoch"], rows["val_loss"], "--", marker=".", label=f"val (repeat {repeat})")
        if "val_score" in rows:
            ax_score.plot(rows["epoch"], 100 * rows["val_score"], marker=".", label=f"val Score (repeat {repeat})")
        if "test_score" in rows:
            ax_score.plot(rows["epoch"], 100 * rows["test_score"], ":", marker=".", label=f"test Score (repeat {repeat})")
        picked = rows[rows["selected"]]
        if len(picked) and "val_score" in rows:
            ax_score.axvline(int(picked["epoch"].iloc[0]), color="grey", lw=0.5)
    ax_loss.set_xlabel("epoch")
    ax_loss.set_ylabel("cross-entropy loss")
    ax_loss.set_title("loss")
    ax_score.set_xlabel("epoch")
    ax_score.set_ylabel("ICBHI Score (%)")
    ax_score.set_title(f"Score; selection: {title}", fontsize=9)
    for ax in (ax_loss, ax_score):
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    atomic_savefig(fig, path, format="png", dpi=120, bbox_inches="tight")


def summary_table(aggregate: dict[str, Any], *, title: str) -> Any:
    """A rich table: Sp / Se / Score / accuracy in %, mean ± 95 % CI, std and n."""
    from rich.table import Table

    table = Table(title=title)
    table.add_column("metric")
    table.add_column("mean ± 95% CI (%)", justify="right")
    table.add_column("std (%)", justify="right")
    table.add_column("runs", justify="right")
    names = {"sp": "Sp", "se": "Se", "score": "Score", "accuracy": "accuracy"}
    for key in SCORE_KEYS:
        stats = aggregate.get(key, {})
        mean, ci, std = stats.get("mean", math.nan), stats.get("ci95", math.nan), stats.get("std", math.nan)
        text = f"{100 * mean:.2f}" + (f" ± {100 * ci:.2f}" if math.isfinite(ci) else "")
        table.add_row(names[key], text, f"{100 * std:.2f}" if math.isfinite(std) else "-", str(stats.get("n", 0)))
    return table


def load_params_toml(path: str | Path) -> list[str]:
    """A best-parameters TOML (recipe-shaped tables) -> `section.key=value` override strings.

    Values are written back in TOML syntax so `config.parse_override` reads them as the same type;
    an `[about]` table (free text for humans) is ignored, and unknown keys are left for
    `config.load_recipe` to reject with its usual message.
    """
    try:
        with open(path, "rb") as f:
            values = tomllib.load(f)
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read parameters file ({exc.strerror})") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: invalid TOML ({exc}); fix the syntax") from None
    values.pop("about", None)
    out: list[str] = []

    def walk(prefix: str, table: dict[str, Any]) -> None:
        for key, value in table.items():
            name = f"{prefix}.{key}" if prefix else key
            if isinstance(value, dict):
                walk(name, value)
            else:
                out.append(f"{name}={toml_value(value)}")

    walk("", values)
    return out


# ---------------------------------------------------------------------------- entry point
def finetune(
    recipe: FinetuneRecipe,
    *,
    task: str,
    data: Path,
    checkpoint: str | Path,
    normal_class: str | None = None,
    epoch_callback: EpochCallback | None = None,
    score_test: bool = True,
    progress: bool = True,
    task_data: TaskData | None = None,
) -> FinetuneResult:
    """Fine-tune `checkpoint` on `task` and write the run directory; see the module docstring.

    Everything that can be checked is checked before training: the recipe, the task and its
    splits, the checkpoint, and every audio file of the splits in use (decoded while preparing
    cycles). With `score_test=False` the test split is never read (the tuner relies on this).
    """
    validate_recipe(recipe, score_test=score_test)
    source = f"{task} ({data})"
    if task_data is None:
        td = load_task(task, data, normal_class=normal_class, val_fraction=recipe.data.val_fraction,
                       seed=recipe.run.seed, test_set=recipe.data.test_set)
    else:
        td = task_data
        if normal_class is not None:
            td = copy.copy(td)
            td.normal_class = resolve_normal_class(td.classes, normal_class, td.classes[td.normal_class], task)
    splits = select_splits(td, recipe, score_test=score_test)
    notes = validate_splits(td, splits, recipe, score_test=score_test, has_callback=epoch_callback is not None,
                            source=source)
    encoder = load_encoder(checkpoint)
    device = pick_device(recipe.run.device, Distributed())
    amp_dtype = pick_amp(recipe.run.amp, device)
    frontend = FrontEndConfig.for_sample_rate(encoder.config.sample_rate)

    run_dir = Path(recipe.run.out) if recipe.run.out else default_run_dir(recipe)
    if (run_dir / "metrics.json").exists():
        raise ConfigError(f"{run_dir}: already holds a finished fine-tuning run; pick another --out")
    recipe = copy.deepcopy(recipe)
    recipe.run.out = str(run_dir)
    cache = cycle_cache_root(recipe) if recipe.data.disk_cache else None
    lms: dict[str, torch.Tensor] = {}
    for split, items in splits.items():
        lms[split] = prepare_cycles(items, frontend=frontend, length_s=recipe.data.cycle_seconds, pad=recipe.data.pad,
                                    cache_dir=cache, workers=recipe.run.num_workers, progress=progress,
                                    description=f"prepare {split} cycles")
    if device.type == "cuda":
        lms = {k: v.to(device) for k, v in lms.items()}  # a few GB at most for ICBHI; avoids per-batch copies
    labels = {split: [it.label for it in items] for split, items in splits.items()}
    encoder = encoder.to(device)

    label = selection_label(recipe.run.selection)
    command = f"m2dx finetune --task {task} --data {data} --checkpoint {checkpoint}"
    save_resolved(recipe, run_dir / "recipe.toml", header=f"resolved recipe of run {run_dir.name}\n{command}")
    for note in [*td.warnings, *notes]:
        if progress:
            console.print(f"[yellow]{note}[/]")
    prep = _Prepared(recipe, encoder, list(td.classes), td.normal_class, lms, labels, device, amp_dtype)

    all_rows: list[dict[str, Any]] = []

    def on_epoch(row: dict[str, Any]) -> None:
        all_rows.append(row)
        _write_csv(pd.DataFrame(all_rows), run_dir / "epochs.csv")  # readable while the run goes on

    outcomes = []
    started = time.time()
    for repeat in range(recipe.run.repeats):
        outcomes.append(run_repeat(prep, repeat, score_test=score_test, epoch_callback=epoch_callback,
                                   keep_state=repeat == 0, on_epoch=on_epoch, progress=progress))

    # ------------------------------------------------------------ outputs
    scored_test = all(o.test is not None for o in outcomes)
    agg_split = "test" if scored_test else "val"
    per_split = [o.test if scored_test else o.val for o in outcomes]
    aggregate = aggregate_runs([m for m in per_split if m is not None], SCORE_KEYS)
    classes = list(td.classes)
    runs = [
        {
            "repeat": o.repeat,
            "seed": o.seed,
            "selected_epoch": o.selected_epoch,
            "val": _named_metrics(o.val, classes),
            "test": _named_metrics(o.test, classes),
        }
        for o in outcomes
    ]
    epochs_frame = pd.DataFrame([row for o in outcomes for row in o.epochs])
    _write_csv(epochs_frame, run_dir / "epochs.csv")
    _write_csv(predictions_frame(outcomes, splits, classes, recipe.run.selection), run_dir / "predictions.csv")
    checkpoint_path = Path(str(checkpoint)).expanduser()
    metrics = {
        "task": td.name,
        "data": str(data),
        "checkpoint": str(checkpoint),
        "checkpoint_resolved": str(checkpoint_path.resolve()) if checkpoint_path.exists() else None,
        "selection": label,
        "selection_mode": recipe.run.selection,
        "test_scored": scored_test,
        "aggregate_split": agg_split,
        "classes": classes,
        "normal_class": classes[td.normal_class],
        "normal_class_index": td.normal_class,
        "items": {split: len(items) for split, items in splits.items()},
        "repeats": recipe.run.repeats,
        "runs": runs,
        "aggregate": aggregate,
        "notes": [*td.notes, *notes],
        "warnings": list(td.warnings),
        "device": str(device),
        "amp": str(amp_dtype) if amp_dtype is not None else "off",
        "seconds": time.time() - started,
        "environment": environment_facts(),
        "metrics_note": "fractions in [0, 1]; recompute from predictions.csv (pred_index vs true_index per repeat and split)",
    }
    atomic_write_json(run_dir / "metrics.json", metrics, end="")

    total_cm = sum(np.asarray((o.test if scored_test else o.val)["confusion_matrix"]) for o in outcomes)
    plot_confusion(total_cm, classes, f"{agg_split} split, summed over {len(outcomes)} repeat(s); selection: {label}",
                   run_dir / "confusion_matrix.png")
    plot_learning_curves(epochs_frame, label, run_dir / "learning_curves.png")
    first = outcomes[0]
    atomic_torch_save(
        {
            "model": first.best_state,
            "classes": classes,
            "normal_class": td.normal_class,
            "norm_stats": encoder.norm_stats.tolist(),
            "vit_config": to_dict(encoder.config),
            "adjust_pos": recipe.model.adjust_pos,
            "epoch": first.selected_epoch,
            "selection": label,
            "checkpoint": str(checkpoint),
            "recipe": to_dict(recipe),
        },
        run_dir / "best.pt",
    )
    if progress:
        title = f"{td.name}: {agg_split} split over {len(outcomes)} run(s) — selection: {label}"
        console.print(summary_table(aggregate, title=title))
        console.print(f"run folder: {run_dir}")
    return FinetuneResult(run_dir=run_dir, runs=runs, aggregate=aggregate, selection=label,
                          aggregate_split=agg_split, classes=classes, normal_class=classes[td.normal_class])
