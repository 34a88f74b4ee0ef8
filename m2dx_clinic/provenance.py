"""What the files a team hands on may say about where a classifier came from.

A classifier file, an export and its sidecar, the model card: these leave the team. By default
("clean") they carry no absolute path, user or host name, recording name or subject id: the data
is named by the fingerprint of its items, a base checkpoint by its published name or a fingerprint
of its content, and files of the run by their path inside the run folder. `run.provenance = "full"`
(`--provenance full`) keeps the paths, for a team that ships nothing.

Run records that need identifiers to be recomputed (`INTERNAL_RECORDS`: predictions.csv,
metrics.json, ...) keep them whatever the mode; the model card says they stay inside the team.

Every writer of a shipped file goes through `Provenance` (one `scrub` for free text and
metadata), so the rule lives here and nowhere else.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from .fileio import content_sha256, file_identity

ProvenanceMode = Literal["clean", "full"]
PROVENANCE_MODES = ("clean", "full")
INTERNAL_RECORDS = ("predictions.csv", "metrics.json", "epochs.csv", "inputs.json")
"""Run records that keep recording names, subject ids and paths: for the team, never shipped."""

PATH_PLACEHOLDER = "<path>"
# An absolute or home-relative path inside free text: starts at "/" or "~/" not preceded by a word
# character or a dot (so "mean / std", "train/val" and "Se/Sp" stay), and runs to the next space or quote.
_PATH_IN_TEXT = re.compile(r"(?<![\w.~/])(?:~/|/)[^\s'\"`,;()\[\]{}<>]+")


def scrub_text(text: str) -> str:
    """`text` with every absolute or home-relative path replaced by `<path>`."""
    return _PATH_IN_TEXT.sub(PATH_PLACEHOLDER, text)


def scrub(value: Any) -> Any:
    """A JSON-like value with every path-looking string scrubbed; a string that is only a path becomes ""."""
    if isinstance(value, str):
        if _PATH_IN_TEXT.fullmatch(value.strip()):
            return ""
        return scrub_text(value)
    if isinstance(value, dict):
        return {k: scrub(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(scrub(v) for v in value)
    return value


def short_sha(sha256: str) -> str:
    return f"sha256:{sha256[:12]}"


def describe_checkpoint(path: Path, published: str | None, mode: ProvenanceMode) -> str:
    """How shipped files name a base checkpoint (the file a run loaded, `weights.ResolvedCheckpoint`): its
    published name when it has one, else its resolved path (full) or the fingerprint of its content (clean)."""
    if published:
        return published
    if mode == "full":
        return str(Path(path).expanduser().resolve())
    identity = file_identity(path)
    if identity is None:
        raise FileNotFoundError(f"{path}: checkpoint vanished while being fingerprinted")
    return f"checkpoint {short_sha(content_sha256(identity))}"


@dataclass(frozen=True)
class Provenance:
    """What shipped files say about a run, decided once per run (see the module docstring)."""

    mode: ProvenanceMode
    name: str  # the classifier's name on its card and in its files
    task_kind: str  # icbhi | sprsound | csv
    data: str  # how shipped files name the data
    checkpoint: str  # how they name the base checkpoint
    command: str  # the command that reproduces the run, as shipped files show it
    placeholders: dict[str, str]  # placeholder in `command` -> what to put there (clean mode)

    def scrub(self, value: Any) -> Any:
        """`value` as a shipped file may carry it (unchanged in full mode)."""
        return value if self.mode == "full" else scrub(value)

    def as_dict(self) -> dict[str, Any]:
        return {"mode": self.mode, "name": self.name, "task_kind": self.task_kind, "data": self.data,
                "checkpoint": self.checkpoint, "command": self.command, "placeholders": self.placeholders,
                "internal_records": list(INTERNAL_RECORDS)}


def run_provenance(mode: ProvenanceMode, *, task: str, data: str | Path, data_sha256: str, checkpoint: Path,
                   published: str | None, run_dir: Path, name: str = "", normal_class: str | None = None) -> Provenance:
    """The Provenance of a fine-tuning run; `command` re-runs it from the resolved recipe.toml of `run_dir`.

    The command passes the run's own recipe.toml (every resolved setting: tuned parameters, repeats,
    epochs, seed), so it reproduces the run whatever flags started it. `checkpoint` is the file the run
    loaded, `published` the published name it was found by (None for a folder or file).
    """
    if mode not in PROVENANCE_MODES:
        from .errors import ConfigError

        raise ConfigError(f"run.provenance must be clean or full, got {mode!r}")
    ckpt = describe_checkpoint(checkpoint, published, mode)
    card_name = name or f"{task}-{data_sha256[:8]}"
    if mode == "full":
        data_text = str(Path(data).expanduser().resolve())
        args = ["--data", data_text, "--checkpoint", ckpt, "--recipe", str((run_dir / "recipe.toml").resolve())]
        placeholders: dict[str, str] = {}
    else:
        data_text = f"{task} data {short_sha(data_sha256)}"
        args = ["--data", "DATA", "--checkpoint", "CHECKPOINT", "--recipe", "recipe.toml"]
        placeholders = {"DATA": f"the {task} data whose items have fingerprint {short_sha(data_sha256)}",
                        "CHECKPOINT": f"the base checkpoint ({ckpt})",
                        "recipe.toml": "the resolved recipe in this run folder"}
    command = ["m2dx", "finetune", "--task", task, *args]
    if normal_class:
        command += ["--normal-class", normal_class]
    return Provenance(mode, card_name, task, data_text, ckpt, shlex.join(command), placeholders)
