"""The `m2dx` command line: parse, validate, call one library function per command.

Every user-caused problem is an `M2DXError`: printed as ONE line on stderr with exit code 2.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Optional

import typer

from .errors import ConfigError, M2DXError, one_line, os_limit_error

app = typer.Typer(
    name="m2dx",
    help=(
        "Turn a small collection of body sounds into a strong classifier with M2D / M2D-X.\n\n"
        "Journey: further-pretrain -> report -> tune -> finetune -> predict.  Try: m2dx quickstart"
    ),
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)
weights_app = typer.Typer(help="Published M2D checkpoints: list and download.", no_args_is_help=True)
data_app = typer.Typer(help=(
    "Data sets: download, inspect, and export as a CSV manifest.\n\n"
    "A manifest has the columns path,label,subject[,split,start,end]: one row per recording or segment "
    "(start/end in seconds), paths relative to the CSV; --task csv and further-pretrain --data read it."),
    no_args_is_help=True)
cache_app = typer.Typer(help="The decoded-audio cache (log-mels of recordings and segments): size and cleaning.",
                        no_args_is_help=True)
app.add_typer(weights_app, name="weights")
app.add_typer(data_app, name="data")
app.add_typer(cache_app, name="cache")


def _version(value: bool) -> None:
    if value:
        from . import __version__

        print(f"m2dx_clinic {__version__}")
        raise typer.Exit()


@app.callback()
def _root(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                       help="Print the package version and exit.")) -> None:
    """Turn a small collection of body sounds into a strong classifier with M2D / M2D-X."""

SET_HELP = "Override any recipe key, e.g. --set optim.epochs=300 (repeatable)."
TASK_HELP = ("icbhi | sprsound (events, challenge task 1-2) | sprsound-1-1 (events normal/adventitious) | "
             "sprsound-2-1 / sprsound-2-2 (records) | csv")
DATA_HELP = ("ICBHI folder, SPRSound repository or BioCAS<year>/ folder, or for --task csv a CSV with columns path,label[,subject,split,start,end] "
             "(start/end in seconds; paths relative to the CSV).")
CHECKPOINT_HELP = "Checkpoint: a published name (m2dx weights list), a checkpoint folder or a .pth file."
NORMAL_HELP = "The class counted for Specificity (default: a class called normal)."
DEVICE_HELP = "auto (CUDA when present) | cpu | cuda | cuda:N"
OUT_HELP = "Run directory (default runs/<recipe>-<time>)."
PROVENANCE_HELP = ("clean (default): shipped files name no path, user, host, recording or subject | "
                   "full: keep the paths (for files that never leave the team).")


def _console():
    from .progress import console

    return console


def _overrides(pairs: dict[str, object], sets: list[str] | None) -> list[str]:
    """Typed CLI options become `key=value` overrides (applied before --set, which wins)."""
    from .config import to_overrides

    return to_overrides(pairs) + list(sets or [])


# ----------------------------------------------------------------------------- pre-training
@app.command("further-pretrain")
def further_pretrain_cmd(
    data: Optional[Path] = typer.Option(None, "--data", help="Your recordings: a folder (recursive) or a CSV with a `path` column."),
    noise: Optional[str] = typer.Option(None, "--noise", help="Background noise: a folder, a CSV, or `fsd50k` / `esc50` (see `m2dx data download`). Use `none` for no noise."),
    base: Optional[str] = typer.Option(None, "--base", help="Base checkpoint: a published name, a folder or a .pth file."),
    recipe: str = typer.Option("icbhi_m2dx", "--recipe", "-r", help="Recipe name in recipes/ or a TOML path."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Run directory (default runs/<recipe>-<time>)."),
    resume: Optional[Path] = typer.Option(None, "--resume", help="Continue the run in this directory from its last save."),
    epochs: Optional[int] = typer.Option(None, help="Number of epochs."),
    max_steps: Optional[int] = typer.Option(None, "--max-steps", help="Stop after this many optimiser steps (smoke runs)."),
    save_every: Optional[int] = typer.Option(None, "--save-every", help="Epochs between checkpoints."),
    min_ds_size: Optional[int] = typer.Option(None, "--min-ds-size", help="Inflate the file list to this many items per epoch."),
    noise_ratio: Optional[float] = typer.Option(None, "--noise-ratio", help="Noise mixing ratio r."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="Per-process batch size (before gradient accumulation)."),
    device: Optional[str] = typer.Option(None, "--device", help="auto | cpu | cuda | cuda:N"),
    data_root: Optional[Path] = typer.Option(None, "--data-root", help="Where named data sets live (default $M2DX_DATA or ~/.cache/m2dx/data)."),
    skip_bad: bool = typer.Option(False, "--skip-bad", help="Skip unreadable audio files instead of stopping."),
    sets: Optional[list[str]] = typer.Option(None, "--set", help=SET_HELP),
) -> None:
    """Further pre-train an M2D checkpoint on your recordings with M2D-X (teacher + noise).

    Example: m2dx further-pretrain --data ./my_sounds --noise fsd50k --out runs/lung
    """
    from . import pretrain
    from .report import BackgroundReporter

    on_save = BackgroundReporter()
    extra = {"base": base, "data.data": str(data) if data else None, "data.noise": "" if noise == "none" else noise,
             "run.out": str(out) if out else None, "optim.epochs": epochs, "run.max_steps": max_steps,
             "run.save_every": save_every, "data.min_ds_size": min_ds_size, "data.noise_ratio": noise_ratio,
             "optim.batch_size": batch_size, "run.device": device,
             "data.data_root": str(data_root) if data_root else None, "data.skip_bad": True if skip_bad else None}
    if noise == "none" and noise_ratio is None:
        extra["data.noise_ratio"] = 0.0  # no noise on purpose: the recorded recipe says so
    run_dir = pretrain.start_or_resume(recipe, resume, _overrides(extra, sets), on_save=on_save)
    on_save.close()  # the report of the last checkpoint
    _console().print(f"[green]done[/]: checkpoints, metrics.jsonl and report/ in {run_dir}")


@app.command("pretrain")
def pretrain_cmd(
    data: Optional[Path] = typer.Option(None, "--data", help="Training audio: folder or CSV (with `label` for the labels task)."),
    recipe: str = typer.Option("audioset_m2d", "--recipe", "-r", help="Recipe name or TOML path."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help=OUT_HELP),
    resume: Optional[Path] = typer.Option(None, "--resume", help="Continue the run in this directory from its last save."),
    nproc: int = typer.Option(1, "--nproc", help="Processes (GPUs) on this machine; >1 launches torchrun (DDP)."),
    device: Optional[str] = typer.Option(None, "--device", help=DEVICE_HELP),
    epochs: Optional[int] = typer.Option(None, "--epochs", help="Number of epochs (overrides the recipe)."),
    max_steps: Optional[int] = typer.Option(None, "--max-steps", help="Stop after this many optimiser steps (smoke runs)."),
    sets: Optional[list[str]] = typer.Option(None, "--set", help=SET_HELP),
) -> None:
    """Pre-train M2D from scratch (the AudioSet recipe), on one or several GPUs through torchrun.

    Example: m2dx pretrain --recipe audioset_m2d --data audioset.csv --nproc 8
    """
    if nproc > 1 and int(os.environ.get("WORLD_SIZE", "1")) == 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "-m", "m2dx_clinic", *_without_option(sys.argv[1:], "--nproc")]
        raise typer.Exit(subprocess.call(cmd))
    from . import pretrain

    extra = {"data.data": str(data) if data else None, "run.out": str(out) if out else None,
             "run.device": device, "optim.epochs": epochs, "run.max_steps": max_steps}
    run_dir = pretrain.start_or_resume(recipe, resume, _overrides(extra, sets), command="m2dx pretrain")
    if int(os.environ.get("RANK", "0")) == 0:
        _console().print(f"[green]done[/]: {run_dir}")


def _without_option(argv: list[str], option: str) -> list[str]:
    """argv minus `--opt VALUE` / `--opt=VALUE` (to re-launch the same command under torchrun)."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == option:
            skip = True
        elif not arg.startswith(option + "="):
            out.append(arg)
    return out


