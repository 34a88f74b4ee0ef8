"""Commands that use a trained model: embed, predict, review, evaluate, export, and the quickstart journey."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer

from ..errors import ConfigError
from .common import CHECKPOINT_HELP, DATA_HELP, DEVICE_HELP, PROVENANCE_HELP, TASK_HELP, _console, app


# ----------------------------------------------------------------------------- embed
@app.command("embed")
def embed_cmd(
    inputs: list[Path] = typer.Argument(..., help="Audio files or folders."),
    checkpoint: str = typer.Option(..., "--checkpoint", "-c", help=CHECKPOINT_HELP + " A classifier file from m2dx finetune works too."),
    out: Path = typer.Option(..., "--out", "-o", help="Output folder for <stem>.npy files."),
    clip: bool = typer.Option(False, "--clip", help="One clip embedding [F*D] per file instead of frames [T, F*D]."),
    device: str = typer.Option("auto", "--device", help=DEVICE_HELP),
) -> None:
    """Write M2D features of audio files as .npy (frames, or one clip vector with --clip).

    Example: m2dx embed -c m2d_vit_base-80x200p16x4-230529 -o feats/ recordings/
    """
    from ..embed import embed_files

    result = embed_files(checkpoint, inputs, out, clip=clip, device=device)
    console = _console()
    for note in result.notes:
        console.print(f"[dim]{note}[/]")
    console.print(f"wrote {len(result.written)} file(s) to {out}")
    _exit_if_files_failed(result.failed)


# ----------------------------------------------------------------------------- using the classifier
@app.command("predict")
def predict_cmd(
    inputs: list[Path] = typer.Argument(..., help="Audio files, folders (recursive) or a CSV manifest (path[,start,end])."),
    model: Path = typer.Option(..., "--model", "-m", help="A fine-tuning run folder (its repeats are averaged) or a classifier file (e.g. RUN/best.pt)."),
    out: Path = typer.Option(..., "--out", "-o", help="Folder for segments.csv, recordings.csv and summary.json."),
    segments: str = typer.Option("auto", "--segments", help="auto (annotation .txt beside the audio, else CSV start/end, else windows) | annotations | window."),
    window_seconds: Optional[float] = typer.Option(None, "--window-seconds", help="Window length for --segments window (default: the model's segment length)."),
    hop_seconds: Optional[float] = typer.Option(None, "--hop-seconds", help="Step between windows (default: the window length)."),
    repeat: Optional[int] = typer.Option(None, "--repeat", help="Use only this repeat of a run folder instead of averaging all."),
    candidate: Optional[str] = typer.Option(None, "--candidate", help="A --mode compare run folder: full | linear | baseline instead of the recommended one."),
    ensemble: bool = typer.Option(False, "--ensemble", help="Average every repeat of the run folder (the default for a run folder)."),
    batch_size: int = typer.Option(32, "--batch-size", help="Segments per forward pass."),
    device: str = typer.Option("auto", "--device", help="auto (CUDA when present) | cpu | cuda | cuda:N"),
    amp: str = typer.Option("off", "--amp", help="off (fp32) | auto | bf16: mixed precision (GPUs; CPUs with bf16 units)."),
    read_workers: Optional[int] = typer.Option(None, "--read-workers", help="Threads decoding the next recordings while the model runs (default: up to 8 on a GPU, none on a CPU, where the model needs the cores)."),
    as_json: bool = typer.Option(False, "--json", help="Print the summary and one record per recording as JSON (for scripts)."),
    html: bool = typer.Option(False, "--html", help="Also write the review page OUT/review/index.html (as m2dx review OUT)."),
) -> None:
    """Classify new recordings with a fine-tuned classifier: one row per segment and per recording.

    Example: m2dx predict --model runs/lung_ft new_recordings/ --out predictions/
    """
    import json

    from ..predict import predict

    if ensemble and repeat is not None:
        raise ConfigError("--ensemble averages every repeat and --repeat picks one; pass only one of them")
    result = predict(model, inputs, out, segments=segments, window_seconds=window_seconds, hop_seconds=hop_seconds,
                     repeat=repeat, candidate=candidate, batch_size=batch_size, device=device, amp=amp,
                     read_workers=read_workers, progress=not as_json)
    s = result.summary
    if as_json:
        print(json.dumps({"summary": s, "recordings": result.recordings.to_dict(orient="records")}, indent=2,
                         default=str))
        _exit_if_files_failed(result.failed)
        return
    from ..predict_outputs import describe_recording

    for row in result.recordings.to_dict(orient="records"):
        _console().print(describe_recording(row, s), highlight=False)
    _console().print(f"classified {s['recordings']} recording(s), {s['segments']} segment(s) with "
                     f"{len(s['classifier_files'])} classifier file(s); {s['decision_rule']}", highlight=False)
    if s["real_time_factor"]:
        _console().print(f"{s['recordings_per_s']:.2f} recordings/s, {s['real_time_factor']:.0f}x real time on {s['device']}")
    _console().print(f"[green]wrote[/] {out / 'segments.csv'}, {out / 'recordings.csv'}, {out / 'summary.json'}")
    if html:
        from ..review import write_review
        _console().print(f"[green]wrote[/] {write_review(out, device=device, batch_size=batch_size)}")
    _exit_if_files_failed(result.failed)


@app.command("review")
def review_cmd(
    pred_dir: Path = typer.Argument(..., help="A folder m2dx predict wrote (segments.csv, recordings.csv, summary.json)."),
    model: Optional[Path] = typer.Option(None, "--model", "-m", help="The classifier for the explanations (default: the one summary.json names)."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Folder for index.html and media/ (default PRED_DIR/review)."),
    explain: int = typer.Option(5, "--explain", help="Occlusion maps for this many flagged segments, highest P(abnormal) first (0: none)."),
    page_size: int = typer.Option(100, "--page-size", help="Recordings per HTML page."),
    show_paths: bool = typer.Option(False, "--show-paths", help="Show each recording's absolute path, not only its file name."),
    device: str = typer.Option("auto", "--device", help="auto (CUDA when present) | cpu | cuda | cuda:N"),
) -> None:
    """A static review page of predictions. Example: m2dx review predictions/ (then open predictions/review/index.html)"""
    from ..review import write_review
    _console().print(f"[green]wrote[/] {write_review(pred_dir, model=model, out=out, explain=explain, page_size=page_size, show_paths=show_paths, device=device)}")


def _exit_if_files_failed(failed: list[tuple[Path, str]]) -> None:
    """The good files are written; name each bad one on its own line and exit 2."""
    for path, problem in failed:
        print(f"error: {path}: {problem.removeprefix(f'{path}: ')}", file=sys.stderr)
    if failed:
        raise typer.Exit(2)


@app.command("export")
def export_cmd(
    model: Path = typer.Option(..., "--model", "-m", help="A fine-tuning run folder (the mean of its repeats, as predict uses it) or a classifier file."),
    format: str = typer.Option(..., "--format", "-f", help="onnx (probabilities from a normalised log-mel segment) | safetensors (no pickle)."),
    out: Path = typer.Option(..., "--out", "-o", help="Output file; a JSON sidecar <out>.json says how to feed it."),
    repeat: Optional[int] = typer.Option(None, "--repeat", help="Export only this repeat of a run folder."),
    candidate: Optional[str] = typer.Option(None, "--candidate", help="A --mode compare run folder: full | linear | baseline instead of the recommended one."),
    provenance: str = typer.Option("clean", "--provenance", help=PROVENANCE_HELP),
) -> None:
    """Export a classifier as ONNX or safetensors, with a JSON sidecar (classes, front-end, segment rule, operating point).

    Example: m2dx export --model runs/lung_ft --format onnx --out lung.onnx
    """
    from ..export import export_classifier, what_is_exported
    from ..inference import load_model_set

    if format not in ("onnx", "safetensors"):
        raise ConfigError(f"--format {format!r}: use onnx or safetensors")
    models = load_model_set(model, repeat=repeat, candidate=candidate)
    written = export_classifier(models, format, out, provenance=provenance)
    _console().print(f"exported {what_is_exported(models)}")
    _console().print(f"[green]wrote[/] {written} and {written}.json")


@app.command("evaluate")
def evaluate_cmd(
    model: Path = typer.Option(..., "--model", "-m", help="A fine-tuning run folder (its repeats are averaged) or a classifier file (e.g. RUN/best.pt)."),
    task: str = typer.Option(..., "--task", help=TASK_HELP),
    data: Path = typer.Option(..., "--data", help=DATA_HELP),
    out: Path = typer.Option(..., "--out", "-o", help="Folder for predictions.csv, metrics.json and the evaluation card."),
    split: str = typer.Option("all", "--split", help="Which segments to score: all (another site's data) | train | val | test (a run's own test split)."),
    subgroup: list[str] = typer.Option([], "--subgroup", help="A manifest column to report performance by (repeatable; --task csv)."),
    repeat: Optional[int] = typer.Option(None, "--repeat", help="Use only this repeat of a run folder instead of averaging all."),
    candidate: Optional[str] = typer.Option(None, "--candidate", help="A --mode compare run folder: full | linear | baseline instead of the recommended one."),
    bootstrap: Optional[int] = typer.Option(None, "--bootstrap", help="Bootstrap resamples over subjects for the CIs (default: the classifier's recipe)."),
    batch_size: int = typer.Option(32, "--batch-size", help="Segments per forward pass."),
    device: str = typer.Option("auto", "--device", help=DEVICE_HELP),
) -> None:
    """Score a trained classifier on labelled data, unchanged: metrics with CIs, calibration, subgroups, a card.

    Example: m2dx evaluate --model runs/lung_ft --task csv --data other_site.csv --out eval_site_b/
    """
    from ..evaluate import evaluate_classifier

    evaluate_classifier(model, task=task, data=data, out=out, split=split, subgroups=subgroup, repeat=repeat,
                        candidate=candidate, bootstrap=bootstrap, batch_size=batch_size, device=device)


# ----------------------------------------------------------------------------- quickstart
@app.command("quickstart")
def quickstart_cmd(
    out: Path = typer.Option(Path("m2dx_quickstart"), "--out", "-o", help="Where the demo data and runs go."),
    data: Optional[Path] = typer.Option(None, "--data", help="An ICBHI-layout folder to use instead of the generated demo recordings."),
    noise: Optional[Path] = typer.Option(None, "--noise", help="A noise folder instead of the bundled clips."),
) -> None:
    """The whole journey on a laptop in minutes: further-pretrain -> finetune -> report (tiny model, CPU).

    Example: m2dx quickstart --out /tmp/m2dx_demo
    """
    from ..quickstart import run_quickstart

    run_quickstart(out, data=data, noise=noise)

