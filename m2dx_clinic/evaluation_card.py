"""EVALUATION_CARD.md and evaluation_card.html: how a trained classifier does on someone else's labelled data.

Written by every `m2dx evaluate` from its own metrics.json, so the card never says anything the numbers
do not. Read top-down: the verdict in words (this data next to the classifier's original test result,
with whether the 95 % CIs overlap), the decision rule, the data, the results, the operating points,
calibration, subgroups, warnings. A shipped file: no paths, recordings or subject ids (`provenance.scrub`).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from .document import Document, Table
from .fileio import atomic_write_text
from .model_card import GLOSSARY, _ROWS, _pct, _with_ci, calibration_section, subgroups_section
from .provenance import INTERNAL_RECORDS, scrub

EVALUATION_CARD_MD = "EVALUATION_CARD.md"
EVALUATION_CARD_HTML = "evaluation_card.html"


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def _ci_text(values: dict[str, Any], ci: dict[str, Any], key: str) -> str:
    return _with_ci({"values": values, "ci95": ci}, key)


def verdict(metrics: dict[str, Any]) -> str:
    """One paragraph: this data's Score and AUROC next to the original test result and chance."""
    here = metrics["result"]
    score = (here.get("values") or {}).get("score")
    if not _finite(score):
        return "No Score could be computed on this data (it lacks normal or abnormal segments): see the warnings."
    text = (f"On this data ({metrics['items']} segments of {metrics['subjects']} subjects, split '{metrics['split']}'), "
            f"the classifier reaches ICBHI Score {_ci_text(here['values'], here['ci95'], 'score')} % and AUROC "
            f"{_ci_text(here['values'], here['ci95'], 'auroc_abnormal')} %.")
    row = next((r for r in metrics.get("comparison") or [] if r["metric"] == "score"), None)
    if row:
        text += f" Its original test Score was {_pct(row['original'])} % (difference {100 * row['difference']:+.1f} points"
        text += {True: "; the 95 % CIs overlap, so no shift is shown).", False: "; the 95 % CIs do NOT overlap: it does "
                 "differently here).", None: "; no CI for the original to compare)."}[row["cis_overlap"]]
    chance = [v.get("score") for v in (metrics.get("chance") or {}).values() if isinstance(v, dict)]
    level = max((c for c in chance if _finite(c)), default=None)
    if level is not None and score <= level + 1e-12:
        text += " Verdict: NOT USEFUL on this data: no better than chance."
    elif metrics.get("warnings"):
        text += " Read the warnings below before relying on it."
    return text + " It is NOT a diagnostic device."


def _results(doc: Document, metrics: dict[str, Any]) -> None:
    here, chance = metrics["result"], metrics.get("chance") or {}
    original = metrics.get("original") or {}
    compared = {r["metric"]: r for r in metrics.get("comparison") or []}
    rows = []
    for name, key in _ROWS:
        row = compared.get(key)
        overlap = "-" if row is None else {True: "yes", False: "NO", None: "unknown"}[row["cis_overlap"]]
        rows.append([name, _with_ci(here, key), _with_ci(original, key) if original else "-",
                     f"{100 * row['difference']:+.1f}" if row else "-", overlap,
                     _pct((chance.get("always_normal") or {}).get(key)), _pct((chance.get("class_prior") or {}).get(key))])
    doc.table(Table(["metric", "this data", "original test", "difference", "CIs overlap", "always normal",
                     "class prior"], rows))
    doc.paragraph(f"Percent; 95 % CIs from {here.get('bootstrap', 0)} bootstrap resamples over subjects. "
                  f"Original: {original.get('source', 'not available')}. Chance is always answering 'normal' or "
                  "guessing with the classifier's training class frequencies, on this data.")
    per_class = here.get("values") or {}
    doc.table(Table(["class", "segments here", "precision", "recall", "F1", "AUROC", "AP"],
                    [[c, str(metrics["counts"].get(c, 0)),
                      *[_pct(per_class.get(f"{m}/{c}")) for m in ("precision", "recall", "f1", "auroc", "ap")]]
                     for c in metrics["classes"]]))


