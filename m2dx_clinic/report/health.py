"""Label-free health of a checkpoint: how its embeddings of the run's own audio look, no labels needed.

Three numbers per checkpoint, on a fixed, seeded set of clean crops of the training audio:
- RankMe (Garrido et al. 2023): the effective number of directions the embeddings use. A collapsed
  encoder maps every recording to nearly the same point and scores near 1.
- EV-AUC: how much of the variance the first few principal directions carry (1.0 = one direction).
- drift: mean cosine between each crop's embedding and the base model's; low values mean further
  pre-training moved far from what the base learned on AudioSet.
A per-checkpoint cache (`report/health_cache.json`) means each refresh during training scores only
the new checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from ..audio import FrontEndConfig
from ..errors import DataError
from ..inference import clip_embeddings
from ..fileio import atomic_save_npy, atomic_write_text, file_identity, json_sha256
from ..models.vit import AudioViT
from ..data.corpora import cache_root
from ..data.crops import crop_lms
from ..data.logmel_cache import LogMelCache
from ..data.segments import list_segments

HEALTH_CACHE_NAME = "health_cache.json"
HEALTH_CROPS_NAME = "health_crops.npy"
HEALTH_BASE_NAME = "health_base_embeddings.npy"
NUM_HEALTH_CROPS = 256
HEALTH_SEED = 0
RANK_COLLAPSE_DROP = 0.30  # warn when RankMe falls more than this fraction below the base's
DRIFT_WARN_COS = 0.5  # warn when the mean cosine to the base's embeddings falls below this
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
    return json_sha256({"v": _CACHE_VERSION, "source": source, "n": num_crops, "seed": seed, "width": width,
                        "frontend": dataclasses.asdict(frontend)})[:16]


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
    source = str(recipe.data.data)
    if not source:
        raise DataError("the run's recipe names no training data (data.data); label-free metrics need it")
    segments = list_segments(Path(source))
    rng = np.random.default_rng(seed)
    chosen = rng.permutation(len(segments))[: min(num_crops, len(segments))]
    cache = LogMelCache(cache_root(recipe.data.cache_dir, recipe.data.data_root), frontend,
                        dtype=recipe.data.cache_dtype)
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


# ============================================================================ health cache
class HealthCache:
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
        ident = file_identity(path)
        return None if ident is None else f"{ident.path}|{ident.mtime_ns}|{ident.size}"

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



def row_warnings(row: dict[str, Any], base_rankme: float | None) -> list[str]:
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


