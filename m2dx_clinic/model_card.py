"""MODEL_CARD.md and model_card.html of a fine-tuning run: what the classifier is, and what it is not.

Written by every `m2dx finetune` (not by tuning trials) from the run's own metrics.json, so the card
never says anything the numbers do not. It reads top-down for a clinician: the verdict in words (next
to the baseline and chance), a glossary, then intended use and what it is not, the data, the
protocol, results with 95 % CIs, warnings, limits, and how to reproduce the run exactly. It is a
shipped file: it names data and checkpoints as `provenance` allows.
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
from .provenance import INTERNAL_RECORDS, scrub

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
    names = [Path(it.recording).stem for it in items if it.recording.count("_") >= 4]
    if not names or len(names) < len(items):
        return "not recorded in the data"
    counts = Counter(name.rsplit("_", 1)[-1] for name in names)
    return ", ".join(f"{device} ({n} segments)" for device, n in counts.most_common())


GLOSSARY = [
    ("Se (sensitivity)", "of the abnormal segments, the fraction the model calls abnormal (ICBHI: with the "
                         "exact abnormal class)."),
    ("Sp (specificity)", "of the normal segments, the fraction the model calls normal."),
    ("ICBHI Score", "the mean of Se and Sp; 50 % is what a model that always answers one way reaches."),
    ("AUROC", "the chance that a random abnormal segment gets a higher P(abnormal) than a random normal one "
              "(50 % = chance, 100 % = perfect ranking); it does not depend on a threshold."),
    ("AP (average precision)", "the area under the precision-recall curve; chance is the abnormal fraction."),
    ("operating point", "the P(abnormal) threshold above which a segment is flagged abnormal, chosen on the "
                        "validation split (never on the test split)."),
    ("PPV (positive predictive value)", "of the flagged segments, the fraction that really are abnormal; it "
                                        "depends on how common abnormal segments are."),
    ("NPV (negative predictive value)", "of the segments not flagged, the fraction that really are normal."),
    ("Youden J", "Se + Sp - 1 at a threshold; the default operating point maximises it on validation."),
    ("95 % CI", "the range the value would likely take on another sample of subjects like these."),
    ("ECE (expected calibration error)", "segments are binned by their predicted probability; per bin the gap "
                                         "between the mean probability and how often it came true, weighted by the "
                                         "bin's share of segments. 0 = the probabilities mean what they say."),
    ("Brier score", "the mean squared difference between the probabilities and the truth (1 for the true class, "
                    "0 for the others); 0 is perfect, lower is better."),
    ("temperature scaling", "one number T fitted on the validation split that softens (T > 1) or sharpens the "
                            "probabilities; it never changes which class is most probable."),
]


def _value(block: dict[str, Any] | None, key: str) -> float | None:
    try:
        value = float(((block or {}).get("values") or {}).get(key))
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def verdict(metrics: dict[str, Any], split: str) -> str:
    """One paragraph in words: the model's Score next to the baseline's and chance's, and what that means."""
    ensemble, baseline = metrics.get("ensemble") or {}, metrics.get("baseline") or {}
    chance = [v.get("score") for v in (metrics.get("chance") or {}).values() if isinstance(v, dict)]
    chance = [float(c) for c in chance if isinstance(c, (int, float)) and math.isfinite(c)]
    model = _value(ensemble.get(split), "score")
    base = _value(baseline.get(split), "score")
    level = max(chance) if chance else None
    if model is None:
        return f"No {split} Score could be computed: see the warnings below."
    where = "on the test split, scored once after the model was chosen" if split == "test" else \
        "on the validation split (no test split was scored), which also chose the model: optimistic"
    ci = ((ensemble.get(split) or {}).get("ci95") or {}).get("score")
    interval = (f" (95 % CI {_pct(ci[0])}-{_pct(ci[1])})"
                if ci and all(isinstance(v, (int, float)) and math.isfinite(v) for v in ci) else "")
    text = f"ICBHI Score {_pct(model)} %{interval} {where}"
    parts = []
    if base is not None:
        parts.append(f"the simple log-mel baseline reaches {_pct(base)} %")
    if level is not None:
        parts.append(f"chance {_pct(level)} %")
    if parts:
        text += "; " + " and ".join(parts)
    text += ". "
    if level is not None and model <= level + 1e-12:
        text += "Verdict: NOT USEFUL: the model is no better than chance on this data."
    elif base is not None and model <= base:  # a tie is no reason to ship the larger model
        text += "Verdict: NOT BETTER THAN THE BASELINE: a much simpler model does at least as well; do not use it."
    elif base is not None:
        text += "Verdict: better than the baseline and chance on this split; read the limits before relying on it."
    else:
        text += "Verdict: better than chance on this split; no baseline was fitted to compare against."
    auroc = _value(ensemble.get(split), "auroc_abnormal")
    if auroc is not None:
        text += f" Its AUROC (abnormal vs normal) is {_pct(auroc)} % (chance 50 %)."
    return text


