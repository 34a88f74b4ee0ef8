"""What a fine-tuning run writes, and how it is judged: predictions, metrics with a baseline, classifier files.

Files (each written atomically): `epochs.csv` (during the run), `predictions.csv` (one row per scored
segment of each repeat's selected model, every class probability), `metrics.json`, the confusion
matrix, learning curves, ROC / precision-recall curves, `classifiers/<folder>/repeat-<k>.pt` (one
classifier file per repeat), `best.pt` (the selected repeat's file), `MODEL_CARD.md` and
`model_card.html`. Every number in `metrics.json` can be recomputed from `predictions.csv`; the
tests do exactly that.

Judging (`evaluate_run`): the repeats' probabilities averaged (the ensemble `m2dx predict` applies
by default), temperature-scaled when validation allows (`evaluation.calibration`; ECE / Brier before
and after in `calibration`, reliability.png), with clinical metrics, 95 % CIs by a bootstrap over subjects, an operating point chosen
on validation, the log-mel statistics + logistic regression baseline on the same segments, the
chance references, and the warnings a reviewer would raise.
"""

from __future__ import annotations

import copy
import datetime as _dt
import math
import shlex
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd

from ._version import __version__
from .checkpoint.classifier import classifier_folder_name, save_classifier
from .config import to_dict
from .data.segments import Segment
from .evaluation.baseline import chance_references, fit_baseline
from .data.groupings import item_groupings
from .evaluation.checks import result_warnings, summary_value
from .evaluation.subgroups import subgroup_report
from .evaluation.clinical import choose_operating_point, clinical_report, p_abnormal
from .evaluation.calibration import apply_temperature, calibration_block, fit_temperature
from .evaluation.plots import plot_calibration, plot_confusion, plot_learning_curves, plot_roc_pr
from .finetune_run import FinetuneRun, RepeatOutcome
from .fileio import atomic_link_or_copy, atomic_write_csv, atomic_write_json, to_jsonable
from .evaluation.ood import profile_of
from .metrics import aggregate_runs, official_block
from .model_card import write_model_card
from .progress import console, environment_facts
from .provenance import Provenance
from .recipes import selection_label

SCORE_KEYS = ("sp", "se", "score", "accuracy")
METHOD_WORDS = {  # what the run's classifier is, in the words metrics.json and the model card use
    "full": "the whole pre-trained encoder fine-tuned with a linear head",
    "linear": "linear evaluation: the frozen pre-trained encoder's clip embedding -> standardise -> logistic "
              "regression (C chosen on validation)",
    "baseline": "per-band log-mel mean / std / delta std -> standardise -> logistic regression (no encoder; "
                "C chosen on validation)",
}
CLASSIFIERS_DIR = "classifiers"
SELECTED_CLASSIFIER = "best.pt"


@dataclass
class FinetuneResult:
    run_dir: Path
    runs: list[dict[str, Any]]  # per repeat: selected epoch, val metrics, test metrics (None when not scored)
    aggregate: dict[str, Any]  # mean / std / 95% CI over repeats (test metrics, or val when test not scored)
    selection: str
    aggregate_split: str = "test"  # which split `aggregate` summarises ("test" or "val")
    classes: list[str] = field(default_factory=list)
    normal_class: str = ""
    warnings: list[str] = field(default_factory=list)
    evaluation: dict[str, Any] | None = None  # ensemble, baseline, chance (metrics.json); None in tuning trials


class EpochsLog:
    """epochs.csv, rewritten (atomically) after every epoch so a user can watch a long run."""

    def __init__(self, path: Path):
        self.path = path
        self.rows: list[dict[str, Any]] = []

    def append(self, row: dict[str, Any]) -> None:
        self.extend([row])

    def extend(self, rows: Sequence[dict[str, Any]]) -> None:
        self.rows.extend(rows)
        atomic_write_csv(self.path, pd.DataFrame(self.rows))


def _named_metrics(metrics: dict[str, Any] | None, classes: list[str]) -> dict[str, Any] | None:
    if metrics is None:
        return None
    out = dict(metrics)
    out["per_class_recall"] = {classes[int(c)]: v for c, v in metrics["per_class_recall"].items()}
    return out