# ----------------------------------------------------------------------------- fine-tuning
@app.command("finetune")
def finetune_cmd(
    task: str = typer.Option("icbhi", "--task", help=TASK_HELP),
    data: Path = typer.Option(..., "--data", help="ICBHI / SPRSound folder, or a CSV manifest for --task csv."),
    checkpoint: str = typer.Option(..., "--checkpoint", "-c", help="Checkpoint: published name, folder or .pth."),
    resume: Optional[Path] = typer.Option(None, "--resume", help="Continue an interrupted run in this folder (its recipe.toml; finished repeats are kept)."),
    recipe: Optional[str] = typer.Option(None, "--recipe", "-r", help="Fine-tuning recipe name in recipes/ or a TOML path (default: the one --params was tuned with, else icbhi_finetune)."),
    params: Optional[Path] = typer.Option(None, "--params", help="best.toml from `m2dx tune`; it brings the recipe it was tuned with."),
    normal_class: Optional[str] = typer.Option(None, "--normal-class", help="Class counted for Specificity."),
    repeats: Optional[int] = typer.Option(None, "--repeats", help="Independent runs; reports mean ± 95% CI."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Seed of the first repeat (repeat k uses seed + k)."),
    selection: Optional[str] = typer.Option(None, "--selection", help="val (default) | test-best (literature protocol, optimistic)."),
    epochs: Optional[int] = typer.Option(None, "--epochs", help="Number of epochs (overrides the recipe)."),
    device: Optional[str] = typer.Option(None, "--device", help=DEVICE_HELP),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help=OUT_HELP),
    name: Optional[str] = typer.Option(None, "--name", help="The classifier's name on its model card (default: the task kind + a data fingerprint)."),
    provenance: Optional[str] = typer.Option(None, "--provenance", help=PROVENANCE_HELP),
    sets: Optional[list[str]] = typer.Option(None, "--set", help=SET_HELP),
) -> None:
    """Fine-tune and report ICBHI-style Sensitivity / Specificity / Score.

    Example: m2dx finetune --task icbhi --data ICBHI/ --checkpoint runs/lung/m2d_x_vit_base-80x200p16x4p16k-261126
    """
    from .config import load_params_toml, load_recipe, recipe_for_params
    from .finetune import finetune
    from .recipes import FinetuneRecipe

    if selection not in (None, "val", "test-best"):
        raise ConfigError(f"--selection must be val or test-best, got {selection!r}")
    if resume is not None:
        given = [flag for flag, value in (("--recipe", recipe), ("--params", params), ("--repeats", repeats),
                                          ("--seed", seed), ("--selection", selection), ("--epochs", epochs),
                                          ("--out", out), ("--name", name), ("--provenance", provenance),
                                          ("--set", sets)) if value]
        if given:
            raise ConfigError(f"{resume}: --resume continues the run with its own recipe.toml; drop {', '.join(given)} "
                              "(or start a new run with them)")
        if not (resume / "recipe.toml").is_file():
            raise ConfigError(f"{resume}: no recipe.toml, so not a fine-tuning run folder; pass the folder m2dx finetune wrote")
        rec = load_recipe(FinetuneRecipe, str(resume / "recipe.toml"), _overrides(
            {"run.out": str(resume), "run.device": device}, None))
    else:
        from_params = load_params_toml(params) if params else []
        extra = {"run.repeats": repeats, "run.seed": seed, "run.selection": selection, "optim.epochs": epochs,
                 "run.device": device, "run.out": str(out) if out else None, "run.model_name": name,
                 "run.provenance": provenance}
        rec = load_recipe(FinetuneRecipe, recipe_for_params(recipe, params), [*from_params, *_overrides(extra, sets)])
    result = finetune(rec, task=task, data=data, checkpoint=checkpoint, normal_class=normal_class,
                      resume=resume is not None)
    _console().print(f"[green]done[/]: metrics.json, predictions.csv and plots in {result.run_dir}")


