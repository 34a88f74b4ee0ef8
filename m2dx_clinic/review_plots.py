"""Figures of the prediction review page: a recording's log-mel with its segments, and an explanation map.

Pyplot-free matplotlib Figures (as `evaluation.plots`), written atomically as PNG. Both figures read
at 1280 px: time in seconds, frequency labelled in Hz on the mel axis, and a colour legend for
every colour drawn.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from .fileio import atomic_savefig

HZ_TICKS = (100, 250, 500, 1000, 2000, 4000, 8000, 16000)
SEGMENT_CMAP = "RdYlGn_r"  # green (normal) -> red (abnormal)
FIG_WIDTH, DPI = 12.0, 100  # 1200 px: the page's 1100 px column shows it at about 100 %


def _levels(logmel: np.ndarray) -> tuple[float, float]:
    """Colour limits that ignore the log floor of empty bands (audio recorded at a lower rate): 2nd-99.8th percentile."""
    low, high = np.percentile(logmel, [2, 99.8])
    return float(low), float(max(high, low + 1e-3))


def _hz_axis(ax, centres: np.ndarray, low: float = 0.0) -> None:
    """Label a mel-band axis (band index from `low`) with round frequencies in Hz."""
    bands = np.arange(len(centres))
    ticks = [(np.interp(hz, centres, bands) + low, hz) for hz in HZ_TICKS if centres[0] <= hz <= centres[-1]]
    ax.set_yticks([t for t, _ in ticks], [f"{hz:g}" if hz < 1000 else f"{hz / 1000:g}k" for _, hz in ticks])
    ax.set_ylabel("frequency (Hz, mel scale)")


def plot_recording(logmel: np.ndarray, centres: np.ndarray, fps: float,
                   segments: Sequence[tuple[int, float, float, float, bool]], threshold: float | None,
                   title: str, path: Path) -> Path:
    """Log-mel [n_mels, frames] with a strip of segments (index, start, end, P(abnormal), flagged) above it."""
    from matplotlib import colormaps
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle

    duration = logmel.shape[1] / fps
    fig = Figure(figsize=(FIG_WIDTH, 4.6), layout="constrained")
    strip, spec = fig.subplots(2, 1, sharex=True, height_ratios=[1, 4.5])
    cmap, norm = colormaps[SEGMENT_CMAP], Normalize(0.0, 1.0)
    for row, (index, start, end, p_abnormal, flagged) in enumerate(segments):
        lane = row % 2  # overlapping windows alternate between two lanes so each stays visible
        strip.add_patch(Rectangle((start, lane), end - start, 0.9, facecolor=cmap(norm(p_abnormal)),
                                  edgecolor="black" if flagged else "white", linewidth=1.5 if flagged else 0.5))
        if (end - start) > duration / 40:
            strip.text((start + end) / 2, lane + 0.45, str(index), ha="center", va="center", fontsize=8)
        spec.axvline(start, color="white", lw=0.6, alpha=0.6)
    strip.set_ylim(0, 1.9)
    strip.set_yticks([])
    strip.set_ylabel("segments", rotation=0, ha="right", va="center")
    strip.set_title(title, fontsize=10, loc="left")
    low, high = _levels(logmel)
    spec.imshow(logmel, origin="lower", aspect="auto", cmap="magma", extent=(0, duration, 0, logmel.shape[0]),
                interpolation="nearest", vmin=low, vmax=high)
    _hz_axis(spec, centres)
    spec.set_xlim(0, duration)
    spec.set_xlabel("time (s)")
    bar = fig.colorbar(ScalarMappable(norm, cmap), ax=[strip, spec], fraction=0.03, pad=0.01)
    bar.set_label("P(abnormal) of a segment")
    if threshold is not None:
        bar.ax.axhline(threshold, color="black", lw=1.5)
        bar.ax.text(1.6, threshold, "threshold", transform=bar.ax.get_yaxis_transform(), fontsize=7, va="center")
    return atomic_savefig(fig, path, format="png", dpi=DPI)


def plot_explanation(logmel: np.ndarray, centres: np.ndarray, fps: float, start: float, drop: np.ndarray,
                     band_edges: np.ndarray, frame_edges: np.ndarray, title: str, path: Path) -> Path:
    """One segment's log-mel [n_mels, frames] (from `start` s) under its occlusion map drop [bands, steps]."""
    from matplotlib.colors import TwoSlopeNorm
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle

    frames = logmel.shape[1]
    fig = Figure(figsize=(FIG_WIDTH, 3.8), layout="constrained")
    ax = fig.subplots()
    low, high = _levels(logmel)
    ax.imshow(logmel, origin="lower", aspect="auto", cmap="gray", extent=(start, start + frames / fps, 0, logmel.shape[0]),
              interpolation="nearest", vmin=low, vmax=high)
    peak = float(np.abs(drop).max()) or 1e-6
    times = start + frame_edges / fps
    mesh = ax.pcolormesh(times, band_edges, drop, cmap="RdBu_r", norm=TwoSlopeNorm(0.0, -peak, peak), alpha=0.55,
                         shading="flat")
    b, s = np.unravel_index(int(np.argmax(drop)), drop.shape)
    ax.add_patch(Rectangle((times[s], band_edges[b]), times[s + 1] - times[s], band_edges[b + 1] - band_edges[b],
                           fill=False, edgecolor="yellow", linewidth=2))
    _hz_axis(ax, centres)
    ax.set_xlabel("time in the recording (s)")
    ax.set_title(title, fontsize=10, loc="left")
    bar = fig.colorbar(mesh, ax=ax, fraction=0.03, pad=0.01)
    bar.set_label("drop in P(abnormal)\nwhen the patch is hidden")
    return atomic_savefig(fig, path, format="png", dpi=DPI)
