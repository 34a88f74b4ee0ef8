"""Fine-tuning an M2D encoder on a labelled task: the loop, model selection and repeats.

What this loop does differently from the common fine-tuning code (docs/METHOD.md, "Fine-tuning"):
- every training sample is used every epoch: the last, partial batch is trained too, and a batch
  split into micro-batches gives exactly the gradient of the whole batch (sum of per-sample losses
  divided by the real number of samples in the batch);
- normalisation is per sample with the FIXED statistics the encoder was pre-trained with
  (`encoder.normalize`), so a prediction never depends on what else is in the batch;
- the front-end is the pre-training front-end (`audio.LogMelSpectrogram` for the encoder's rate);
- the model is selected on a subject-disjoint VALIDATION split and the test split is scored once;
  the literature's best-test-epoch protocol is available but labelled as optimistic everywhere.

Segments are decoded and turned into log-mel once per run (`data.segment_cache`), because decoding
dominates the cost of small fine-tuning runs and tuning trials repeat it otherwise. What a run
writes (metrics, predictions, plots, classifier files) is `finetune_outputs`' job.
"""

from __future__ import annotations

import copy
import math
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .audio import FrontEndConfig
from .augment import mixup, spec_augment
from .config import save_resolved, to_dict
from .data.corpora import cache_root
from .data.segment_cache import SegmentArrays, on_device_if_small, prepare_segments
from .data.segments import Segment
from .data.tasks import load_task
from .data.task_data import TaskData, resolve_normal_class
from .errors import ConfigError, DataError
from .inference import class_probabilities
from .linear_eval import baseline_repeat, empty_model, linear_repeat, split_embeddings
from .finetune_run import FinetuneRun, Prepared, RepeatOutcome
from .finetune_outputs import (REPEATS_DIR, SCORE_KEYS, EpochsLog, FinetuneResult, finished_repeats, save_repeat_classifier,
                               outcome_fields, resume_command, save_repeat_record, shippable_recipe,
                               write_outputs)
from .metrics import probability_scores as evaluate  # noqa: F401 (evaluate: the loop's name for it)
from .models.classifier import Classifier
from .models.cpu_kernels import use_fast_cpu_kernels
from .models.vit import AudioViT
from .objectives import inverse_frequency_weights, lr_at, soft_cross_entropy
from .progress import console, make_progress
from .provenance import run_provenance
from .recipes import FinetuneRecipe, FtOptimSection, validate_finetune_recipe
from .rundir import check_inputs, default_run_dir, fingerprint, hold, record_inputs, remove_stale_temp_files
from .runtime import (
    SUBSET_SEED,
    TrainingDiverged,
    autocast,
    fused_optimizer,
    keep_freed_cpu_memory,
    pick_amp,
    pick_device,
    seed_everything,
    use_deterministic_kernels,
)
from .weights import load_base

EpochCallback = Callable[[int, dict[str, Any]], None]
"""Called after every epoch with (epoch, validation metrics); may raise (e.g. optuna.TrialPruned) to stop."""


# ---------------------------------------------------------------------------- splits
def _subset(items: list[Segment], limit: int) -> list[Segment]:
    """A fixed, seeded subset (same for every repeat and seed) in the original order; all when limit is 0."""
    if limit <= 0 or len(items) <= limit:
        return list(items)
    keep = np.sort(np.random.default_rng(SUBSET_SEED).choice(len(items), size=limit, replace=False))
    return [items[i] for i in keep]


def select_splits(td: TaskData, recipe: FinetuneRecipe, *, score_test: bool) -> dict[str, list[Segment]]:
    """The items of each split this run may touch: train, val, and test only when it will be scored."""
    limit = recipe.data.max_items_per_split
    splits = {"train": _subset(td.split("train"), limit), "val": _subset(td.split("val"), limit)}
    if score_test:
        splits["test"] = _subset(td.split("test"), limit)
    return splits