@app.command("tune")
def tune_cmd(
    task: str = typer.Option("icbhi", "--task", help=TASK_HELP),
    data: Path = typer.Option(..., "--data", help=DATA_HELP),
    checkpoint: str = typer.Option(..., "--checkpoint", "-c", help=CHECKPOINT_HELP),
    recipe: str = typer.Option("icbhi_tune", "--recipe", "-r", help="Tune recipe (search space) name or TOML path; `tiny` = tiny_tune."),
    trials: Optional[int] = typer.Option(None, "--trials", help="Target number of finished trials in the study."),
    timeout: Optional[str] = typer.Option(None, "--timeout", help="Wall-clock limit of this invocation, e.g. 8h, 30m, 3600."),
    storage: Optional[str] = typer.Option(None, "--storage", help="Optuna storage URL (default sqlite:///OUT/optuna.db; postgresql://... to share)."),
    study: Optional[str] = typer.Option(None, "--study", help="Study name (default from the task and recipe)."),
    repeats: Optional[int] = typer.Option(None, "--repeats", help="Seeds per trial (averaged)."),
    pruner: Optional[str] = typer.Option(None, "--pruner", help="median | hyperband | wilcoxon | none"),
    normal_class: Optional[str] = typer.Option(None, "--normal-class", help=NORMAL_HELP),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Output folder of the search (default runs/tune-<task>-<recipe>)."),
    no_final_test: bool = typer.Option(False, "--no-final-test", help="Skip the final test-split run with the best parameters."),
    sets: Optional[list[str]] = typer.Option(None, "--set", help="Override fine-tuning recipe keys for every trial."),
) -> None:
    """Tune fine-tuning hyper-parameters with Optuna on the subject-disjoint validation split.

    Re-running the same command resumes the study. Example: m2dx tune --task icbhi --data ICBHI/ -c CKPT --trials 50 --timeout 8h
    """
    from .tuning import tune

    name = {"tiny": "tiny_tune"}.get(recipe, recipe)
    result = tune(task=task, data=data, checkpoint=checkpoint, tune_recipe=name, trials=trials,
                  timeout=timeout, storage=storage, study_name=study, out=out, repeats=repeats,
                  pruner=pruner, normal_class=normal_class, overrides=list(sets or []), final_test=not no_final_test)
    _console().print(f"[green]done[/]: best.toml, trials.csv and plots in {result.out_dir}")


