"""The prediction review page: what `m2dx predict` said about each recording, in a form a clinician reads.

A CSV of probabilities cannot be agreed or disagreed with; a spectrogram, the sound and where the
model looked can. `write_review` turns a prediction folder (segments.csv, recordings.csv,
summary.json) into static HTML with its images and audio beside it, opened from disk with no
server and no network: an index sorted by P(abnormal), one section per recording (log-mel with
the segments coloured by P(abnormal), the class probabilities, a player), and occlusion maps for
the top flagged segments, computed from the classifier predict used (`inference.load_model_set`).

Occlusion: each time-frequency patch of the segment's model input is set to the segment's mean
log-mel and the drop in P(abnormal) is measured; a patch whose removal lowers P(abnormal) is one
the model relied on. It costs one forward pass per patch and classifier file; the page says how many.
Only file names appear unless `show_paths` is set.
"""

from __future__ import annotations

import html
import io
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import soundfile as sf
import torch

from .audio import LogMelSpectrogram, load_audio
from .data.segment_cache import prepare_segments, readable_rows
from .data.segments import Segment
from .document import CSS
from .errors import CheckpointError, DataError
from .fileio import atomic_write_bytes, atomic_write_text
from .inference import ModelSet, load_model_set, model_set_probabilities
from .progress import make_progress
from .provenance import scrub_text, short_sha
from .review_plots import plot_explanation, plot_recording
from .runtime import pick_device

PAGE_SIZE = 100  # recordings per HTML page: 100 lazy images and players load in about a second
EXPLAIN_TOP = 5  # occlusion maps for this many flagged segments (highest P(abnormal) first)
PATCH_BANDS, PATCH_SECONDS = 16, 0.32  # occlusion patch: one ViT patch row (16 mel bands) x 0.32 s
EXTRA_CSS = (".notice{border:2px solid #b00;padding:.5em 1em;background:#fff4f4}"
             "audio{width:100%;margin:.3em 0}section{border-top:2px solid #999;margin-top:2em}"
             "figure img{width:100%;height:auto}nav a{margin-right:.6em}")
FIX = "run m2dx predict --out PRED_DIR first (m2dx predict ... --html writes the review too)"


@dataclass
class Explanation:
    """An occlusion map of one segment: drop[b, s] = P(abnormal) - P(abnormal with patch (b, s) hidden)."""

    drop: np.ndarray  # [bands, steps]
    band_edges: np.ndarray  # [bands + 1] mel-band indices
    frame_edges: np.ndarray  # [steps + 1] frame indices from the segment start
    p_abnormal: float
    passes: int
    seconds: float


def occlusion_map(models: ModelSet, lms: torch.Tensor, *, valid_frames: int, device: torch.device,
                  batch_size: int = 32, patch_bands: int = PATCH_BANDS, patch_frames: int = 32) -> Explanation:
    """Occlude patches of raw log-mel [n_mels, frames] inside its first `valid_frames` (the real audio, not padding)."""
    t0 = time.perf_counter()
    n_mels = lms.shape[0]
    valid_frames = max(1, min(int(valid_frames), lms.shape[1]))
    band_edges = np.r_[np.arange(0, n_mels, patch_bands), n_mels]
    frame_edges = np.r_[np.arange(0, valid_frames, patch_frames), valid_frames]
    fill = lms[:, :valid_frames].mean()
    variants = [lms]
    for b0, b1 in zip(band_edges[:-1], band_edges[1:]):
        for f0, f1 in zip(frame_edges[:-1], frame_edges[1:]):
            hidden = lms.clone()
            hidden[b0:b1, f0:f1] = fill
            variants.append(hidden)
    probs = model_set_probabilities(models, torch.stack(variants), device=device,
                                    batch_size=batch_size)  # [1 + patches, K]
    p_abnormal = 1.0 - probs[:, models.first.normal_index]
    drop = (p_abnormal[0] - p_abnormal[1:]).reshape(len(band_edges) - 1, len(frame_edges) - 1)
    return Explanation(drop, band_edges, frame_edges, float(p_abnormal[0]), len(variants) * len(models.members),
                       time.perf_counter() - t0)


