"""Exporting a classifier for other runtimes: ONNX, and safetensors for teams whose policy forbids pickles.

A run folder exports the classifier that `m2dx predict` and the model card use: the mean of its
repeats' probabilities (one ONNX graph; one safetensors file with every member) and the ensemble's
operating point; `--repeat K` or a classifier file exports that one file.

Both write the model plus a JSON sidecar (`<out>.json`) that says how to feed it: class names and
the normal class, the front-end (sample rate, mel settings), the segment rule (length, padding),
the normalisation statistics, the temperature and the operating point. The ONNX graph takes the NORMALISED log-mel
segment `[batch, 1, n_mels, frames]` ((log-mel - mean) / std, the sidecar's `norm_stats`) and
returns class probabilities (after the temperature, when the classifier has one); the log-mel itself stays in the caller's hands because the exporter
cannot reproduce torchaudio's STFT faithfully.

By default (`provenance="clean"`) nothing exported names the exporting machine: the ONNX file loses
the exporter's doc strings and metadata (source-file paths of the exporting Python), and the sidecar
names its source by file name only (see `provenance`).
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any, Literal, Sequence

import torch

from .checkpoint.classifier import LoadedClassifier, classifier_from_weights, classifier_weights
from .errors import ConfigError
from .fileio import atomic_write_bytes, atomic_write_json, to_jsonable
from .inference import ModelSet
from .provenance import ProvenanceMode, scrub

ExportFormat = Literal["onnx", "safetensors"]


class _Probabilities(torch.nn.Module):
    """The classifier (or the mean of a run's repeats) with a softmax on top: what a deployment wants."""

    def __init__(self, members: Sequence[torch.nn.Module], temperature: float | None = None):
        super().__init__()
        self.members = torch.nn.ModuleList(members)
        self.temperature = temperature  # temperature scaling of the (mean) probabilities, as predict applies it

    def forward(self, lms: torch.Tensor) -> torch.Tensor:  # [B, 1, n_mels, frames] -> [B, K]
        probs = torch.softmax(self.members[0](lms), dim=-1)
        for member in self.members[1:]:
            probs = probs + torch.softmax(member(lms), dim=-1)
        probs = probs / len(self.members)
        if self.temperature:  # softmax(log p / T), `evaluation.calibration.apply_temperature`
            probs = torch.softmax(torch.log(probs.clamp_min(1e-12)) / self.temperature, dim=-1)
        return probs


def input_frames(clf: LoadedClassifier) -> int:
    """Frames of one fitted segment: 1 + floor(samples / hop)."""
    frontend = clf.frontend
    return frontend.num_frames(int(round(clf.segment_seconds * frontend.sample_rate)))


def _as_model_set(model: LoadedClassifier | ModelSet) -> ModelSet:
    if isinstance(model, ModelSet):
        return model
    temperature = (model.meta.get("calibration") or {}).get("temperature")
    return ModelSet([model], model.operating_point, str(model.path), temperature)


def what_is_exported(models: ModelSet) -> str:
    """One line for the user and the sidecar: which classifier this is, and why."""
    n = len(models.members)
    if n == 1:
        return f"one classifier file ({models.first.path.name}) with its own operating point"
    return (f"the mean of the {n} repeats' probabilities with the ensemble's operating point: the classifier "
            "m2dx predict and the model card use for this run folder (pass --repeat K for one repeat)")


def sidecar(model: LoadedClassifier | ModelSet, fmt: str, provenance: ProvenanceMode = "clean") -> dict[str, Any]:
    """What a runtime needs to feed the exported model correctly."""
    models = _as_model_set(model)
    clf = models.first
    meta = clf.meta
    source = Path(models.source)
    out = to_jsonable({
        "format": fmt, "classes": clf.classes, "normal_class": clf.classes[clf.normal_index],
        "normal_class_index": clf.normal_index, "frontend": meta["frontend"], "segment": meta["segment"],
        "norm_stats": meta["norm_stats"], "operating_point": models.operating_point,
        "members": len(models.members), "classifier": what_is_exported(models),
        "classifier_kind": clf.kind, "method": meta.get("method") or "the pre-trained encoder fine-tuned with a linear head",
        "input": {"name": "lms", "shape": ["batch", 1, clf.frontend.n_mels, input_frames(clf)],
                  "meaning": "normalised log-mel of one fitted segment: (log-mel - norm_stats[0]) / norm_stats[1]"},
        "output": {"name": "probs", "meaning": "class probabilities, in the order of `classes`"
                   + (f" (the mean of {len(models.members)} members)" if len(models.members) > 1 else "")},
        "abnormal_rule": "P(abnormal) = 1 - probs[normal_class_index] >= operating_point.threshold",
        "temperature": models.temperature,
        "calibration": (f"temperature scaling T = {models.temperature:.6g} (fitted on validation): ONNX output "
                        "already includes it; with safetensors apply softmax(log(mean probs) / T) before the "
                        "operating point" if models.temperature else "none: probabilities as the model gives them"),
        "source": str(source) if provenance == "full" else source.name, "package_version": meta.get("package_version"),
        "vit_config": meta.get("vit_config"), "data": meta.get("data"), "scores": meta.get("scores"),
    })
    return out if provenance == "full" else scrub(out)


def clean_onnx(model: Any) -> Any:
    """Drop what the exporter records about the exporting machine: doc strings and metadata (source-file
    paths and stack traces with the user's home folder) on the model, graph, nodes, functions and values."""
    def strip(item: Any) -> None:
        item.doc_string = ""
        if hasattr(item, "metadata_props"):
            del item.metadata_props[:]

    def strip_nodes(nodes: Any) -> None:
        for node in nodes:
            strip(node)
            for attr in node.attribute:  # control flow (If, Loop, Scan) carries sub-graphs
                attr.doc_string = ""
                for sub in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
                    strip_graph(sub)

    def strip_graph(graph: Any) -> None:
        strip(graph)
        for value in [*graph.input, *graph.output, *graph.value_info, *graph.initializer]:
            strip(value)
        strip_nodes(graph.node)

    strip(model)
    strip_graph(model.graph)
    for function in model.functions:
        strip(function)
        strip_nodes(function.node)
    return model


def export_onnx(model: LoadedClassifier | ModelSet, out: Path, provenance: ProvenanceMode = "clean") -> Path:
    """`out` (.onnx) with a dynamic batch axis, plus the sidecar; cleaned, then checked with onnx.checker."""
    try:
        import onnx
    except ImportError:
        raise ConfigError("ONNX export needs the onnx extra: pip install -e '.[onnx]'") from None
    models = _as_model_set(model)
    clf = models.first
    out.parent.mkdir(parents=True, exist_ok=True)
    module = _Probabilities([m.model.eval().cpu() for m in models.members], models.temperature)
    example = torch.zeros(2, 1, clf.frontend.n_mels, input_frames(clf))
    tmp = out.with_name(f".{out.name}.export.onnx")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporter's deprecation and tracer notes are not the user's business
        torch.onnx.export(module, (example,), str(tmp), input_names=["lms"], output_names=["probs"],
                          dynamic_shapes={"lms": {0: torch.export.Dim("batch", min=1, max=4096)}}, dynamo=True,
                          external_data=False, verbose=False)
    try:
        graph = onnx.load(str(tmp))
        if provenance == "clean":
            graph = clean_onnx(graph)
        onnx.checker.check_model(graph)
        atomic_write_bytes(out, graph.SerializeToString())
    finally:
        tmp.unlink(missing_ok=True)
    atomic_write_json(out.with_suffix(out.suffix + ".json"), sidecar(models, "onnx", provenance))
    return out


MEMBER_PREFIX = "member{}."


def export_safetensors(model: LoadedClassifier | ModelSet, out: Path, provenance: ProvenanceMode = "clean") -> Path:
    """`out` (.safetensors): the encoder's published keys + `head.*`, no pickle; metadata in the sidecar.

    An ensemble stores each member under `member<k>.`; the sidecar's `members_meta` lists their metadata
    and `load_safetensors_classifiers` reads them all back (average their probabilities).
    """
    from safetensors.torch import save

    models = _as_model_set(model)
    clean = (lambda v: v) if provenance == "full" else scrub
    if len(models.members) == 1:
        weights = classifier_weights(models.first.model)
        extra: dict[str, Any] = {"meta": clean(models.first.meta)}
    else:
        weights = {MEMBER_PREFIX.format(k) + name: tensor for k, m in enumerate(models.members)
                   for name, tensor in classifier_weights(m.model).items()}
        extra = {"meta": clean(models.first.meta), "members_meta": [clean(m.meta) for m in models.members]}
    atomic_write_bytes(out, save(weights, metadata={"format": "m2dx-classifier", "members": str(len(models.members))}))
    atomic_write_json(out.with_suffix(out.suffix + ".json"), {**sidecar(models, "safetensors", provenance), **extra})
    return out


def _read_sidecar(path: Path) -> dict[str, Any]:
    side = path.with_suffix(path.suffix + ".json")
    try:
        data = json.loads(side.read_text(encoding="utf-8"))
        data["meta"]
    except (OSError, ValueError, KeyError):
        raise ConfigError(f"{side}: the sidecar of {path.name} is missing or damaged; export again") from None
    return data


def load_safetensors_classifiers(path: str | Path) -> list[LoadedClassifier]:
    """Every member of a safetensors export (one for a single classifier), without reading a pickle."""
    from safetensors.torch import load_file

    path = Path(path).expanduser()
    side = _read_sidecar(path)
    weights = load_file(str(path))
    metas = side.get("members_meta") or [side["meta"]]
    if len(metas) == 1:
        return [LoadedClassifier(path, classifier_from_weights(weights, metas[0], str(path)), metas[0])]
    out = []
    for k, meta in enumerate(metas):
        prefix = MEMBER_PREFIX.format(k)
        own = {name[len(prefix):]: t for name, t in weights.items() if name.startswith(prefix)}
        out.append(LoadedClassifier(path, classifier_from_weights(own, meta, f"{path} (member {k})"), meta))
    return out


def load_safetensors_classifier(path: str | Path) -> LoadedClassifier:
    """A single-classifier safetensors export and its sidecar back into a LoadedClassifier (no pickle is read)."""
    members = load_safetensors_classifiers(path)
    if len(members) != 1:
        raise ConfigError(f"{path}: holds an ensemble of {len(members)} members; read it with "
                          "load_safetensors_classifiers and average their probabilities")
    return members[0]


def export_classifier(model: LoadedClassifier | ModelSet, fmt: ExportFormat, out: str | Path,
                      provenance: ProvenanceMode = "clean") -> Path:
    """Dispatch on the format; the output folder is created. A ModelSet of several repeats exports their mean."""
    out = Path(out).expanduser()
    if provenance not in ("clean", "full"):
        raise ConfigError(f"--provenance {provenance!r}: use clean or full")
    if fmt == "onnx":
        return export_onnx(model, out, provenance)
    if fmt == "safetensors":
        out.parent.mkdir(parents=True, exist_ok=True)
        return export_safetensors(model, out, provenance)
    raise ConfigError(f"--format {fmt!r}: use onnx or safetensors")
