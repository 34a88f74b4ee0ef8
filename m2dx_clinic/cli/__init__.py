"""The `m2dx` command line: parse, validate, call one library function per command.

Every user-caused problem is an `M2DXError`: printed as ONE line on stderr with exit code 2.
The commands live by what they do: `train` (pre-train, fine-tune, tune, report), `use` (embed,
predict, review, export, quickstart) and `stores` (weights, data, cache); `common` holds the apps.
"""

from __future__ import annotations

import sys

from ..errors import M2DXError, one_line, os_limit_error
from . import stores, train, use  # noqa: F401  (each registers its commands on the app)
from .common import app

__all__ = ["app", "main"]


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
