"""What a pre-training run is built from, before its loop starts: data, geometry, teacher, offline task, batches.

`pretrain.Pretrainer` calls these in order; they are kept apart so the loop file reads top to bottom
(docs/ARCHITECTURE.md). Nothing here trains.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from . import checkpoint as ckpt_io
from .audio import FrontEndConfig
from .data.corpora import cache_root, resolve_noise
from .data.crops import CropDataset, ItemKey, KeyedSampler, NoiseCropDataset, compute_norm_stats
from .data.logmel_cache import LogMelCache
from .data.segments import list_segments, read_manifest
from .errors import ConfigError
from .models.m2d import M2D
from .models.vit import AudioViT
from .objectives import LabelsTask, OfflineTask, TeacherTask
from .progress import console
from .recipes import ModelSection, PretrainRecipe
from .runtime import stream_seed
from .weights import load_encoder


@dataclass
class TrainingData:
    dataset: CropDataset
    noise: NoiseCropDataset | None
    mean: float
    std: float
    num_files: int
    label_names: list[str]


def log_mel_cache_dir(recipe: PretrainRecipe) -> Path:
    """The run's log-mel cache: `data.cache_dir`, else `<data root>/cache` (the report's crops reuse it)."""
    return cache_root(recipe.data.cache_dir, recipe.data.data_root)


def prepare_data(recipe: PretrainRecipe, frontend: FrontEndConfig, crop_frames: int,
                 norm_stats: tuple[float, float] | None, noise_mean: float | None, progress: bool,
                 rank: int = 0) -> TrainingData:
    """List, validate and cache the audio (decode + resample + log-mel once), then build the datasets."""
    if not recipe.data.data:
        raise ConfigError("no training data given; pass --data FOLDER_OR_CSV")
    source = Path(recipe.data.data).expanduser()
    manifest = read_manifest(source) if source.is_file() and source.suffix.lower() == ".csv" else None
    segments = manifest.segments if manifest is not None else list_segments(source)
    cache = LogMelCache(log_mel_cache_dir(recipe), frontend, dtype=recipe.data.cache_dtype)
    lms_list, bad = cache.build(segments, workers=recipe.data.cache_workers, skip_bad=recipe.data.skip_bad,
                                progress=progress)
    if bad:
        console.print(f"[yellow]skipped {len(bad)} unreadable file(s) (--skip-bad); first: {bad[0][0].path}: {bad[0][1]}[/]")
    good = cache.last_good_segments  # the segments behind lms_list, same order
    labels, names = None, []
    if recipe.objective.offline_task == "labels":
        if any(s.label is None for s in good):
            raise ConfigError(f"{recipe.data.data}: offline_task=labels needs a `label` for every row of the manifest")
        used = sorted({s.label for s in good})  # --skip-bad may have dropped every file of a class
        names = [manifest.classes[i] for i in used]
        labels = [used.index(s.label) for s in good]
    if norm_stats is None:
        norm_stats = compute_norm_stats(lms_list, crop_frames, recipe.data.norm_stats_samples, recipe.run.seed)
    dataset = CropDataset(lms_list, crop_frames, min_ds_size=recipe.data.min_ds_size, labels=labels,
                          num_classes=len(names) or None)
    noise = None
    if recipe.data.noise:
        root = Path(recipe.data.data_root) if recipe.data.data_root else None
        noise_segments = list_segments(resolve_noise(recipe.data.noise, root))
        noise_lms, bad_noise = cache.build(noise_segments, workers=recipe.data.cache_workers,
                                           skip_bad=recipe.data.skip_bad, progress=progress)
        # each rank draws its own noise stream, but all centre it with the mean of the same sample
        noise = NoiseCropDataset(noise_lms, crop_frames, mean=noise_mean, seed=stream_seed(recipe.run.seed, "noise", rank),
                                 stats_seed=stream_seed(recipe.run.seed, "noise_stats"),
                                 num_stat_samples=min(recipe.data.norm_stats_samples, 10000))
    return TrainingData(dataset, noise, float(norm_stats[0]), float(norm_stats[1]), len(lms_list), names)


def record_geometry(m: ModelSection, model: M2D) -> list[str]:
    """Write the trained model's geometry into the recipe's [model] table (a base checkpoint decides it);
    returns a note when that differs from what the recipe asked for, so a checkpoint of another size is not
    adopted silently."""
    c, pc = model.config, model.predictor_config
    asked = (tuple(m.input_size), tuple(m.patch_size), m.embed_dim, m.depth, m.num_heads)
    got = (tuple(c.input_size), tuple(c.patch_size), c.embed_dim, c.depth, c.num_heads)
    m.adopt(c, pc)
    if asked == got:
        return []
    describe = lambda g: f"{g[2]}-d x {g[3]} blocks, {g[4]} heads, input {g[0][0]}x{g[0][1]}, patch {g[1][0]}x{g[1][1]}"  # noqa: E731
    return [f"the base checkpoint is a {describe(got)} model but the recipe asked for {describe(asked)}: training the "
            "checkpoint's geometry (recipe.toml records it; pick a recipe of the checkpoint's size to silence this)"]


def load_teacher(recipe: PretrainRecipe) -> AudioViT | None:
    """The frozen offline teacher: `objective.teacher`, else the base checkpoint, else None (initial model)."""
    source = recipe.objective.teacher or recipe.base
    return load_encoder(source) if source else None


def freeze_initial_encoder(model: M2D, run_dir: Path) -> tuple[AudioViT, Path]:
    """Without a base checkpoint the teacher is the initial encoder; saved so a resumed run reuses it."""
    teacher = AudioViT(model.config, tuple(model.norm_stats.tolist()))
    teacher.load_state_dict(model.encoder_state_dict())
    return teacher, ckpt_io.save_teacher(teacher, run_dir)


def build_offline_task(recipe: PretrainRecipe, label_names: list[str], teacher: AudioViT | None,
                       device: torch.device) -> OfflineTask | None:
    task = recipe.objective.offline_task
    if task == "none":
        return None
    if task == "labels":
        if len(label_names) < 2:
            raise ConfigError("offline_task=labels needs at least two distinct labels in the manifest")
        return LabelsTask(len(label_names))
    return TeacherTask(teacher.to(device))


class EpochBatches(torch.utils.data.Sampler):
    """Batches of item keys for epochs `first`..`end - 1` as one stream (the loader's `batch_sampler`).

    Each epoch yields `per_epoch` whole batches (the trained ones: whole accumulation cycles) and
    reseeds its shuffle when the stream reaches it, which may be while the loop still trains the
    previous epoch: the shuffle reads only its own generator and the epoch number, never the loop's state.
    """

    def __init__(self, sampler: KeyedSampler, seed_epoch: Callable[[int], None], batch_size: int, per_epoch: int,
                 first: int, end: int):
        self.sampler, self.seed_epoch = sampler, seed_epoch
        self.batch_size, self.per_epoch, self.first, self.end = batch_size, per_epoch, first, end

    def __len__(self) -> int:
        return max(self.end - self.first, 0) * self.per_epoch

    def __iter__(self):
        for epoch in range(self.first, self.end):
            self.seed_epoch(epoch)
            keys = iter(self.sampler)
            for _ in range(self.per_epoch):
                batch: list[ItemKey] = [next(keys) for _ in range(self.batch_size)]
                yield batch


