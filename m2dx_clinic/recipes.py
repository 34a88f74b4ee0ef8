"""The recipe types: what every TOML file in `recipes/` may say, with the paper's values as defaults.

A recipe is data (see `config.load_recipe`): these dataclasses declare its tables and keys, with a
comment on each default, and the `validate_*` functions reject impossible combinations before any
file is read or any weight is trained. No loop code lives here, so the command line, the report and
the tuner can read a recipe without importing a training loop.

Three kinds:
- `PretrainRecipe` (`m2dx further-pretrain`, `m2dx pretrain`): M2D / M2D-X pre-training;
- `FinetuneRecipe` (`m2dx finetune`): fine-tuning with ICBHI-style evaluation;
- `TuneSettings` (the `[tune]` table of a tune recipe; its `[space]` is parsed by `tuning.space`).
The numbers and where they come from are in docs/METHOD.md.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Literal

from .config import PredictorConfig, ViTConfig
from .errors import ConfigError

ICBHI_BASE = "m2d_vit_base-80x200p16x4-230529"  # the paper's ICBHI base, a name of weights.PUBLISHED_WEIGHTS


# ============================================================================ pre-training
PREDICTOR_KEYS = {"dim": "predictor_dim", "depth": "predictor_depth", "num_heads": "predictor_heads"}
"""The `PredictorConfig` fields a recipe's flat `[model]` table sets, by key (`--set model.predictor_dim=...`)."""


class _ModelGeometry:
    """What `ModelSection` adds to its fields: the two configs it stands for, and back."""

    def vit_config(self) -> ViTConfig:
        """The encoder this table describes (training from scratch)."""
        return ViTConfig(**{f.name: _as_tuple(getattr(self, f.name)) for f in dataclasses.fields(ViTConfig)})

    def predictor_config(self) -> PredictorConfig:
        """The predictor this table describes; fields the table has no key for keep their defaults."""
        return PredictorConfig(**{name: getattr(self, key) for name, key in PREDICTOR_KEYS.items()})

    def adopt(self, vit: ViTConfig, predictor: PredictorConfig) -> None:
        """Set the table to a model's geometry (a base checkpoint decides it; recipe.toml records it)."""
        for f in dataclasses.fields(ViTConfig):
            setattr(self, f.name, _as_tuple(getattr(vit, f.name)))
        for name, key in PREDICTOR_KEYS.items():
            setattr(self, key, getattr(predictor, name))


def _as_tuple(value: object) -> object:
    return tuple(value) if isinstance(value, list) else value


# The [model] table is flat (`embed_dim`, `predictor_dim`, ...) in every recipe a user has, so it cannot nest
# the two configs; its keys, types and defaults are taken from them instead, so they are declared once.
ModelSection = dataclasses.make_dataclass(
    "ModelSection",
    [(f.name, f.type, field(default=f.default)) for f in dataclasses.fields(ViTConfig)]
    + [(key, f.type, field(default=f.default)) for f in dataclasses.fields(PredictorConfig)
       if (key := PREDICTOR_KEYS.get(f.name))],
    bases=(_ModelGeometry,),
    namespace={"__module__": __name__, "__doc__": "Architecture for training from scratch (ignored when a base checkpoint gives it): the "
                          "`ViTConfig` fields, then the predictor's as `predictor_dim` / `_depth` / `_heads`."},
)


@dataclass
class DataSection:
    data: str = ""  # folder (recursive) or CSV manifest with a `path` column
    noise: str = ""  # folder, CSV, `fsd50k`, `esc50`, or "" for no background noise
    noise_ratio: float = 0.3  # r in log(r*exp(noise) + (1-r)*exp(clean)); ICBHI 0.3, SPRSound 0.01
    routing: Literal["paper", "reference"] = "paper"  # which branch sees the noisy mix
    min_ds_size: int = 10000  # inflate the file list to at least this many items per epoch
    norm_stats_samples: int = 10000  # random crops used for the dataset mean/std
    data_root: str = ""  # where named data sets live; default $M2DX_DATA or ~/.cache/m2dx/data
    cache_dir: str = ""  # log-mel cache; default <data_root>/cache
    cache_workers: int = 2
    # Stored log-mel precision: float16 halves the cache's disk (and page cache) for a difference of
    # at most 2^-7 in a log-mel value, about 0.002 of the normalised input (docs/METHOD.md).
    cache_dtype: Literal["float32", "float16"] = "float32"
    loader_workers: int = 2
    skip_bad: bool = False  # skip unreadable files instead of stopping


@dataclass
class ObjectiveSection:
    mask_ratio: float = 0.7
    offline_task: Literal["teacher", "labels", "none"] = "teacher"
    teacher: str = ""  # frozen teacher checkpoint; default = the base checkpoint
    lambda_m2d: float = 1.0
    lambda_off: float = 1.0
    ema_start: float = 0.99995
    ema_end: float = 0.99999


