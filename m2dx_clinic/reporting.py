"""Checkpoint-progress report of a further-pretraining run: the library behind `m2dx report RUN_DIR`.

A team that further-pretrains M2D/M2D-X on its own recordings needs to know which saved checkpoint
to hand to fine-tuning, and whether training went wrong (collapse, drifting away from the base).
The report answers that with one row per checkpoint (epoch 0 = the base or the from-scratch
teacher), built from four sources of evidence, cheapest first:

1. training curves from `metrics.jsonl` (loss, M2D / offline loss, lr, EMA decay at that epoch);
2. label-free health on a fixed, seeded set of clean crops of the run's own training audio:
   RankMe (effective rank, Garrido et al. 2023), the area under the PCA explained-variance curve,
   and the mean cosine between each crop's embedding and the base encoder's (drift);
3. `--probe`: a linear probe (standardise + balanced logistic regression) fitted on the task's
   training split and scored on its subject-disjoint validation split (never the test split,
   so choosing a checkpoint on it does not leak test data);
4. `--finetune`: a full fine-tune per checkpoint with a given recipe (val and test scores).

A missing or corrupt checkpoint becomes a row with `error` set; the rest of the report is still
written. `update_progress_report` is the cheap part (1 + 2 only, with per-checkpoint caching) that
the training loop calls after every published save; it never raises.

Numbers in `report.json` are fractions as `metrics.icbhi_scores` returns them; the Markdown, HTML,
terminal table and plots show Sp / Se / Score in percent.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import hashlib
import html
import json
import math
import threading
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from . import checkpoint as ckpt_io
from .audio import FrontEndConfig, LogMelSpectrogram
from .config import build_dataclass, find_recipe, load_recipe
from .errors import ConfigError, DataError, M2DXError
from .fileio import atomic_save_npy, atomic_savefig, atomic_write_json, atomic_write_text, to_jsonable
from .models.vit import AudioViT
from .progress import console, make_progress, read_jsonl

REPORT_DIR_NAME = "report"
HEALTH_CACHE_NAME = "health_cache.json"
HEALTH_CROPS_NAME = "health_crops.npy"
HEALTH_BASE_NAME = "health_base_embeddings.npy"
NUM_HEALTH_CROPS = 256
HEALTH_SEED = 0
RANK_COLLAPSE_DROP = 0.30  # warn when RankMe falls more than this fraction below the base's
DRIFT_WARN_COS = 0.5  # warn when the mean cosine to the base's embeddings falls below this
_SCORE_DECIMALS = 4  # labelled scores equal to this many decimals count as a tie
_CACHE_VERSION = 1


# ============================================================================ label-free metrics
def _as_matrix(features: np.ndarray | torch.Tensor) -> np.ndarray:
    """[N, D] float64 numpy from a tensor or array (float64 so the SVD of near-collapsed sets is stable)."""
    if isinstance(features, torch.Tensor):
        features = features.detach().float().cpu().numpy()
    matrix = np.asarray(features, dtype=np.float64)
    if matrix.ndim != 2:
        raise ValueError(f"expected features of shape [items, dims], got {tuple(matrix.shape)}")
    return matrix


def rankme(features: np.ndarray | torch.Tensor, eps: float = 1e-7) -> float:
    """Effective rank exp(H(p)), p_k = s_k / sum(s) + eps over the singular values s (Garrido et al. 2023).

    It approaches the number of equally used directions of the embedding space: a collapsed encoder
    that maps everything onto a few directions scores near 1, a healthy one stays high. The matrix
    is not centred, as in the paper. An all-zero matrix has no direction at all and gives 0.
    """
    matrix = _as_matrix(features)
    if matrix.size == 0:
        return 0.0
    singular = np.linalg.svd(matrix, compute_uv=False)
    total = float(singular.sum())
    if not math.isfinite(total) or total <= 0.0:
        return 0.0
    p = singular / total + eps
    return float(np.exp(-(p * np.log(p)).sum()))


def explained_variance_auc(features: np.ndarray | torch.Tensor) -> float:
    """Area under the cumulative PCA explained-variance curve, components on x in (0, 1].

    Computed as the mean of the cumulative explained-variance ratios (a right Riemann sum), so all
    variance in one component gives exactly 1.0 and isotropic data about 0.5 (+ 1/(2K) for K
    components). High values mean few directions carry the signal. NaN when there is no variance.
    """
    matrix = _as_matrix(features)
    if matrix.shape[0] < 2:
        return math.nan
    centred = matrix - matrix.mean(axis=0, keepdims=True)
    variance = np.linalg.svd(centred, compute_uv=False) ** 2
    total = float(variance.sum())
    if not math.isfinite(total) or total <= 0.0:
        return math.nan
    return float(np.mean(np.cumsum(variance) / total))


def cosine_drift(feats_a: np.ndarray | torch.Tensor, feats_b: np.ndarray | torch.Tensor) -> float:
    """Mean cosine similarity between row i of `feats_a` and row i of `feats_b` (same items, two models).

    1.0 = the embeddings point the same way as before; low values mean further pre-training moved
    the representation far from the base, which can throw away what the base had learned.
    """
    a, b = _as_matrix(feats_a), _as_matrix(feats_b)
    if a.shape != b.shape:
        raise ValueError(f"cannot compare embeddings of shapes {a.shape} and {b.shape}; use the same items and model size")
    if a.shape[0] == 0:
        return math.nan
    denom = np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-12)
    return float(np.mean((a * b).sum(axis=1) / denom))


# ============================================================================ embeddings
def pick_device(device: str | torch.device | None = None) -> torch.device:
    """CUDA when available (the report shares the training GPU), else CPU."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


@torch.inference_mode()
def clip_embeddings(
    encoder: AudioViT,
    lms: np.ndarray | torch.Tensor,
    *,
    norm_stats: Sequence[float] | None = None,
    batch_size: int = 32,
    device: str | torch.device | None = None,
) -> np.ndarray:
    """Raw log-mel [N, n_mels, frames] -> one vector per clip [N, F*D]: mean over time of `encode_lms`.

    `norm_stats` (mean, std) overrides the encoder's own buffer; the report normalises every
    checkpoint of a run the way the training loop fed it, so their embeddings are comparable.
    """
    dev = pick_device(device)
    encoder = encoder.to(dev).eval()
    out = []
    for start in range(0, len(lms), batch_size):
        chunk = torch.as_tensor(np.asarray(lms[start : start + batch_size]), dtype=torch.float32).to(dev)
        chunk = chunk.unsqueeze(1)  # [B, 1, n_mels, frames]
        if norm_stats is not None:
            chunk = (chunk - float(norm_stats[0])) / float(norm_stats[1])
        else:
            chunk = encoder.normalize(chunk)
        out.append(encoder.encode_lms(chunk).mean(dim=1).float().cpu().numpy())
    if not out:
        return np.zeros((0, encoder.frame_feature_dim), dtype=np.float32)
    return np.concatenate(out, axis=0)


