"""End-to-end user journeys through the real CLI (issue: the first ten minutes).

1. `m2dx quickstart`: generated example data -> further-pretrain -> finetune -> report.
2. "Bring your own recordings" on the shared ICBHI subset treated as a CSV task:
   export -> inspect -> further-pretrain -> report --probe -> tune -> finetune --params.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pandas as pd
import pytest

from m2dx_clinic import checkpoint as ckpt_io
from m2dx_clinic.weights import load_encoder
from m2dx_clinic.metrics import icbhi_scores

M2DX = [sys.executable, "-m", "m2dx_clinic"]
ENV = {**os.environ, "M2DX_NO_PROGRESS": "1"}


def m2dx(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    proc = subprocess.run([*M2DX, *args], capture_output=True, text=True, timeout=timeout, env=ENV)
    assert proc.returncode == 0, f"m2dx {' '.join(args)} failed:\n{proc.stderr[-3000:]}"
    return proc


def check_finetune_outputs(run: Path) -> dict:
    for name in ("metrics.json", "predictions.csv", "epochs.csv", "recipe.toml", "best.pt",
                 "confusion_matrix.png", "learning_curves.png"):
        assert (run / name).is_file(), name
    metrics = json.loads((run / "metrics.json").read_text())
    preds = pd.read_csv(run / "predictions.csv")
    test = preds[(preds["split"] == "test") & (preds["repeat"] == 0)]
    recomputed = icbhi_scores(test["true_index"].to_numpy(), test["pred_index"].to_numpy(),
                              normal_class=metrics["normal_class_index"], num_classes=len(metrics["classes"]))
    first = metrics["runs"][0]["test"]
    for key in ("sp", "se", "score", "accuracy"):
        assert recomputed[key] == pytest.approx(first[key], abs=1e-9), key
    return metrics


def check_report(run: Path, rows: int) -> dict:
    report_dir = run / "report"
    for name in ("report.json", "report.md", "report.html", "loss_curves.png", "health.png"):
        assert (report_dir / name).is_file(), name
    report = json.loads((report_dir / "report.json").read_text())
    assert len(report["rows"]) == rows
    assert report["recommendation"]["epoch"] is not None
    html = (report_dir / "report.html").read_text()
    assert "loss_curves.png" in html and "<table" in html
    return report


@pytest.mark.slow
def test_quickstart_journey(tmp_path):
    out = tmp_path / "qs"
    proc = m2dx("quickstart", "--out", str(out), timeout=900)
    assert "report.html" in proc.stderr + proc.stdout
    run = out / "further_pretrain"
    assert [e for e, _ in ckpt_io.list_checkpoints(run)] == [5, 10]
    load_encoder(ckpt_io.list_checkpoints(run)[-1][1])
    check_finetune_outputs(out / "finetune")
    report = check_report(run, rows=3)  # epoch 0 (initial teacher), 5, 10
    assert all(row["probe"] is not None for row in report["rows"])
    # a second call reuses what is done and finishes quickly
    again = m2dx("quickstart", "--out", str(out), timeout=600)
    assert "done in" in again.stderr + again.stdout


@pytest.mark.slow
@pytest.mark.realdata
def test_own_recordings_journey_on_shared_icbhi_as_csv(tmp_path, icbhi_dir, noise_dir):
    labels = tmp_path / "labels.csv"
    m2dx("data", "export", "--task", "icbhi", "--data", str(icbhi_dir), "-o", str(labels))
    table = pd.read_csv(labels)
    assert {"path", "label", "subject", "split", "start", "end"} <= set(table.columns)
    assert len(table) == 1065
    info = json.loads(m2dx("data", "inspect", "--task", "csv", "--data", str(labels), "--json").stdout)
    assert info["items"] if "items" in info else info
    files = tmp_path / "train_files.csv"
    m2dx("data", "export", "--task", "csv", "--data", str(labels), "--split", "train", "--recordings", "-o", str(files))
    assert len(pd.read_csv(files)) == 52  # training recordings with audio

    run = tmp_path / "pretrain"
    m2dx("further-pretrain", "--recipe", "tiny_cpu", "--data", str(files), "--noise", str(noise_dir / "esc10"),
         "--out", str(run), "--set", f"data.cache_dir={tmp_path / 'cache'}", "--set", "data.min_ds_size=64")
    ckpt = ckpt_io.list_checkpoints(run)[-1][1]
    m2dx("report", str(run), "--task", "csv", "--data", str(labels), "--probe")
    check_report(run, rows=3)

    subset = "data.max_items_per_split=48"
    tune_dir = tmp_path / "tune"
    m2dx("tune", "--task", "csv", "--data", str(labels), "--checkpoint", str(ckpt), "--recipe", "tiny",
         "--trials", "2", "--out", str(tune_dir), "--set", subset, "--set", f"data.cache_dir={tmp_path / 'cache'}",
         timeout=900)
    best = tune_dir / "best.toml"
    with open(best, "rb") as f:
        assert tomllib.load(f)  # readable TOML with the best parameters
    ft = tmp_path / "finetune"
    m2dx("finetune", "--task", "csv", "--data", str(labels), "--checkpoint", str(ckpt), "--recipe", "tiny_finetune",
         "--params", str(best), "--out", str(ft), "--set", subset, "--set", f"data.cache_dir={tmp_path / 'cache'}")
    metrics = check_finetune_outputs(ft)
    assert metrics["classes"][metrics["normal_class_index"]] == "normal"


def test_help_reads_well_for_every_command():
    top = m2dx("--help").stdout
    for command in ("further-pretrain", "pretrain", "finetune", "tune", "report", "embed", "quickstart",
                    "weights", "data"):
        assert command in top
    for command in (["further-pretrain"], ["pretrain"], ["finetune"], ["tune"], ["report"], ["embed"],
                    ["quickstart"], ["weights", "list"], ["weights", "download"], ["data", "download"],
                    ["data", "inspect"], ["data", "export"]):
        text = m2dx(*command, "--help").stdout
        assert "Example" in text and "Usage" in text, command
    assert "--install-completion" in top  # Typer shell completion