@dataclass
class OptimSection:
    epochs: int = 600
    warmup_epochs: int = 24
    batch_size: int = 64
    accum_steps: int = 2
    blr: float = 3e-4  # lr = blr * effective batch / 256
    min_lr: float = 0.0
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.95)
    clip_grad: float = 3.0


@dataclass
class RunSection:
    out: str = ""  # run directory; default runs/<name>-<timestamp>
    seed: int = 0
    device: str = "auto"  # auto = cuda when present
    amp: Literal["auto", "bf16", "fp16", "off"] = "auto"  # auto: bf16/fp16 on GPUs, fp32 on CPU; bf16 on a bf16 CPU
    save_every: int = 100  # epochs between published-layout checkpoints (the last epoch is always saved)
    # state/last.pth (for --resume) at the first epoch end after this many minutes (0 = every epoch); written in
    # the background, so it costs the loop little, but a ViT-B state is ~1.5 GB: at a few seconds per epoch,
    # saving every epoch would mostly write the disk. A kill loses at most this much training.
    resume_every_minutes: float = 10.0
    max_steps: int = 0  # stop after this many optimiser steps (0 = no limit); for smoke runs
    log_every: int = 10  # optimiser steps between log lines
    compile: bool = False  # torch.compile the model (+50% on an H200; on a CPU within noise of eager; ~1 min to compile)
    report_on_save: bool = True  # refresh report/ (curves + label-free health) after each checkpoint, in the background
    tag: str = ""  # appended to the checkpoint folder name
    deterministic: bool = False  # deterministic GPU kernels (slower); CPU runs are reproducible without it


@dataclass
class PretrainRecipe:
    name: str = "icbhi_m2dx"
    base: str = ICBHI_BASE  # published name, folder or file; "" = train from scratch
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    objective: ObjectiveSection = field(default_factory=ObjectiveSection)
    optim: OptimSection = field(default_factory=OptimSection)
    run: RunSection = field(default_factory=RunSection)


def pretrain_notes(recipe: PretrainRecipe) -> list[str]:
    """What a user should know about a valid pre-training recipe before it runs."""
    if not recipe.data.noise and recipe.data.noise_ratio > 0:
        return [f"no background noise (data.noise is empty), so this run trains WITHOUT the denoising task although "
                f"data.noise_ratio = {recipe.data.noise_ratio:g}; pass --noise fsd50k (or a folder), or --noise none "
                "to train without it on purpose"]
    return []


def validate_pretrain_recipe(recipe: PretrainRecipe) -> None:
    """Reject bad combinations before any work starts."""
    o, r = recipe.optim, recipe.run
    if o.batch_size < 1 or o.accum_steps < 1 or o.epochs < 1:
        raise ConfigError("optim.batch_size, optim.accum_steps and optim.epochs must be >= 1")
    if not 0.0 < recipe.objective.mask_ratio < 1.0:
        raise ConfigError(f"objective.mask_ratio must be in (0, 1), got {recipe.objective.mask_ratio}")
    if not 0.0 <= recipe.data.noise_ratio <= 1.0:
        raise ConfigError(f"data.noise_ratio must be in [0, 1], got {recipe.data.noise_ratio}")
    if r.save_every < 1:
        raise ConfigError("run.save_every must be >= 1")
    if not r.resume_every_minutes >= 0:
        raise ConfigError(f"run.resume_every_minutes must be >= 0 (0 = every epoch), got {r.resume_every_minutes}")


# ============================================================================ fine-tuning
@dataclass
class FtModelSection:
    freeze_patch_embed: bool = True  # paper default
    adjust_pos: bool = False  # one pass over the 8-s cycle with bicubic-resized positions (else chunked)
    layer_decay: float = 1.0  # layer-wise lr decay (1.0 = off)
    head_init_std: float = 0.01


@dataclass
class FtDataSection:
    cycle_seconds: float = 8.0  # every segment is cut or padded to this length (the ICBHI protocol)
    pad: Literal["circular", "zero"] = "circular"
    val_fraction: float = 0.15  # subject-disjoint validation carved from the training split
    test_set: str = "inter"  # SPRSound only: inter, intra, all, a year (2023) or a name (2022-intra)
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
    # full = fine-tune the encoder; linear = frozen encoder + logistic regression (linear evaluation);
    # baseline = log-mel statistics + logistic regression; compare = all three, the best on validation recommended
    mode: Literal["full", "linear", "baseline", "compare"] = "full"
    seed: int = 0
    repeats: int = 1
    device: str = "auto"
    amp: Literal["auto", "bf16", "fp16", "off"] = "auto"
    # test-best = the literature protocol, always labelled; last = the final epoch (no validation needed)
    selection: Literal["val", "test-best", "last"] = "val"
    num_workers: int = 0  # threads that decode and prepare cycles (the training data then sits in memory)
    eval_batch_size: int = 64
    # operating point on P(abnormal), chosen on the validation split: 0 = maximum Youden J, else the
    # highest threshold whose validation sensitivity reaches this target (e.g. 0.9)
    target_sensitivity: float = 0.0
    bootstrap: int = 1000  # resamples over subjects for the 95% CIs of the clinical metrics (0 = none)
    baseline: bool = True  # fit the log-mel statistics + logistic regression baseline on the same segments
    deterministic: bool = False  # deterministic GPU kernels (slower); CPU runs are reproducible without it
    # what shipped files (classifier files, exports, the model card) say about where the run came from:
    # clean = no absolute paths, user or host names, recording names or subject ids; full = paths too
    provenance: Literal["clean", "full"] = "clean"
    model_name: str = ""  # the classifier's name on its card (default: the task kind + a data fingerprint)