def calibration_section(doc: Document, block: dict[str, Any] | None, where: str, images: list[str]) -> None:
    """ECE and Brier of one scored split, before and after temperature scaling, and the reliability diagram."""
    doc.heading(f"Calibration ({where})")
    if not block:
        doc.paragraph("Not measured.")
        return
    rows, shown = [], None
    for label, key in (("before temperature scaling", "before_scaling"), ("after temperature scaling", "after_scaling"),
                       ("no temperature scaling", "uncalibrated")):
        report = block.get(key)
        if report:
            shown = report
            rows.append([label, _pct(report["ece"]), f"{report['brier']:.4f}", _pct(report["ece_abnormal"]),
                         f"{report['brier_abnormal']:.4f}"])
    doc.table(Table(["probabilities", "ECE, top class (%)", "Brier", "ECE, P(abnormal) (%)", "Brier, P(abnormal)"], rows))
    temperature = block.get("temperature")
    doc.paragraph(f"ECE over {shown['bins']} {shown['binning']}; Brier 0 is perfect. "
                  + (f"Temperature T = {temperature:.3f}, fitted on the validation split, is applied by predict, "
                     "evaluate and export, and the operating point was chosen after it." if temperature else
                     "No temperature was fitted (too few validation items or one class); probabilities are as the "
                     "model gives them."))
    if "reliability.png" in images:
        doc.image("reliability.png", "reliability diagrams: observed frequency against predicted probability per bin "
                                     "(the diagonal is perfect calibration; numbers are segments per bin)")


def subgroups_section(doc: Document, groups: dict[str, Any] | None) -> None:
    """Per grouping a table: n, subjects, Score and AUROC with CIs, the rest's, and the judgement."""
    groups = groups or {}
    if not groups.get("groupings"):
        doc.paragraph("The data names no device, location, sex, age band or chosen manifest column: no subgroups.")
        return
    doc.paragraph(f"Each group is scored alone, its 95 % CI from {groups.get('bootstrap')} bootstrap resamples over "
                  "its own subjects, next to the rest of the data. A group with fewer than "
                  f"{groups.get('min_subjects')} subjects or {groups.get('min_items')} segments is too small to judge.")
    for name, grouping in groups["groupings"].items():
        rows, css = [], []
        for value, block in grouping["groups"].items():
            rest = block["rest"]
            rows.append([value, str(block["n"]), str(block["subjects"]), str(block["abnormal"]),
                         _with_ci(block, "score"), _with_ci(block, "auroc_abnormal"), _with_ci(rest, "score"),
                         _with_ci(rest, "auroc_abnormal"), block["judgement"]])
            css.append({"below the rest": "err", "too small to judge": "warn"}.get(block["judgement"], ""))
        unknown = f" ({grouping['unknown']} segments with no value are not scored)" if grouping["unknown"] else ""
        doc.heading(f"{name.replace('_', ' ')}{unknown}", 3)
        doc.table(Table([name.replace("_", " "), "segments", "subjects", "abnormal", "Score", "AUROC", "rest: Score",
                         "rest: AUROC", "judgement"], rows, row_classes=css))