def predictions_frame(outcomes: Sequence[RepeatOutcome], splits: dict[str, list[Segment]],
                      classes: list[str], selection: str) -> pd.DataFrame:
    """One row per scored item of each repeat's selected model (val rows, then test rows)."""
    frames = []
    label = selection_label(selection)
    for out in outcomes:
        for split, probs in (("val", out.val_probs), ("test", out.test_probs)):
            if probs is None or split not in splits:
                continue
            items = splits[split]
            pred = probs.argmax(dim=1).numpy()
            frame = pd.DataFrame({
                "repeat": out.repeat,
                "seed": out.seed,
                "epoch": out.selected_epoch,
                "split": split,
                "item_id": [it.item_id for it in items],
                "recording": [it.recording for it in items],
                "subject": [it.subject for it in items],
                "true_index": [it.label for it in items],
                "true_label": [classes[it.label] for it in items],
                "pred_index": pred,
                "pred_label": [classes[p] for p in pred],
            })
            for c, name in enumerate(classes):
                frame[f"prob_{name}"] = probs[:, c].numpy().astype(np.float64)
            frame["selection"] = label
            frames.append(frame)
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()




# ---------------------------------------------------------------------------- classifier files
def shippable_recipe(recipe: Any, provenance: Provenance) -> Any:
    """The resolved recipe as recipe.toml and classifier files carry it: no run folder (a re-run picks its
    own), and in clean provenance no path at all (the cache folder falls back to the default)."""
    out = copy.deepcopy(recipe)
    out.run.out = ""
    if provenance.mode == "clean":
        out.data.cache_dir = ""
    return out


def segment_rule(recipe: Any) -> dict[str, Any]:
    """How a recording becomes model input: segment length, padding, chunked or adjusted positions."""
    return {"seconds": recipe.data.cycle_seconds, "pad": recipe.data.pad,
            "positions": "adjusted" if recipe.model.adjust_pos else "chunked"}


def classifier_meta(run: FinetuneRun, outcome: RepeatOutcome) -> dict[str, Any]:
    """Everything a classifier file carries besides its weights (see `checkpoint.classifier`)."""
    prep, td = run.prepared, run.task_data
    recipe, encoder = prep.recipe, prep.encoder
    classes = list(prep.classes)
    point, calibration = None, None
    if outcome.val_probs is not None and len(prep.labels.get("val", [])):
        val = outcome.val_probs.numpy().astype(np.float64)  # [N, K]
        calibration = fit_temperature(val, prep.labels["val"])
        val = apply_temperature(val, calibration["temperature"]) if calibration else val
        point = choose_operating_point(val, prep.labels["val"], prep.normal_class,
                                       target_sensitivity=recipe.run.target_sensitivity)
    prov = run.provenance
    data = {**td.fingerprint(run.splits), "task": prov.name} if prov.mode == "clean" else td.fingerprint(run.splits)
    return prov.scrub(to_jsonable({
        "package_version": __version__,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "classes": classes,
        "normal_class": classes[prep.normal_class],
        "normal_class_index": prep.normal_class,
        "norm_stats": encoder.norm_stats.tolist(),
        "frontend": asdict(run.frontend),
        "segment": segment_rule(recipe),
        "vit_config": to_dict(encoder.config),
        "recipe": to_dict(shippable_recipe(recipe, prov)),
        "operating_point": point,
        "calibration": calibration,
        "data": data,
        "audio_profile": profile_of(run.splits["train"], prep.lms["train"], run.frontend.frames_per_second),
        "scores": {"val": _named_metrics(outcome.val, classes), "test": _named_metrics(outcome.test, classes)},
        "repeat": outcome.repeat,
        "seed": outcome.seed,
        "selected_epoch": outcome.selected_epoch,
        "selection": selection_label(recipe.run.selection),
        "task": prov.name,
        "task_kind": prov.task_kind,
        "base_checkpoint": prov.checkpoint,
        "command": prov.command,
        "provenance": prov.mode,
    }))


