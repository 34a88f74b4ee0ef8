"""Commands for what lives on disk beside the runs: published weights, data sets and the cache."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ..errors import ConfigError
from .common import DATA_HELP, NORMAL_HELP, TASK_HELP, _console, cache_app, data_app, weights_app


# ----------------------------------------------------------------------------- weights
@weights_app.command("list")
def weights_list_cmd() -> None:
    """Show the published M2D checkpoints.

    Example: m2dx weights list
    """
    from rich.table import Table

    from ..weights import PUBLISHED_WEIGHTS, weights_cache_dir

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
    from ..weights import download_weights

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
    from ..data.corpora import DATASETS, download_dataset

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

    from ..data.inspection import inspect_task, print_inspect
    from ..data.tasks import load_task

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
    from ..data.task_data import export_manifest
    from ..data.tasks import load_task

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
    from ..data.corpora import cache_root, cache_summary

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
    from ..data.corpora import cache_root, cache_summary, clean_cache

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


