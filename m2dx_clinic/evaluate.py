"""Scoring a trained classifier on labelled data from where it will be used: the library behind `m2dx evaluate`.

External validation (TRIPOD+AI): before anyone relies on a classifier, it is scored on labelled
recordings of the site, devices and patients it will meet (docs/METHOD.md, "Evaluating a classifier").
Nothing is trained or chosen here: the classifier's own front-end, segment rule, temperature and
operating point are applied unchanged (the operating point this data would have chosen is shown
beside it, marked as not for use). The data is any labelled task `m2dx finetune` reads, and
`split` picks which part (`all` for another site's data; `test` reproduces the run's own test
result exactly).

Files (atomic): predictions.csv (one row per segment: truth, every probability, P(abnormal), the
decision, the subgroup values), metrics.json (clinical metrics with subject-bootstrap CIs, chance on
this data, calibration, subgroups, the classifier's original test result and the difference),
confusion_matrix.png, roc_pr.png, reliability.png, EVALUATION_CARD.md and evaluation_card.html.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd
import torch

from ._version import __version__
from .data.groupings import item_groupings
from .data.segment_cache import prepare_segments, readable_rows
from .data.tasks import load_task
from .errors import ConfigError, DataError
from .evaluation.baseline import chance_references
from .evaluation.calibration import apply_temperature, calibration_block, shipped_report
from .evaluation.checks import operating_point_warnings
from .evaluation.clinical import choose_operating_point, clinical_report, p_abnormal
from .evaluation.plots import plot_calibration, plot_confusion, plot_roc_pr
from .evaluation.subgroups import subgroup_report
from .evaluation_card import write_evaluation_card
from .fileio import atomic_write_csv, atomic_write_json, to_jsonable
from .inference import ModelSet, load_model_set, mean_probabilities
from .models.cpu_kernels import use_fast_cpu_kernels
from .progress import console
from .rundir import hold
from .runtime import pick_device

SPLIT_CHOICES = ("all", "train", "val", "test")
COMPARED = ("sp", "se", "score", "accuracy", "auroc_abnormal", "op_sensitivity", "op_specificity")


@dataclass
class EvaluateResult:
    out_dir: Path
    metrics: dict[str, Any]
    predictions: pd.DataFrame


def _recipe_value(meta: dict[str, Any], section: str, key: str, default: Any) -> Any:
    value = ((meta.get("recipe") or {}).get(section) or {}).get(key)
    return default if value is None else value


def class_labels(data_classes: Sequence[str], model_classes: Sequence[str], source: str) -> list[int]:
    """The classifier's index of each of the data's classes; a class it does not know is one clear line."""
    unknown = [c for c in data_classes if c not in model_classes]
    if unknown:
        raise DataError(f"{source}: the data's classes ({', '.join(data_classes)}) do not match the classifier's "
                        f"({', '.join(model_classes)}): {', '.join(unknown)} unknown to it; relabel the data with "
                        "the classifier's class names, or evaluate a classifier trained on these classes")
    return [list(model_classes).index(c) for c in data_classes]


def original_result(models: ModelSet) -> dict[str, Any] | None:
    """The classifier's own test result: a run folder's ensemble (metrics.json) or the file's stored test scores."""
    if Path(models.source).is_dir():  # a run folder, all its repeats: the block its card reports
        try:
            block = json.loads((Path(models.source) / "metrics.json").read_text(encoding="utf-8"))["ensemble"]["test"]
        except (OSError, ValueError, KeyError, TypeError):
            return None
        return {"source": "the run's test split (its repeats averaged, as here)", "values": block.get("values") or {},
                "ci95": block.get("ci95") or {}, "n": block.get("n"), "subjects": block.get("subjects")}
    scores = ((models.first.meta.get("scores") or {}).get("test")) or None
    if not scores:
        return None
    return {"source": "the classifier file's test scores (no confidence intervals stored)",
            "values": {k: v for k, v in scores.items() if isinstance(v, (int, float))}, "ci95": {}}