# ============================================================================ health crops
@dataclass
class HealthCrops:
    """The fixed probe set for label-free metrics: raw clean log-mel crops [N, n_mels, width].

    `key` identifies how they were drawn (data source, count, seed, width, front-end), so cached
    metrics computed on a different set are never mixed with these.
    """

    lms: np.ndarray
    key: str
    source: str


def _crops_key(source: str, num_crops: int, seed: int, width: int, frontend: FrontEndConfig) -> str:
    payload = json.dumps({"v": _CACHE_VERSION, "source": source, "n": num_crops, "seed": seed, "width": width,
                          "frontend": dataclasses.asdict(frontend)}, sort_keys=True)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()[:16]


def health_crops(
    recipe: Any,
    width: int,
    frontend: FrontEndConfig,
    *,
    num_crops: int = NUM_HEALTH_CROPS,
    seed: int = HEALTH_SEED,
) -> HealthCrops:
    """Up to `num_crops` seeded clean crops of the run's training audio (no noise, no masking).

    Only the sampled files go through the run's log-mel cache, so this stays cheap on large data
    sets. Raises DataError when the training audio is gone (callers turn that into a warning).
    """
    from .data.pretrain_data import LogMelCache, crop_lms, list_training_audio
    from .pretrain import log_mel_cache_dir

    source = str(recipe.data.data)
    if not source:
        raise DataError("the run's recipe names no training data (data.data); label-free metrics need it")
    segments = list_training_audio(Path(source))
    rng = np.random.default_rng(seed)
    chosen = rng.permutation(len(segments))[: min(num_crops, len(segments))]
    cache = LogMelCache(log_mel_cache_dir(recipe), frontend)
    arrays, _bad = cache.build([segments[int(i)] for i in chosen], workers=1, skip_bad=True, progress=False)
    if not arrays:
        raise DataError(f"{source}: none of the sampled training files could be read; label-free metrics skipped")
    crops = []
    for k in range(num_crops):  # fewer files than crops: cycle through them with fresh offsets
        lms = arrays[k % len(arrays)]
        frames = lms.shape[-1]
        start = int(rng.integers(0, frames - width + 1)) if frames > width else 0
        crops.append(crop_lms(lms, start, width).numpy())
    # float16 halves the cached file; log-mel values need no more precision than that
    return HealthCrops(np.stack(crops).astype(np.float16), _crops_key(source, num_crops, seed, width, frontend), source)


def health_metrics(
    encoder: AudioViT,
    crops: HealthCrops | np.ndarray,
    *,
    base_embeddings: np.ndarray | None = None,
    norm_stats: Sequence[float] | None = None,
    device: str | torch.device | None = None,
    return_embeddings: bool = False,
) -> dict[str, Any]:
    """Label-free metrics of one encoder on held-out clean crops: rankme, ev_auc, drift_cos.

    `drift_cos` compares with `base_embeddings` (the epoch-0 encoder on the same crops) and is None
    without them. With `return_embeddings` the clip embeddings are returned under `embeddings` so
    the caller can keep the base's for the other checkpoints.
    """
    lms = crops.lms if isinstance(crops, HealthCrops) else crops
    emb = clip_embeddings(encoder, lms, norm_stats=norm_stats, device=device)
    out: dict[str, Any] = {
        "rankme": rankme(emb),
        "ev_auc": explained_variance_auc(emb),
        "drift_cos": cosine_drift(emb, base_embeddings) if base_embeddings is not None
        and base_embeddings.shape == emb.shape else None,
    }
    if return_embeddings:
        out["embeddings"] = emb
    return out


# ============================================================================ linear probe
class ProbeSet:
    """The task's train + val cycles as raw log-mel, decoded once per report and shared by all checkpoints.

    Test items are never read: the probe picks checkpoints, so it must not see the test split.
    Items whose audio cannot be read are skipped and listed in `skipped`.
    """

    def __init__(self, task_data: Any, *, cycle_seconds: float = 8.0, pad: str = "circular", progress: bool = False):
        self.task_data = task_data
        self.cycle_seconds = cycle_seconds
        self.pad = pad
        self.progress = progress
        self.skipped: list[str] = []
        self._by_frontend: dict[FrontEndConfig, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}

    def arrays(self, frontend: FrontEndConfig) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(lms float16 [N, n_mels, frames], labels [N], is_train [N]) for this front-end."""
        if frontend in self._by_frontend:
            return self._by_frontend[frontend]
        from .data.icbhi import load_cycle
        from .errors import AudioError

        items = [it for it in self.task_data.items if it.split in ("train", "val")]
        mel = LogMelSpectrogram(frontend)
        lms, labels, is_train = [], [], []
        self.skipped = []
        # No live bar unless asked: the report may run inside the training loop's own live display.
        with make_progress(transient=True, show=self.progress) as bar:
            task = bar.add_task("probe: reading cycles", total=len(items), status="")
            for item in items:
                bar.advance(task)
                try:
                    wave = load_cycle(item, frontend.sample_rate, length_s=self.cycle_seconds, pad=self.pad)
                except AudioError as exc:
                    self.skipped.append(f"{item.item_id}: {exc}")
                    continue
                with torch.no_grad():
                    lms.append(mel(wave).numpy().astype(np.float16))
                labels.append(int(item.label))
                is_train.append(item.split == "train")
        if not lms:
            raise DataError("no train/val cycle of the task could be read; the probe needs labelled audio")
        result = (np.stack(lms), np.asarray(labels, dtype=int), np.asarray(is_train, dtype=bool))
        self._by_frontend[frontend] = result
        return result


def probe_scores(
    encoder: AudioViT,
    task_data: Any,
    *,
    probe_set: ProbeSet | None = None,
    norm_stats: Sequence[float] | None = None,
    device: str | torch.device | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """Linear-probe Sp / Se / Score / accuracy on the subject-disjoint validation split.

    StandardScaler + LogisticRegression(class_weight='balanced') on mean-pooled clip embeddings of
    the training split: a cheap, label-aware check of which checkpoint's features separate the
    classes best, minutes instead of a fine-tune per checkpoint. Raises DataError when the split
    cannot support a probe (no validation items, fewer than two training classes).
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from .metrics import icbhi_scores

    probe_set = probe_set or ProbeSet(task_data)
    frontend = FrontEndConfig.for_sample_rate(encoder.config.sample_rate)
    lms, labels, is_train = probe_set.arrays(frontend)
    if not is_train.any() or is_train.all():
        raise DataError("the probe needs items in both the train and the validation split of the task")
    if len(np.unique(labels[is_train])) < 2:
        raise DataError("the training split has a single class; a linear probe needs at least two")
    emb = clip_embeddings(encoder, lms, norm_stats=norm_stats, device=device)
    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000, class_weight="balanced", random_state=seed))
    model.fit(emb[is_train], labels[is_train])
    pred = model.predict(emb[~is_train])
    scores = icbhi_scores(labels[~is_train], pred, normal_class=int(task_data.normal_class),
                          num_classes=len(task_data.classes))
    return {"sp": scores["sp"], "se": scores["se"], "score": scores["score"], "accuracy": scores["accuracy"],
            "n_train": int(is_train.sum()), "n_val": int((~is_train).sum())}