def build_model_card(metrics: dict[str, Any], task_data: TaskData, splits: dict[str, list[Segment]],
                     images: list[str]) -> Document:
    """The card as a Document (rendered to Markdown and HTML by the caller).

    Read top-down: the verdict in words, the glossary, then intended use, data, protocol, results,
    warnings, limits and how to reproduce. Everything it names passes the run's provenance rule
    (`metrics["provenance"]`): no paths, recording names or subject ids in the default clean mode.
    """
    classes, normal = metrics["classes"], metrics["normal_class"]
    split = "test" if metrics.get("test_scored") and (metrics.get("ensemble") or {}).get("test") else "val"
    ensemble, baseline = metrics.get("ensemble") or {}, metrics.get("baseline") or {}
    chance = metrics.get("chance") or {}
    prov = metrics.get("provenance") or {}
    shipped = (lambda v: v) if prov.get("mode") == "full" else scrub
    info = inspect_task(task_data)
    fp = metrics.get("data_fingerprint") or {}
    items, subjects = fp.get("items") or {}, fp.get("subjects") or {}
    name = prov.get("name") or metrics["task"]
    doc = Document(f"Model card: {name} ({', '.join(classes)})")

    doc.heading("Verdict")
    doc.paragraph(verdict(metrics, split))
    if metrics.get("mode") in ("linear", "baseline"):
        doc.paragraph(f"What it is: {metrics.get('method')}.")
    doc.paragraph(f"It sorts fixed-length segments of body-sound recordings into {len(classes)} classes "
                  f"({', '.join(classes)}; '{normal}' is the normal class). It is NOT a diagnostic device.")

    doc.heading("Glossary")
    doc.definitions(GLOSSARY)

    doc.heading("Intended use")
    doc.paragraph("Research and development of body-sound classifiers: a tool for building and evaluating "
                  "classifiers on a team's own data.")
    doc.paragraph("It is NOT a diagnostic device. It has not been cleared or approved by any regulator, it must not "
                  "be used to diagnose, triage or treat anyone, and its outputs are probabilities from a model "
                  f"trained on {items.get('train', '?')} training segments of {subjects.get('train', '?')} "
                  "subjects, not clinical findings.")

    doc.heading("The data")
    counts = fp.get("counts") or {}
    header = ["split", *classes, "segments", "subjects"]
    rows = [[name_, *[str(counts[name_].get(c, 0)) for c in classes], str(items[name_]),
             str(subjects[name_])] for name_ in ("train", "val", "test") if name_ in counts]
    doc.table(Table(header, rows))
    durations = info.get("durations_s") or {}
    rates = ", ".join(f"{rate} Hz ({n} files)" for rate, n in (info.get("sample_rates") or {}).items()) or "unknown"
    doc.bullets([
        f"task: {prov.get('task_kind', metrics['task'])}, data: {prov.get('data') or shipped(metrics['data'])}; "
        + ("the published official split" if task_data.official_split else "a subject-disjoint split"),
        f"the whole data set: {info.get('recordings')} recordings of {info.get('subjects')} subjects "
        "(the table counts the segments this run used)",
        f"sample rates: {rates}; recording devices: {_devices([it for items_ in splits.values() for it in items_])}",
        f"segment durations before fitting: mean {durations.get('mean')} s, min {durations.get('min')} s, "
        f"max {durations.get('max')} s",
        f"data fingerprint (sha256 of the items used): {fp.get('sha256', '-')}",
    ])

    doc.heading("Protocol")
    segment = metrics.get("segment") or {}
    doc.bullets([
        f"model selection: {metrics['selection']}",
        f"repeats: {metrics['repeats']} (different seeds; results below average their probabilities, and "
        "`m2dx predict` and `m2dx export` of the run folder use the same average)",
        "validation carved subject-disjointly from the training split; the test split is scored once"
        if metrics.get("selection_mode") != "test-best" else
        "the epoch was chosen on the TEST split (literature protocol): the test scores are optimistic",
        *(shipped(w) for w in task_data.warnings if "subject" in w),
        f"each segment cut or padded to {segment.get('seconds', '?')} s ({segment.get('pad', '?')} padding, "
        f"{segment.get('positions', '?')} positions)",
        f"base checkpoint: {prov.get('checkpoint') or shipped(str(metrics['checkpoint']))}",
    ])

    doc.heading(f"Results ({split} split)")
    point = ensemble.get("operating_point")
    doc.paragraph("Percent, with 95 % confidence intervals from a bootstrap over subjects "
                  f"({(ensemble.get(split) or {}).get('bootstrap', 0)} resamples). The baseline is log-mel "
                  "statistics + logistic regression fitted on the same segments; chance is always answering "
                  "'normal' or guessing with the training class frequencies.")
    table_rows = []
    for row_name, key in _ROWS:
        table_rows.append([row_name, _with_ci(ensemble.get(split), key), _with_ci(baseline.get(split), key),
                           _pct((chance.get("always_normal") or {}).get(key)),
                           _pct((chance.get("class_prior") or {}).get(key))])
    doc.table(Table(["metric", "model", "baseline", "always normal", "class prior"], table_rows))
    if point:
        doc.paragraph(f"Operating point: flag a segment abnormal when P(abnormal) >= {point['threshold']:.4f} "
                      f"({point['method']}; validation Se {_pct(point['val_sensitivity'])}, "
                      f"Sp {_pct(point['val_specificity'])}). `m2dx predict`, `m2dx evaluate` and the exports apply "
                      "it: it is the decision rule. Sp, Se, the ICBHI Score and accuracy use the most probable class "
                      "(argmax), a secondary figure: which abnormal class, for comparison with the literature.")
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
    calibration_section(doc, (metrics.get("calibration") or {}).get(split), split, images)
    doc.heading(f"Subgroups ({split} split)")
    subgroups_section(doc, metrics.get("subgroups"))

    doc.heading("Warnings")
    if metrics.get("warnings"):
        doc.warnings([shipped(w) for w in metrics["warnings"]])
    else:
        doc.paragraph("None.")

    doc.heading("Limits")
    doc.bullets([
        f"Trained on {items.get('train', '?')} segments of {subjects.get('train', '?')} subjects: performance on "
        "other devices, sites, populations or recording protocols is unknown.",
        "The confidence intervals reflect which subjects were sampled, not a shift in population or equipment.",
        "Segments are fixed-length windows or annotated cycles; on unannotated audio `m2dx predict` uses sliding "
        "windows, which the model was not scored on.",
        "Class imbalance: see the counts above; a class with few validation items is selected on noise.",
    ])

    doc.heading("Reproduce")
    command = prov.get("command") or shipped(metrics.get("command", ""))
    bullets = [f"command: `{command}`"]
    bullets += [f"{key}: {meaning}" for key, meaning in (prov.get("placeholders") or {}).items()]
    bullets += [f"package: m2dx_clinic {metrics.get('package_version')}",
                f"data fingerprint: {fp.get('sha256', '-')}",
                f"classifier files: {', '.join((metrics.get('classifiers') or {}).get('files', [])) or '-'}",
                f"internal records ({', '.join(INTERNAL_RECORDS)}) name recordings and subjects so every number "
                "can be recomputed: they stay inside the team and are not part of what is handed on"]
    doc.bullets(bullets)
    return doc