def segment_input(models: ModelSet, path: Path, start: float, end: float) -> torch.Tensor:
    """The raw log-mel [n_mels, frames] predict fed the model for [start, end) of `path` (same fitting rule)."""
    head = models.first
    item = Segment(path, start=start, end=end, item_id=f"{path.stem}#review")
    lms = prepare_segments([item], frontend=head.frontend, length_s=head.segment_seconds, pad=head.pad,
                           cache_dir=None, remember=False)
    return lms[readable_rows(lms)][0]


# ---------------------------------------------------------------------------- reading a prediction folder
def read_predictions(pred_dir: Path) -> tuple[pd.DataFrame, pd.DataFrame, dict[str, Any]]:
    """segments.csv, recordings.csv and summary.json of `m2dx predict`; a missing or damaged one is one line."""
    if not pred_dir.is_dir():
        raise DataError(f"{pred_dir}: no such prediction folder; {FIX}")
    frames = []
    for name in ("segments.csv", "recordings.csv"):
        try:
            frames.append(pd.read_csv(pred_dir / name, keep_default_na=False))
        except FileNotFoundError:
            raise DataError(f"{pred_dir / name}: missing, so this is not a finished prediction folder; {FIX}") from None
        except (ValueError, pd.errors.ParserError) as exc:
            raise DataError(f"{pred_dir / name}: unreadable ({str(exc).splitlines()[0]}); {FIX}") from None
    try:
        summary = json.loads((pred_dir / "summary.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        raise DataError(f"{pred_dir / 'summary.json'}: missing or damaged; {FIX}") from None
    segments, recordings = frames
    needed = {"recording", "segment", "start", "end", "p_abnormal", "abnormal", "flags", "predicted"}
    if not needed <= set(segments.columns) or "recording" not in recordings.columns:
        raise DataError(f"{pred_dir / 'segments.csv'}: not written by m2dx predict (columns "
                        f"{', '.join(sorted(needed - set(segments.columns)))} missing); {FIX}")
    for rec in recordings["recording"]:
        if not Path(rec).is_file():
            raise DataError(f"{pred_dir / 'recordings.csv'}: the recording {rec} is missing; restore it, or run "
                            "m2dx review from the folder m2dx predict ran in (paths are relative to it)")
    return segments, recordings, summary


# ---------------------------------------------------------------------------- the page
def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _pct(value: float) -> str:
    return f"{100 * value:.0f} %"


def _header(models: ModelSet, summary: dict[str, Any], show_paths: bool, cost: str, pages: int) -> str:
    meta = models.first.meta
    fingerprint = (meta.get("data") or {}).get("sha256")
    files = [m.path if show_paths else m.path.name for m in models.members]
    source = summary.get("model", "") if show_paths else Path(str(summary.get("model", ""))).name
    nav = "".join(f"<a href='{_page_file(k)}'>page {k + 1}</a>" for k in range(pages)) if pages > 1 else ""
    return (f"<h1>Prediction review</h1><p class='notice'><b>Not a diagnostic device.</b> These are a research "
            "classifier's outputs for a clinician to check by looking and listening; they do not diagnose and must "
            "not replace clinical judgement.</p>"
            f"<ul><li>classifier: {_e(meta.get('task', '?'))} from {_e(source)} ({len(files)} file(s): "
            f"{_e(', '.join(map(str, files)))}), created {_e(meta.get('created', '?'))}, "
            f"data fingerprint {_e(short_sha(fingerprint) if fingerprint else 'unknown')}</li>"
            f"<li>decision rule: a segment is flagged abnormal when {_e(summary.get('abnormal_rule', '?'))}; "
            f"normal class {_e(summary.get('normal_class', '?'))}</li>"
            f"<li>predictions made {_e(summary.get('created', '?'))} with m2dx_clinic "
            f"{_e(summary.get('package_version', '?'))}</li><li>explanations: {_e(cost)}</li></ul>"
            f"<nav>{nav}</nav>")


def _page_file(k: int) -> str:
    return "index.html" if k == 0 else f"page-{k + 1}.html"


def _index(order: list[dict[str, Any]], page_size: int) -> str:
    head = ("<h2>Recordings, most likely abnormal first</h2><table><tr><th>#</th><th class='t'>recording</th>"
            "<th class='t'>predicted</th><th>mean P(abnormal)</th><th>max P(abnormal)</th><th>flagged segments</th>"
            "<th class='t'>unlike the training audio</th></tr>")
    rows = [f"<tr class='{'warn' if r['abnormal_fraction'] > 0 else ''}'><td>{k + 1}</td><td class='t'>"
            f"<a href='{_page_file(k // page_size)}#rec-{k + 1}'>{_e(r['name'])}</a></td><td class='t'>{_e(r['predicted'])}"
            f"</td><td>{r['p_abnormal']:.3f}</td><td>{r['max_p_abnormal']:.3f}</td><td>{_pct(r['abnormal_fraction'])} of "
            f"{r['segments']}</td><td class='t'>{_e(r['flags'])}</td></tr>" for k, r in enumerate(order)]
    return head + "".join(rows) + "</table>"


def _section(k: int, rec: dict[str, Any], segs: pd.DataFrame, classes: list[str], explained: list[str]) -> str:
    probs = "".join(f"<th>P({_e(c)})</th>" for c in classes)
    rows = "".join(
        f"<tr class='seg{' warn' if s['abnormal'] else ''}'><td>{int(s['segment'])}</td><td>{s['start']:.2f}</td>"
        f"<td>{s['end']:.2f}</td>" + "".join(f"<td>{s[f'prob_{c}']:.3f}</td>" for c in classes)
        + f"<td>{s['p_abnormal']:.3f}</td><td class='t'>{'yes' if s['abnormal'] else 'no'}</td>"
          f"<td class='t'>{_e(s['flags'])}</td></tr>" for s in segs.to_dict(orient="records"))
    where = f" <small>({_e(rec['path'])})</small>" if rec["path"] else ""
    return (f"<section id='rec-{k + 1}'><h2>{k + 1}. {_e(rec['name'])}{where}: {_e(rec['predicted'])}</h2>"
            f"<p>mean P(abnormal) {rec['p_abnormal']:.3f}, max {rec['max_p_abnormal']:.3f}; flagged in "
            f"{_pct(rec['abnormal_fraction'])} of {rec['segments']} segment(s)."
            + (f" Unlike the training audio: {_e(rec['flags'])}." if rec["flags"] else "") + "</p>"
            f"<audio controls preload='metadata' src='{rec['audio']}'></audio>"
            f"<figure><img loading='lazy' width='1200' height='460' src='{rec['image']}' alt='log-mel of {_e(rec['name'])}'>"
            "<figcaption>Log-mel spectrogram (time in seconds, frequency in Hz on the mel scale). The strip above "
            "shows each segment, numbered, coloured by P(abnormal); a black edge marks a flagged segment.</figcaption>"
            f"</figure><table><tr><th>segment</th><th>start (s)</th><th>end (s)</th>{probs}<th>P(abnormal)</th>"
            f"<th class='t'>flagged</th><th class='t'>unlike the training audio</th></tr>{rows}</table>"
            + "".join(explained) + "</section>")


def write_review(pred_dir: str | Path, *, model: str | Path | None = None, out: str | Path | None = None,
                 explain: int = EXPLAIN_TOP, page_size: int = PAGE_SIZE, show_paths: bool = False,
                 device: str = "auto", batch_size: int = 32, progress: bool = True) -> Path:
    """Write the review of a prediction folder to `out` (default PRED_DIR/review); returns its index.html."""
    pred_dir = Path(pred_dir).expanduser()
    if explain < 0 or page_size < 1:
        raise DataError(f"--explain must be >= 0 and --page-size >= 1, got {explain} / {page_size}")
    segments, recordings, summary = read_predictions(pred_dir)
    if model is None and not summary.get("model"):
        raise DataError(f"{pred_dir / 'summary.json'}: names no classifier; pass --model RUN_DIR or FILE")
    models = load_model_set(model if model is not None else summary["model"])
    head = models.first
    classes = head.classes
    if classes != summary.get("classes", classes):
        raise CheckpointError(f"{head.path}: classes {', '.join(classes)}, but {pred_dir / 'summary.json'} has "
                              f"{', '.join(summary['classes'])}; pass the --model that made these predictions")
    out_dir = Path(out).expanduser() if out is not None else pred_dir / "review"
    dev = pick_device(device)
    frontend = head.frontend
    fps = frontend.frames_per_second
    logmel = LogMelSpectrogram(frontend)
    fb = logmel.mel.mel_scale.fb  # [n_freqs, n_mels] filterbank: each band's peak is its centre frequency
    centres = np.linspace(0, frontend.sample_rate / 2, fb.shape[0])[fb.argmax(dim=0).numpy()]
    threshold = (summary.get("operating_point") or {}).get("threshold")

    normal = summary.get("normal_class", classes[head.normal_index])
    order = recordings.assign(p_abnormal=1.0 - recordings[f"mean_prob_{normal}"]).sort_values(
        ["p_abnormal", "max_p_abnormal"], ascending=False, kind="stable").to_dict(orient="records")
    flagged = segments[segments["abnormal"].astype(str).str.lower() == "true"]
    chosen = set(flagged.sort_values("p_abnormal", ascending=False, kind="stable").head(explain).index)
    passes, seconds, sections = 0, 0.0, []
    with make_progress(show=progress) as bar:
        task = bar.add_task("review pages", total=len(order), status="")
        for k, rec in enumerate(order):
            path = Path(rec["recording"])
            rec.update(name=path.name, path=str(path.resolve()) if show_paths else "",
                       flags=rec["flags"] if show_paths else scrub_text(str(rec["flags"])),
                       audio=f"media/rec-{k + 1:04d}.wav", image=f"media/rec-{k + 1:04d}.png")
            wave = load_audio(path, frontend.sample_rate)  # [samples]
            buffer = io.BytesIO()
            sf.write(buffer, wave.numpy(), frontend.sample_rate, format="WAV", subtype="PCM_16")
            atomic_write_bytes(out_dir / rec["audio"], buffer.getvalue())
            spec = logmel(wave).numpy()  # [n_mels, frames]
            segs = segments[segments["recording"] == rec["recording"]].sort_values("segment")
            if not show_paths:
                segs = segs.assign(flags=segs["flags"].astype(str).map(scrub_text))
            bands = [(int(s["segment"]), float(s["start"]), float(s["end"]), float(s["p_abnormal"]),
                      str(s["abnormal"]).lower() == "true") for s in segs.to_dict(orient="records")]
            plot_recording(spec, centres, fps, bands, threshold, f"{path.name}: {rec['predicted']}", out_dir / rec["image"])
            explained = []
            for row_id, s in segs.loc[[i for i in segs.index if i in chosen]].iterrows():
                lms = segment_input(models, path, float(s["start"]), float(s["end"]))  # [n_mels, frames]
                valid = int(round((float(s["end"]) - float(s["start"])) * fps)) + 1
                found = occlusion_map(models, lms, valid_frames=valid, device=dev, batch_size=batch_size,
                                      patch_frames=max(1, round(PATCH_SECONDS * fps)))
                passes, seconds = passes + found.passes, seconds + found.seconds
                image = f"media/rec-{k + 1:04d}-seg-{int(s['segment']):03d}.png"
                plot_explanation(lms[:, :found.frame_edges[-1]].numpy(), centres, fps, float(s["start"]), found.drop,
                                 found.band_edges, found.frame_edges,
                                 f"{path.name}, segment {int(s['segment'])}: P(abnormal) {found.p_abnormal:.3f}",
                                 out_dir / image)
                explained.append(
                    f"<h3>Where the model looked: segment {int(s['segment'])}</h3><figure><img loading='lazy' "
                    f"width='1200' height='380' src='{image}' alt='occlusion map of segment {int(s['segment'])}'>"
                    "<figcaption>Each patch (16 mel bands x 0.32 s) was hidden (set to the segment's mean) and the "
                    "drop in P(abnormal) measured: red patches supported the abnormal call, blue ones argued against "
                    f"it; the yellow box is the largest. Cost: {found.passes} forward passes, {found.seconds:.1f} s."
                    "</figcaption></figure>")
            sections.append(_section(k, rec, segs, classes, explained))
            bar.advance(task)
    cost = (f"occlusion maps for the {len(chosen)} flagged segment(s) with the highest P(abnormal) (of "
            f"{len(flagged)} flagged): {passes} forward passes through {len(models.members)} classifier file(s), "
            f"{seconds:.1f} s on {dev}")
    pages = max(1, -(-len(order) // page_size))
    top = _header(models, summary, show_paths, cost, pages)
    for p in range(pages):
        body = top + (_index(order, page_size) if p == 0 else "") + "".join(sections[p * page_size:(p + 1) * page_size])
        atomic_write_text(out_dir / _page_file(p), "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
                          f"<title>Prediction review</title><style>{CSS}{EXTRA_CSS}</style></head><body>{body}"
                          "</body></html>\n")
    return out_dir / "index.html"
