"""Run folders: where a command writes when the user gives no `--out`, and fresh names that never clash.

Every command that writes a run folder (further-pretrain, pretrain, finetune, tune, report, quickstart)
takes its folder rules from here, so they behave the same everywhere.
"""

from __future__ import annotations

import time
from pathlib import Path


def fresh_dir(path: str | Path) -> Path:
    """`path`, or `path-2`, `path-3`, ... when something of that name already exists."""
    path = Path(path)
    if not path.exists():
        return path
    n = 2
    while path.with_name(f"{path.name}-{n}").exists():
        n += 1
    return path.with_name(f"{path.name}-{n}")


def default_run_dir(name: str, root: str | Path = "runs") -> Path:
    """`runs/<name>-<yyyymmdd-hhmmss>`, made unique with a `-N` suffix when started within the same second."""
    return fresh_dir(Path(root) / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}")