def compare(original: dict[str, Any] | None, here: dict[str, Any]) -> list[dict[str, Any]]:
    """Per metric: the original and this data's value, the difference, and whether the 95 % CIs overlap (None: unknown)."""
    if not original:
        return []
    rows = []
    for key in COMPARED:
        before, after = original["values"].get(key), here["values"].get(key)
        if not all(isinstance(v, (int, float)) and math.isfinite(v) for v in (before, after)):
            continue
        ci_before, ci_after = (original.get("ci95") or {}).get(key), (here.get("ci95") or {}).get(key)
        known = all(ci and all(isinstance(v, (int, float)) and math.isfinite(v) for v in ci)
                    for ci in (ci_before, ci_after))
        overlap = bool(ci_before[0] <= ci_after[1] and ci_after[0] <= ci_before[1]) if known else None
        rows.append({"metric": key, "original": float(before), "here": float(after),
                     "difference": float(after) - float(before), "original_ci95": ci_before if known else None,
                     "here_ci95": ci_after if known else None, "cis_overlap": overlap})
    return rows


def _chance(meta: dict[str, Any], classes: list[str], labels: list[int], normal: int) -> dict[str, Any] | None:
    """Always-normal and guessing with the classifier's TRAINING class frequencies, on this data."""
    counts = (((meta.get("data") or {}).get("counts") or {}).get("train")) or {}
    train = [c for c, name in enumerate(classes) for _ in range(int(counts.get(name, 0)))]
    if not train or not labels:
        return None
    return chance_references(train, labels, num_classes=len(classes), normal=normal)


def evaluate_classifier(
    model: str | Path,
    *,
    task: str,
    data: str | Path,
    out: str | Path,
    split: str = "all",
    subgroups: Sequence[str] = (),
    repeat: int | None = None,
    candidate: str | None = None,
    batch_size: int = 32,
    device: str = "auto",
    bootstrap: int | None = None,
    progress: bool = True,
) -> EvaluateResult:
    """Score `model` on the labelled `task`/`data` (`split`: all | train | val | test) and write `out`."""
    if split not in SPLIT_CHOICES:
        raise ConfigError(f"--split {split!r}: use one of {', '.join(SPLIT_CHOICES)}")
    if batch_size < 1:
        raise ConfigError(f"--batch-size must be >= 1, got {batch_size}")
    if bootstrap is not None and bootstrap < 0:
        raise ConfigError(f"--bootstrap must be >= 0, got {bootstrap}")
    if subgroups and task.strip().lower() != "csv":
        raise ConfigError("--subgroup names a column of a CSV manifest: use it with --task csv (device, chest "
                          "location, sex and age band of ICBHI recordings are found without it)")
    out_dir = Path(out).expanduser()
    if (out_dir / "metrics.json").exists():
        raise ConfigError(f"{out_dir}: already holds an evaluation; pick another --out")
    models = load_model_set(model, repeat=repeat, candidate=candidate)
    head = models.first
    meta, classes, normal = head.meta, head.classes, head.normal_index
    seed = int(_recipe_value(meta, "run", "seed", 0))
    resamples = int(bootstrap if bootstrap is not None else _recipe_value(meta, "run", "bootstrap", 200))
    td = load_task(task, data, normal_class=classes[normal], seed=seed,
                   val_fraction=float(_recipe_value(meta, "data", "val_fraction", 0.15)),
                   test_set=str(_recipe_value(meta, "data", "test_set", "inter")))
    index = class_labels(td.classes, classes, f"{task} ({data})")
    items = list(td.items) if split == "all" else td.split(split)
    if not items:
        raise DataError(f"{task} ({data}): the {split} split is empty; pick another --split (all uses every segment)")
    warnings: list[str] = []
    with hold(out_dir, "m2dx evaluate"):
        problems: list[str] = []
        lms = prepare_segments(items, frontend=head.frontend, length_s=head.segment_seconds, pad=head.pad,
                               cache_dir=None, problems=problems, remember=False, progress=progress,
                               description=f"prepare {split} segments")
        keep = readable_rows(lms).numpy()
        if not keep.any():
            raise DataError(f"{task} ({data}): no segment could be read ({problems[0] if problems else 'unknown'})")
        if not keep.all():
            warnings.append(f"{int((~keep).sum())} segment(s) could not be read and are not scored "
                            f"(first: {problems[0] if problems else 'unknown'})")
            items = [it for it, k in zip(items, keep) if k]
        dev = pick_device(device)
        use_fast_cpu_kernels([m.model for m in models.members], dev, None)
        rows = lms if keep.all() else lms[torch.from_numpy(keep)]
        raw = mean_probabilities([m.model for m in models.members], rows, device=dev, batch_size=batch_size)  # [N, K]
        result = _score(models, model, raw, items, index, td, split, resamples, seed, subgroups, data, task, warnings)
        result["metrics"]["environment"] = {"device": str(dev), "package_version": __version__}
        _write(out_dir, result, classes, normal, progress)
    return EvaluateResult(out_dir, result["metrics"], result["predictions"])


