"""Linear evaluation of the frozen encoder, and the log-mel baseline, as classifiers a run ships.

What the M2D paper, EVAR, OPERA and HeAR report beside fine-tuning: the encoder stays frozen, each
segment becomes one clip embedding (the feature `m2dx embed` writes: mean over time of the encoder's
per-frame features), and a standardised logistic regression (`evaluation.linear`, C chosen on
validation, class weighting as the recipe says) classifies it. The embeddings are computed once per
split and kept in the cache (`<cache>/embeddings`), so re-running or another C costs seconds.

The fit is shipped as a classifier file of the usual format: the frozen encoder plus a linear head
holding the logistic regression with its standardisation folded in (weight / scale), so `m2dx
predict`, `m2dx export` and `m2dx embed` read it like any fine-tuned classifier; the standardisation
and the coefficients are stored too, as tensors. The probabilities a run reports are the ones that
file computes (torch, float32), so predict reproduces them.

The baseline (`--mode baseline`) is the same, on per-band log-mel statistics instead of embeddings
(`models.baseline.LogMelStatsClassifier`).
"""

from __future__ import annotations

import copy
import time
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from .data.corpora import cache_root
from .evaluation.baseline import fit_baseline
from .evaluation.linear import LinearFit, fit_linear
from .fileio import atomic_save_npy, json_sha256
from .finetune_outputs import METHOD_WORDS
from .finetune_run import FinetuneRun, Prepared, RepeatOutcome
from .inference import class_probabilities, clip_embeddings
from .metrics import probability_scores
from .models.baseline import LogMelStatsClassifier
from .models.classifier import Classifier

EMBEDDINGS_DIR = "embeddings"
LINEAR_KIND = "linear"
BASELINE_KIND = "baseline"


# ---------------------------------------------------------------------------- embeddings, once
def _embedding_key(run: FinetuneRun, split: str) -> str:
    """The cache key of one split's embeddings: checkpoint file, items, segment rule, positions, normalisation."""
    prep = run.prepared
    recipe = prep.recipe
    return json_sha256({
        "checkpoint": run.checkpoint.key,
        "items": run.task_data.fingerprint({split: run.splits[split]})["sha256"],
        "segment": [recipe.data.cycle_seconds, recipe.data.pad, recipe.model.adjust_pos],
        "precision": "fp32", "norm_stats": prep.encoder.norm_stats.tolist(),
    })


def split_embeddings(run: FinetuneRun) -> dict[str, np.ndarray]:
    """Clip embeddings [N, F*D] (float32) of every split the run touches, read from or written to the cache.

    Always in fp32, whatever `run.amp` says: inference is cheap next to training, and `m2dx predict`
    (fp32 by default) then reproduces the linear classifier's probabilities exactly.
    """
    prep = run.prepared
    recipe = prep.recipe
    folder = cache_root(recipe.data.cache_dir) / EMBEDDINGS_DIR if recipe.data.disk_cache else None
    out: dict[str, np.ndarray] = {}
    for split, lms in prep.lms.items():
        path = folder / f"{_embedding_key(run, split)}.npy" if folder is not None else None
        if path is not None and path.is_file():
            cached = np.load(path)
            if cached.shape[0] == len(lms):
                out[split] = cached
                continue
        out[split] = clip_embeddings(prep.encoder, lms, batch_size=recipe.run.eval_batch_size, device=prep.device,
                                     amp_dtype=None, adjust_pos=recipe.model.adjust_pos)
        if path is not None:
            atomic_save_npy(path, out[split])
    return out


# ---------------------------------------------------------------------------- one repeat
def _judge(probs: torch.Tensor, labels: list[int], prep: Prepared) -> dict[str, Any]:
    """ICBHI scores of argmax predictions and the mean cross-entropy, as the fine-tuning loop reports them."""
    return probability_scores(probs, labels, normal_class=prep.normal_class, num_classes=len(prep.classes))


