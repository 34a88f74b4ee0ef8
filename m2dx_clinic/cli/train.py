"""Commands that train: further-pretrain, pretrain, finetune, tune, recipes and report."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Optional

import typer

from ..errors import ConfigError
from .common import (CHECKPOINT_HELP, DATA_HELP, DEVICE_HELP, NORMAL_HELP, OUT_HELP, PROVENANCE_HELP, SET_HELP,
                     TASK_HELP, _console, _overrides, app)


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
    from .. import pretrain
    from ..report import BackgroundReporter

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
    from .. import pretrain

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
    mode: Optional[str] = typer.Option(None, "--mode", help="full (fine-tune the encoder, default) | linear (frozen encoder + logistic regression) | baseline (log-mel statistics) | compare (all three; the best on validation becomes best.pt)."),
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
    from ..config import load_params_toml, load_recipe, recipe_for_params
    from ..finetune import finetune
    from ..recipes import FinetuneRecipe

    if selection not in (None, "val", "test-best"):
        raise ConfigError(f"--selection must be val or test-best, got {selection!r}")
    if mode not in (None, "full", "linear", "baseline", "compare"):
        raise ConfigError(f"--mode must be full, linear, baseline or compare, got {mode!r}")
    if resume is not None:
        given = [flag for flag, value in (("--recipe", recipe), ("--params", params), ("--repeats", repeats),
                                          ("--seed", seed), ("--selection", selection), ("--mode", mode), ("--epochs", epochs),
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
        extra = {"run.repeats": repeats, "run.seed": seed, "run.selection": selection, "run.mode": mode, "optim.epochs": epochs,
                 "run.device": device, "run.out": str(out) if out else None, "run.model_name": name,
                 "run.provenance": provenance}
        rec = load_recipe(FinetuneRecipe, recipe_for_params(recipe, params), [*from_params, *_overrides(extra, sets)])
    if rec.run.mode == "compare":
        if resume is not None:
            raise ConfigError(f"{resume}: a comparison is not resumed; start it again with another --out")
        from ..compare import compare_candidates

        compared = compare_candidates(rec, task=task, data=data, checkpoint=checkpoint, normal_class=normal_class)
        _console().print(f"[green]done[/]: metrics.json (candidates, recommended), MODEL_CARD.md and best.pt "
                         f"({compared.recommended}) in {compared.run_dir}")
        return
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
    from ..tuning import tune

    name = {"tiny": "tiny_tune"}.get(recipe, recipe)
    # flags that set the tune recipe's [tune] table arrive as its overrides; --set overrides the fine-tuning recipe
    settings = _overrides({"tune.trials": trials, "tune.timeout": timeout, "tune.repeats": repeats,
                           "tune.pruner": pruner}, None)
    result = tune(task=task, data=data, checkpoint=checkpoint, tune_recipe=name, tune_overrides=settings,
                  storage=storage, study_name=study, out=out, normal_class=normal_class, overrides=list(sets or []),
                  final_test=not no_final_test)
    _console().print(f"[green]done[/]: best.toml, trials.csv and plots in {result.out_dir}")


@app.command("recipes")
def recipes_cmd() -> None:
    """List the bundled recipes (pass a name to --recipe, or copy the file and pass its path).

    Example: m2dx recipes
    """
    from rich.table import Table

    from ..config import RECIPES_DIR, list_recipes

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
    from ..progress import console
    from ..report import build_report, render_report_table

    if (probe or finetune) and (task is None or data is None):
        raise ConfigError("--probe and --finetune need --task and --data (the labelled data to score on)")
    report = build_report(run_dir, task=task, data=data, probe=probe, finetune=finetune,
                          finetune_recipe=finetune_recipe, normal_class=normal_class)
    console.print(render_report_table(report))  # its caption states the recommendation
    rec = report.get("recommendation") or {}
    for warning in rec.get("warnings", []):
        console.print(f"[yellow]warning: {warning}[/]")
    console.print(f"[green]report[/]: {Path(run_dir) / 'report' / 'report.html'}")


