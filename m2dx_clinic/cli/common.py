"""What every command shares: the Typer apps, the option help texts and how flags become recipe overrides."""

from __future__ import annotations

import typer

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
        from .. import __version__

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
    from ..progress import console

    return console


def _overrides(pairs: dict[str, object], sets: list[str] | None) -> list[str]:
    """Typed CLI options become `key=value` overrides (applied before --set, which wins)."""
    from ..config import to_overrides

    return to_overrides(pairs) + list(sets or [])

