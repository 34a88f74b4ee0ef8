"""Every file format that holds weights, read and written in one place.

- `names`: the published folder and file naming (`<model>-80x200p16x4p16k-<yymmdd>/checkpoint-N.pth`);
- `loading`: safe loading (`weights_only=True` + an allow-list) and `filter_checkpoint`, the one
  adapter from every accepted layout to the published keys;
- `training`: what pre-training writes (training checkpoints, resume state, the frozen teacher) and
  the background writer that saves them without stopping the loop;
- `classifier`: the self-describing fine-tuned classifier file that `m2dx predict` uses.

The published layout is a hard compatibility requirement: the reference loaders read what we save,
and we read what they published (docs/METHOD.md, "Checkpoints").
"""

from ..fileio import atomic_torch_save
from .loading import (
    EVAR_PREFIX,
    META_KEY,
    SAFE_GLOBALS,
    LoadedCheckpoint,
    build_m2d_from,
    filter_checkpoint,
    infer_predictor_config,
    infer_vit_config,
    load_checkpoint_file,
    norm_stats_of,
    peek_checkpoint,
    strict_load,
)
from .names import (
    checkpoint_epoch,
    checkpoint_folder_name,
    latest_checkpoint,
    list_checkpoints,
    model_family_name,
    parse_geometry_from_name,
)
from .training import (
    FORMAT_VERSION,
    RESUME_STATE,
    BackgroundSaver,
    host_snapshot,
    latest_resume_point,
    save_teacher,
    to_namespace,
    training_checkpoint,
)

__all__ = [
    "EVAR_PREFIX", "FORMAT_VERSION", "META_KEY", "RESUME_STATE", "SAFE_GLOBALS", "BackgroundSaver",
    "LoadedCheckpoint", "atomic_torch_save", "build_m2d_from", "checkpoint_epoch", "checkpoint_folder_name", "filter_checkpoint",
    "host_snapshot", "infer_predictor_config", "infer_vit_config", "latest_checkpoint", "latest_resume_point", "list_checkpoints",
    "load_checkpoint_file", "model_family_name", "norm_stats_of", "parse_geometry_from_name", "peek_checkpoint",
    "save_teacher", "strict_load", "to_namespace", "training_checkpoint",
]