def save_repeat_classifier(run: FinetuneRun, outcome: RepeatOutcome, model: Any) -> Path:
    """`classifiers/<published-convention folder>/repeat-<k>.pt` for one repeat's selected model (a Classifier;
    a baseline's LogMelStatsClassifier goes to `classifiers/logmel-baseline/`, having no encoder); the outcome's
    extra metadata and tensors (a linear fit's standardisation and coefficients) go into the file too."""
    name = "logmel-baseline" if outcome.kind == "baseline" else classifier_folder_name(run.prepared.encoder.config)
    meta = {**classifier_meta(run, outcome), **run.provenance.scrub(to_jsonable(outcome.extra_meta or {}))}
    return save_classifier(model, meta, run.run_dir / CLASSIFIERS_DIR / name / f"repeat-{outcome.repeat}.pt",
                           epoch=outcome.selected_epoch, extra=outcome.extra_tensors)


REPEATS_DIR = "repeats"


def save_repeat_record(run_dir: Path, outcome: RepeatOutcome) -> Path:
    """`repeats/repeat-<k>.json`: what a finished repeat produced (scores, epochs, selected probabilities),
    so a resumed run keeps it instead of training it again. No item names: probabilities are in split order."""
    record = {
        "repeat": outcome.repeat, "seed": outcome.seed, "selected_epoch": outcome.selected_epoch,
        "val": outcome.val, "test": outcome.test, "epochs": outcome.epochs,
        "val_probs": None if outcome.val_probs is None else outcome.val_probs.double().tolist(),
        "test_probs": None if outcome.test_probs is None else outcome.test_probs.double().tolist(),
        "classifier": str(outcome.classifier.relative_to(run_dir)) if outcome.classifier else None,
    }
    return atomic_write_json(run_dir / REPEATS_DIR / f"repeat-{outcome.repeat}.json", to_jsonable(record))


def finished_repeats(run_dir: Path) -> dict[int, dict[str, Any]]:
    """The records `save_repeat_record` left in a run folder, by repeat (damaged ones are trained again)."""
    import json

    out = {}
    for path in sorted((run_dir / REPEATS_DIR).glob("repeat-*.json")):
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if record.get("classifier") and not (run_dir / record["classifier"]).is_file():
            continue
        out[int(record["repeat"])] = record
    return out


def resume_command(run: FinetuneRun) -> str:
    """The command that continues an interrupted run (for the user's console, so with its real paths)."""
    return shlex.join(["m2dx", "finetune", "--resume", str(run.run_dir), "--task", run.task, "--data", str(run.data),
                       "--checkpoint", run.checkpoint.given])


def outcome_fields(record: dict[str, Any], run_dir: Path) -> dict[str, Any]:
    """A finished repeat's record as the fields of the `RepeatOutcome` the loop would have returned."""
    import torch

    def probs(key: str) -> Any:
        return None if record.get(key) is None else torch.tensor(record[key], dtype=torch.float64).float()

    return {"repeat": int(record["repeat"]), "seed": int(record["seed"]),
            "selected_epoch": int(record["selected_epoch"]), "val": record.get("val"), "test": record.get("test"),
            "epochs": list(record.get("epochs") or []), "val_probs": probs("val_probs"),
            "test_probs": probs("test_probs"), "best_state": None,
            "classifier": run_dir / record["classifier"] if record.get("classifier") else None}


def _selected_repeat(outcomes: Sequence[RepeatOutcome], selection: str) -> int:
    """The repeat whose file becomes best.pt: best validation Score (test Score for test-best), else the first."""
    def key(o: RepeatOutcome) -> float:
        block = o.test if selection == "test-best" else o.val
        value = summary_value(block, "score")
        return -math.inf if value is None else value

    scored = [o for o in outcomes if key(o) > -math.inf]
    return max(scored, key=key).repeat if scored else outcomes[0].repeat


# ---------------------------------------------------------------------------- judging the run
def _ensemble(outcomes: Sequence[RepeatOutcome], split: str) -> np.ndarray | None:
    probs = [getattr(o, f"{split}_probs") for o in outcomes]
    if not probs or any(p is None for p in probs) or len(probs[0]) == 0:
        return None
    return np.mean([p.numpy().astype(np.float64) for p in probs], axis=0)