@app.command("recipes")
def recipes_cmd() -> None:
    """List the bundled recipes (pass a name to --recipe, or copy the file and pass its path).

    Example: m2dx recipes
    """
    from rich.table import Table

    from .config import RECIPES_DIR, list_recipes

    table = Table(title=f"Recipes ({RECIPES_DIR})")
    for column in ("name", "read by", "what it is"):
        table.add_column(column, overflow="fold")
    for row in list_recipes():
        table.add_row(row["name"], row["command"], row["about"])
    _console().print(table)


# ----------------------------------------------------------------------------- report
@app.command("report")
def report_cmd(
    run_dir: Path = typer.Argument(..., help="A further-pretrain run directory."),
    task: Optional[str] = typer.Option(None, "--task", help="Labelled task for --probe / --finetune."),
    data: Optional[Path] = typer.Option(None, "--data", help=DATA_HELP),
    probe: bool = typer.Option(False, "--probe", help="Linear probe per checkpoint (validation Sp/Se/Score)."),
    finetune: bool = typer.Option(False, "--finetune", help="Full fine-tune per checkpoint (slow; the paper's Fig. 5 view)."),
    finetune_recipe: str = typer.Option("tiny_finetune", "--finetune-recipe", help="Fine-tuning recipe for --finetune (name or TOML path)."),
    normal_class: Optional[str] = typer.Option(None, "--normal-class", help=NORMAL_HELP),
) -> None:
    """Report how every checkpoint of a run is doing, and recommend one.

    Example: m2dx report runs/lung --task icbhi --data ICBHI/ --probe
    """
    from .progress import console
    from .report import build_report, render_report_table

    if (probe or finetune) and (task is None or data is None):
        raise ConfigError("--probe and --finetune need --task and --data (the labelled data to score on)")
    report = build_report(run_dir, task=task, data=data, probe=probe, finetune=finetune,
                          finetune_recipe=finetune_recipe, normal_class=normal_class)
    console.print(render_report_table(report))  # its caption states the recommendation
    rec = report.get("recommendation") or {}
    for warning in rec.get("warnings", []):
        console.print(f"[yellow]warning: {warning}[/]")
    console.print(f"[green]report[/]: {Path(run_dir) / 'report' / 'report.html'}")


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
    from .embed import embed_files

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
    ensemble: bool = typer.Option(False, "--ensemble", help="Average every repeat of the run folder (the default for a run folder)."),
    batch_size: int = typer.Option(32, "--batch-size", help="Segments per forward pass."),
    device: str = typer.Option("auto", "--device", help="auto (CUDA when present) | cpu | cuda | cuda:N"),
    amp: str = typer.Option("off", "--amp", help="off (fp32) | auto | bf16: mixed precision (GPUs; CPUs with bf16 units)."),
    as_json: bool = typer.Option(False, "--json", help="Print the summary and one record per recording as JSON (for scripts)."),
    html: bool = typer.Option(False, "--html", help="Also write the review page OUT/review/index.html (as m2dx review OUT)."),
) -> None:
    """Classify new recordings with a fine-tuned classifier: one row per segment and per recording.

    Example: m2dx predict --model runs/lung_ft new_recordings/ --out predictions/
    """
    import json

    from .predict import predict

    if ensemble and repeat is not None:
        raise ConfigError("--ensemble averages every repeat and --repeat picks one; pass only one of them")
    result = predict(model, inputs, out, segments=segments, window_seconds=window_seconds, hop_seconds=hop_seconds,
                     repeat=repeat, batch_size=batch_size, device=device, amp=amp, progress=not as_json)
    s = result.summary
    if as_json:
        print(json.dumps({"summary": s, "recordings": result.recordings.to_dict(orient="records")}, indent=2,
                         default=str))
        _exit_if_files_failed(result.failed)
        return
    for row in result.recordings.to_dict(orient="records"):
        _console().print(f"{Path(row['recording']).name}: {row['predicted']}, abnormal in "
                         f"{100 * row['abnormal_fraction']:.0f} % of {row['segments']} segment(s), "
                         f"max P(abnormal) {row['max_p_abnormal']:.2f}", highlight=False)
    _console().print(f"classified {s['recordings']} recording(s), {s['segments']} segment(s) with "
                     f"{len(s['classifier_files'])} classifier file(s); abnormal when {s['abnormal_rule']}")
    if s["real_time_factor"]:
        _console().print(f"{s['recordings_per_s']:.2f} recordings/s, {s['real_time_factor']:.0f}x real time on {s['device']}")
    _console().print(f"[green]wrote[/] {out / 'segments.csv'}, {out / 'recordings.csv'}, {out / 'summary.json'}")
    if html:
        from .review import write_review
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
    from .review import write_review
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
    provenance: str = typer.Option("clean", "--provenance", help=PROVENANCE_HELP),
) -> None:
    """Export a classifier as ONNX or safetensors, with a JSON sidecar (classes, front-end, segment rule, operating point).

    Example: m2dx export --model runs/lung_ft --format onnx --out lung.onnx
    """
    from .export import export_classifier, what_is_exported
    from .predict import load_model_set

    if format not in ("onnx", "safetensors"):
        raise ConfigError(f"--format {format!r}: use onnx or safetensors")
    models = load_model_set(model, repeat=repeat)
    written = export_classifier(models, format, out, provenance=provenance)
    _console().print(f"exported {what_is_exported(models)}")
    _console().print(f"[green]wrote[/] {written} and {written}.json")