# ============================================================================ run-directory facts
def _prune_to(cls: type, values: dict[str, Any], where: str, dropped: list[str]) -> dict[str, Any]:
    """Keep only keys `cls` still declares (recursively), listing the rest in `dropped`.

    A report reads runs made by older versions of the training loop; a recipe key that was renamed
    since must not make the whole report unreadable.
    """
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    out: dict[str, Any] = {}
    for key, value in values.items():
        name = f"{where}.{key}" if where else key
        if key not in fields:
            dropped.append(name)
        elif isinstance(value, dict) and dataclasses.is_dataclass(hints[key]):
            out[key] = _prune_to(hints[key], value, name, dropped)
        else:
            out[key] = value
    return out


def _load_run_recipe(run_dir: Path, checkpoints: list[tuple[int, Path]]) -> tuple[Any, list[str]]:
    """(the run's resolved recipe, notes): recipe.toml, else the copy stored in the newest readable checkpoint.

    Keys this version no longer knows are dropped with a note instead of failing.
    """
    from .config import read_toml
    from .pretrain import PretrainRecipe

    dropped: list[str] = []
    values: dict[str, Any] | None = None
    toml_path = run_dir / "recipe.toml"
    if toml_path.is_file():
        values = read_toml(toml_path)
        values.pop("about", None)
    else:
        for _, path in reversed(checkpoints):
            try:
                meta = ckpt_io.peek_checkpoint(path)[1]
            except M2DXError:
                continue
            if isinstance(meta.get("recipe"), dict):
                values = meta["recipe"]
                break
    if values is None:
        raise ConfigError(f"{run_dir}: no recipe.toml and no readable checkpoint; pass the folder that further-pretrain created")
    recipe = build_dataclass(PretrainRecipe, _prune_to(PretrainRecipe, values, "", dropped))
    notes = [f"run recipe keys unknown to this version were ignored: {', '.join(dropped)}"] if dropped else []
    return recipe, notes


def epoch_end_rows(metrics: list[dict[str, Any]]) -> dict[int, dict[str, Any]]:
    """Completed epoch (1-based) -> its `epoch_end` row; a resumed epoch keeps its last row.

    The first epoch_end row of a run always closes epoch 1, so any constant offset in the logged
    `epoch` field (older loops logged the next epoch's number) is removed from that anchor.
    """
    ends = [r for r in metrics if r.get("epoch_end") and isinstance(r.get("epoch"), (int, float))]
    if not ends:
        return {}
    offset = int(ends[0]["epoch"]) - 1
    offset = offset if offset in (0, 1) else 0
    return {int(r["epoch"]) - offset: r for r in ends}


def _finite(value: Any) -> float | None:
    """A float for JSON, None for missing / NaN / 'nan' strings (the logger writes non-finite as text)."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


@dataclass
class _Slot:
    """One report row before scoring: which checkpoint, where it came from, or why it is missing."""

    epoch: int
    source: str  # "base", "teacher" or "run"
    checkpoint: str
    path: Path | None
    error: str | None = None


def _collect_slots(run_dir: Path, recipe: Any, ends: dict[int, dict[str, Any]],
                   checkpoints: list[tuple[int, Path]]) -> list[_Slot]:
    """Epoch 0 (base or teacher), every saved checkpoint, and rows for checkpoints the log says should exist."""
    from .registry import resolve_checkpoint

    slots: list[_Slot] = []
    if recipe.base:
        try:
            slots.append(_Slot(0, "base", str(recipe.base), resolve_checkpoint(str(recipe.base))))
        except M2DXError as exc:
            slots.append(_Slot(0, "base", str(recipe.base), None, f"base checkpoint unavailable: {exc}"))
    else:
        teachers = ckpt_io.list_checkpoints(run_dir / "teacher")
        if teachers:
            slots.append(_Slot(0, "teacher", str(teachers[0][1]), teachers[0][1]))
    found = {epoch for epoch, _ in checkpoints}
    for epoch, path in checkpoints:
        slots.append(_Slot(epoch, "run", str(path), path))
    save_every = max(1, int(recipe.run.save_every))
    folder = checkpoints[0][1].parent if checkpoints else None
    for epoch in sorted(ends):
        expected = epoch % save_every == 0 or epoch >= int(recipe.optim.epochs)
        if expected and epoch not in found:
            where = folder / f"checkpoint-{epoch}.pth" if folder else Path(f"checkpoint-{epoch}.pth")
            slots.append(_Slot(epoch, "run", str(where), None,
                               f"{where}: checkpoint missing (metrics.jsonl says epoch {epoch} was saved); "
                               "it was deleted or moved"))
    slots.sort(key=lambda s: (s.epoch, s.source != "base" and s.source != "teacher"))
    return slots


# ============================================================================ health cache
class _HealthCache:
    """`report/health_cache.json`: metrics per checkpoint keyed by path + mtime + size, plus the crops.

    The training loop refreshes the report after every save; with this cache each refresh scores
    only the new checkpoint. Entries are valid only for the same crop set and the same base.
    A damaged cache is ignored (it only costs recomputation).
    """

    def __init__(self, report_dir: Path):
        self.dir = report_dir
        self.path = report_dir / HEALTH_CACHE_NAME
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
            if not isinstance(data, dict) or data.get("version") != _CACHE_VERSION:
                raise ValueError
        except (OSError, ValueError):
            data = {"version": _CACHE_VERSION, "entries": {}, "crops": None, "base": None}
        self.data = data
        self.dirty = False

    @staticmethod
    def file_key(path: Path) -> str | None:
        try:
            st = Path(path).stat()
        except OSError:
            return None
        return f"{Path(path).resolve()}|{st.st_mtime_ns}|{st.st_size}"

    def get(self, key: str | None, crops_key: str, base_key: str | None) -> dict[str, Any] | None:
        entry = self.data["entries"].get(key) if key else None
        if isinstance(entry, dict) and entry.get("crops") == crops_key and entry.get("base") == base_key:
            return entry
        return None

    def put(self, key: str | None, crops_key: str, base_key: str | None, metrics: dict[str, Any]) -> None:
        if key is None:
            return
        self.data["entries"][key] = {"crops": crops_key, "base": base_key,
                                     **{k: metrics.get(k) for k in ("rankme", "ev_auc", "drift_cos")}}
        self.dirty = True

    def load_array(self, name: str, kind: str, key: str) -> np.ndarray | None:
        info = self.data.get(kind)
        if not isinstance(info, dict) or info.get("key") != key:
            return None
        try:
            return np.load(self.dir / name)
        except (OSError, ValueError):
            return None

    def save_array(self, name: str, kind: str, key: str, array: np.ndarray, **extra: Any) -> None:
        atomic_save_npy(self.dir / name, array)
        self.data[kind] = {"key": key, **extra}
        self.dirty = True

    def save(self) -> None:
        if self.dirty:
            atomic_write_text(self.path, json.dumps(self.data, indent=1))
            self.dirty = False


# ============================================================================ building the report
def _row_warnings(row: dict[str, Any], base_rankme: float | None) -> list[str]:
    """Rank-collapse and drift warnings for a scored row (epoch 0 is the reference, never warned)."""
    out = []
    if row["epoch"] == 0:
        return out
    rm = row.get("rankme")
    if rm is not None and base_rankme:
        drop = 1.0 - rm / base_rankme
        if drop > RANK_COLLAPSE_DROP:
            out.append(f"epoch {row['epoch']}: RankMe {rm:.1f} is {drop * 100:.0f}% below the base's {base_rankme:.1f}: "
                       "possible representation collapse")
    cos = row.get("drift_cos")
    if cos is not None and cos < DRIFT_WARN_COS:
        out.append(f"epoch {row['epoch']}: embeddings drifted far from the base (mean cosine {cos:.2f} < {DRIFT_WARN_COS}); "
                   "the base's knowledge may be lost")
    return out


def _metric_block(run: Any, split: str) -> dict[str, Any] | None:
    """The `val` / `test` metrics dict of one fine-tune run record (None when the split was not scored)."""
    block = run.get(split) if isinstance(run, dict) else None
    return block if isinstance(block, dict) else None


def _mean_scores(blocks: list[dict[str, Any]]) -> dict[str, float | None] | None:
    if not blocks:
        return None
    out: dict[str, float | None] = {}
    for key in ("sp", "se", "score", "accuracy"):
        values = [v for b in blocks if (v := _finite(b.get(key))) is not None]
        out[key] = float(np.mean(values)) if values else None
    return out


def _run_finetune(path: Path, epoch: int, *, recipe_name: str, task: str, data: Path, normal_class: str | None,
                  report_dir: Path, task_data: Any, progress: bool) -> dict[str, Any]:
    """One full fine-tune of this checkpoint; its run folder is `report/finetune/epoch-<N>/`."""
    from . import finetune as ft

    base_out = report_dir / "finetune" / f"epoch-{epoch}"
    out, attempt = base_out, 1
    while (out / "metrics.json").is_file():
        reused = _reuse_finetune(out, path)
        if reused is not None:
            return reused  # the same checkpoint was already fine-tuned: a rerun of the report costs nothing
        attempt += 1
        out = base_out.with_name(f"{base_out.name}-{attempt}")
    recipe = load_recipe(ft.FinetuneRecipe, recipe_name, extra={"run": {"out": str(out)}})
    result = ft.finetune(recipe, task=task, data=data, checkpoint=path, normal_class=normal_class,
                         score_test=True, progress=progress, task_data=task_data)
    return _finetune_summary(result.run_dir, result.runs, result.aggregate, result.selection)


def _reuse_finetune(out: Path, checkpoint: Path) -> dict[str, Any] | None:
    """An earlier fine-tune of this very checkpoint file (same path, not modified since), else None."""
    try:
        saved = json.loads((out / "metrics.json").read_text(encoding="utf-8"))
        same = saved.get("checkpoint_resolved") == str(Path(checkpoint).resolve())
        fresh = (out / "metrics.json").stat().st_mtime >= Path(checkpoint).stat().st_mtime
    except (OSError, ValueError, AttributeError):
        return None
    if not (same and fresh and isinstance(saved.get("runs"), list)):
        return None
    summary = _finetune_summary(out, saved["runs"], saved.get("aggregate") or {}, str(saved.get("selection", "")))
    summary["reused"] = True
    return summary


def _finetune_summary(run_dir: Path, runs: list[dict[str, Any]], aggregate: Any, selection: str) -> dict[str, Any]:
    """Mean val / test Sp, Se, Score over repeats plus the fine-tune's own aggregate, for one report row."""
    vals = [b for r in runs if (b := _metric_block(r, "val"))]
    tests = [b for r in runs if (b := _metric_block(r, "test"))]
    return {"run_dir": str(run_dir), "selection": selection, "repeats": len(runs), "reused": False,
            "val": _mean_scores(vals), "test": _mean_scores(tests), "aggregate": to_jsonable(aggregate)}