@dataclass
class FinetuneRecipe:
    name: str = "icbhi_finetune"
    model: FtModelSection = field(default_factory=FtModelSection)
    data: FtDataSection = field(default_factory=FtDataSection)
    augment: FtAugmentSection = field(default_factory=FtAugmentSection)
    optim: FtOptimSection = field(default_factory=FtOptimSection)
    run: FtRunSection = field(default_factory=FtRunSection)


TEST_BEST_LABEL = "test-best (literature protocol; optimistic)"
SELECTION_LABELS = {
    "val": "val (best validation Score; test scored once)",
    "test-best": TEST_BEST_LABEL,
    "last": "last (final epoch; test scored once)",
}


def selection_label(selection: str) -> str:
    """The words every output uses for a selection protocol (test-best always says it is optimistic)."""
    return SELECTION_LABELS[selection]


def validate_finetune_recipe(recipe: FinetuneRecipe, *, score_test: bool = True) -> None:
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
        (0 <= r.target_sensitivity < 1,
         f"run.target_sensitivity must be in [0, 1) (0 = maximum Youden J), got {r.target_sensitivity}"),
        (r.bootstrap >= 0, f"run.bootstrap must be >= 0 (0 = no bootstrap CIs), got {r.bootstrap}"),
        (score_test or r.selection != "test-best",
         "run.selection=test-best picks the epoch on the test split, which contradicts not scoring the test "
         "split; use run.selection=val"),
        (r.mode in ("full", "linear", "baseline", "compare"),
         f"run.mode must be full, linear, baseline or compare, got {r.mode!r}"),
        (r.mode == "full" or r.selection != "test-best",
         f"run.mode={r.mode} chooses on the validation split only; run.selection=test-best is for full fine-tuning"),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)


# ============================================================================ tuning
@dataclass
class TuneSettings:
    """The `[tune]` table: what to tune, for how long and how to judge a trial."""

    finetune_recipe: str = "icbhi_finetune"  # name in recipes/, or a path (relative to the tune recipe)
    trials: int = 50  # target number of finished (complete + pruned) trials in the study
    timeout: float | None = None  # seconds for this invocation; TOML accepts 3600 or "8h" / "90m"
    pruner: Literal["auto", "median", "hyperband", "wilcoxon", "none"] = "auto"  # auto: median, wilcoxon if repeats>1
    seed: int = 0  # TPE sampler seed
    repeats: int = 1  # seeds per trial (objective = mean validation metric over them)
    direction: Literal["maximize", "minimize"] = "maximize"
    metric: Literal["score", "sp", "se", "accuracy", "loss"] = "score"
    sampler_startup_trials: int = 10  # random trials before TPE models the space
    pruner_startup_trials: int = 5  # median pruner: trials that always run to the end
    pruner_warmup_epochs: int = 5  # median pruner: epochs before a trial may be pruned
    wilcoxon_p: float = 0.1  # wilcoxon pruner p-value threshold
    heartbeat_interval: int = 60  # seconds; a RUNNING trial silent for grace_period is failed and retried
    grace_period: int = 180
    max_retry: int = 3  # retries of a trial whose process died
    max_consecutive_failures: int = 5  # stop early when the setup is broken rather than burn the budget
    min_trials_for_importance: int = 8  # complete trials before parameter importances mean anything


def validate_tune_settings(settings: TuneSettings, where: str) -> None:
    positive = {"trials": 1, "repeats": 1, "heartbeat_interval": 1, "grace_period": 1, "max_consecutive_failures": 1,
                "min_trials_for_importance": 2}
    for name, minimum in positive.items():
        if getattr(settings, name) < minimum:
            raise ConfigError(f"{where}: tune.{name} must be at least {minimum}, got {getattr(settings, name)}")
    for name in ("sampler_startup_trials", "pruner_startup_trials", "pruner_warmup_epochs", "max_retry", "seed"):
        if getattr(settings, name) < 0:
            raise ConfigError(f"{where}: tune.{name} must not be negative")
    if not 0.0 < settings.wilcoxon_p < 1.0:
        raise ConfigError(f"{where}: tune.wilcoxon_p must be in (0, 1), got {settings.wilcoxon_p}")
    if (settings.metric == "loss") != (settings.direction == "minimize"):
        want = "minimize" if settings.metric == "loss" else "maximize"
        raise ConfigError(f"{where}: metric {settings.metric!r} should be {want}d; set tune.direction = \"{want}\"")