# ----------------------------------------------------------------------------- weights
@weights_app.command("list")
def weights_list_cmd() -> None:
    """Show the published M2D checkpoints.

    Example: m2dx weights list
    """
    from rich.table import Table

    from .weights import PUBLISHED_WEIGHTS, weights_cache_dir

    table = Table(title=f"Published M2D weights (cache: {weights_cache_dir()})")
    table.add_column("name", no_wrap=True)
    table.add_column("input")
    table.add_column("patch")
    table.add_column("rate")
    table.add_column("what it is for", overflow="fold")
    for w in PUBLISHED_WEIGHTS:
        table.add_row(w.name, f"{w.input_size[0]}x{w.input_size[1]}", f"{w.patch_size[0]}x{w.patch_size[1]}",
                      f"{w.sample_rate // 1000} kHz", w.purpose)
    console = _console()
    console.print(table)
    console.print("Download URLs (m2dx weights download NAME fetches and unzips them):")
    for w in PUBLISHED_WEIGHTS:
        console.print(w.url, soft_wrap=True, highlight=False)


@weights_app.command("download")
def weights_download_cmd(
    name: str = typer.Argument(..., help="A name from `m2dx weights list`."),
    dir: Optional[Path] = typer.Option(None, "--dir", help="Destination (default $M2DX_WEIGHTS or ~/.cache/m2dx/weights)."),
    sha256: Optional[str] = typer.Option(None, "--sha256", help="Expected sha256 of the zip, if you have it."),
) -> None:
    """Download and unzip a published checkpoint (resumable, verified).

    Example: m2dx weights download m2d_vit_base-80x200p16x4-230529
    """
    from .weights import download_weights

    path = download_weights(name, dir, expected_sha256=sha256)
    _console().print(f"[green]ready[/]: {path}")