def validate_splits(td: TaskData, splits: dict[str, list[Segment]], recipe: FinetuneRecipe,
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


# ---------------------------------------------------------------------------- one batch, prediction, evaluation
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
        with autocast(device_type, amp_dtype):
            logits = model(x)
        per_sample = soft_cross_entropy(logits, y, class_weights)
        loss = per_sample.sum() / n
        (scaler.scale(loss) if scaler is not None else loss).backward()
        total += per_sample.detach().sum()
    return float(total) / max(n, 1), n


# ---------------------------------------------------------------------------- one repeat
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
    """Adam (the paper) or AdamW over the layer-decay groups, fused where the device has the kernel."""
    groups = model.param_groups(o.lr, o.weight_decay, layer_decay)
    fused = fused_optimizer(next(model.parameters()).device)
    if o.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=o.lr, fused=fused)
    return torch.optim.Adam(groups, lr=o.lr, fused=fused)


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
    lms: SegmentArrays | torch.Tensor,
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
    prep: Prepared,
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
        probs = class_probabilities(model, prep.lms[split], batch_size=r.eval_batch_size, device=prep.device,
                                    amp_dtype=prep.amp_dtype)
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


# ---------------------------------------------------------------------------- entry point
def prepare_run(
    recipe: FinetuneRecipe,
    *,
    task: str,
    data: Path,
    checkpoint: str | Path,
    normal_class: str | None = None,
    score_test: bool = True,
    has_callback: bool = False,
    progress: bool = True,
    task_data: TaskData | None = None,
    resume: bool = False,
) -> FinetuneRun:
    """Everything that can be checked, before any training: recipe, task, splits, checkpoint, every audio file.

    The audio of the splits in use is decoded here (cached), so an unreadable file stops the run
    before its first epoch. With `score_test=False` the test split is never read.
    """
    validate_finetune_recipe(recipe, score_test=score_test)
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
    notes = validate_splits(td, splits, recipe, score_test=score_test, has_callback=has_callback, source=source)
    encoder, base = load_base(checkpoint)  # resolved once: the run's records name this file
    device = pick_device(recipe.run.device)
    amp_dtype = pick_amp(recipe.run.amp, device)
    use_deterministic_kernels(recipe.run.deterministic)
    notes += use_fast_cpu_kernels([encoder], device, amp_dtype)  # the repeats' classifiers copy the encoder's kernels
    notes += keep_freed_cpu_memory(device)
    frontend = FrontEndConfig.for_sample_rate(encoder.config.sample_rate)

    data_sha256 = td.fingerprint(splits)["sha256"]
    inputs = finetune_inputs(recipe, data_sha256, base.key)
    run_dir = Path(recipe.run.out) if recipe.run.out else default_run_dir(recipe.name)
    lock = hold(run_dir, "m2dx finetune")  # one writer per run folder; released by finetune()
    try:
        if (run_dir / "metrics.json").exists():
            raise ConfigError(f"{run_dir}: already holds a finished fine-tuning run; pick another --out")
        if resume:  # finished repeats are kept only when made from the same data, checkpoint and recipe
            check_inputs(run_dir / REPEATS_DIR, inputs, "finished repeats")
        elif finished_repeats(run_dir):
            raise ConfigError(f"{run_dir}: holds an interrupted run; continue it with m2dx finetune --resume {run_dir} "
                              "(same --task/--data/--checkpoint), or pick another --out")
        remove_stale_temp_files(run_dir)
        recipe = copy.deepcopy(recipe)
        recipe.run.out = str(run_dir)
        if recipe.run.mode == "baseline":  # the run's classifier is the baseline: no second copy beside it
            recipe.run.baseline = False
        cache = cache_root(recipe.data.cache_dir) / "cycles" if recipe.data.disk_cache else None
        lms: dict[str, SegmentArrays] = {}
        for split, items in splits.items():
            lms[split] = prepare_segments(items, frontend=frontend, length_s=recipe.data.cycle_seconds,
                                          pad=recipe.data.pad, cache_dir=cache, workers=recipe.run.num_workers,
                                          progress=progress, description=f"prepare {split} cycles")
        record_inputs(run_dir / REPEATS_DIR, inputs)  # only once every audio file was read
    except BaseException:
        lock.release()
        raise
    lms = {k: on_device_if_small(v, device) for k, v in lms.items()}
    labels = {split: [it.label for it in items] for split, items in splits.items()}
    provenance = run_provenance(recipe.run.provenance, task=task, data=data, data_sha256=data_sha256,
                                checkpoint=base.path, published=base.published, run_dir=run_dir,
                                name=recipe.run.model_name,
                                normal_class=normal_class)
    save_resolved(shippable_recipe(recipe, provenance), run_dir / "recipe.toml",
                  header=f"resolved recipe of classifier {provenance.name}\nreproduce: {provenance.command}")
    if progress:
        for note in [*td.warnings, *notes]:
            console.print(f"[yellow]{note}[/]")
    prepared = Prepared(recipe, encoder.to(device), list(td.classes), td.normal_class, lms, labels, device, amp_dtype)
    return FinetuneRun(prepared, td, splits, run_dir, notes, task, Path(data), base, score_test, lock, inputs,
                       provenance)