def recommend(rows: list[dict[str, Any]], global_warnings: Sequence[str] = ()) -> dict[str, Any]:
    """Which checkpoint to use and why.

    Labelled evidence wins: the best fine-tune validation Score, else the best probe validation
    Score; ties (to 4 decimals) go to the row with fewer warnings, then the higher RankMe. Without
    labels the choice rests on health alone (the highest RankMe among rows without warnings), and
    the reason says so. Test scores are never used to choose.
    """
    ok = [r for r in rows if not r.get("error")]
    warnings = list(global_warnings)
    failed = [r for r in rows if r.get("error")]
    if failed:
        warnings.append(f"{len(failed)} checkpoint(s) could not be scored: epochs {', '.join(str(r['epoch']) for r in failed)}")
    if not ok:
        return {"epoch": None, "checkpoint": None, "basis": "none", "reason": "no checkpoint could be loaded", "warnings": warnings}

    def health_key(r: dict[str, Any]) -> tuple:
        return (-len(r.get("warnings") or []), r.get("rankme") if r.get("rankme") is not None else -math.inf)

    def ft_score(r: dict[str, Any]) -> float | None:
        ft = r.get("finetune") or {}
        return _finite((ft.get("val") or {}).get("score"))

    def probe_score(r: dict[str, Any]) -> float | None:
        return _finite((r.get("probe") or {}).get("score"))

    basis, best = "health", None
    for name, getter, label in (("finetune", ft_score, "fine-tune validation Score"),
                                ("probe", probe_score, "linear-probe validation Score")):
        scored = [r for r in ok if getter(r) is not None]
        if scored:
            best = max(scored, key=lambda r: (round(getter(r), _SCORE_DECIMALS), *health_key(r)))
            basis = name
            value = getter(best)
            ties = [r for r in scored if round(getter(r), _SCORE_DECIMALS) == round(value, _SCORE_DECIMALS)]
            reason = f"best {label} ({value * 100:.1f}%)"
            if len(ties) > 1:
                reason += (f", tied with epoch(s) {', '.join(str(r['epoch']) for r in ties if r is not best)}; "
                           "tie broken by label-free health (fewer warnings, higher RankMe)")
            break
    if best is None:
        healthy = [r for r in ok if r.get("rankme") is not None]
        if healthy:
            best = max(healthy, key=lambda r: (*health_key(r), r["epoch"]))
            reason = (f"no labels: chosen on label-free health only (highest RankMe {best['rankme']:.1f}"
                      f"{' among checkpoints without warnings' if not best.get('warnings') else ''}); "
                      "run with --probe --task ... --data ... to choose on validation scores")
        else:
            best = max(ok, key=lambda r: r["epoch"])
            reason = "no labels and no health metrics: the newest readable checkpoint by default"
            basis = "newest"
    if best["epoch"] == 0:
        reason += "; the starting checkpoint scores best, so further pre-training did not help (yet)"
    warnings = list(best.get("warnings") or []) + warnings
    return {"epoch": best["epoch"], "checkpoint": best["checkpoint"], "basis": basis, "reason": reason,
            "warnings": warnings}


