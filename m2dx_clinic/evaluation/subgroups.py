"""Performance per subgroup (device, chest location, sex, age band, a manifest column), with CIs and flags.

For each grouping and each of its values: n (segments), subjects, the ICBHI Score (argmax) and the
AUROC of P(abnormal), each with a 95 % percentile interval from a bootstrap over the group's SUBJECTS
(seeded). The rest of the data (every segment with a known, different value) gets the same, so a
group whose interval lies entirely below the rest's is flagged. A group with fewer than
`MIN_SUBJECTS` subjects or `MIN_ITEMS` segments is noted as too small to judge, and never flagged.
Segments whose value is unknown are counted, not scored. Plain arrays in, plain values out: the
tests recompute every number from predictions.csv.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np

MIN_SUBJECTS = 5
MIN_ITEMS = 20
METRICS = ("score", "auroc_abnormal")
_NAMES = {"score": "Score", "auroc_abnormal": "AUROC"}


def _auroc(truth: np.ndarray, score: np.ndarray) -> float:
    """Mann-Whitney AUROC with ties counted half; NaN without both kinds."""
    pos, neg = score[truth], score[~truth]
    if not len(pos) or not len(neg):
        return math.nan
    order = np.argsort(np.concatenate([pos, neg]), kind="mergesort")
    ranks = np.empty(len(order), dtype=np.float64)
    values = np.concatenate([pos, neg])[order]
    ranks[order] = np.arange(1, len(order) + 1, dtype=np.float64)
    _, start, counts = np.unique(values, return_index=True, return_counts=True)
    for s, c in zip(start, counts):  # ties share their mean rank
        if c > 1:
            ranks[order[s:s + c]] = s + (c + 1) / 2.0
    return float((ranks[: len(pos)].sum() - len(pos) * (len(pos) + 1) / 2) / (len(pos) * len(neg)))


def group_metrics(probs: np.ndarray, labels: np.ndarray, normal: int) -> dict[str, float]:
    """Sp, Se (exact class), Score (argmax) and AUROC of P(abnormal) of one set of items."""
    pred = probs.argmax(axis=1)
    is_normal = labels == normal
    sp = float((pred[is_normal] == normal).mean()) if is_normal.any() else math.nan
    se = float((pred[~is_normal] == labels[~is_normal]).mean()) if (~is_normal).any() else math.nan
    score = (sp + se) / 2 if math.isfinite(sp) and math.isfinite(se) else math.nan
    return {"sp": sp, "se": se, "score": score, "auroc_abnormal": _auroc(~is_normal, 1.0 - probs[:, normal])}


def _interval(probs: np.ndarray, labels: np.ndarray, subjects: np.ndarray, normal: int, resamples: int,
              seed: int) -> dict[str, list[float]]:
    """95 % percentile intervals of `METRICS`, resampling whole subjects with replacement."""
    if resamples <= 0 or not len(labels):
        return {}
    unique, inverse = np.unique(subjects, return_inverse=True)
    members = [np.flatnonzero(inverse == g) for g in range(len(unique))]
    rng = np.random.default_rng(seed)
    draws: dict[str, list[float]] = {key: [] for key in METRICS}
    for _ in range(resamples):
        idx = np.concatenate([members[g] for g in rng.integers(0, len(unique), size=len(unique))])
        values = group_metrics(probs[idx], labels[idx], normal)
        for key in METRICS:
            draws[key].append(values[key])
    out = {}
    for key, values in draws.items():
        arr = np.asarray(values, dtype=np.float64)
        arr = arr[np.isfinite(arr)]
        out[key] = [float(np.percentile(arr, 2.5)), float(np.percentile(arr, 97.5))] if arr.size else [math.nan] * 2
    return out


def _block(probs: np.ndarray, labels: np.ndarray, subjects: np.ndarray, normal: int, resamples: int,
           seed: int) -> dict[str, Any]:
    return {"n": int(len(labels)), "subjects": int(len(set(subjects.tolist()))),
            "abnormal": int((labels != normal).sum()), "values": group_metrics(probs, labels, normal),
            "ci95": _interval(probs, labels, subjects, normal, resamples, seed)}


def _below(group: dict[str, Any], rest: dict[str, Any], key: str) -> bool:
    ours, theirs = group["ci95"].get(key), rest["ci95"].get(key)
    return bool(ours and theirs and all(map(math.isfinite, [*ours, *theirs])) and ours[1] < theirs[0])


def subgroup_report(probs: np.ndarray, labels: Sequence[int], subjects: Sequence[str],
                    groupings: dict[str, Sequence[str | None]], normal: int, *, resamples: int = 200,
                    seed: int = 0) -> dict[str, Any]:
    """Per grouping, per value: n, subjects, Score / AUROC with CIs, the rest's, and a judgement.

    Returns {"groupings": {name: {"unknown": n, "groups": {value: {...}}}}, "warnings": [...], "notes": [...],
    "min_subjects", "min_items", "bootstrap", "bootstrap_seed"}.
    """
    probs = np.asarray(probs, dtype=np.float64)  # [N, K]
    y = np.asarray(labels, dtype=int)
    who = np.asarray([str(s) for s in subjects])
    out: dict[str, Any] = {"groupings": {}, "warnings": [], "notes": [], "min_subjects": MIN_SUBJECTS,
                           "min_items": MIN_ITEMS, "bootstrap": int(resamples), "bootstrap_seed": int(seed),
                           "metrics": list(METRICS)}
    for name, values in groupings.items():
        vals = np.asarray([None if v is None else str(v) for v in values], dtype=object)
        known = np.asarray([v is not None for v in vals])
        groups: dict[str, Any] = {}
        for value in sorted({v for v in vals if v is not None}):
            inside = vals == value
            rest = known & ~inside
            block = _block(probs[inside], y[inside], who[inside], normal, resamples, seed)
            block["rest"] = _block(probs[rest], y[rest], who[rest], normal, resamples, seed)
            small = block["subjects"] < MIN_SUBJECTS or block["n"] < MIN_ITEMS
            block["judgement"] = "too small to judge" if small else "ok"
            if small:
                out["notes"].append(f"{name} = {value}: {block['n']} segment(s) of {block['subjects']} subject(s), "
                                    f"too small to judge (fewer than {MIN_SUBJECTS} subjects or {MIN_ITEMS} segments)")
            else:
                lower = [key for key in METRICS if _below(block, block["rest"], key)]
                if lower:
                    block["judgement"] = "below the rest"
                    out["warnings"].append(
                        f"{name} = {value}: the 95 % CI of {' and '.join(_NAMES[k] for k in lower)} lies entirely below "
                        f"the rest's ({block['n']} segments, {block['subjects']} subjects); the model does worse here")
            groups[value] = block
        out["groupings"][name] = {"unknown": int((~known).sum()), "groups": groups}
    return out