def finetune_inputs(recipe: FinetuneRecipe, data_sha256: str, checkpoint_key: object) -> dict[str, str]:
    """What a fine-tune was made from: the data items, the base checkpoint (`weights.checkpoint_key`: its
    published name or the identity of its file), the recipe (not its output folder)."""
    values = to_dict(recipe)
    values["run"] = {k: v for k, v in values["run"].items() if k not in ("out", "device", "num_workers")}
    values["data"] = {k: v for k, v in values["data"].items() if k != "cache_dir"}  # where, not what
    return fingerprint(data=data_sha256, checkpoint=checkpoint_key, recipe=values)


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
    resume: bool = False,
) -> FinetuneResult:
    """Fine-tune `checkpoint` on `task`, every repeat, and write the run directory; see the module docstring.

    With `score_test=False` the test split is never read (the tuner relies on this). `resume=True` keeps
    the finished repeats of an interrupted run (`repeats/`); Ctrl-C says where the run stands.
    """
    if recipe.run.mode == "compare":
        raise ConfigError("run.mode=compare trains three candidates; run it with m2dx finetune --mode compare "
                          "(compare.compare_candidates), or pick full, linear or baseline")
    run = prepare_run(recipe, task=task, data=data, checkpoint=checkpoint, normal_class=normal_class,
                      score_test=score_test, has_callback=epoch_callback is not None, progress=progress,
                      task_data=task_data, resume=resume)
    prep = run.prepared
    total = prep.recipe.run.repeats
    kept = {k: r for k, r in finished_repeats(run.run_dir).items() if k < total} if resume else {}
    outcomes = [RepeatOutcome(**outcome_fields(kept[k], run.run_dir)) for k in sorted(kept)]
    mode = prep.recipe.run.mode
    if mode in ("linear", "baseline") and total > 1:
        run.notes.append(f"run.mode={mode}: the logistic regression is fitted deterministically (lbfgs), so its "
                         f"{total} repeats are the same classifier; run.repeats=1 is enough")
    try:
        epochs_log = EpochsLog(run.run_dir / "epochs.csv")  # readable while the run goes on
        epochs_log.extend([row for o in outcomes for row in o.epochs])
        embeddings = split_embeddings(run) if mode == "linear" else None  # once for all repeats
        for repeat in (k for k in range(total) if k not in kept):
            if embeddings is not None:
                outcome = linear_repeat(prep, repeat, embeddings, score_test=score_test)
                epochs_log.extend(outcome.epochs)
            elif mode == "baseline":
                outcome = baseline_repeat(prep, repeat, score_test=score_test)
                epochs_log.extend(outcome.epochs)
            else:  # Tuning trials (score_test=False) keep no weights: a classifier file per trial would fill the disk.
                outcome = run_repeat(prep, repeat, score_test=score_test, epoch_callback=epoch_callback,
                                     keep_state=score_test, on_epoch=epochs_log.append, progress=progress)
            if outcome.best_state is not None and not score_test:
                outcome.best_state = None
            if outcome.best_state is not None:
                model = (build_classifier(prep.encoder, len(prep.classes), prep.recipe) if outcome.kind == "full"
                         else empty_model(prep, outcome.kind))
                model.load_state_dict(outcome.best_state)
                outcome.classifier = save_repeat_classifier(run, outcome, model.cpu().eval())
                outcome.best_state = None  # written: free the memory before the next repeat
                save_repeat_record(run.run_dir, outcome)
            outcomes.append(outcome)
        return write_outputs(run, sorted(outcomes, key=lambda o: o.repeat), progress=progress)
    except KeyboardInterrupt:
        if score_test:
            console.print(f"[yellow]interrupted in repeat {len(outcomes) + 1}/{total}: {len(outcomes)} finished "
                          f"repeat(s) kept in {run.run_dir}; continue with: {resume_command(run)}[/]")
        raise
    finally:
        run.lock.release()

