"""Reading checkpoints safely and adapting every accepted layout to the published key names.

Published files are `torch.save({'model', 'optimizer', 'epoch', 'scaler', 'args'})` pickles. We
load them with `weights_only=True` and an allow-list of exactly what they need
(`argparse.Namespace`), so a crafted pickle is refused without running it. `filter_checkpoint` is
the one adapter at the edge: the training dict, a bare state dict, a DDP wrapper and the evaluation
package's fine-tuned prefix all come out with the published encoder keys.
"""

from __future__ import annotations

import argparse
import pickle
import re
from pathlib import Path
from typing import Any

import torch

from ..errors import CheckpointError, one_line
from ..models.m2d import M2D, PredictorConfig
from ..models.vit import DEFAULT_NORM_STATS, AudioViT, ViTConfig, is_encoder_key
from .names import parse_geometry_from_name

SAFE_GLOBALS = [argparse.Namespace]
EVAR_PREFIX = "module.ar.runtime.backbone."
META_KEY = "m2dx"  # our own metadata, beside the published keys
_BLOCK_INDEX = re.compile(r"^blocks\.(\d+)\.")
_DECODER_INDEX = re.compile(r"^decoder_blocks\.(\d+)\.")


# ---------------------------------------------------------------------------- loading
def load_checkpoint_file(path: str | Path, *, mmap: bool = False) -> dict[str, Any]:
    """torch.load with weights_only=True + the allow-list; anything else is refused with a clear message.

    `mmap=True` maps the tensors instead of reading them (zip-format files only): for metadata.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found; pass a .pth file, a run folder or a published name")
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            obj = torch.load(str(path), map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as exc:
        lines = str(exc).strip().splitlines()
        detail = next((ln.strip() for ln in lines if "GLOBAL" in ln or "global" in ln), None)
        if detail is None:  # a corrupt pickle stream (bad opcode), not a refused object
            operand = next((ln.strip() for ln in lines if "Unsupported operand" in ln), "corrupt pickle data")
            raise CheckpointError(
                f"{path}: not a readable PyTorch checkpoint ({operand[:160]}); re-download or re-save it"
            ) from None
        raise CheckpointError(
            f"{path}: refused to load: the file contains objects outside the safe allow-list "
            f"({detail[:160]}); only load checkpoints from sources you trust"
        ) from None
    except Exception as exc:  # garbage bytes surface as RuntimeError, EOFError, KeyError, ValueError, ...
        msg = one_line(exc)
        if isinstance(exc, KeyError):  # torch's legacy reader on a non-torch file: a bare magic number
            msg = "unrecognised file format"
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({msg}); re-download or re-save it") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a dict or state_dict, found {type(obj).__name__}")
    return obj


def filter_checkpoint(obj: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Any accepted layout -> a flat state dict with published key names.

    Accepts the full training dict (`model` key), a bare state dict, and fine-tuned weights from
    the evaluation package (`module.ar.runtime.backbone.` prefix; its head keys are dropped).
    """
    state = obj.get("model", obj) if isinstance(obj.get("model", None), dict) else obj
    state = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    if any(k.startswith(EVAR_PREFIX) for k in state):
        state = {k[len(EVAR_PREFIX):]: v for k, v in state.items() if k.startswith(EVAR_PREFIX)}
    elif state and all(k.startswith("module.") for k in state):  # DistributedDataParallel wrapper
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def infer_vit_config(state: dict[str, torch.Tensor], name_hint: str | Path | None = None,
                     meta: dict[str, Any] | None = None) -> ViTConfig:
    """Encoder geometry: our metadata, else the folder name, else the tensor shapes (checked against each other)."""
    if meta and "vit_config" in meta:
        cfg = dict(meta["vit_config"])
        cfg["input_size"] = tuple(cfg["input_size"])
        cfg["patch_size"] = tuple(cfg["patch_size"])
        return ViTConfig(**cfg)
    try:
        weight = state["patch_embed.proj.weight"]  # [D, 1, pf, pt]
        pos = state["pos_embed"]  # [1, 1 + F*T', D]
    except KeyError as exc:
        raise CheckpointError(
            f"{name_hint or 'checkpoint'}: missing encoder key {exc.args[0]!r}; is this an M2D checkpoint?"
        ) from None
    dim, patch = int(weight.shape[0]), (int(weight.shape[2]), int(weight.shape[3]))
    depth = 1 + max((int(m.group(1)) for k in state if (m := _BLOCK_INDEX.match(k))), default=-1)
    num_patches = int(pos.shape[1]) - 1
    sample_rate = 16000
    parsed = parse_geometry_from_name(name_hint) if name_hint is not None else None
    if parsed is not None:
        input_size, name_patch, sample_rate = parsed
        grid = (input_size[0] // name_patch[0]) * (input_size[1] // name_patch[1])
        if tuple(name_patch) != patch or grid != num_patches:
            raise CheckpointError(
                f"{name_hint}: folder name says {input_size[0]}x{input_size[1]} with {name_patch[0]}x{name_patch[1]} "
                f"patches, but the weights have {patch[0]}x{patch[1]} patches and {num_patches} positions; "
                "rename the folder to match the weights"
            )
    else:
        grid_f = 80 // patch[0]
        input_size = (80, (num_patches // grid_f) * patch[1])
    mlp_hidden = state.get("blocks.0.mlp.fc1.weight")
    mlp_ratio = float(mlp_hidden.shape[0]) / dim if mlp_hidden is not None else 4.0
    return ViTConfig(input_size=tuple(input_size), patch_size=patch, embed_dim=dim, depth=depth,
                     num_heads=max(1, dim // 64), mlp_ratio=mlp_ratio, sample_rate=sample_rate)


def infer_predictor_config(state: dict[str, torch.Tensor], meta: dict[str, Any] | None = None) -> PredictorConfig | None:
    if meta and "predictor_config" in meta:
        return PredictorConfig(**meta["predictor_config"])
    if "decoder_embed.weight" not in state:
        return None
    dim = int(state["decoder_embed.weight"].shape[0])
    depth = 1 + max((int(m.group(1)) for k in state if (m := _DECODER_INDEX.match(k))), default=-1)
    return PredictorConfig(dim=dim, depth=depth, num_heads=max(1, dim // 32))


def norm_stats_of(state: dict[str, torch.Tensor]) -> tuple[float, float]:
    stats = state.get("norm_stats")
    if stats is None or stats.numel() != 2:
        return DEFAULT_NORM_STATS
    return float(stats[0]), float(stats[1])


def strict_load(module: torch.nn.Module, state: dict[str, torch.Tensor], source: str, *, assign: bool = False) -> None:
    """load_state_dict that reports missing / unexpected / mis-shaped keys in one clear error.

    `assign=True` makes the module's tensors the loaded ones (for modules built on the meta device).
    """
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"missing keys: {_listing(missing)}")
        if unexpected:
            parts.append(f"unexpected keys: {_listing(unexpected)}")
        if shapes:
            parts.append("shape mismatch: " + _listing([f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in shapes]))
        raise CheckpointError(f"{source}: does not fit the model ({'; '.join(parts)})")
    module.load_state_dict(state, strict=True, assign=assign)


def _listing(keys: list[str], limit: int = 8) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f" (+{len(keys) - limit} more)" if len(keys) > limit else "")


def encoder_from_state(config: ViTConfig, state: dict[str, torch.Tensor], source: str) -> AudioViT:
    """An encoder holding exactly `state`, built without drawing from the global random generator.

    The module is made on the meta device (no initial weights are computed) and the checkpoint's
    tensors become its weights. Besides skipping a useless random init, this keeps a report built in
    a background thread from moving the training loop's random stream (a run stays reproducible).
    """
    with torch.device("meta"):
        encoder = AudioViT(config, norm_stats_of(state))
    strict_load(encoder, state, source, assign=True)
    return encoder.eval()


class LoadedCheckpoint:
    """A safely loaded checkpoint: the raw dict, its flat state dict, the geometry and our metadata."""

    def __init__(self, path: Path):
        self.path = path
        self.raw = load_checkpoint_file(path)
        self.state = filter_checkpoint(self.raw)
        meta = self.raw.get(META_KEY)
        self.meta: dict[str, Any] = meta if isinstance(meta, dict) else {}
        if self.meta.get("classifier_kind") == "baseline":
            raise CheckpointError(f"{path}: a log-mel baseline classifier, which has no encoder; use it with m2dx "
                                  "predict / export, or pass a checkpoint or a fine-tuned / linear classifier here")
        self.vit_config = infer_vit_config(self.state, path, self.meta)
        self.norm_stats = norm_stats_of(self.state)

    @property
    def encoder_state(self) -> dict[str, torch.Tensor]:
        state = {k: v for k, v in self.state.items() if is_encoder_key(k)}
        state.setdefault("norm_stats", torch.tensor(self.norm_stats, dtype=torch.float32))
        return state

    @property
    def epoch(self) -> int | None:
        return _epoch_of(self.raw)

    def encoder(self) -> AudioViT:
        """The encoder of this checkpoint, strictly loaded, in eval mode."""
        return encoder_from_state(self.vit_config, self.encoder_state, str(self.path))


def _epoch_of(raw: dict[str, Any]) -> int | None:
    epoch = raw.get("epoch")
    return int(epoch) if isinstance(epoch, (int, float)) else None


def peek_checkpoint(path: str | Path) -> tuple[int | None, dict[str, Any]]:
    """(epoch, our metadata) of a checkpoint without reading its weights.

    A ViT-B training checkpoint is ~2 GB; memory-mapping it reads only the small pickled part.
    Files in the legacy (non-zip) format cannot be mapped and are read whole.
    """
    try:
        raw = load_checkpoint_file(path, mmap=True)
    except CheckpointError:
        raw = load_checkpoint_file(path)  # legacy format, or a real problem: reported by this full read
    meta = raw.get(META_KEY)
    return _epoch_of(raw), meta if isinstance(meta, dict) else {}


def build_m2d_from(ckpt: LoadedCheckpoint, offline_dim: int | None,
                   predictor: PredictorConfig | None = None) -> tuple[M2D, list[str]]:
    """An M2D(-X) model initialised from a checkpoint: encoder, predictor and target when present.

    Returns the model and notes on what had to start fresh (e.g. the predictor of an encoder-only
    file; the offline predictor always starts fresh unless the checkpoint has one of the same size).
    """
    notes: list[str] = []
    pred_cfg = infer_predictor_config(ckpt.state, ckpt.meta) or predictor or PredictorConfig()
    model = M2D(ckpt.vit_config, pred_cfg, offline_dim=offline_dim, norm_stats=ckpt.norm_stats)
    own = model.state_dict()
    state = dict(ckpt.encoder_state)
    encoder_from_state(ckpt.vit_config, state, str(ckpt.path))  # the encoder must fit exactly
    has_predictor = "decoder_embed.weight" in ckpt.state
    has_target = "target_norm.weight" in ckpt.state
    for key, value in ckpt.state.items():
        if key.startswith(("decoder_", "mask_token")) and has_predictor:
            state[key] = value
        elif key.startswith(("target_blocks.", "target_norm.")) and has_target:
            state[key] = value
        elif key.startswith("offline_predictor.") and key in own and own[key].shape == value.shape:
            state[key] = value
    if not has_predictor:
        notes.append("the checkpoint has no predictor (encoder-only); the predictor starts fresh")
    bad = [k for k, v in state.items() if k in own and own[k].shape != v.shape]
    if bad:
        raise CheckpointError(f"{ckpt.path}: shape mismatch for {_listing(bad)}")
    model.load_state_dict(state, strict=False)
    if not has_target:
        model.copy_online_to_target()
        notes.append("the checkpoint has no target network; the target starts as a copy of the online encoder")
    return model, notes