def _score(models: ModelSet, model: str | Path, raw: np.ndarray, items: list, index: list[int], td: Any,
           split: str, resamples: int, seed: int, subgroups: Sequence[str], data: str | Path, task: str,
           warnings: list[str]) -> dict[str, Any]:
    """Every number of the evaluation from the probabilities; returns metrics and the predictions table."""
    head = models.first
    meta, classes, normal = head.meta, head.classes, head.normal_index
    temperature = models.temperature
    probs = apply_temperature(raw, float(temperature)) if temperature else raw  # [N, K]
    labels = [index[it.label] for it in items]
    subjects = [str(it.subject) for it in items]
    absent = [c for k, c in enumerate(classes) if k not in set(labels)]
    if absent:
        warnings.append(f"class(es) absent from this data: {', '.join(absent)}; their recall, precision and AUROC "
                        "cannot be judged here")
    point = models.operating_point
    threshold = point["threshold"] if point else None
    here = clinical_report(probs, labels, subjects, classes, normal, threshold, resamples=resamples, seed=seed)
    target = float(_recipe_value(meta, "run", "target_sensitivity", 0.0))
    would = choose_operating_point(probs, labels, normal, target_sensitivity=target)
    if would:
        would = {**would, "method": would["method"].replace("on validation", "on THIS data"),
                 "use": "NOT FOR USE: chosen on the data it is scored on, so optimistic; shown to see how far the "
                        "classifier's own operating point is from what this data would have chosen"}
    original = original_result(models)
    comparison = compare(original, here)
    warnings += [f"{row['metric']}: {100 * row['here']:.1f} % here against {100 * row['original']:.1f} % on the "
                 "classifier's own test split, and the 95 % CIs do not overlap: it does differently on this data"
                 for row in comparison if row["cis_overlap"] is False]
    groupings = item_groupings(items, manifest=Path(data).expanduser() if task.strip().lower() == "csv" else None,
                               columns=subgroups)
    groups = subgroup_report(probs, labels, subjects, groupings, normal, resamples=resamples, seed=seed)
    warnings += groups["warnings"] + operating_point_warnings(here["values"] if point else None)
    calibration = calibration_block(raw, labels, normal, temperature)
    decision = (f"P(abnormal) >= {threshold:.6g} (the classifier's operating point)" if threshold is not None
                else "the most probable class is not the normal class")
    frame = _predictions(items, labels, probs, classes, normal, threshold, groupings)
    counts = {name: int(labels.count(k)) for k, name in enumerate(classes)}
    metrics = {
        "kind": "evaluation", "model": str(model), "classifier_files": [str(m.path) for m in models.members],
        "ensemble": len(models.members) > 1, "task": task, "data": str(data), "split": split,
        "classes": classes, "normal_class": classes[normal], "normal_class_index": normal,
        "data_classes": list(td.classes), "counts": counts, "items": len(items), "subjects": len(set(subjects)),
        "segment": meta.get("segment"), "frontend": meta.get("frontend"),
        "decision_rule": decision, "operating_point": point, "operating_point_this_data": would,
        "result": here, "chance": _chance(meta, classes, labels, normal), "original": original,
        "comparison": comparison, "calibration": calibration, "subgroups": groups,
        "warnings": [*warnings], "notes": [*td.notes, *groups["notes"]], "data_warnings": list(td.warnings),
        "classifier": {"task": meta.get("task"), "data_sha256": (meta.get("data") or {}).get("sha256"),
                       "trained_counts": ((meta.get("data") or {}).get("counts") or {}).get("train"),
                       "selection": meta.get("selection"), "package_version": meta.get("package_version")},
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "metrics_note": "fractions in [0, 1]; recompute from predictions.csv (prob_* are the probabilities scored, "
                        "after the classifier's temperature when it has one)",
    }
    return {"metrics": metrics, "predictions": frame, "probs": probs, "labels": labels}