def _resolve_norm_stats(meta: dict[str, Any], run_stats: tuple[float, float] | None,
                        encoder: AudioViT) -> tuple[float, float]:
    """The statistics the training loop fed this model: its meta, else the run's, else its own buffer."""
    stats = meta.get("norm_stats") if isinstance(meta, dict) else None
    if isinstance(stats, (list, tuple)) and len(stats) == 2:
        return float(stats[0]), float(stats[1])
    if run_stats is not None:
        return run_stats
    return float(encoder.norm_stats[0]), float(encoder.norm_stats[1])


def _run_norm_stats(checkpoints: list[tuple[int, Path]]) -> tuple[float, float] | None:
    for _, path in reversed(checkpoints):
        try:
            stats = ckpt_io.peek_checkpoint(path)[1].get("norm_stats")
        except M2DXError:
            continue
        if isinstance(stats, (list, tuple)) and len(stats) == 2:
            return float(stats[0]), float(stats[1])
    return None


def _build(
    run_dir: Path,
    *,
    kind: str,
    task: str | None,
    data: Path | None,
    probe: bool,
    finetune: bool,
    finetune_recipe: str,
    normal_class: str | None,
    progress: bool,
    device: str | torch.device | None,
    num_crops: int,
) -> dict[str, Any]:
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ConfigError(f"{run_dir}: run folder not found; pass the folder that further-pretrain created")
    report_dir = run_dir / REPORT_DIR_NAME
    checkpoints = ckpt_io.list_checkpoints(run_dir)
    recipe, global_warnings = _load_run_recipe(run_dir, checkpoints)
    metrics = read_jsonl(run_dir / "metrics.jsonl")
    ends = epoch_end_rows(metrics)
    slots = _collect_slots(run_dir, recipe, ends, checkpoints)

    task_data = None
    if probe or finetune:
        if not task or data is None:
            raise ConfigError("--probe / --finetune need a labelled task: pass --task icbhi|sprsound|csv and --data PATH")
        from .data.tasks import load_task

        task_data = load_task(task, data, normal_class=normal_class)
    if finetune:
        find_recipe(finetune_recipe)  # a bad recipe name is the user's error: say so before any work
    probe_set = ProbeSet(task_data, progress=progress) if probe else None

    cache = _HealthCache(report_dir)
    crops: HealthCrops | None = None
    health_note: str | None = None
    run_stats = _run_norm_stats(checkpoints)
    base_emb: np.ndarray | None = None
    base_key: str | None = None
    base_rankme: float | None = None

    def ensure_crops(vit_config: Any) -> HealthCrops | None:
        """The crop set, from the cache when it was drawn the same way; None (with a warning) when impossible."""
        nonlocal crops, health_note
        if crops is not None or health_note is not None:
            return crops
        frontend = FrontEndConfig.for_sample_rate(vit_config.sample_rate)
        width = int(vit_config.input_size[1])
        key = _crops_key(str(recipe.data.data), num_crops, HEALTH_SEED, width, frontend)
        cached = cache.load_array(HEALTH_CROPS_NAME, "crops", key)
        if cached is not None:
            crops = HealthCrops(cached, key, str(recipe.data.data))
            return crops
        try:
            crops = health_crops(recipe, width, frontend, num_crops=num_crops, seed=HEALTH_SEED)
            cache.save_array(HEALTH_CROPS_NAME, "crops", crops.key, crops.lms, source=crops.source)
        except (M2DXError, OSError) as exc:
            health_note = f"label-free metrics skipped: the training audio is not available ({exc})"
            global_warnings.append(health_note)
        return crops

    rows: list[dict[str, Any]] = []
    # Plain status lines, not a live bar: the probe and the fine-tune loop open their own bars,
    # and rich allows one live display at a time.
    for index, slot in enumerate(slots, start=1):
        if progress:
            console.print(f"[dim]report: epoch {slot.epoch} ({index}/{len(slots)}) {slot.checkpoint}[/]")
        end = ends.get(slot.epoch, {}) if slot.epoch > 0 else {}
        row: dict[str, Any] = {
            "epoch": slot.epoch, "source": slot.source, "checkpoint": slot.checkpoint, "error": slot.error,
            "loss": _finite(end.get("loss")), "loss_m2d": _finite(end.get("loss_m2d")),
            "loss_offline": _finite(end.get("loss_offline")), "lr": _finite(end.get("lr")),
            "ema_decay": _finite(end.get("ema_decay")), "opt_step": end.get("opt_step"),
            "rankme": None, "ev_auc": None, "drift_cos": None, "probe": None, "finetune": None,
            "warnings": [],
        }
        rows.append(row)
        if slot.error is not None or slot.path is None:
            continue
        try:
            scored_base = _score_slot(slot, row, cache=cache, ensure_crops=ensure_crops, run_stats=run_stats,
                        base=(base_emb, base_key), probe_set=probe_set, task_data=task_data, device=device,
                        finetune=finetune, finetune_args=dict(recipe_name=finetune_recipe, task=task, data=data,
                                                              normal_class=normal_class, report_dir=report_dir,
                                                              task_data=task_data, progress=progress))
            if slot.epoch == 0:
                base_emb, base_key = scored_base
                base_rankme = row.get("rankme")
        except M2DXError as exc:
            row["error"] = str(exc)
        except Exception as exc:  # one bad checkpoint must not cost the whole report
            row["error"] = f"{slot.checkpoint}: {type(exc).__name__}: {str(exc).strip()[:300]}"
    try:
        cache.save()
    except OSError as exc:
        global_warnings.append(f"health cache not saved ({exc})")
    for row in rows:
        if not row["error"]:
            row["warnings"] = _row_warnings(row, base_rankme) + row["warnings"]
    if probe_set is not None and probe_set.skipped:
        global_warnings.append(f"probe: {len(probe_set.skipped)} cycle(s) unreadable and skipped (e.g. {probe_set.skipped[0]})")
    if task_data is not None:
        global_warnings.extend(f"task: {w}" for w in task_data.warnings)
    if not any(r["epoch"] == 0 for r in rows):
        global_warnings.append("no epoch-0 checkpoint (no base and no saved teacher): drift cannot be measured")
    report = {
        "kind": kind,
        "run_dir": str(run_dir),
        "generated_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "task": task if (probe or finetune) else None,
        "data": str(data) if data is not None and (probe or finetune) else None,
        "recipe": {"name": recipe.name, "base": recipe.base, "epochs": recipe.optim.epochs,
                   "save_every": recipe.run.save_every, "offline_task": recipe.objective.offline_task},
        "health": {"crops": int(len(crops.lms)) if crops is not None else 0, "seed": HEALTH_SEED,
                   "source": crops.source if crops is not None else None,
                   "rank_collapse_drop": RANK_COLLAPSE_DROP, "drift_warn_cos": DRIFT_WARN_COS},
        "rows": rows,
        "recommendation": recommend(rows, global_warnings),
        "warnings": global_warnings,
    }
    report = to_jsonable(report)
    write_report_files(report, report_dir, metrics)
    return report


