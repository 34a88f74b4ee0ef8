"""MODEL_CARD.md and model_card.html of a fine-tuning run: what the classifier is, and what it is not.

Written by every `m2dx finetune` (not by tuning trials) from the run's own metrics.json, so the card
never says anything the numbers do not. Sections: intended use and what it is not, the data, the
protocol, results next to the baseline and chance with 95 % CIs, warnings, limits, and how to
reproduce the run exactly.
"""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path
from typing import Any

from .data.inspection import inspect_task
from .data.segments import Segment
from .data.task_data import TaskData
from .document import Document, Table
from .fileio import atomic_write_text

MODEL_CARD_MD = "MODEL_CARD.md"
MODEL_CARD_HTML = "model_card.html"
_ROWS = [("Specificity (Sp)", "sp"), ("Sensitivity (Se, exact class)", "se"), ("ICBHI Score", "score"),
         ("accuracy", "accuracy"), ("AUROC, abnormal vs normal", "auroc_abnormal"),
         ("Se at the operating point", "op_sensitivity"), ("Sp at the operating point", "op_specificity"),
         ("PPV at the operating point", "op_ppv"), ("NPV at the operating point", "op_npv")]


def _pct(value: Any) -> str:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return "-"
    return f"{100 * number:.1f}" if math.isfinite(number) else "-"


def _with_ci(block: dict[str, Any] | None, key: str) -> str:
    if not block:
        return "-"
    text = _pct((block.get("values") or {}).get(key))
    ci = (block.get("ci95") or {}).get(key)
    if text != "-" and ci and all(isinstance(v, (int, float)) and math.isfinite(v) for v in ci):
        text += f" ({_pct(ci[0])}-{_pct(ci[1])})"
    return text


def _devices(items: list[Segment]) -> str:
    """ICBHI names carry the recording device as their last field; other corpora do not record it."""
    names = [it.recording for it in items if it.recording.count("_") >= 4]
    if not names or len(names) < len(items):
        return "not recorded in the data"
    counts = Counter(name.rsplit("_", 1)[-1] for name in names)
    return ", ".join(f"{device} ({n} segments)" for device, n in counts.most_common())


