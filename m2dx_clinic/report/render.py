"""Writing a report: the table (terminal, Markdown, HTML), the plots and report.json, each atomically.

Numbers in `report.json` are fractions as `metrics.icbhi_scores` returns them; the Markdown, HTML,
terminal table and plots show Sp / Se / Score in percent.
"""

from __future__ import annotations

import html
import math
from pathlib import Path
from typing import Any

import numpy as np

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


def _markdown(report: dict[str, Any], images: list[str]) -> str:
    header, rows = table_rows(report)
    rec = report.get("recommendation") or {}

    def esc(text: str) -> str:
        return text.replace("|", "\\|").replace("\n", " ")

    lines = [f"# Checkpoint report: {report['run_dir']}", "",
             f"Generated {report['generated_at']} ({report['kind']} report"
             + (f", task {report['task']}" if report.get("task") else "") + ").", "",
             "## Recommendation", ""]
    if rec.get("epoch") is not None:
        lines.append(f"**Epoch {rec['epoch']}** (`{rec['checkpoint']}`): {rec['reason']}.")
    else:
        lines.append(f"No recommendation: {rec.get('reason', '')}.")
    for w in rec.get("warnings") or []:
        lines.append(f"- warning: {esc(w)}")
    lines += ["", "## Checkpoints", "", "Sp / Se / Score in percent (validation split for the probe).", "",
              "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(esc(c) for c in cells) + " |" for cells in rows]
    if images:
        lines += ["", "## Plots", ""] + [f"![{name}]({name})" for name in images]
    return "\n".join(lines) + "\n"


def _html(report: dict[str, Any], images: list[str]) -> str:
    header, rows = table_rows(report)
    rec = report.get("recommendation") or {}
    e = html.escape
    parts = [
        "<!DOCTYPE html>", "<html><head><meta charset='utf-8'>",
        f"<title>Checkpoint report: {e(report['run_dir'])}</title>",
        "<style>body{font-family:sans-serif;margin:1.5em}table{border-collapse:collapse;font-size:13px}"
        "td,th{border:1px solid #ccc;padding:3px 6px;text-align:right}td.t{text-align:left}"
        "tr.rec{background:#e6f4e6;font-weight:bold}tr.err{background:#fbe3e3}tr.warn{background:#fff6d6}"
        ".plots{display:flex;flex-wrap:wrap;gap:12px}.plots img{max-width:48%;border:1px solid #ddd}</style>",
        "</head><body>",
        f"<h1>Checkpoint report</h1><p><code>{e(report['run_dir'])}</code> &mdash; generated {e(report['generated_at'])}"
        f" ({e(report['kind'])} report{', task ' + e(str(report['task'])) if report.get('task') else ''})</p>",
        "<h2>Recommendation</h2>",
    ]
    if rec.get("epoch") is not None:
        parts.append(f"<p><b>Epoch {rec['epoch']}</b> (<code>{e(str(rec['checkpoint']))}</code>): {e(rec['reason'])}.</p>")
    else:
        parts.append(f"<p>No recommendation: {e(str(rec.get('reason', '')))}.</p>")
    if rec.get("warnings"):
        parts.append("<ul>" + "".join(f"<li>warning: {e(w)}</li>" for w in rec["warnings"]) + "</ul>")
    parts.append("<h2>Checkpoints</h2><p>Sp / Se / Score in percent (validation split for the probe).</p><table><tr>"
                 + "".join(f"<th>{e(h)}</th>" for h in header) + "</tr>")
    for cells in rows:
        status = cells[-1]
        cls = "rec" if status.startswith("RECOMMENDED") else "err" if "ERROR" in status else \
            "warn" if "warning" in status else ""
        tds = "".join(f"<td class='t'>{e(c)}</td>" if i in (1, len(cells) - 1) else f"<td>{e(c)}</td>"
                      for i, c in enumerate(cells))
        parts.append(f"<tr class='{cls}'>{tds}</tr>")
    parts.append("</table>")
    if images:
        parts.append("<h2>Plots</h2><div class='plots'>"
                     + "".join(f"<img src='{e(name)}' alt='{e(name)}'>" for name in images) + "</div>")
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def _save_figure(fig: Any, path: Path) -> Path:
    """Every report plot is saved alike: PNG at 110 dpi, trimmed, written atomically."""
    return atomic_savefig(fig, path, format="png", dpi=110, bbox_inches="tight")


def _new_figure(ncols: int) -> Any:
    """A pyplot-free Agg figure: no global backend switch, safe inside a training process."""
    from matplotlib.figure import Figure

    return Figure(figsize=(6.0 * ncols, 4.2), layout="constrained")


def plot_loss_curves(metrics: list[dict[str, Any]], path: Path) -> Path | None:
    """Three panels vs epoch: total / M2D / offline loss (epoch means as markers, logged steps thin), lr, EMA decay."""
    ends = epoch_end_rows(metrics)
    if not ends:
        return None
    epochs = sorted(ends)
    anchor_steps = [0.0] + [float(ends[e].get("opt_step", 0)) for e in epochs]
    anchor_epochs = [0.0] + [float(e) for e in epochs]
    steps = [r for r in metrics if not r.get("epoch_end") and isinstance(r.get("opt_step"), (int, float))]

    def step_x(rows: list[dict[str, Any]]) -> np.ndarray:
        return np.interp([float(r["opt_step"]) for r in rows], anchor_steps, anchor_epochs)

    fig = _new_figure(3)
    ax_loss, ax_lr, ax_ema = fig.subplots(1, 3)
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
            report.setdefault("warnings", []).append(f"plot {name} failed: {type(exc).__name__}: {exc}")
            console.print(f"[yellow]warning: plot {name} failed: {exc}[/]")
    report["files"] = ["report.json", "report.md", "report.html", *images]
    written = {
        "json": atomic_write_json(report_dir / "report.json", report),
        "md": atomic_write_text(report_dir / "report.md", _markdown(report, images)),
        "html": atomic_write_text(report_dir / "report.html", _html(report, images)),
    }
    for name in images:
        written[name] = report_dir / name
    return written
