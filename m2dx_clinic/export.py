"""Exporting a classifier for other runtimes: ONNX, and safetensors for teams whose policy forbids pickles.

Both write the model plus a JSON sidecar (`<out>.json`) that says how to feed it: class names and
the normal class, the front-end (sample rate, mel settings), the segment rule (length, padding),
the normalisation statistics and the operating point. The ONNX graph takes the NORMALISED log-mel
segment `[batch, 1, n_mels, frames]` ((log-mel - mean) / std, the sidecar's `norm_stats`) and
returns class probabilities; the log-mel itself stays in the caller's hands because the exporter
cannot reproduce torchaudio's STFT faithfully.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any, Literal

import torch

from .checkpoint.classifier import LoadedClassifier, classifier_from_weights, classifier_weights
from .errors import ConfigError
from .fileio import atomic_write_bytes, atomic_write_json, to_jsonable

ExportFormat = Literal["onnx", "safetensors"]


class _Probabilities(torch.nn.Module):
    """The classifier with a softmax on top: what a deployment wants out of the graph."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, lms: torch.Tensor) -> torch.Tensor:  # [B, 1, n_mels, frames] -> [B, K]
        return torch.softmax(self.model(lms), dim=-1)


def input_frames(clf: LoadedClassifier) -> int:
    """Frames of one fitted segment: 1 + floor(samples / hop)."""
    frontend = clf.frontend
    return frontend.num_frames(int(round(clf.segment_seconds * frontend.sample_rate)))


def sidecar(clf: LoadedClassifier, fmt: str) -> dict[str, Any]:
    """What a runtime needs to feed the exported model correctly."""
    meta = clf.meta
    return to_jsonable({
        "format": fmt, "classes": clf.classes, "normal_class": clf.classes[clf.normal_index],
        "normal_class_index": clf.normal_index, "frontend": meta["frontend"], "segment": meta["segment"],
        "norm_stats": meta["norm_stats"], "operating_point": clf.operating_point,
        "input": {"name": "lms", "shape": ["batch", 1, clf.frontend.n_mels, input_frames(clf)],
                  "meaning": "normalised log-mel of one fitted segment: (log-mel - norm_stats[0]) / norm_stats[1]"},
        "output": {"name": "probs", "meaning": "class probabilities, in the order of `classes`"},
        "abnormal_rule": "P(abnormal) = 1 - probs[normal_class_index] >= operating_point.threshold",
        "source": str(clf.path), "package_version": meta.get("package_version"), "vit_config": meta.get("vit_config"),
        "data": meta.get("data"), "scores": meta.get("scores"),
    })


def export_onnx(clf: LoadedClassifier, out: Path) -> Path:
    """`out` (.onnx) with a dynamic batch axis, plus the sidecar; checked with onnx.checker."""
    try:
        import onnx
    except ImportError:
        raise ConfigError("ONNX export needs the onnx extra: pip install -e '.[onnx]'") from None
    out.parent.mkdir(parents=True, exist_ok=True)
    module = _Probabilities(clf.model.eval().cpu())
    example = torch.zeros(2, 1, clf.frontend.n_mels, input_frames(clf))
    tmp = out.with_name(f".{out.name}.export.onnx")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporter's deprecation and tracer notes are not the user's business
        torch.onnx.export(module, (example,), str(tmp), input_names=["lms"], output_names=["probs"],
                          dynamic_shapes={"lms": {0: torch.export.Dim("batch", min=1, max=4096)}}, dynamo=True,
                          external_data=False, verbose=False)
    try:
        onnx.checker.check_model(str(tmp))
        atomic_write_bytes(out, tmp.read_bytes())
    finally:
        tmp.unlink(missing_ok=True)
    atomic_write_json(out.with_suffix(out.suffix + ".json"), sidecar(clf, "onnx"))
    return out


def export_safetensors(clf: LoadedClassifier, out: Path) -> Path:
    """`out` (.safetensors): the encoder's published keys + `head.*`, no pickle; metadata in the sidecar."""
    from safetensors.torch import save

    atomic_write_bytes(out, save(classifier_weights(clf.model), metadata={"format": "m2dx-classifier"}))
    atomic_write_json(out.with_suffix(out.suffix + ".json"), {**sidecar(clf, "safetensors"), "meta": clf.meta})
    return out


def load_safetensors_classifier(path: str | Path) -> LoadedClassifier:
    """A safetensors export and its sidecar back into a LoadedClassifier (no pickle is read)."""
    from safetensors.torch import load_file

    path = Path(path).expanduser()
    side = path.with_suffix(path.suffix + ".json")
    try:
        meta = json.loads(side.read_text(encoding="utf-8"))["meta"]
    except (OSError, ValueError, KeyError):
        raise ConfigError(f"{side}: the sidecar of {path.name} is missing or damaged; export again") from None
    return LoadedClassifier(path, classifier_from_weights(load_file(str(path)), meta, str(path)), meta)


def export_classifier(clf: LoadedClassifier, fmt: ExportFormat, out: str | Path) -> Path:
    """Dispatch on the format; the output folder is created."""
    out = Path(out).expanduser()
    if fmt == "onnx":
        return export_onnx(clf, out)
    if fmt == "safetensors":
        return export_safetensors(clf, out)
    raise ConfigError(f"--format {fmt!r}: use onnx or safetensors")