# ----------------------------------------------------------------------------- data
@data_app.command("download")
def data_download_cmd(
    name: str = typer.Argument(..., help="icbhi | fsd50k | esc50"),
    root: Optional[Path] = typer.Option(None, "--root", "--data-root", help="Data root (default $M2DX_DATA or ~/.cache/m2dx/data)."),
) -> None:
    """Download and verify a data set (resumable; FSD50K's multi-part zip is joined).

    Example: m2dx data download fsd50k
    """
    from .data.corpora import DATASETS, download_dataset

    if name not in DATASETS:
        raise ConfigError(f"unknown data set {name!r}; choose one of: {', '.join(DATASETS)}")
    spec = DATASETS[name]
    _console().print(f"{spec.description}\nterms: {spec.terms}")
    path = download_dataset(name, root)
    _console().print(f"[green]ready[/]: {path}")


@data_app.command("inspect")
def data_inspect_cmd(
    task: str = typer.Option("icbhi", "--task", help=TASK_HELP),
    data: Path = typer.Option(..., "--data", help=DATA_HELP),
    normal_class: Optional[str] = typer.Option(None, "--normal-class", help=NORMAL_HELP),
    as_json: bool = typer.Option(False, "--json", help="Print JSON for scripts instead of tables."),
) -> None:
    """Recordings, subjects, cycles per class per split, durations, sample rates, missing audio.

    Example: m2dx data inspect --task icbhi --data ICBHI/
    """
    import json

    from .data.inspection import inspect_task, print_inspect
    from .data.tasks import load_task

    info = inspect_task(load_task(task, data, normal_class=normal_class))
    if as_json:
        print(json.dumps(info, indent=2))
    else:
        print_inspect(info)