def _score_slot(slot: _Slot, row: dict[str, Any], *, cache: _HealthCache, ensure_crops, run_stats,
                base: tuple[np.ndarray | None, str | None], probe_set: ProbeSet | None, task_data: Any,
                device: str | torch.device | None, finetune: bool,
                finetune_args: dict[str, Any]) -> tuple[np.ndarray | None, str]:
    """Fill one row: health (cached when possible), probe and fine-tune. Raises on an unreadable checkpoint.

    Returns (embeddings, cache key) of this checkpoint: the base's are the drift reference of the others.
    """
    assert slot.path is not None
    base_emb, base_key = base
    key = _HealthCache.file_key(slot.path)
    is_base = slot.epoch == 0
    crops_key_now = cache.data.get("crops", {}).get("key") if isinstance(cache.data.get("crops"), dict) else None
    cached = None if is_base else (cache.get(key, crops_key_now, base_key) if crops_key_now else None)
    need_model = cached is None or probe_set is not None or finetune
    loaded = ckpt_io.LoadedCheckpoint(slot.path) if need_model or is_base else None
    if loaded is not None:
        encoder = loaded.encoder()
        stats = _resolve_norm_stats(loaded.meta, run_stats, encoder)
        crops = ensure_crops(loaded.vit_config)
    else:
        crops = None
    embeddings: np.ndarray | None = None
    if cached is not None:
        row.update({k: cached.get(k) for k in ("rankme", "ev_auc", "drift_cos")})
    elif crops is not None and loaded is not None:
        emb = None
        if is_base:
            emb = cache.load_array(HEALTH_BASE_NAME, "base", f"{key}|{crops.key}")
        if emb is not None:
            health = {"rankme": rankme(emb), "ev_auc": explained_variance_auc(emb), "drift_cos": 1.0, "embeddings": emb}
        else:
            health = health_metrics(encoder, crops, base_embeddings=base_emb, norm_stats=stats, device=device,
                                    return_embeddings=True)
            if is_base:
                health["drift_cos"] = 1.0
                try:
                    cache.save_array(HEALTH_BASE_NAME, "base", f"{key}|{crops.key}", health["embeddings"])
                except OSError:
                    pass
        row.update({k: health[k] for k in ("rankme", "ev_auc", "drift_cos")})
        embeddings = health["embeddings"]
        if not is_base:
            cache.put(key, crops.key, base_key, health)
    if probe_set is not None and loaded is not None:
        try:
            row["probe"] = probe_scores(encoder, task_data, probe_set=probe_set, norm_stats=stats, device=device)
        except DataError as exc:
            row["warnings"].append(f"probe skipped: {exc}")
    if finetune and loaded is not None:
        try:
            row["finetune"] = _run_finetune(slot.path, slot.epoch, **finetune_args)
        except M2DXError as exc:
            row["warnings"].append(f"fine-tune failed: {exc}")
        except Exception as exc:  # a crashed fine-tune is reported on its row, the report goes on
            row["warnings"].append(f"fine-tune failed: {type(exc).__name__}: {str(exc).strip()[:300]}")
    return embeddings, key


def build_report(
    run_dir: str | Path,
    *,
    task: str | None = None,
    data: str | Path | None = None,
    probe: bool = False,
    finetune: bool = False,
    finetune_recipe: str = "tiny_finetune",
    normal_class: str | None = None,
    progress: bool = True,
    device: str | torch.device | None = None,
    num_crops: int = NUM_HEALTH_CROPS,
) -> dict[str, Any]:
    """The full report of a further-pretraining run, written to `RUN_DIR/report/` and returned as a dict.

    One row per checkpoint (epoch 0 = base / teacher): curve summaries, label-free health, the
    probe's validation scores with `probe`, fine-tune scores with `finetune` (both need `task` and
    `data`), and a recommendation. Raises ConfigError only for a folder that is not a run at all.
    """
    return _build(Path(run_dir), kind="full", task=task, data=Path(data) if data is not None else None,
                  probe=probe, finetune=finetune, finetune_recipe=finetune_recipe, normal_class=normal_class,
                  progress=progress, device=device, num_crops=num_crops)


def update_progress_report(run_dir: str | Path, *, num_crops: int = NUM_HEALTH_CROPS) -> Path | None:
    """Refresh the cheap report (curves + label-free health) after a save; returns report.json or None.

    Called from the training loop, so it must never raise: any problem is a warning and None.
    Cached health metrics mean each call scores only checkpoints that are new or changed.
    """
    try:
        _build(Path(run_dir), kind="progress", task=None, data=None, probe=False, finetune=False,
               finetune_recipe="", normal_class=None, progress=False, device=None, num_crops=num_crops)
        return Path(run_dir) / REPORT_DIR_NAME / "report.json"
    except Exception as exc:  # never let the report stop a training run
        try:
            console.print(f"[yellow]warning: progress report of {run_dir} not updated: {type(exc).__name__}: {exc}[/]")
        except Exception:
            pass
        return None


class BackgroundReporter:
    """`on_save` hook that refreshes the progress report in a worker thread, so training never waits for it.

    Saves that arrive while a refresh runs coalesce into one more refresh (of the newest state);
    `close()` waits for the last one, so a finished run always has the report of its final checkpoint.
    """

    def __init__(self, num_crops: int = NUM_HEALTH_CROPS):
        self.num_crops = num_crops
        self._lock = threading.Lock()
        self._pending: Path | None = None
        self._thread: threading.Thread | None = None

    def __call__(self, checkpoint_path: str | Path) -> None:
        run_dir = Path(checkpoint_path).parent.parent  # RUN/<published folder>/checkpoint-N.pth
        with self._lock:
            self._pending = run_dir
            if self._thread is None:
                self._thread = threading.Thread(target=self._work, name="m2dx-progress-report", daemon=True)
                self._thread.start()

    def _work(self) -> None:
        while True:
            with self._lock:
                run_dir, self._pending = self._pending, None
                if run_dir is None:
                    self._thread = None
                    return
            update_progress_report(run_dir, num_crops=self.num_crops)

    def close(self) -> None:
        """Wait for the refresh in flight (and any it still has queued)."""
        with self._lock:
            thread = self._thread
        if thread is not None:
            thread.join()


# ============================================================================ outputs
def _pct(value: Any) -> str:
    number = _finite(value)
    return "-" if number is None else f"{number * 100:.1f}"


def _num(value: Any, fmt: str = ".4f") -> str:
    number = _finite(value)
    return "-" if number is None else format(number, fmt)