def _outcome(prep: Prepared, repeat: int, fitted: LinearFit, probs: dict[str, torch.Tensor], state: dict[str, Any],
             kind: str, seconds: float, score_test: bool, tensors: dict[str, dict[str, torch.Tensor]]) -> RepeatOutcome:
    """The record the run's outputs expect from a repeat: one 'epoch' (the fit), its scores and probabilities."""
    scored = {split: _judge(p, prep.labels[split], prep) for split, p in probs.items() if len(prep.labels[split])}
    has_test = score_test and "test" in scored
    row = {"repeat": repeat, "seed": prep.recipe.run.seed + repeat, "epoch": 1, "C": fitted.C,
           "train_loss": scored["train"]["loss"], "train_samples": len(prep.labels["train"]), "lr": float("nan"),
           **{f"{s}_{k}": float(scored[s][k]) for s in ("val", "test") if s in scored
              for k in ("loss", "sp", "se", "score", "accuracy")},
           "selected": True, "seconds": seconds}
    return RepeatOutcome(
        repeat=repeat, seed=prep.recipe.run.seed + repeat, selected_epoch=1, val=scored.get("val"),
        test=scored["test"] if has_test else None, epochs=[row], val_probs=probs.get("val"),
        test_probs=probs["test"] if has_test else None, best_state=state,
        kind=kind, extra_meta={kind: fitted.describe(), "classifier_kind": kind, "method": METHOD_WORDS[kind],
                               **({"vit_config": None} if kind == BASELINE_KIND else {})},
        extra_tensors=tensors)


def _fit_tensors(fitted: LinearFit) -> dict[str, dict[str, torch.Tensor]]:
    """The fit as the classifier file stores it besides the model: standardisation and coefficients (float64)."""
    return {"standardise": {"mean": torch.from_numpy(fitted.mean), "scale": torch.from_numpy(fitted.scale)},
            "logistic": {"coef": torch.from_numpy(fitted.coef), "intercept": torch.from_numpy(fitted.intercept)}}


def linear_repeat(prep: Prepared, repeat: int, embeddings: dict[str, np.ndarray], *, score_test: bool) -> RepeatOutcome:
    """Fit the standardised logistic regression on the training embeddings (C on validation) and build its classifier."""
    t0 = time.perf_counter()
    recipe = prep.recipe
    grid = None if recipe.run.selection == "val" else (1.0,)
    fitted = fit_linear({s: e for s, e in embeddings.items() if s != "test"}, prep.labels,
                        num_classes=len(prep.classes), normal=prep.normal_class,
                        balanced=recipe.optim.class_weighting != "none", seed=recipe.run.seed + repeat,
                        **({"c_grid": grid} if grid else {}))
    model = Classifier(prep.encoder, len(prep.classes), adjust_pos=recipe.model.adjust_pos)  # shares the encoder: no copy
    weight, bias = fitted.folded()
    with torch.no_grad():
        model.head.weight.copy_(torch.from_numpy(weight).float())
        model.head.bias.copy_(torch.from_numpy(bias).float())
    head = model.head  # [K, F*D] on the CPU, where the embeddings are
    probs = {}
    with torch.inference_mode():  # exactly what the file computes: float32 head on the float32 clip embedding
        for split, emb in embeddings.items():
            probs[split] = F.softmax(head(torch.from_numpy(np.asarray(emb, dtype=np.float32))).float(), dim=-1)
    state = {n: t.detach().to("cpu", copy=True) for n, t in model.state_dict().items()}
    return _outcome(prep, repeat, fitted, probs, state, LINEAR_KIND, time.perf_counter() - t0, score_test,
                    _fit_tensors(fitted))


def baseline_repeat(prep: Prepared, repeat: int, *, score_test: bool) -> RepeatOutcome:
    """The log-mel statistics baseline as a classifier: fitted like the run's yardstick, applied by its torch module."""
    t0 = time.perf_counter()
    recipe = prep.recipe
    lms = {s: x for s, x in prep.lms.items() if s != "test"}
    fitted = fit_baseline(lms, {s: prep.labels[s] for s in lms}, num_classes=len(prep.classes),
                          normal=prep.normal_class, balanced=recipe.optim.class_weighting != "none",
                          seed=recipe.run.seed + repeat)["fit"]
    model = LogMelStatsClassifier.from_fit(fitted, norm_stats=prep.encoder.norm_stats.tolist())
    probs = {split: class_probabilities(model, x, batch_size=recipe.run.eval_batch_size, device=torch.device("cpu"))
             for split, x in prep.lms.items()}
    state = {n: t.detach().to("cpu", copy=True) for n, t in model.state_dict().items()}
    return _outcome(prep, repeat, fitted, probs, state, BASELINE_KIND, time.perf_counter() - t0, score_test,
                    _fit_tensors(fitted))


def empty_model(prep: Prepared, kind: str) -> torch.nn.Module:
    """A model of the candidate's kind to load a repeat's selected state into (CPU, before saving its file)."""
    if kind == BASELINE_KIND:
        n_mels = int(prep.lms["train"].shape[1])
        return LogMelStatsClassifier(n_mels, len(prep.classes), prep.encoder.norm_stats.tolist())
    return Classifier(copy.deepcopy(prep.encoder).cpu(), len(prep.classes), adjust_pos=prep.recipe.model.adjust_pos)
