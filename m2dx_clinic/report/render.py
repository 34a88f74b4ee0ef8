"""Writing a report: the table (terminal, Markdown, HTML), the plots and report.json, each atomically.

Numbers in `report.json` are fractions as `metrics.icbhi_scores` returns them; the Markdown, HTML,
terminal table and plots show Sp / Se / Score in percent.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from ..document import Document, Table
from ..errors import one_line
from ..fileio import atomic_savefig, atomic_write_json, atomic_write_text
from ..progress import console
from .health import DRIFT_WARN_COS, RANK_COLLAPSE_DROP
from .runinfo import epoch_end_rows, finite


def _pct(value: Any) -> str:
    number = finite(value)
    return "-" if number is None else f"{number * 100:.1f}"


def _num(value: Any, fmt: str = ".4f") -> str:
    number = finite(value)
    return "-" if number is None else format(number, fmt)


def table_rows(report: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """Header and formatted cells shared by the Markdown, HTML and terminal tables."""
    rows = report.get("rows", [])
    has_probe = any(r.get("probe") for r in rows)
    has_ft = any(r.get("finetune") for r in rows)
    header = ["epoch", "checkpoint", "loss", "loss M2D", "loss offline", "lr", "RankMe", "EV-AUC", "drift cos"]
    if has_probe:
        header += ["probe Sp", "probe Se", "probe Score"]
    if has_ft:
        header += ["FT val Score", "FT test Sp", "FT test Se", "FT test Score"]
    header.append("status")
    chosen = (report.get("recommendation") or {}).get("epoch")
    out = []
    for r in rows:
        name = Path(str(r.get("checkpoint", ""))).name or str(r.get("checkpoint"))
        if r.get("source") in ("base", "teacher"):
            name = f"{r['source']}: {name}"
        cells = [str(r["epoch"]), name, _num(r.get("loss")), _num(r.get("loss_m2d")), _num(r.get("loss_offline")),
                 _num(r.get("lr"), ".2e"), _num(r.get("rankme"), ".2f"), _num(r.get("ev_auc"), ".3f"),
                 _num(r.get("drift_cos"), ".3f")]
        if has_probe:
            p = r.get("probe") or {}
            cells += [_pct(p.get("sp")), _pct(p.get("se")), _pct(p.get("score"))]
        if has_ft:
            f = r.get("finetune") or {}
            val, test = f.get("val") or {}, f.get("test") or {}
            cells += [_pct(val.get("score")), _pct(test.get("sp")), _pct(test.get("se")), _pct(test.get("score"))]
        if r.get("error"):
            status = "ERROR: " + str(r["error"])
        elif r.get("warnings"):
            status = "warning: " + "; ".join(r["warnings"])
        else:
            status = "ok"
        if chosen is not None and r["epoch"] == chosen and not r.get("error"):
            status = "RECOMMENDED; " + status
        cells.append(status)
        out.append(cells)
    return header, out


def render_report_table(report: dict[str, Any]):
    """A rich Table of the report (the recommended row in bold green, errors red, warnings yellow)."""
    from rich.table import Table

    rec = report.get("recommendation") or {}
    table = Table(title=f"checkpoint report: {report.get('run_dir', '')}",
                  caption=f"recommended: epoch {rec.get('epoch')} ({rec.get('reason', '')})"
                  if rec.get("epoch") is not None else "no recommendation")
    header, rows = table_rows(report)
    for name in header:
        table.add_column(name, overflow="fold", justify="left" if name in ("checkpoint", "status") else "right")
    for cells in rows:
        status = cells[-1]
        style = "bold green" if status.startswith("RECOMMENDED") else "red" if "ERROR" in status else \
            "yellow" if "warning" in status else None
        table.add_row(*cells, style=style)
    return table


GLOSSARY = [
    ("RankMe", "how many independent directions the model uses to describe the recordings. A healthy model keeps "
               "it high; if it falls far below the base model's, the model has started to describe every "
               "recording alike (collapse) and will separate classes poorly."),
    ("EV-AUC", "how concentrated the description is: near 1 means almost everything the model says about a "
               "recording lies along one direction (little detail); lower means richer descriptions."),
    ("drift cos", "how similar each recording's description is to the base model's (1 = identical, 0 = unrelated). "
                  "Some drift is the point of further pre-training; very low values mean what the base learned "
                  "from AudioSet may be lost."),
    ("probe Sp / Se / Score", "a quick label check: a simple linear classifier on each checkpoint's descriptions, "
                              "trained on the training patients and scored on separate validation patients. "
                              "Sp = normal cycles called normal; Se = abnormal cycles given their exact class; "
                              "Score = their mean. 50 % is what always answering 'normal' gets."),
    ("baseline", "the same linear classifier on plain sound-energy statistics of each mel band: what the model has "
                 "to beat to have learned anything beyond loudness per frequency."),
]


def report_document(report: dict[str, Any], images: list[str]) -> Document:
    """The report as one Document: the same content as Markdown and as HTML."""
    header, rows = table_rows(report)
    rec = report.get("recommendation") or {}
    doc = Document(f"Checkpoint report: {report['run_dir']}")
    doc.paragraph(f"Generated {report['generated_at']} ({report['kind']} report"
                  + (f", task {report['task']}" if report.get("task") else "") + ").")
    doc.heading("Recommendation")
    if rec.get("epoch") is not None:
        doc.paragraph(f"Epoch {rec['epoch']} ({rec['checkpoint']}): {rec['reason']}.")
    else:
        doc.paragraph(f"No recommendation: {rec.get('reason', '')}.")
    doc.warnings(rec.get("warnings") or [])
    summary = report.get("data_summary") or {}
    if summary:
        doc.heading("Data")
        lines = [f"training audio: {summary.get('training_audio')}",
                 f"background noise: {summary.get('noise') or 'none'}"
                 + (f" (mixing ratio {summary.get('noise_ratio')})" if summary.get("noise") else ""),
                 f"label-free metrics on {summary.get('health_crops', 0)} fixed clean crops of the training audio"]
        task = summary.get("task")
        if task:
            lines.append(f"task {task['name']}: " + "; ".join(
                f"{split} " + ", ".join(f"{c} {n}" for c, n in counts.items()) for split, counts in task["counts"].items()))
        doc.bullets(lines)
    baseline = report.get("probe_baseline")
    doc.heading("Checkpoints")
    doc.paragraph("Sp / Se / Score in percent (validation split for the probe)."
                  + (f" Log-mel statistics baseline on the same cycles: Score {_pct(baseline.get('score'))} "
                     f"(Sp {_pct(baseline.get('sp'))}, Se {_pct(baseline.get('se'))}); chance (always 'normal'): 50.0."
                     if baseline else ""))
    classes = ["rec" if c[-1].startswith("RECOMMENDED") else "err" if "ERROR" in c[-1] else
               "warn" if "warning" in c[-1] else "" for c in rows]
    doc.table(Table(header, rows, classes, text_columns=(1, len(header) - 1)))
    finetuned = [r for r in report.get("rows", []) if r.get("finetune")]
    if finetuned:
        doc.heading("Fine-tune results")
        doc.paragraph("A full fine-tune of each checkpoint (validation selects the epoch; the test split is scored "
                      "once). Percent; the baseline is log-mel statistics + logistic regression on the same segments.")
        ft_rows = []
        for r in finetuned:
            f = r["finetune"]
            val, test, base = f.get("val") or {}, f.get("test") or {}, f.get("baseline_test") or {}
            ft_rows.append([str(r["epoch"]), _pct(val.get("score")), _pct(test.get("sp")), _pct(test.get("se")),
                            _pct(test.get("score")), _pct(f.get("test_auroc_abnormal")), _pct(base.get("score")),
                            _pct(base.get("auroc_abnormal")), f.get("model_card") or f.get("run_dir", "")])
        doc.table(Table(["epoch", "val Score", "test Sp", "test Se", "test Score", "test AUROC", "baseline Score",
                         "baseline AUROC", "model card"], ft_rows, text_columns=(8,)))
    doc.heading("What the columns mean")
    doc.definitions(GLOSSARY)
    if images:
        doc.heading("Plots")
        for name in images:
            doc.image(name, _CAPTIONS.get(name, name))
    if report.get("warnings"):
        doc.heading("Warnings")
        doc.warnings(report["warnings"])
    return doc


_CAPTIONS = {
    "loss_curves.png": "training losses, learning rate and EMA decay against epochs",
    "health.png": "label-free health per checkpoint: RankMe (left), drift and variance concentration (right)",
    "probe.png": "linear-probe validation scores per checkpoint, with the log-mel baseline and chance",
    "finetune.png": "fine-tune validation scores per checkpoint, with chance",
}


def _save_figure(fig: Any, path: Path) -> Path:
    """Every report plot is saved alike: PNG at 110 dpi, trimmed, written atomically."""
    return atomic_savefig(fig, path, format="png", dpi=110, bbox_inches="tight")


def _new_figure(ncols: int) -> Any:
    """A pyplot-free Agg figure: no global backend switch, safe inside a training process."""
    from matplotlib.figure import Figure

    return Figure(figsize=(6.0 * ncols, 4.2), layout="constrained")


def plot_loss_curves(metrics: list[dict[str, Any]], path: Path) -> Path | None:
    """Losses vs epoch (epoch means as markers, logged steps thin) on top; lr and EMA decay below."""
    ends = epoch_end_rows(metrics)
    if not ends:
        return None
    epochs = sorted(ends)
    anchor_steps = [0.0] + [float(ends[e].get("opt_step", 0)) for e in epochs]
    anchor_epochs = [0.0] + [float(e) for e in epochs]
    steps = [r for r in metrics if not r.get("epoch_end") and isinstance(r.get("opt_step"), (int, float))]

    def step_x(rows: list[dict[str, Any]]) -> np.ndarray:
        return np.interp([float(r["opt_step"]) for r in rows], anchor_steps, anchor_epochs)

    from matplotlib.figure import Figure

    # the losses full width on top, the two schedules below: readable at 100 % zoom in a 1,100-px page
    fig = Figure(figsize=(10.0, 7.6), layout="constrained")
    grid = fig.add_gridspec(2, 2, height_ratios=[1.4, 1.0])
    ax_loss, ax_lr, ax_ema = fig.add_subplot(grid[0, :]), fig.add_subplot(grid[1, 0]), fig.add_subplot(grid[1, 1])
    for key, label, color in (("loss", "total loss", "C0"), ("loss_m2d", "M2D loss", "C1"),
                              ("loss_offline", "offline loss", "C2")):
        xs = [e for e in epochs if finite(ends[e].get(key)) is not None]
        if not xs:
            continue
        detail = [r for r in steps if finite(r.get(key)) is not None]
        if detail:
            ax_loss.plot(step_x(detail), [float(r[key]) for r in detail], color=color, alpha=0.35, linewidth=1)
        ax_loss.plot(xs, [float(ends[e][key]) for e in xs], "o-", color=color, label=f"{label} (epoch mean)")
    ax_loss.set_xlabel("epoch")
    ax_loss.set_ylabel("loss")
    ax_loss.set_title("Training losses (thin: logged steps)")
    ax_loss.grid(alpha=0.3)
    ax_loss.legend(fontsize=8, loc="best", framealpha=0.7)
    sched = sorted((r for r in [*steps, *[ends[e] for e in epochs]] if isinstance(r.get("opt_step"), (int, float))),
                   key=lambda r: float(r["opt_step"]))
    for ax, key, label, color in ((ax_lr, "lr", "learning rate", "C3"), (ax_ema, "ema_decay", "EMA decay", "C4")):
        rows = [r for r in sched if finite(r.get(key)) is not None]
        if rows:
            ax.plot(step_x(rows), [float(r[key]) for r in rows], ".-", color=color, label=label)
        ax.set_xlabel("epoch")
        ax.set_ylabel(label)
        ax.set_title(f"{label[0].upper()}{label[1:]} schedule")
        ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3), useOffset=False)
        ax.grid(alpha=0.3)
    return _save_figure(fig, path)


def _ok_rows(report: dict[str, Any]) -> list[dict[str, Any]]:
    return [r for r in report.get("rows", []) if not r.get("error")]


def plot_health(report: dict[str, Any], path: Path) -> Path | None:
    """RankMe, and drift cosine + EV-AUC, vs checkpoint epoch: one marker per checkpoint, thresholds dashed."""
    rows = [r for r in _ok_rows(report) if r.get("rankme") is not None]
    if not rows:
        return None
    fig = _new_figure(2)
    ax_rank, ax_cos = fig.subplots(1, 2)
    xs = [r["epoch"] for r in rows]
    ax_rank.plot(xs, [r["rankme"] for r in rows], "o-", color="C0", label="RankMe")
    base = next((r for r in rows if r["epoch"] == 0), None)
    if base is not None:
        ax_rank.axhline(base["rankme"] * (1 - RANK_COLLAPSE_DROP), color="C3", linestyle="--", linewidth=1,
                        label=f"collapse warning (-{RANK_COLLAPSE_DROP:.0%} vs base)")
    ax_rank.set_xlabel("checkpoint epoch (0 = base)")
    ax_rank.set_ylabel("RankMe (effective rank)")
    ax_rank.set_title("Embedding rank")
    ax_rank.set_ylim(0, max(r["rankme"] for r in rows) * 1.3)  # headroom so the legend hides no marker
    ax_rank.grid(alpha=0.3)
    ax_rank.legend(fontsize=8, loc="upper right", framealpha=0.7)
    drift = [r for r in rows if r.get("drift_cos") is not None]
    if drift:
        ax_cos.plot([r["epoch"] for r in drift], [r["drift_cos"] for r in drift], "o-", color="C1",
                    label="cosine to base embeddings")
    ev = [r for r in rows if r.get("ev_auc") is not None]
    if ev:
        ax_cos.plot([r["epoch"] for r in ev], [r["ev_auc"] for r in ev], "s-", color="C2",
                    label="explained-variance AUC")
    ax_cos.axhline(DRIFT_WARN_COS, color="C3", linestyle="--", linewidth=1, label=f"drift warning (cos {DRIFT_WARN_COS})")
    low = min([0.0] + [r["drift_cos"] for r in drift])
    ax_cos.set_ylim(low - 0.05, 1.35)  # headroom above 1 for the legend
    ax_cos.set_xlabel("checkpoint epoch (0 = base)")
    ax_cos.set_ylabel("value")
    ax_cos.set_title("Drift from base and variance concentration")
    ax_cos.grid(alpha=0.3)
    ax_cos.legend(fontsize=8, loc="upper right", framealpha=0.7)
    for ax in (ax_rank, ax_cos):
        ax.set_xticks(sorted(set(xs)))
    return _save_figure(fig, path)


def plot_scores(report: dict[str, Any], path: Path, which: str) -> Path | None:
    """Validation Sp / Se / Score (percent) vs checkpoint epoch for the probe or the fine-tune."""
    points = []
    for r in _ok_rows(report):
        block = r.get(which) or {}
        if which == "finetune":
            block = block.get("val") or {}
        if finite(block.get("score")) is not None:
            points.append((r["epoch"], block))
    if not points:
        return None
    fig = _new_figure(1)
    ax = fig.subplots(1, 1)
    xs = [p[0] for p in points]
    for key, label, style in (("sp", "Sp", "o-"), ("se", "Se", "s-"), ("score", "Score", "D-")):
        ys = [math.nan if (v := finite(b.get(key))) is None else v * 100 for _, b in points]
        ax.plot(xs, ys, style, label=label, linewidth=2 if key == "score" else 1)
    chosen = (report.get("recommendation") or {}).get("epoch")
    if chosen in xs:
        ax.axvline(chosen, color="grey", linestyle=":", label=f"recommended (epoch {chosen})")
    ax.axhline(50.0, color="black", linestyle=":", linewidth=1, label="chance Score (always 'normal')")
    baseline = report.get("probe_baseline") if which == "probe" else None
    if baseline and finite(baseline.get("score")) is not None:
        ax.axhline(100 * baseline["score"], color="C3", linestyle="--", linewidth=1.5,
                   label=f"log-mel baseline Score ({100 * baseline['score']:.1f})")
    name = "Linear probe" if which == "probe" else "Fine-tune"
    ax.set_title(f"{name}: validation scores per checkpoint")
    ax.set_xlabel("checkpoint epoch (0 = base)")
    ax.set_ylabel("percent")
    ax.set_ylim(-2, 102)
    ax.set_xticks(sorted(set(xs)))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))  # outside: never hides a marker
    return _save_figure(fig, path)


def write_report_files(report: dict[str, Any], report_dir: Path, metrics: list[dict[str, Any]] | None = None) -> dict[str, Path]:
    """report.json / .md / .html and the PNGs, each written atomically; a failed plot is a warning only."""
    report_dir.mkdir(parents=True, exist_ok=True)
    plots = [("loss_curves.png", lambda p: plot_loss_curves(metrics or [], p)),
             ("health.png", lambda p: plot_health(report, p)),
             ("probe.png", lambda p: plot_scores(report, p, "probe")),
             ("finetune.png", lambda p: plot_scores(report, p, "finetune"))]
    images: list[str] = []
    for name, make in plots:
        try:
            if make(report_dir / name) is not None:
                images.append(name)
        except Exception as exc:  # a plotting problem must not lose the numbers
            report.setdefault("warnings", []).append(f"plot {name} failed: {one_line(exc, limit=None, with_type=True)}")
            console.print(f"[yellow]warning: plot {name} failed: {exc}[/]")
    report["files"] = ["report.json", "report.md", "report.html", *images]
    document = report_document(report, images)
    written = {
        "json": atomic_write_json(report_dir / "report.json", report),
        "md": atomic_write_text(report_dir / "report.md", document.markdown()),
        "html": atomic_write_text(report_dir / "report.html", document.html()),
    }
    for name in images:
        written[name] = report_dir / name
    return written