@data_app.command("export")
def data_export_cmd(
    task: str = typer.Option("icbhi", "--task", help=TASK_HELP),
    data: Path = typer.Option(..., "--data", help=DATA_HELP),
    out: Path = typer.Option(..., "--out", "-o", help="CSV file to write."),
    split: Optional[list[str]] = typer.Option(None, "--split", help="Only these splits (train / test); repeatable."),
    recordings: bool = typer.Option(False, "--recordings", help="One row per audio file (a further-pretrain manifest)."),
) -> None:
    """Write a task as a CSV manifest: labelled cycles for `--task csv`, or recordings for further-pretrain.

    Example: m2dx data export --task icbhi --data ICBHI/ --split train --recordings -o icbhi_train.csv
    """
    from .data.task_data import export_manifest
    from .data.tasks import load_task

    td = load_task(task, data)
    path = export_manifest(td, out, splits=split or ("train", "val", "test"), recordings=recordings)
    _console().print(f"[green]wrote[/] {path}")


# ----------------------------------------------------------------------------- cache
CACHE_DIR_HELP = "The cache folder (default <data root>/cache; a run's data.cache_dir, e.g. m2dx_quickstart/cache)."


@cache_app.command("info")
def cache_info_cmd(
    cache_dir: Optional[Path] = typer.Option(None, "--cache-dir", help=CACHE_DIR_HELP),
    data_root: Optional[Path] = typer.Option(None, "--data-root", help="Data root (default $M2DX_DATA or ~/.cache/m2dx/data)."),
) -> None:
    """Where the cache is and how big it is.

    Example: m2dx cache info
    """
    from .data.corpora import cache_root, cache_summary

    info = cache_summary(cache_root(cache_dir, data_root))
    console = _console()
    console.print(f"cache: {info['root']}" + ("" if info["exists"] else " (not created yet)"))
    for name, kind in info["kinds"].items():
        console.print(f"  {name:<7} {kind['entries']:>7} entries  {_size(kind['bytes']):>9}  {kind['what']}")
    console.print(f"  total   {info['entries']:>7} entries  {_size(info['bytes']):>9}")


@cache_app.command("clean")
def cache_clean_cmd(
    cache_dir: Optional[Path] = typer.Option(None, "--cache-dir", help=CACHE_DIR_HELP),
    data_root: Optional[Path] = typer.Option(None, "--data-root", help="Data root (default $M2DX_DATA or ~/.cache/m2dx/data)."),
    yes: bool = typer.Option(False, "--yes", "-y", help="Do not ask for confirmation."),
) -> None:
    """Empty the cache (everything in it is recomputed from the audio when needed).

    Example: m2dx cache clean --yes
    """
    from .data.corpora import cache_root, cache_summary, clean_cache

    root = cache_root(cache_dir, data_root)
    info = cache_summary(root)
    if not yes and not typer.confirm(f"delete {info['entries']} cache entries ({_size(info['bytes'])}) in {root}?"):
        raise typer.Exit(1)
    _console().print(f"[green]freed[/] {_size(clean_cache(root))} in {root}")


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TB"


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
    from .quickstart import run_quickstart

    run_quickstart(out, data=data, noise=noise)


def main() -> None:
    """Entry point: user errors become one line + exit 2; Ctrl-C exits 130 with a hint."""
    try:
        app()
    except M2DXError as exc:
        print(f"error: {one_line(exc, limit=None)}", file=sys.stderr)
        sys.exit(2)
    except (OSError, RuntimeError) as exc:
        limit = os_limit_error(exc)  # open files, disk space, memory maps: a setting to change, not a bug
        if limit is None:
            raise
        print(f"error: {limit}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted; further-pretrain, pretrain and finetune runs continue with --resume RUN_DIR "
              "(finished work is kept)", file=sys.stderr)
        sys.exit(130)
