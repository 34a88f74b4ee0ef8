"""Atomic writes and the one JSON conversion shared by every module that writes results."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from m2dx_clinic import checkpoint, config
from m2dx_clinic.fileio import (
    atomic_link_or_copy,
    atomic_save_npy,
    atomic_savefig,
    atomic_torch_save,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
    to_jsonable,
)


def test_each_writer_creates_the_folder_and_leaves_no_temporary_file(tmp_path):
    folder = tmp_path / "a" / "b"
    assert atomic_write_bytes(folder / "x.bin", b"\x00\x01") == folder / "x.bin"
    assert (folder / "x.bin").read_bytes() == b"\x00\x01"
    atomic_write_text(folder / "x.txt", "héllo\n")
    assert (folder / "x.txt").read_text(encoding="utf-8") == "héllo\n"
    atomic_save_npy(folder / "x.npy", np.arange(6, dtype=np.float32).reshape(2, 3))
    assert np.load(folder / "x.npy").tolist() == [[0, 1, 2], [3, 4, 5]]
    atomic_torch_save({"w": torch.ones(2)}, folder / "x.pth")
    assert torch.load(folder / "x.pth", weights_only=True)["w"].tolist() == [1.0, 1.0]
    atomic_write_json(folder / "x.json", {"a": (1, 2)})
    assert (folder / "x.json").read_text() == '{\n  "a": [\n    1,\n    2\n  ]\n}\n'
    atomic_write_json(folder / "y.json", [], end="")
    assert (folder / "y.json").read_text() == "[]"
    assert sorted(p.name for p in folder.iterdir()) == ["x.bin", "x.json", "x.npy", "x.pth", "x.txt", "y.json"]


def test_link_or_copy_replaces_the_target_with_the_same_file(tmp_path, monkeypatch):
    import os

    from m2dx_clinic import fileio
    from m2dx_clinic.rundir import remove_stale_temp_files

    source = atomic_write_bytes(tmp_path / "repeat-1.pt", b"weights")
    atomic_write_bytes(tmp_path / "classifier.pt", b"old")
    atomic_link_or_copy(source, tmp_path / "classifier.pt")
    assert (tmp_path / "classifier.pt").read_bytes() == b"weights"
    assert os.stat(tmp_path / "classifier.pt").st_ino == os.stat(source).st_ino  # a link, not a copy

    def no_links(src, dst):
        raise OSError("cross-device link")

    monkeypatch.setattr(fileio.os, "link", no_links)
    atomic_link_or_copy(source, tmp_path / "copy.pt")
    assert (tmp_path / "copy.pt").read_bytes() == b"weights"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["classifier.pt", "copy.pt", "repeat-1.pt"]
    # the temporary name is the one a later run recognises as a dead writer's leftover
    leftover = fileio._temp_path(tmp_path / "classifier.pt").name.replace(str(os.getpid()), "999999999")
    (tmp_path / leftover).write_bytes(b"")
    assert [p.name for p in remove_stale_temp_files(tmp_path)] == [leftover]


def test_a_failed_write_keeps_the_old_file_and_removes_the_temporary_one(tmp_path):
    target = tmp_path / "keep.npy"
    atomic_save_npy(target, np.zeros(3))

    class Unsaveable:
        def __reduce__(self):
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        atomic_torch_save({"x": Unsaveable()}, tmp_path / "keep.npy")
    assert np.load(target).tolist() == [0.0, 0.0, 0.0]
    assert [p.name for p in tmp_path.iterdir()] == ["keep.npy"]


def test_savefig_takes_the_format_from_the_suffix(tmp_path):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(2, 2))
    fig.subplots().plot([0, 1], [1, 0])
    path = atomic_savefig(fig, tmp_path / "plot.png", dpi=50)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in tmp_path.iterdir()] == ["plot.png"]


def test_config_and_checkpoint_still_export_the_writers():
    assert config.atomic_write_text is atomic_write_text
    assert checkpoint.atomic_torch_save is atomic_torch_save


@dataclass
class _Point:
    x: float
    where: Path


def test_to_jsonable_gives_strict_json():
    value = {
        1: (np.int64(3), np.float32(0.5), np.bool_(True)),
        "nan": [math.nan, math.inf, -math.inf, np.float64("nan")],
        "tensor": torch.tensor(2.0),
        "tensor_vec": torch.tensor([1.0, float("nan")]),
        "array": np.array([[1, 2], [3, 4]]),
        "path": Path("a/b"),
        "point": _Point(1.0, Path("c")),
        "other": {3},
        "plain": [None, True, "s", 7],
    }
    out = to_jsonable(value)
    assert out == {
        "1": [3, 0.5, True],
        "nan": [None, None, None, None],
        "tensor": 2.0,
        "tensor_vec": [1.0, None],
        "array": [[1, 2], [3, 4]],
        "path": str(Path("a/b")),
        "point": {"x": 1.0, "where": "c"},
        "other": "{3}",
        "plain": [None, True, "s", 7],
    }
    json.dumps(out, allow_nan=False)  # strict: no NaN literals left
    assert to_jsonable(out) == out  # idempotent on plain JSON data


def test_to_jsonable_can_keep_non_finite_numbers_as_text_for_the_metric_log():
    row = to_jsonable({"loss": torch.tensor(float("nan")), "lr": float("inf"), "m": -math.inf, "ok": 1.5},
                      nonfinite="text")
    assert row == {"loss": "nan", "lr": "inf", "m": "-inf", "ok": 1.5}
    assert to_jsonable(object()).startswith("<object object")