def table_rows(report: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """Header and formatted cells shared by the Markdown, HTML and terminal tables."""
    rows = report.get("rows", [])
    has_probe = any(r.get("probe") for r in rows)
    has_ft = any(r.get("finetune") for r in rows)
    header = ["epoch", "checkpoint", "loss", "loss M2D", "loss offline", "lr", "RankMe", "EV-AUC", "drift cos"]
    if has_probe:
        header += ["probe Sp", "probe Se", "probe Score"]
    if has_ft:
        header += ["FT val Score", "FT test Sp", "FT test Se", "FT test Score"]
    header.append("status")
    chosen = (report.get("recommendation") or {}).get("epoch")
    out = []
    for r in rows:
        name = Path(str(r.get("checkpoint", ""))).name or str(r.get("checkpoint"))
        if r.get("source") in ("base", "teacher"):
            name = f"{r['source']}: {name}"
        cells = [str(r["epoch"]), name, _num(r.get("loss")), _num(r.get("loss_m2d")), _num(r.get("loss_offline")),
                 _num(r.get("lr"), ".2e"), _num(r.get("rankme"), ".2f"), _num(r.get("ev_auc"), ".3f"),
                 _num(r.get("drift_cos"), ".3f")]
        if has_probe:
            p = r.get("probe") or {}
            cells += [_pct(p.get("sp")), _pct(p.get("se")), _pct(p.get("score"))]
        if has_ft:
            f = r.get("finetune") or {}
            val, test = f.get("val") or {}, f.get("test") or {}
            cells += [_pct(val.get("score")), _pct(test.get("sp")), _pct(test.get("se")), _pct(test.get("score"))]
        if r.get("error"):
            status = "ERROR: " + str(r["error"])
        elif r.get("warnings"):
            status = "warning: " + "; ".join(r["warnings"])
        else:
            status = "ok"
        if chosen is not None and r["epoch"] == chosen and not r.get("error"):
            status = "RECOMMENDED; " + status
        cells.append(status)
        out.append(cells)
    return header, out


def render_report_table(report: dict[str, Any]):
    """A rich Table of the report (the recommended row in bold green, errors red, warnings yellow)."""
    from rich.table import Table

    rec = report.get("recommendation") or {}
    table = Table(title=f"checkpoint report: {report.get('run_dir', '')}",
                  caption=f"recommended: epoch {rec.get('epoch')} ({rec.get('reason', '')})"
                  if rec.get("epoch") is not None else "no recommendation")
    header, rows = table_rows(report)
    for name in header:
        table.add_column(name, overflow="fold", justify="left" if name in ("checkpoint", "status") else "right")
    for cells in rows:
        status = cells[-1]
        style = "bold green" if status.startswith("RECOMMENDED") else "red" if "ERROR" in status else \
            "yellow" if "warning" in status else None
        table.add_row(*cells, style=style)
    return table


def _markdown(report: dict[str, Any], images: list[str]) -> str:
    header, rows = table_rows(report)
    rec = report.get("recommendation") or {}

    def esc(text: str) -> str:
        return text.replace("|", "\\|").replace("\n", " ")

    lines = [f"# Checkpoint report: {report['run_dir']}", "",
             f"Generated {report['generated_at']} ({report['kind']} report"
             + (f", task {report['task']}" if report.get("task") else "") + ").", "",
             "## Recommendation", ""]
    if rec.get("epoch") is not None:
        lines.append(f"**Epoch {rec['epoch']}** (`{rec['checkpoint']}`): {rec['reason']}.")
    else:
        lines.append(f"No recommendation: {rec.get('reason', '')}.")
    for w in rec.get("warnings") or []:
        lines.append(f"- warning: {esc(w)}")
    lines += ["", "## Checkpoints", "", "Sp / Se / Score in percent (validation split for the probe).", "",
              "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(esc(c) for c in cells) + " |" for cells in rows]
    if images:
        lines += ["", "## Plots", ""] + [f"![{name}]({name})" for name in images]
    return "\n".join(lines) + "\n"


def _html(report: dict[str, Any], images: list[str]) -> str:
    header, rows = table_rows(report)
    rec = report.get("recommendation") or {}
    e = html.escape
    parts = [
        "<!DOCTYPE html>", "<html><head><meta charset='utf-8'>",
        f"<title>Checkpoint report: {e(report['run_dir'])}</title>",
        "<style>body{font-family:sans-serif;margin:1.5em}table{border-collapse:collapse;font-size:13px}"
        "td,th{border:1px solid #ccc;padding:3px 6px;text-align:right}td.t{text-align:left}"
        "tr.rec{background:#e6f4e6;font-weight:bold}tr.err{background:#fbe3e3}tr.warn{background:#fff6d6}"
        ".plots{display:flex;flex-wrap:wrap;gap:12px}.plots img{max-width:48%;border:1px solid #ddd}</style>",
        "</head><body>",
        f"<h1>Checkpoint report</h1><p><code>{e(report['run_dir'])}</code> &mdash; generated {e(report['generated_at'])}"
        f" ({e(report['kind'])} report{', task ' + e(str(report['task'])) if report.get('task') else ''})</p>",
        "<h2>Recommendation</h2>",
    ]
    if rec.get("epoch") is not None:
        parts.append(f"<p><b>Epoch {rec['epoch']}</b> (<code>{e(str(rec['checkpoint']))}</code>): {e(rec['reason'])}.</p>")
    else:
        parts.append(f"<p>No recommendation: {e(str(rec.get('reason', '')))}.</p>")
    if rec.get("warnings"):
        parts.append("<ul>" + "".join(f"<li>warning: {e(w)}</li>" for w in rec["warnings"]) + "</ul>")
    parts.append("<h2>Checkpoints</h2><p>Sp / Se / Score in percent (validation split for the probe).</p><table><tr>"
                 + "".join(f"<th>{e(h)}</th>" for h in header) + "</tr>")
    for cells in rows:
        status = cells[-1]
        cls = "rec" if status.startswith("RECOMMENDED") else "err" if "ERROR" in status else \
            "warn" if "warning" in status else ""
        tds = "".join(f"<td class='t'>{e(c)}</td>" if i in (1, len(cells) - 1) else f"<td>{e(c)}</td>"
                      for i, c in enumerate(cells))
        parts.append(f"<tr class='{cls}'>{tds}</tr>")
    parts.append("</table>")
    if images:
        parts.append("<h2>Plots</h2><div class='plots'>"
                     + "".join(f"<img src='{e(name)}' alt='{e(name)}'>" for name in images) + "</div>")
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def _save_figure(fig: Any, path: Path) -> Path:
    """Every report plot is saved alike: PNG at 110 dpi, trimmed, written atomically."""
    return atomic_savefig(fig, path, format="png", dpi=110, bbox_inches="tight")


def _new_figure(ncols: int) -> Any:
    """A pyplot-free Agg figure: no global backend switch, safe inside a training process."""
    from matplotlib.figure import Figure

    return Figure(figsize=(6.0 * ncols, 4.2), layout="constrained")


def plot_loss_curves(metrics: list[dict[str, Any]], path: Path) -> Path | None:
    """Three panels vs epoch: total / M2D / offline loss (epoch means as markers, logged steps thin), lr, EMA decay."""
    ends = epoch_end_rows(metrics)
    if not ends:
        return None
    epochs = sorted(ends)
    anchor_steps = [0.0] + [float(ends[e].get("opt_step", 0)) for e in epochs]
    anchor_epochs = [0.0] + [float(e) for e in epochs]
    steps = [r for r in metrics if not r.get("epoch_end") and isinstance(r.get("opt_step"), (int, float))]

    def step_x(rows: list[dict[str, Any]]) -> np.ndarray:
        return np.interp([float(r["opt_step"]) for r in rows], anchor_steps, anchor_epochs)

    fig = _new_figure(3)
    ax_loss, ax_lr, ax_ema = fig.subplots(1, 3)
    for key, label, color in (("loss", "total loss", "C0"), ("loss_m2d", "M2D loss", "C1"),
                              ("loss_offline", "offline loss", "C2")):
        xs = [e for e in epochs if _finite(ends[e].get(key)) is not None]
        if not xs:
            continue
        detail = [r for r in steps if _finite(r.get(key)) is not None]
        if detail:
            ax_loss.plot(step_x(detail), [float(r[key]) for r in detail], color=color, alpha=0.35, linewidth=1)
        ax_loss.plot(xs, [float(ends[e][key]) for e in xs], "o-", color=color, label=f"{label} (epoch mean)")
    ax_loss.set_xlabel("epoch")
    ax_loss.set_ylabel("loss")
    ax_loss.set_title("Training losses (thin: logged steps)")
    ax_loss.grid(alpha=0.3)
    ax_loss.legend(fontsize=8, loc="best", framealpha=0.7)
    sched = sorted((r for r in [*steps, *[ends[e] for e in epochs]] if isinstance(r.get("opt_step"), (int, float))),
                   key=lambda r: float(r["opt_step"]))
    for ax, key, label, color in ((ax_lr, "lr", "learning rate", "C3"), (ax_ema, "ema_decay", "EMA decay", "C4")):
        rows = [r for r in sched if _finite(r.get(key)) is not None]
        if rows:
            ax.plot(step_x(rows), [float(r[key]) for r in rows], ".-", color=color, label=label)
        ax.set_xlabel("epoch")
        ax.set_ylabel(label)
        ax.set_title(f"{label[0].upper()}{label[1:]} schedule")
        ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3), useOffset=False)
        ax.grid(alpha=0.3)
    return _save_figure(fig, path)