def build_evaluation_card(metrics: dict[str, Any], images: list[str]) -> Document:
    """The card as a Document; everything it names passes `provenance.scrub` (no paths, recordings, subjects)."""
    classifier = metrics.get("classifier") or {}
    name = scrub(str(classifier.get("task") or "classifier")) or "classifier"
    doc = Document(f"Evaluation card: {name} on {metrics['task']} data, split '{metrics['split']}'")
    doc.heading("Verdict")
    doc.paragraph(verdict(metrics))
    doc.heading("Decision rule")
    doc.paragraph(f"A segment is called abnormal when {metrics['decision_rule']}; the ensemble of "
                  f"{len(metrics['classifier_files'])} classifier file(s) was applied unchanged (its front-end, "
                  f"{(metrics.get('segment') or {}).get('seconds', '?')}-s segments with "
                  f"{(metrics.get('segment') or {}).get('pad', '?')} padding). The ICBHI Score, Se and Sp use the "
                  "most probable class (argmax), a secondary figure: it says which abnormal class, not whether to flag.")
    doc.heading("Glossary")
    doc.definitions(GLOSSARY)
    doc.heading("The data")
    doc.bullets([f"task: {metrics['task']}, split '{metrics['split']}': {metrics['items']} segments of "
                 f"{metrics['subjects']} subjects",
                 "segments per class: " + ", ".join(f"{c} {n}" for c, n in metrics["counts"].items()),
                 "the classifier was trained on: " + ", ".join(f"{c} {n}" for c, n in
                                                                 (classifier.get("trained_counts") or {}).items())])
    doc.heading("Results")
    _results(doc, metrics)
    for image, caption in (("roc_pr.png", "ROC and precision-recall, abnormal vs normal, with the operating point"),
                           ("confusion_matrix.png", "confusion matrix (most probable class)")):
        if image in images:
            doc.image(image, caption)
    doc.heading("Operating points")
    point, would = metrics.get("operating_point"), metrics.get("operating_point_this_data")
    lines = [f"used: P(abnormal) >= {point['threshold']:.4f} ({point['method']} of the classifier's own run)" if point
             else "used: none stored (a segment is abnormal when its most probable class is not normal)"]
    if would:
        lines.append(f"this data would have chosen P(abnormal) >= {would['threshold']:.4f} ({would['method']}; Se "
                     f"{_pct(would['val_sensitivity'])}, Sp {_pct(would['val_specificity'])}): {would['use']}")
    doc.bullets(lines)
    calibration_section(doc, metrics["calibration"], "this data", images)
    doc.heading("Subgroups")
    subgroups_section(doc, metrics.get("subgroups"))
    doc.heading("Warnings")
    warnings = [scrub(w) for w in metrics.get("warnings") or []]
    doc.warnings(warnings) if warnings else doc.paragraph("None.")
    doc.bullets([scrub(n) for n in metrics.get("notes") or []])
    doc.heading("Records")
    doc.paragraph(f"Every number is recomputed from predictions.csv; the internal records ({', '.join(INTERNAL_RECORDS)}) "
                  "name recordings and subjects and stay inside the team.")
    return doc


def write_evaluation_card(out_dir: Path, metrics: dict[str, Any]) -> tuple[Path, Path]:
    """EVALUATION_CARD.md and evaluation_card.html in `out_dir`, atomically."""
    images = [p.name for p in sorted(Path(out_dir).glob("*.png"))]
    doc = build_evaluation_card(metrics, images)
    return (atomic_write_text(Path(out_dir) / EVALUATION_CARD_MD, doc.markdown()),
            atomic_write_text(Path(out_dir) / EVALUATION_CARD_HTML, doc.html()))