def evaluate_run(run: FinetuneRun, outcomes: Sequence[RepeatOutcome]) -> dict[str, Any]:
    """The ensemble's clinical metrics and operating point, the baseline, chance, and the warnings."""
    prep = run.prepared
    recipe, r = prep.recipe, prep.recipe.run
    classes, normal, labels = prep.classes, prep.normal_class, prep.labels
    groups = {split: [str(it.subject) for it in items] for split, items in run.splits.items()}
    raw = {split: p for split in ("val", "test") if (p := _ensemble(outcomes, split)) is not None}
    # temperature scaling fitted on the ensemble's validation probabilities; what predict and export apply
    temperature = fit_temperature(raw["val"], labels["val"]) if "val" in raw else None
    probs = {s: apply_temperature(p, temperature["temperature"]) for s, p in raw.items()} if temperature else raw

    def judged(split_probs: dict[str, np.ndarray]) -> dict[str, Any]:
        point = (choose_operating_point(split_probs["val"], labels["val"], normal, target_sensitivity=r.target_sensitivity)
                 if "val" in split_probs else None)
        threshold = point["threshold"] if point else None
        out: dict[str, Any] = {"operating_point": point}
        for split, p in split_probs.items():
            out[split] = clinical_report(p, labels[split], groups[split], classes, normal, threshold,
                                         resamples=r.bootstrap if split == "test" else 0, seed=r.seed)
        return out

    model = {"repeats": len(outcomes), "calibration": temperature, **judged(probs)}
    baseline = None
    if r.baseline:
        fitted = fit_baseline({s: prep.lms[s] for s in labels}, labels, num_classes=len(classes), normal=normal,
                              balanced=recipe.optim.class_weighting != "none", seed=r.seed)
        baseline = {"method": "per-band log-mel mean / std / delta std -> standardise -> logistic regression",
                    "C": fitted["C"], "val_grid": fitted["val_grid"], "features": fitted["features"],
                    **judged({s: p for s, p in fitted["probs"].items() if s in ("val", "test")})}
    eval_split = "test" if "test" in probs else "val"
    chance = chance_references(labels["train"], labels.get(eval_split, []), num_classes=len(classes), normal=normal)         if labels.get(eval_split) else None
    warnings = result_warnings(
        classes=classes, normal=normal,
        splits={s: (p, np.asarray(labels[s])) for s, p in probs.items()},
        model_val_score=summary_value((model.get("val") or {}).get("values"), "score"),
        baseline_val_score=summary_value(((baseline or {}).get("val") or {}).get("values"), "score"),
        chance=chance, test_score=summary_value((model.get("test") or {}).get("values"), "score"),
        baseline_test_score=summary_value(((baseline or {}).get("test") or {}).get("values"), "score"),
        test_operating=(model.get("test") or {}).get("values") if (model.get("operating_point") or None) else None)
    calibration = {split: calibration_block(p, labels[split], normal, temperature and temperature["temperature"])
                   for split, p in raw.items()}
    scored = "test" if "test" in probs else "val"
    subgroups = subgroup_report(probs[scored], labels[scored], groups[scored], item_groupings(run.splits[scored]),
                                normal, resamples=r.bootstrap, seed=r.seed) if scored in probs else None
    warnings += (subgroups or {}).get("warnings", [])
    return {"ensemble": model, "baseline": baseline, "chance": chance, "chance_split": eval_split,
            "calibration": calibration, "subgroups": subgroups, "warnings": warnings, "_probs": probs,
            "_baseline_probs": fitted["probs"] if baseline else None}


def comparison_table(evaluation: dict[str, Any], *, split: str, title: str) -> Any:
    """A rich table: the model (ensemble) next to the baseline and chance, in percent, with 95 % CIs."""
    from rich.table import Table

    table = Table(title=title)
    table.add_column("metric")
    table.add_column("model (95% CI)", justify="right")
    table.add_column("baseline (95% CI)", justify="right")
    table.add_column("always normal", justify="right")
    table.add_column("class prior", justify="right")
    model = (evaluation["ensemble"].get(split) or {})
    base = ((evaluation.get("baseline") or {}).get(split) or {})
    chance = evaluation.get("chance") or {}

    def cell(block: dict[str, Any], key: str) -> str:
        value = summary_value(block.get("values"), key)
        if value is None:
            return "-"
        ci = (block.get("ci95") or {}).get(key)
        interval = f" ({100 * ci[0]:.1f}-{100 * ci[1]:.1f})" if ci and all(map(math.isfinite, ci)) else ""
        return f"{100 * value:.1f}{interval}"

    rows = [("Sp", "sp"), ("Se", "se"), ("Score", "score"), ("accuracy", "accuracy"),
            ("AUROC abnormal", "auroc_abnormal"), ("Se at op. point", "op_sensitivity"),
            ("Sp at op. point", "op_specificity"), ("PPV at op. point", "op_ppv"), ("NPV at op. point", "op_npv")]
    for name, key in rows:
        chance_cells = [f"{100 * v:.1f}" if (v := summary_value(chance.get(which), key)) is not None else "-"
                        for which in ("always_normal", "class_prior")]
        table.add_row(name, cell(model, key), cell(base, key), *chance_cells)
    return table


