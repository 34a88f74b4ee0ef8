"""Figures of a fine-tuning run or an evaluation: confusion matrix, learning curves, ROC and precision-recall
curves, reliability diagrams.

Pyplot-free matplotlib Figures (no global backend switch, no pyplot state in a training or tuning
process), written atomically as PNG at a size that reads at 100 % zoom.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd

from ..fileio import atomic_savefig


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


def plot_roc_pr(curves: Sequence[dict[str, Any]], path: Path, *, title: str,
                operating_point: dict[str, Any] | None = None) -> None:
    """ROC (left) and precision-recall (right) curves of normal-vs-abnormal, one line per model.

    Each curve: {"label", "truth" (bool [N], True = abnormal), "score" (P(abnormal) [N])}. The
    operating point (a threshold on the first curve's score) is marked on both panels; the
    diagonal and the prevalence line are chance.
    """
    from matplotlib.figure import Figure
    from sklearn.metrics import auc, precision_recall_curve, roc_curve

    fig = Figure(figsize=(11, 4.6), layout="constrained")
    ax_roc, ax_pr = fig.subplots(1, 2)
    prevalence = None
    for i, curve in enumerate(curves):
        truth, score = np.asarray(curve["truth"], dtype=bool), np.asarray(curve["score"], dtype=np.float64)
        if truth.all() or not truth.any():
            continue
        fpr, tpr, _ = roc_curve(truth, score)
        precision, recall, _ = precision_recall_curve(truth, score)
        style = "-" if i == 0 else "--"
        ax_roc.plot(fpr, tpr, style, label=f"{curve['label']} (AUROC {auc(fpr, tpr):.3f})")
        ax_pr.plot(recall, precision, style, label=curve["label"])
        prevalence = float(truth.mean())
        if i == 0 and operating_point is not None:
            flagged = score >= operating_point["threshold"]
            se = float((flagged & truth).sum() / truth.sum())
            sp = float((~flagged & ~truth).sum() / (~truth).sum())
            ppv = float((flagged & truth).sum() / flagged.sum()) if flagged.any() else float("nan")
            ax_roc.plot([1 - sp], [se], "ko", label=f"operating point (threshold {operating_point['threshold']:.3f})")
            ax_pr.plot([se], [ppv], "ko", label="operating point")
    ax_roc.plot([0, 1], [0, 1], ":", color="grey", label="chance")
    if prevalence is not None:
        ax_pr.axhline(prevalence, linestyle=":", color="grey", label=f"chance (prevalence {prevalence:.2f})")
    ax_roc.set_xlabel("1 - specificity (false-positive rate)")
    ax_roc.set_ylabel("sensitivity")
    ax_roc.set_title(f"ROC, abnormal vs normal: {title}", fontsize=9)
    ax_pr.set_xlabel("sensitivity (recall)")
    ax_pr.set_ylabel("PPV (precision)")
    ax_pr.set_title(f"Precision-recall, abnormal vs normal: {title}", fontsize=9)
    for ax in (ax_roc, ax_pr):
        ax.set_xlim(-0.02, 1.02)
        ax.set_ylim(-0.02, 1.05)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="lower right" if ax is ax_roc else "lower left")
    atomic_savefig(fig, path, format="png", dpi=110)


def plot_reliability(panels: Sequence[dict[str, Any]], path: Path, *, title: str) -> None:
    """Reliability diagrams: observed frequency against mean predicted probability per bin, one panel each.

    Each panel: {"label", "table" (the bins of `calibration.calibration_report`), "ece", "xlabel"}; bar
    widths are the bins, the diagonal is perfect calibration, the counts per bin are written on the bars.
    """
    from matplotlib.figure import Figure

    columns = min(max(len(panels), 1), 2)
    rows = (max(len(panels), 1) + columns - 1) // columns
    fig = Figure(figsize=(6.2 * columns, 4.8 * rows), layout="constrained")
    axes = fig.subplots(rows, columns, squeeze=False).ravel()
    for ax, panel in zip(axes, panels):
        for row in panel["table"]:
            if not row["n"]:
                continue
            ax.bar(row["lo"], row["observed"], width=row["hi"] - row["lo"], align="edge", alpha=0.6,
                   edgecolor="black", color="tab:blue")
            ax.plot([row["confidence"]], [row["observed"]], "k.")
            ax.text((row["lo"] + row["hi"]) / 2, min(row["observed"] + 0.02, 0.97), str(row["n"]), ha="center",
                    fontsize=7)
        ax.plot([0, 1], [0, 1], ":", color="grey", label="perfect calibration")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1.02)
        ax.set_xlabel(panel.get("xlabel", "mean predicted probability in the bin"))
        ax.set_ylabel("observed frequency")
        ax.set_title(f"{panel['label']}: ECE {100 * panel['ece']:.1f} % ({len(panel['table'])} bins); {title}",
                     fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="upper left")
    atomic_savefig(fig, path, format="png", dpi=110)


def plot_calibration(block: dict[str, Any], path: Path, *, title: str) -> None:
    """reliability.png of one scored split (`calibration.calibration_block`): the most probable class and
    P(abnormal), before and after temperature scaling when there is a temperature."""
    panels = []
    for key, when in (("before_scaling", "before scaling"), ("after_scaling", f"after T = {block.get('temperature', 0):.2f}"),
                      ("uncalibrated", "")):
        report = block.get(key)
        if not report:
            continue
        suffix = f" ({when})" if when else ""
        panels += [{"label": f"most probable class{suffix}", "table": report["reliability"], "ece": report["ece"],
                    "xlabel": "highest class probability (mean in bin)"},
                   {"label": f"P(abnormal){suffix}", "table": report["reliability_abnormal"],
                    "ece": report["ece_abnormal"], "xlabel": "P(abnormal) (mean in bin)"}]
    plot_reliability(panels, path, title=title)
