"""What a fine-tuning run writes: epochs.csv, predictions.csv, metrics.json, plots and the classifier file.

Every number in `metrics.json` can be recomputed from `predictions.csv` (one row per scored segment
of each repeat's selected model, with every class probability); the tests do exactly that.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
import pandas as pd

from .config import to_dict
from .data.segments import Segment
from .fileio import atomic_savefig, atomic_torch_save, atomic_write_csv, atomic_write_json
from .metrics import aggregate_runs
from .progress import console, environment_facts
from .recipes import selection_label

if TYPE_CHECKING:  # the loop's records; only their attributes are used here
    from .finetune import FinetuneRun, RepeatOutcome

SCORE_KEYS = ("sp", "se", "score", "accuracy")


@dataclass
class FinetuneResult:
    run_dir: Path
    runs: list[dict[str, Any]]  # per repeat: selected epoch, val metrics, test metrics (None when not scored)
    aggregate: dict[str, Any]  # mean / std / 95% CI over repeats (test metrics, or val when test not scored)
    selection: str
    aggregate_split: str = "test"  # which split `aggregate` summarises ("test" or "val")
    classes: list[str] = field(default_factory=list)
    normal_class: str = ""




class EpochsLog:
    """epochs.csv, rewritten (atomically) after every epoch so a user can watch a long run."""

    def __init__(self, path: Path):
        self.path = path
        self.rows: list[dict[str, Any]] = []

    def append(self, row: dict[str, Any]) -> None:
        self.rows.append(row)
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


def plot_confusion(matrix: np.ndarray, classes: list[str], title: str, path: Path) -> None:
    from matplotlib.figure import Figure  # pyplot-free, as the report's plots: no global backend switch

    fig = Figure(figsize=(1.2 * len(classes) + 2.5, 1.2 * len(classes) + 2))
    ax = fig.subplots()
    ax.imshow(matrix, cmap="Blues")
    ax.set_xticks(range(len(classes)), classes, rotation=45, ha="right")
    ax.set_yticks(range(len(classes)), classes)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title(title, fontsize=9)
    peak = matrix.max() if matrix.size else 0
    for i in range(matrix.shape[0]):
        for j in range(matrix.shape[1]):
            ax.text(j, i, str(int(matrix[i, j])), ha="center", va="center",
                    color="white" if peak and matrix[i, j] > peak / 2 else "black")
    atomic_savefig(fig, path, format="png", dpi=120, bbox_inches="tight")


def plot_learning_curves(epochs: pd.DataFrame, title: str, path: Path) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4))
    ax_loss, ax_score = fig.subplots(1, 2)
    for repeat, rows in epochs.groupby("repeat"):
        ax_loss.plot(rows["epoch"], rows["train_loss"], marker=".", label=f"train (repeat {repeat})")
        if "val_loss" in rows:
            ax_loss.plot(rows["epoch"], rows["val_loss"], "--", marker=".", label=f"val (repeat {repeat})")
        if "val_score" in rows:
            ax_score.plot(rows["epoch"], 100 * rows["val_score"], marker=".", label=f"val Score (repeat {repeat})")
        if "test_score" in rows:
            ax_score.plot(rows["epoch"], 100 * rows["test_score"], ":", marker=".", label=f"test Score (repeat {repeat})")
        picked = rows[rows["selected"]]
        if len(picked) and "val_score" in rows:
            ax_score.axvline(int(picked["epoch"].iloc[0]), color="grey", lw=0.5)
    ax_loss.set_xlabel("epoch")
    ax_loss.set_ylabel("cross-entropy loss")
    ax_loss.set_title("loss")
    ax_score.set_xlabel("epoch")
    ax_score.set_ylabel("ICBHI Score (%)")
    ax_score.set_title(f"Score; selection: {title}", fontsize=9)
    for ax in (ax_loss, ax_score):
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    atomic_savefig(fig, path, format="png", dpi=120, bbox_inches="tight")


def summary_table(aggregate: dict[str, Any], *, title: str) -> Any:
    """A rich table: Sp / Se / Score / accuracy in %, mean ± 95 % CI, std and n."""
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


def write_outputs(run: "FinetuneRun", outcomes: Sequence["RepeatOutcome"], *, progress: bool) -> FinetuneResult:
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
    checkpoint_path = Path(str(run.checkpoint)).expanduser()
    metrics = {
        "task": td.name,
        "data": str(run.data),
        "checkpoint": str(run.checkpoint),
        "checkpoint_resolved": str(checkpoint_path.resolve()) if checkpoint_path.exists() else None,
        "selection": label,
        "selection_mode": recipe.run.selection,
        "test_scored": scored_test,
        "aggregate_split": agg_split,
        "classes": classes,
        "normal_class": classes[td.normal_class],
        "normal_class_index": td.normal_class,
        "items": {split: len(items) for split, items in run.splits.items()},
        "repeats": recipe.run.repeats,
        "runs": runs,
        "aggregate": aggregate,
        "notes": [*td.notes, *run.notes],
        "warnings": list(td.warnings),
        "device": str(prep.device),
        "amp": str(prep.amp_dtype) if prep.amp_dtype is not None else "off",
        "seconds": time.time() - run.started,
        "environment": environment_facts(),
        "metrics_note": "fractions in [0, 1]; recompute from predictions.csv (pred_index vs true_index per repeat and split)",
    }
    atomic_write_json(run_dir / "metrics.json", metrics, end="")

    total_cm = sum(np.asarray((o.test if scored_test else o.val)["confusion_matrix"]) for o in outcomes)
    plot_confusion(total_cm, classes, f"{agg_split} split, summed over {len(outcomes)} repeat(s); selection: {label}",
                   run_dir / "confusion_matrix.png")
    plot_learning_curves(epochs_frame, label, run_dir / "learning_curves.png")
    first = outcomes[0]
    encoder = prep.encoder
    atomic_torch_save(
        {
            "model": first.best_state,
            "classes": classes,
            "normal_class": td.normal_class,
            "norm_stats": encoder.norm_stats.tolist(),
            "vit_config": to_dict(encoder.config),
            "adjust_pos": recipe.model.adjust_pos,
            "epoch": first.selected_epoch,
            "selection": label,
            "checkpoint": str(run.checkpoint),
            "recipe": to_dict(recipe),
        },
        run_dir / "best.pt",
    )
    if progress:
        title = f"{td.name}: {agg_split} split over {len(outcomes)} run(s) — selection: {label}"
        console.print(summary_table(aggregate, title=title))
        console.print(f"run folder: {run_dir}")
    return FinetuneResult(run_dir=run_dir, runs=runs, aggregate=aggregate, selection=label,
                          aggregate_split=agg_split, classes=classes, normal_class=classes[td.normal_class])
