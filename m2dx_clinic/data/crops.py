"""What one pre-training step sees: random crops of cached log-mels, background noise, and their mix.

Crops are drawn from the memory-mapped log-mel cache, repeated ("inflated") to a minimum epoch size;
each item's crop and noise crop are seeded from its key (epoch, stream position, index) so the batches
do not depend on the number of loader workers or on restarts; the noise is mixed in the log domain on
the training device, per batch (docs/METHOD.md, "Background noise").
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple, Sequence

import numpy as np
import torch

from ..audio import LOG_EPS
from ..errors import ConfigError, DataError


# ============================================================================ normalisation
def normalize(lms: Any, mean: float, std: float) -> Any:
    """(lms - mean) / std with scalar statistics (numpy arrays or tensors)."""
    return (lms - mean) / std


def compute_norm_stats(
    lms_list: Sequence[np.ndarray],
    crop_frames: int,
    num_samples: int = 10000,
    seed: int = 0,
) -> tuple[float, float]:
    """Scalar (mean, std) of log-mel values over `num_samples` random crops (the reference recipe).

    A clip shorter than the crop contributes its own frames only: the repeated padding the model
    sees would just re-weight the same values.
    """
    if len(lms_list) == 0:
        raise DataError("no training audio to compute normalisation statistics from; check the training list")
    if crop_frames < 1 or num_samples < 1:
        raise ValueError("crop_frames and num_samples must be positive")
    rng = np.random.default_rng(seed)
    total = 0.0
    total_sq = 0.0
    count = 0
    clip_ids = rng.integers(0, len(lms_list), size=num_samples)
    for idx in clip_ids:
        lms = lms_list[int(idx)]
        frames = lms.shape[-1]
        if frames > crop_frames:
            start = int(rng.integers(0, frames - crop_frames + 1))
            crop = lms[..., start : start + crop_frames]
        else:
            crop = lms
        values = np.asarray(crop, dtype=np.float64)
        total += float(values.sum())
        total_sq += float(np.square(values).sum())
        count += values.size
    mean = total / count
    var = max(total_sq / count - mean * mean, 0.0)
    return float(mean), float(math.sqrt(var))


# ============================================================================ crops
def crop_lms(lms: Any, start: int, width: int) -> torch.Tensor:
    """[n_mels, width] float32 from `start`, wrapping around (circular repeat) when short."""
    array = lms.numpy() if isinstance(lms, torch.Tensor) else lms
    frames = array.shape[-1]
    if start + width <= frames:
        window = np.array(array[:, start : start + width], dtype=np.float32)
    else:
        window = np.array(array[:, (start + np.arange(width)) % frames], dtype=np.float32)
    return torch.from_numpy(window)


def _check_clips(lms_list: Sequence[Any], what: str) -> None:
    if len(lms_list) == 0:
        raise DataError(f"no {what} clips to train on; check the {what} folder or list")
    # The cache's lazy sequence knows every shape from its index: nothing is read to check it.
    shape_of = getattr(lms_list, "shape", None)
    for i in range(len(lms_list)):
        shape = tuple(shape_of(i)) if callable(shape_of) else tuple(lms_list[i].shape)
        if len(shape) != 2 or shape[-1] < 1:
            raise ValueError(f"{what} clip {i} has shape {shape}, expected [n_mels, frames >= 1]")


def keyed_generator(*key: int) -> torch.Generator:
    """A generator seeded from a tuple of integers (run seed, rank, epoch, item, ...).

    Pre-training draws every random choice of an item from its own key, so what a batch contains
    depends only on (seed, rank, epoch, position): not on which loader worker made it, how many
    workers there are, or whether they were restarted. That is what lets the workers persist
    across epochs and a resumed run still see exactly the batches of an uninterrupted one.
    """
    words = [int(k) % (1 << 64) for k in key]
    seed = int(np.random.SeedSequence(words).generate_state(1, dtype=np.uint64)[0])
    return torch.Generator().manual_seed(seed)


def _random_start(frames: int, crop_frames: int, generator: torch.Generator | None) -> int:
    if frames <= crop_frames:
        return 0
    return int(torch.randint(0, frames - crop_frames + 1, (1,), generator=generator).item())


class CropDataset(torch.utils.data.Dataset):
    """Random crops of raw (unnormalised) log-mels, the list repeated to at least `min_ds_size`.

    Normalisation and noise mixing happen per batch on the device, so crops stay raw here.
    `dataset[i]` draws its crop from torch's global RNG; `crop(i, generator)` from the given one
    (the pre-training loader passes a per-item generator, see `PretrainItems`).
    """

    def __init__(
        self,
        lms_list: Sequence[Any],
        crop_frames: int,
        *,
        min_ds_size: int = 0,
        labels: Sequence[int | Sequence[int]] | None = None,
        num_classes: int | None = None,
    ):
        _check_clips(lms_list, "training")
        if crop_frames < 1:
            raise ValueError("crop_frames must be positive")
        self.lms_list = lms_list
        self.crop_frames = int(crop_frames)
        n = len(lms_list)
        self.repeats = max(1, math.ceil(max(0, min_ds_size) / n))
        if labels is not None:
            if len(labels) != n:
                raise ValueError(f"{len(labels)} labels for {n} clips; give one label per clip")
            multi = [not isinstance(lab, (int, np.integer)) for lab in labels]
            if any(multi) and num_classes is None:
                raise ValueError("multi-label targets need num_classes")
            for lab in labels:
                ids = [int(lab)] if isinstance(lab, (int, np.integer)) else [int(x) for x in lab]
                if num_classes is not None and any(not 0 <= x < num_classes for x in ids):
                    raise ValueError(f"label {lab} is outside [0, {num_classes})")
        self.labels = labels
        self.num_classes = num_classes

    def __len__(self) -> int:
        return len(self.lms_list) * self.repeats

    def __getitem__(self, i: int) -> dict[str, torch.Tensor | int]:
        return self.crop(i, None)

    def crop(self, i: int, generator: torch.Generator | None) -> dict[str, torch.Tensor | int]:
        """Item i: {"lms": [1, n_mels, crop_frames], "index": clip index[, "label"]}."""
        if not -len(self) <= i < len(self):
            raise IndexError(i)
        index = i % len(self.lms_list)
        lms = self.lms_list[index]
        start = _random_start(lms.shape[-1], self.crop_frames, generator)
        item: dict[str, torch.Tensor | int] = {"lms": crop_lms(lms, start, self.crop_frames).unsqueeze(0), "index": index}
        if self.labels is not None:
            label = self.labels[index]
            if isinstance(label, (int, np.integer)):
                item["label"] = torch.tensor(int(label), dtype=torch.long)
            else:
                hot = torch.zeros(int(self.num_classes), dtype=torch.float32)  # type: ignore[arg-type]
                hot[[int(x) for x in label]] = 1.0
                item["label"] = hot
        return item


class NoiseCropDataset:
    """Background-noise crops along a shuffled cycle over all clips, as a pure function of position.

    Position p of a stream uses clip perm_c[p mod n], where n is the number of clips, c = p // n and
    perm_c is a permutation seeded by (seed, c): every clip once per cycle, a fresh order each cycle.
    The crop offset is seeded by (seed, p). So there is no state to save for an exact resume, and any
    loader worker can produce any position. `mean` is the noise set's own log-mel mean (noise is
    centred with it before mixing).
    """

    def __init__(
        self,
        lms_list: Sequence[Any],
        crop_frames: int,
        *,
        mean: float | None = None,
        seed: int = 0,
        num_stat_samples: int = 10000,
        stats_seed: int | None = None,
    ):
        """`seed` drives the cycle and crops; `stats_seed` (default `seed`) the sample that gives `mean`."""
        _check_clips(lms_list, "noise")
        self.lms_list = lms_list
        self.crop_frames = int(crop_frames)
        self.seed = int(seed)
        if mean is None:
            sample_seed = self.seed if stats_seed is None else int(stats_seed)
            mean = compute_norm_stats(lms_list, crop_frames, num_stat_samples, sample_seed)[0]
        self.mean = float(mean)
        self._cycle: tuple[int, list[int]] = (-1, [])  # the last permutation used (positions come in runs)

    def __len__(self) -> int:
        return len(self.lms_list)

    def clip_at(self, position: int) -> int:
        """Index of the clip used at stream `position`."""
        if position < 0:
            raise ValueError(f"noise stream positions start at 0, got {position}")
        cycle, offset = divmod(int(position), len(self.lms_list))
        if self._cycle[0] != cycle:
            order = torch.randperm(len(self.lms_list), generator=keyed_generator(self.seed, 0x6E6F, cycle)).tolist()
            self._cycle = (cycle, order)
        return self._cycle[1][offset]

    def crop_at(self, position: int) -> torch.Tensor:
        """[1, n_mels, crop_frames] raw noise crop at stream `position` (short clips repeat from their start)."""
        lms = self.lms_list[self.clip_at(position)]
        start = _random_start(lms.shape[-1], self.crop_frames, keyed_generator(self.seed, 0x6372, position))
        return crop_lms(lms, start, self.crop_frames).unsqueeze(0)

    def batch(self, start: int, count: int) -> torch.Tensor:
        """[count, 1, n_mels, crop_frames]: the crops at positions start .. start + count - 1."""
        return torch.stack([self.crop_at(p) for p in range(start, start + count)])


class ItemKey(NamedTuple):
    """What the pre-training sampler hands the dataset: enough to make the item reproducibly."""

    epoch: int
    position: int  # place in this rank's stream of items across epochs (drives the noise cycle)
    index: int  # item of the (inflated) crop dataset


class KeyedSampler(torch.utils.data.Sampler):
    """Wraps the shuffling sampler and numbers its indices with the epoch and the stream position.

    It runs in the main process, so `set_epoch` reaches it even when the loader workers persist.
    """

    def __init__(self, base: torch.utils.data.Sampler):
        self.base = base
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)
        if hasattr(self.base, "set_epoch"):
            self.base.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __iter__(self):
        first = self.epoch * len(self)
        for offset, index in enumerate(self.base):
            yield ItemKey(self.epoch, first + offset, int(index))


class PretrainItems(torch.utils.data.Dataset):
    """The pre-training loader's dataset: a training crop and, with a noise set, its noise crop.

    Indexed by `ItemKey`; the crop is seeded by (seed, rank, epoch, index) and the noise by the
    stream position, so loader workers do the cropping (off the training loop's thread, pinned by
    the loader) and can persist across epochs without changing what the run sees.
    """

    def __init__(self, crops: CropDataset, noise: NoiseCropDataset | None, seed: int, rank: int = 0):
        self.crops, self.noise = crops, noise
        self.seed, self.rank = int(seed), int(rank)

    def __len__(self) -> int:
        return len(self.crops)

    def __getitem__(self, key: ItemKey) -> dict[str, torch.Tensor | int]:
        epoch, position, index = key
        item = self.crops.crop(index, keyed_generator(self.seed, self.rank, epoch, index))
        if self.noise is not None:
            item["noise"] = self.noise.crop_at(position)
        return item


# ============================================================================ log-domain mixing
def mix_in_log_domain(
    clean: torch.Tensor,
    noise: torch.Tensor,
    ratio: float,
    clean_mean: float,
    noise_mean: float,
    std: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(clean, mixed), both normalised by the main set's std (docs/METHOD.md, "Background noise").

    Each input is centred with its own mean, then mixed = log(max(r*exp(noise) + (1-r)*exp(clean), eps)).
    Computed as logaddexp(noise + log r, clean + log(1-r)) in float32, which is the same value but
    cannot overflow and gives exactly `clean` at r = 0 (and `noise` at r = 1).
    """
    if not 0.0 <= ratio <= 1.0:
        raise ConfigError(f"noise ratio must be within [0, 1], got {ratio}; fix the noise ratio setting")
    with torch.autocast(device_type=clean.device.type, enabled=False):
        clean_c = clean.float() - clean_mean
        noise_c = noise.float() - noise_mean
        log_r = math.log(ratio) if ratio > 0 else -math.inf
        log_1r = math.log1p(-ratio) if ratio < 1 else -math.inf
        mixed = torch.logaddexp(noise_c + log_r, clean_c + log_1r).clamp_min(math.log(LOG_EPS))
        return clean_c / std, mixed / std