def write_model_card(run_dir: Path, metrics: dict[str, Any], task_data: TaskData,
                     splits: dict[str, list[Segment]]) -> tuple[Path, Path]:
    """MODEL_CARD.md and model_card.html in `run_dir`, atomically; returns both paths."""
    images = [p.name for p in sorted(run_dir.glob("*.png"))]
    doc = build_model_card(metrics, task_data, splits, images)
    return (atomic_write_text(run_dir / MODEL_CARD_MD, doc.markdown()),
            atomic_write_text(run_dir / MODEL_CARD_HTML, doc.html()))

def calibration_cells(row: dict[str, Any]) -> tuple[str, str]:
    """(ECE in percent, Brier score) of a candidate's shipped probabilities on test (validation without a test
    split), '-' when not scored; the comparison card and its console table."""
    blocks = row.get("calibration") or {}
    block = blocks.get("test") or blocks.get("val") or {}
    ece, brier = block.get("ece"), block.get("brier")
    good = lambda v: isinstance(v, (int, float)) and math.isfinite(v)  # noqa: E731
    return (f"{100 * ece:.1f}" if good(ece) else "-", f"{brier:.3f}" if good(brier) else "-")


def write_comparison_card(run_dir: Path, metrics: dict[str, Any]) -> tuple[Path, Path]:
    """The card of `m2dx finetune --mode compare`: which candidate to use and why, in one sentence, then every
    candidate next to the others (validation, which chose, and test, scored once) and where each one's own card is."""
    # named as the candidates' own cards are (provenance: never the CSV's file name in clean mode)
    doc = Document(f"Model card: which classifier to use for {metrics.get('name') or metrics['task']} "
                   f"({', '.join(metrics['classes'])})")
    doc.heading("Recommendation")
    doc.paragraph(str(metrics["reason"]))
    doc.paragraph(f"{metrics['selected']} in this folder is that classifier ({metrics['recommended']}); "
                  "m2dx predict --model THIS_FOLDER applies it, --candidate picks another. It is NOT a diagnostic device.")
    doc.heading("Every candidate, on the same recordings")
    rows = []
    for kind, row in metrics["candidates"].items():
        rows.append([kind + (" (recommended)" if kind == metrics["recommended"] else ""), row["method"],
                     _with_ci(row.get("val"), "score"), _with_ci(row.get("val"), "auroc_abnormal"),
                     _with_ci(row.get("test"), "score"), _with_ci(row.get("test"), "auroc_abnormal"),
                     *calibration_cells(row), f"{row['seconds']:.0f}", f"{row['folder']}/{MODEL_CARD_MD}"])
    doc.table(Table(["candidate", "what it is", "validation Score (95 % CI)", "validation AUROC",
                     "test Score (95 % CI)", "test AUROC", "test ECE (%)", "test Brier", "seconds", "its own card"], rows,
                    row_classes=["rec" if r[0].endswith("(recommended)") else "" for r in rows], text_columns=(0, 1)))
    doc.paragraph(f"How the choice is made: {metrics['rule']}. Scores are percentages; the ICBHI Score is the mean "
                  "of sensitivity and specificity. ECE (10 equal-width bins) and Brier score are of the probabilities "
                  "each candidate ships, after its temperature scaling when one was fitted; lower is better calibrated, "
                  "and calibration does not choose.")
    chosen = metrics["recommended"]
    doc.heading(f"Warnings about the recommended classifier ({chosen})")
    warnings = [scrub(w) for w in metrics["candidates"][chosen].get("warnings") or []]
    doc.warnings(warnings) if warnings else doc.paragraph("None.")
    others = [kind for kind, row in metrics["candidates"].items() if kind != chosen and row.get("warnings")]
    if others:
        doc.paragraph("The other candidates' warnings are in their own cards: "
                      + ", ".join(f"{kind}/{MODEL_CARD_MD}" for kind in others) + ".")
    doc.heading("Glossary")
    doc.definitions(GLOSSARY)
    return (atomic_write_text(run_dir / MODEL_CARD_MD, doc.markdown()),
            atomic_write_text(run_dir / MODEL_CARD_HTML, doc.html()))