def _ok_rows(report: dict[str, Any]) -> list[dict[str, Any]]:
    return [r for r in report.get("rows", []) if not r.get("error")]


def plot_health(report: dict[str, Any], path: Path) -> Path | None:
    """RankMe, and drift cosine + EV-AUC, vs checkpoint epoch: one marker per checkpoint, thresholds dashed."""
    rows = [r for r in _ok_rows(report) if r.get("rankme") is not None]
    if not rows:
        return None
    fig = _new_figure(2)
    ax_rank, ax_cos = fig.subplots(1, 2)
    xs = [r["epoch"] for r in rows]
    ax_rank.plot(xs, [r["rankme"] for r in rows], "o-", color="C0", label="RankMe")
    base = next((r for r in rows if r["epoch"] == 0), None)
    if base is not None:
        ax_rank.axhline(base["rankme"] * (1 - RANK_COLLAPSE_DROP), color="C3", linestyle="--", linewidth=1,
                        label=f"collapse warning (-{RANK_COLLAPSE_DROP:.0%} vs base)")
    ax_rank.set_xlabel("checkpoint epoch (0 = base)")
    ax_rank.set_ylabel("RankMe (effective rank)")
    ax_rank.set_title("Embedding rank")
    ax_rank.set_ylim(0, max(r["rankme"] for r in rows) * 1.3)  # headroom so the legend hides no marker
    ax_rank.grid(alpha=0.3)
    ax_rank.legend(fontsize=8, loc="upper right", framealpha=0.7)
    drift = [r for r in rows if r.get("drift_cos") is not None]
    if drift:
        ax_cos.plot([r["epoch"] for r in drift], [r["drift_cos"] for r in drift], "o-", color="C1",
                    label="cosine to base embeddings")
    ev = [r for r in rows if r.get("ev_auc") is not None]
    if ev:
        ax_cos.plot([r["epoch"] for r in ev], [r["ev_auc"] for r in ev], "s-", color="C2",
                    label="explained-variance AUC")
    ax_cos.axhline(DRIFT_WARN_COS, color="C3", linestyle="--", linewidth=1, label=f"drift warning (cos {DRIFT_WARN_COS})")
    low = min([0.0] + [r["drift_cos"] for r in drift])
    ax_cos.set_ylim(low - 0.05, 1.35)  # headroom above 1 for the legend
    ax_cos.set_xlabel("checkpoint epoch (0 = base)")
    ax_cos.set_ylabel("value")
    ax_cos.set_title("Drift from base and variance concentration")
    ax_cos.grid(alpha=0.3)
    ax_cos.legend(fontsize=8, loc="upper right", framealpha=0.7)
    for ax in (ax_rank, ax_cos):
        ax.set_xticks(sorted(set(xs)))
    return _save_figure(fig, path)


def plot_scores(report: dict[str, Any], path: Path, which: str) -> Path | None:
    """Validation Sp / Se / Score (percent) vs checkpoint epoch for the probe or the fine-tune."""
    points = []
    for r in _ok_rows(report):
        block = r.get(which) or {}
        if which == "finetune":
            block = block.get("val") or {}
        if _finite(block.get("score")) is not None:
            points.append((r["epoch"], block))
    if not points:
        return None
    fig = _new_figure(1)
    ax = fig.subplots(1, 1)
    xs = [p[0] for p in points]
    for key, label, style in (("sp", "Sp", "o-"), ("se", "Se", "s-"), ("score", "Score", "D-")):
        ys = [math.nan if (v := _finite(b.get(key))) is None else v * 100 for _, b in points]
        ax.plot(xs, ys, style, label=label, linewidth=2 if key == "score" else 1)
    chosen = (report.get("recommendation") or {}).get("epoch")
    if chosen in xs:
        ax.axvline(chosen, color="grey", linestyle=":", label=f"recommended (epoch {chosen})")
    name = "Linear probe" if which == "probe" else "Fine-tune"
    ax.set_title(f"{name}: validation scores per checkpoint")
    ax.set_xlabel("checkpoint epoch (0 = base)")
    ax.set_ylabel("percent")
    ax.set_ylim(-2, 102)
    ax.set_xticks(sorted(set(xs)))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))  # outside: never hides a marker
    return _save_figure(fig, path)


def write_report_files(report: dict[str, Any], report_dir: Path, metrics: list[dict[str, Any]] | None = None) -> dict[str, Path]:
    """report.json / .md / .html and the PNGs, each written atomically; a failed plot is a warning only."""
    report_dir.mkdir(parents=True, exist_ok=True)
    plots = [("loss_curves.png", lambda p: plot_loss_curves(metrics or [], p)),
             ("health.png", lambda p: plot_health(report, p)),
             ("probe.png", lambda p: plot_scores(report, p, "probe")),
             ("finetune.png", lambda p: plot_scores(report, p, "finetune"))]
    images: list[str] = []
    for name, make in plots:
        try:
            if make(report_dir / name) is not None:
                images.append(name)
        except Exception as exc:  # a plotting problem must not lose the numbers
            report.setdefault("warnings", []).append(f"plot {name} failed: {type(exc).__name__}: {exc}")
            console.print(f"[yellow]warning: plot {name} failed: {exc}[/]")
    report["files"] = ["report.json", "report.md", "report.html", *images]
    written = {
        "json": atomic_write_json(report_dir / "report.json", report),
        "md": atomic_write_text(report_dir / "report.md", _markdown(report, images)),
        "html": atomic_write_text(report_dir / "report.html", _html(report, images)),
    }
    for name in images:
        written[name] = report_dir / name
    return written