def _predictions(items: list, labels: list[int], probs: np.ndarray, classes: list[str], normal: int,
                 threshold: float | None, groupings: dict[str, list[Any]]) -> pd.DataFrame:
    """predictions.csv: one row per segment scored, with the probabilities, the decision and the subgroups."""
    pred = probs.argmax(axis=1)
    frame = pd.DataFrame({
        "item_id": [it.item_id for it in items], "recording": [it.recording for it in items],
        "subject": [str(it.subject) for it in items],
        "split": [it.split for it in items], "true_index": labels, "true_label": [classes[k] for k in labels],
        "pred_index": pred, "pred_label": [classes[k] for k in pred]})
    for k, name in enumerate(classes):
        frame[f"prob_{name}"] = probs[:, k]
    frame["p_abnormal"] = p_abnormal(probs, normal)
    frame["abnormal"] = frame["p_abnormal"] >= threshold if threshold is not None else pred != normal
    for name, values in groupings.items():
        frame[f"group_{name}"] = values
    return frame


def _write(out_dir: Path, result: dict[str, Any], classes: list[str], normal: int, progress: bool) -> None:
    from sklearn.metrics import confusion_matrix

    metrics, frame, probs, labels = result["metrics"], result["predictions"], result["probs"], result["labels"]
    atomic_write_csv(out_dir / "predictions.csv", frame)
    truth = np.asarray(labels) != normal
    cm = confusion_matrix(labels, probs.argmax(axis=1), labels=list(range(len(classes))))
    plot_confusion(cm, classes, f"{metrics['task']}, {metrics['split']} ({len(labels)} segments)",
                   out_dir / "confusion_matrix.png")
    plot_roc_pr([{"label": "classifier", "truth": truth, "score": p_abnormal(probs, normal)}], out_dir / "roc_pr.png",
                title=f"{metrics['split']} of this data", operating_point=metrics["operating_point"])
    calib = metrics["calibration"]
    shown = shipped_report(calib)
    plot_calibration(calib, out_dir / "reliability.png", title="this data")
    atomic_write_json(out_dir / "metrics.json", to_jsonable(metrics), end="")
    write_evaluation_card(out_dir, metrics)
    if progress:
        values, ci = metrics["result"]["values"], metrics["result"]["ci95"]

        def pct(key: str) -> str:
            v = values.get(key)
            text = f"{100 * v:.1f}" if isinstance(v, float) and math.isfinite(v) else "-"
            c = ci.get(key)
            return text + (f" ({100 * c[0]:.1f}-{100 * c[1]:.1f})" if c and all(map(math.isfinite, c)) else "")

        console.print(f"{metrics['items']} segments of {metrics['subjects']} subjects: Score {pct('score')} %, "
                      f"AUROC {pct('auroc_abnormal')} %, ECE {100 * shown['ece']:.1f} %, Brier {shown['brier']:.3f}")
        for line in metrics["warnings"]:
            console.print(f"[yellow]warning: {line}[/]")
        console.print(f"[green]wrote[/] {out_dir / 'evaluation_card.html'}")