def build_model_card(metrics: dict[str, Any], task_data: TaskData, splits: dict[str, list[Segment]],
                     images: list[str]) -> Document:
    """The card as a Document (rendered to Markdown and HTML by the caller)."""
    classes, normal = metrics["classes"], metrics["normal_class"]
    split = "test" if metrics.get("test_scored") and (metrics.get("ensemble") or {}).get("test") else "val"
    ensemble, baseline = metrics.get("ensemble") or {}, metrics.get("baseline") or {}
    chance = metrics.get("chance") or {}
    info = inspect_task(task_data)
    fp = metrics.get("data_fingerprint") or {}
    doc = Document(f"Model card: {metrics['task']} classifier ({', '.join(classes)})")

    doc.heading("Intended use")
    doc.paragraph(f"Research and development of body-sound classifiers: this model sorts fixed-length segments "
                  f"of recordings into {len(classes)} classes ({', '.join(classes)}; '{normal}' is the normal "
                  "class). It is a tool for building and evaluating classifiers on a team's own data.")
    doc.paragraph("It is NOT a diagnostic device. It has not been cleared or approved by any regulator, it must not "
                  "be used to diagnose, triage or treat anyone, and its outputs are probabilities from a model "
                  f"trained on {sum(fp.get('items', {}).values()) or 'few'} segments, not clinical findings.")

    doc.heading("The data")
    counts = fp.get("counts") or {}
    header = ["split", *classes, "items", "subjects"]
    rows = [[name, *[str(counts[name].get(c, 0)) for c in classes], str(fp["items"][name]),
             str(fp["subjects"][name])] for name in ("train", "val", "test") if name in counts]
    doc.table(Table(header, rows))
    durations = info.get("durations_s") or {}
    rates = ", ".join(f"{rate} Hz ({n} files)" for rate, n in (info.get("sample_rates") or {}).items()) or "unknown"
    doc.bullets([
        f"task: {metrics['task']}, from {metrics['data']}; "
        + ("the published official split" if task_data.official_split else "a subject-disjoint split"),
        f"recordings: {info.get('recordings')}, subjects: {info.get('subjects')}",
        f"sample rates: {rates}; recording devices: {_devices([it for items in splits.values() for it in items])}",
        f"segment durations before fitting: mean {durations.get('mean')} s, min {durations.get('min')} s, "
        f"max {durations.get('max')} s",
        f"data fingerprint (sha256 of the items used): {fp.get('sha256', '-')}",
    ])

    doc.heading("Protocol")
    segment = metrics.get("segment") or {}
    doc.bullets([
        f"model selection: {metrics['selection']}",
        f"repeats: {metrics['repeats']} (different seeds; results below average their probabilities)",
        "validation carved subject-disjointly from the training split; the test split is scored once"
        if metrics.get("selection_mode") != "test-best" else
        "the epoch was chosen on the TEST split (literature protocol): the test scores are optimistic",
        *(f"{w}" for w in task_data.warnings if "subject" in w),
        f"each segment cut or padded to {segment.get('seconds', '?')} s ({segment.get('pad', '?')} padding, "
        f"{segment.get('positions', '?')} positions)",
        f"base checkpoint: {metrics['checkpoint']}",
    ])

    doc.heading(f"Results ({split} split)")
    point = ensemble.get("operating_point")
    doc.paragraph("Percent, with 95 % confidence intervals from a bootstrap over subjects "
                  f"({(ensemble.get(split) or {}).get('bootstrap', 0)} resamples). The baseline is log-mel "
                  "statistics + logistic regression fitted on the same segments; chance is always answering "
                  "'normal' or guessing with the training class frequencies.")
    table_rows = []
    for name, key in _ROWS:
        table_rows.append([name, _with_ci(ensemble.get(split), key), _with_ci(baseline.get(split), key),
                           _pct((chance.get("always_normal") or {}).get(key)),
                           _pct((chance.get("class_prior") or {}).get(key))])
    doc.table(Table(["metric", "model", "baseline", "always normal", "class prior"], table_rows))
    if point:
        doc.paragraph(f"Operating point: flag a segment abnormal when P(abnormal) >= {point['threshold']:.4f} "
                      f"({point['method']}; validation Se {_pct(point['val_sensitivity'])}, "
                      f"Sp {_pct(point['val_specificity'])}). `m2dx predict` applies it.")
    else:
        doc.paragraph("No operating point: the validation split lacks normal or abnormal items; `m2dx predict` "
                      "flags a segment abnormal when its most probable class is not the normal class.")
    per_class = (ensemble.get(split) or {}).get("values") or {}
    doc.table(Table(["class", "precision", "recall", "F1", "AUROC", "AP"],
                    [[c, *[_pct(per_class.get(f"{m}/{c}")) for m in ("precision", "recall", "f1", "auroc", "ap")]]
                     for c in classes]))
    for image, caption in (("roc_pr.png", "ROC and precision-recall, abnormal vs normal (model and baseline)"),
                           ("confusion_matrix.png", "confusion matrix, summed over repeats"),
                           ("learning_curves.png", "learning curves")):
        if image in images:
            doc.image(image, caption)

    doc.heading("Warnings")
    if metrics.get("warnings"):
        doc.warnings(metrics["warnings"])
    else:
        doc.paragraph("None.")

    doc.heading("Limits")
    doc.bullets([
        f"Trained on {fp.get('items', {}).get('train', '?')} segments of {fp.get('subjects', {}).get('train', '?')} "
        "subjects: performance on other devices, sites, populations or recording protocols is unknown.",
        "The confidence intervals reflect which subjects were sampled, not a shift in population or equipment.",
        "Segments are fixed-length windows or annotated cycles; on unannotated audio `m2dx predict` uses sliding "
        "windows, which the model was not scored on.",
        "Class imbalance: see the counts above; a class with few validation items is selected on noise.",
    ])

    doc.heading("Reproduce")
    doc.bullets([f"command: {metrics.get('command', '')}", "recipe: recipe.toml in this folder (pass it with --recipe)",
                 f"package: m2dx_clinic {metrics.get('package_version')}",
                 f"data fingerprint: {fp.get('sha256', '-')}",
                 f"classifier files: {', '.join((metrics.get('classifiers') or {}).get('files', [])) or '-'}"])
    return doc


def write_model_card(run_dir: Path, metrics: dict[str, Any], task_data: TaskData,
                     splits: dict[str, list[Segment]]) -> tuple[Path, Path]:
    """MODEL_CARD.md and model_card.html in `run_dir`, atomically; returns both paths."""
    images = [p.name for p in sorted(run_dir.glob("*.png"))]
    doc = build_model_card(metrics, task_data, splits, images)
    return (atomic_write_text(run_dir / MODEL_CARD_MD, doc.markdown()),
            atomic_write_text(run_dir / MODEL_CARD_HTML, doc.html()))