def summary_table(aggregate: dict[str, Any], *, title: str) -> Any:
    """A rich table: Sp / Se / Score / accuracy in %, mean ± 95 % CI, std and n over repeats."""
    from rich.table import Table

    table = Table(title=title)
    table.add_column("metric")
    table.add_column("mean ± 95% CI (%)", justify="right")
    table.add_column("std (%)", justify="right")
    table.add_column("runs", justify="right")
    names = {"sp": "Sp", "se": "Se", "score": "Score", "accuracy": "accuracy"}
    for key in SCORE_KEYS:
        stats = aggregate.get(key, {})
        mean, ci, std = stats.get("mean", math.nan), stats.get("ci95", math.nan), stats.get("std", math.nan)
        text = f"{100 * mean:.2f}" + (f" ± {100 * ci:.2f}" if math.isfinite(ci) else "")
        table.add_row(names[key], text, f"{100 * std:.2f}" if math.isfinite(std) else "-", str(stats.get("n", 0)))
    return table


# ---------------------------------------------------------------------------- all files of a run
def write_outputs(run: FinetuneRun, outcomes: Sequence[RepeatOutcome], *, progress: bool) -> FinetuneResult:
    """All files of a finished run, each written atomically; returns the result the caller reports."""
    prep, td, run_dir = run.prepared, run.task_data, run.run_dir
    recipe = prep.recipe
    label = selection_label(recipe.run.selection)
    scored_test = all(o.test is not None for o in outcomes)
    agg_split = "test" if scored_test else "val"
    per_split = [o.test if scored_test else o.val for o in outcomes]
    aggregate = aggregate_runs([m for m in per_split if m is not None], SCORE_KEYS)
    classes = list(td.classes)
    runs = [
        {
            "repeat": o.repeat,
            "seed": o.seed,
            "selected_epoch": o.selected_epoch,
            "val": _named_metrics(o.val, classes),
            "test": _named_metrics(o.test, classes),
        }
        for o in outcomes
    ]
    epochs_frame = pd.DataFrame([row for o in outcomes for row in o.epochs])
    atomic_write_csv(run_dir / "epochs.csv", epochs_frame)
    atomic_write_csv(run_dir / "predictions.csv", predictions_frame(outcomes, run.splits, classes, recipe.run.selection))
    evaluation = evaluate_run(run, outcomes) if run.score_test else None
    warnings = [*td.warnings, *(evaluation["warnings"] if evaluation else [])]
    metrics = {
        "task": td.name,
        "data": str(run.data),
        **run.checkpoint.record(),  # checkpoint (as given), checkpoint_resolved (the file), checkpoint_published
        "selection": label,
        "selection_mode": recipe.run.selection,
        "mode": recipe.run.mode,
        "method": METHOD_WORDS[recipe.run.mode],
        "test_scored": scored_test,
        "aggregate_split": agg_split,
        "classes": classes,
        "normal_class": classes[td.normal_class],
        "normal_class_index": td.normal_class,
        "items": {split: len(items) for split, items in run.splits.items()},
        "segment": segment_rule(recipe),
        "repeats": recipe.run.repeats,
        "runs": runs,
        "aggregate": aggregate,
        "notes": [*td.notes, *run.notes],
        "warnings": warnings,
        "device": str(prep.device),
        "amp": str(prep.amp_dtype) if prep.amp_dtype is not None else "off",
        "seconds": time.time() - run.started,
        "data_fingerprint": td.fingerprint(run.splits),
        "inputs": run.inputs,
        "package_version": __version__,
        "command": run.command,
        "provenance": run.provenance.as_dict(),
        "environment": environment_facts(),
        "metrics_note": "fractions in [0, 1]; recompute from predictions.csv (pred_index vs true_index per repeat and "
                        "split; the ensemble is the mean of the repeats' probabilities). prob_* are each repeat's own "
                        "probabilities BEFORE temperature scaling; the ensemble's scores, operating point and what "
                        "predict / evaluate / export ship are after ensemble.calibration.temperature when one was "
                        "fitted: softmax(log p / T) of the mean)",
    }
    if td.accounting is not None:
        metrics["data_accounting"] = td.accounting
    if td.official_metric:
        metrics["official"] = official_block(
            td.official_metric, prep.labels, [{"val": o.val_probs, "test": o.test_probs} for o in outcomes],
            normal_class=td.normal_class, num_classes=len(classes), aggregate_split=agg_split)
    if evaluation is not None:
        metrics.update({k: v for k, v in evaluation.items() if not k.startswith("_") and k != "warnings"})
        files = [o.classifier for o in outcomes if getattr(o, "classifier", None) is not None]
        if files:
            chosen = _selected_repeat(outcomes, recipe.run.selection)
            atomic_link_or_copy(next(f for o, f in zip(outcomes, files) if o.repeat == chosen), run_dir / SELECTED_CLASSIFIER)
            metrics["classifiers"] = {"files": [str(f.relative_to(run_dir)) for f in files], "selected_repeat": chosen,
                                      "selected": SELECTED_CLASSIFIER}
    atomic_write_json(run_dir / "metrics.json", metrics, end="")

    total_cm = sum(np.asarray((o.test if scored_test else o.val)["confusion_matrix"]) for o in outcomes)
    plot_confusion(total_cm, classes, f"{agg_split} split, summed over {len(outcomes)} repeat(s); selection: {label}",
                   run_dir / "confusion_matrix.png")
    plot_learning_curves(epochs_frame, label, run_dir / "learning_curves.png")
    if evaluation is not None:
        _plot_curves(run, evaluation)
        split = "test" if "test" in evaluation["calibration"] else "val"
        if split in evaluation["calibration"]:
            plot_calibration(evaluation["calibration"][split], run_dir / "reliability.png", title=f"{split} split")
        write_model_card(run_dir, metrics, run.task_data, run.splits)
    if progress:
        title = f"{td.name}: {agg_split} split over {len(outcomes)} run(s) — selection: {label}"
        console.print(summary_table(aggregate, title=title))
        if evaluation is not None:
            split = "test" if "test" in evaluation["ensemble"] else "val"
            console.print(comparison_table(evaluation, split=split, title=f"{split} split: the model ({len(outcomes)} "
                                           "repeat(s) averaged) next to the baseline and chance"))
        official = metrics.get("official")
        if official and official["aggregate"]["score"]["n"]:
            values = "  ".join(f"{k.upper()} {official['aggregate'][k]['mean'] * 100:.2f}" for k in ("se", "sp", "as", "hs", "score"))
            console.print(f"official {official['name']} scores ({agg_split}, mean of repeats): {values}")
        for line in (td.accounting or {}).get("summary", []):
            console.print(f"data: {line}")
        for line in warnings:
            console.print(f"[yellow]warning: {line}[/]")
        console.print(f"run folder: {run_dir}")
    return FinetuneResult(run_dir=run_dir, runs=runs, aggregate=aggregate, selection=label,
                          aggregate_split=agg_split, classes=classes, normal_class=classes[td.normal_class],
                          warnings=warnings, evaluation=metrics if evaluation is not None else None)


def _plot_curves(run: FinetuneRun, evaluation: dict[str, Any]) -> None:
    """roc_pr.png: normal-vs-abnormal ROC and precision-recall of the model and the baseline on the scored split."""
    prep = run.prepared
    split = "test" if "test" in evaluation["_probs"] else "val"
    if split not in evaluation["_probs"]:
        return
    truth = np.asarray(prep.labels[split]) != prep.normal_class
    curves = [{"label": "model", "truth": truth, "score": p_abnormal(evaluation["_probs"][split], prep.normal_class)}]
    if evaluation.get("_baseline_probs") and split in evaluation["_baseline_probs"]:
        curves.append({"label": "log-mel baseline", "truth": truth,
                       "score": p_abnormal(evaluation["_baseline_probs"][split], prep.normal_class)})
    plot_roc_pr(curves, run.run_dir / "roc_pr.png", title=f"{split} split",
                operating_point=evaluation["ensemble"].get("operating_point"))
