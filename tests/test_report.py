"""Checkpoint-progress report: label-free metrics on known matrices, and reports of a tiny real run.

The tiny 2-epoch run is trained once per session (about 10 s on CPU) and copied for tests that
damage it, so the expensive part is paid once.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from m2dx_clinic import checkpoint as ckpt_io
from m2dx_clinic.report import (
    build_report,
    cosine_drift,
    epoch_end_rows,
    explained_variance_auc,
    rankme,
    recommend,
    render_report_table,
    update_progress_report,
)

CROPS = 64  # fewer health crops than the default 256 keep the tests fast on 2 shared cores
REPO_ROOT = Path(__file__).resolve().parents[1]
ROW_KEYS = {"epoch", "checkpoint", "error", "loss", "loss_m2d", "loss_offline", "lr", "ema_decay",
            "rankme", "ev_auc", "drift_cos", "probe", "finetune", "warnings"}


# ---------------------------------------------------------------------------- metrics on known matrices
def test_rankme_identity_is_n():
    assert rankme(np.eye(16)) == pytest.approx(16, rel=1e-4)


def test_rankme_rank_one_is_one():
    rng = np.random.default_rng(0)
    matrix = np.outer(rng.normal(size=50), rng.normal(size=20))
    assert rankme(matrix) == pytest.approx(1.0, abs=1e-3)


def test_rankme_orthogonal_equal_norm_columns_is_k():
    rng = np.random.default_rng(1)
    q, _ = np.linalg.qr(rng.normal(size=(40, 40)))
    matrix = np.zeros((40, 12))
    matrix[:, :5] = 3.0 * q[:, :5]  # 5 orthogonal columns of equal norm, the rest zero
    assert rankme(torch.from_numpy(matrix).float()) == pytest.approx(5.0, rel=1e-3)


def test_rankme_zero_matrix_is_zero():
    assert rankme(np.zeros((4, 3))) == 0.0


def test_explained_variance_auc_isotropic_vs_rank_one():
    rng = np.random.default_rng(2)
    iso = rng.normal(size=(4000, 32))
    assert 0.5 <= explained_variance_auc(iso) < 0.6
    rank1 = np.outer(rng.normal(size=200), rng.normal(size=32))
    assert explained_variance_auc(rank1) == pytest.approx(1.0, abs=1e-6)
    assert np.isnan(explained_variance_auc(np.ones((5, 3))))  # no variance at all


def test_cosine_drift():
    rng = np.random.default_rng(3)
    a = rng.normal(size=(10, 8))
    assert cosine_drift(a, a) == pytest.approx(1.0)
    assert cosine_drift(a, -a) == pytest.approx(-1.0)
    assert cosine_drift(a, 2.5 * a) == pytest.approx(1.0)  # scale does not count as drift
    with pytest.raises(ValueError):
        cosine_drift(a, a[:, :4])


def test_epoch_end_rows_removes_logged_offset():
    # the loop logged the next epoch's number on epoch_end rows; the first one closes epoch 1
    rows = [{"epoch": 1, "opt_step": 1, "loss": 3.0}, {"epoch": 2, "opt_step": 1, "loss": 2.0, "epoch_end": True},
            {"epoch": 3, "opt_step": 2, "loss": 1.0, "epoch_end": True}]
    assert {e: r["loss"] for e, r in epoch_end_rows(rows).items()} == {1: 2.0, 2: 1.0}
    fixed = [{"epoch": 1, "opt_step": 1, "loss": 2.0, "epoch_end": True}, {"epoch": 2, "opt_step": 2, "loss": 1.0, "epoch_end": True}]
    assert sorted(epoch_end_rows(fixed)) == [1, 2]


def test_recommend_without_labels_uses_health_and_says_so():
    rows = [
        {"epoch": 0, "checkpoint": "a", "error": None, "rankme": 10.0, "warnings": []},
        {"epoch": 1, "checkpoint": "b", "error": None, "rankme": 12.0, "warnings": []},
        {"epoch": 2, "checkpoint": "c", "error": None, "rankme": 20.0, "warnings": ["epoch 2: drifted"]},
        {"epoch": 3, "checkpoint": "d", "error": "corrupt", "rankme": None, "warnings": []},
    ]
    rec = recommend(rows)
    assert rec["epoch"] == 1 and rec["basis"] == "health"
    assert "no labels" in rec["reason"]
    assert any("could not be scored" in w for w in rec["warnings"])


def test_recommend_prefers_probe_score_and_breaks_ties_on_health():
    rows = [
        {"epoch": 0, "checkpoint": "a", "error": None, "rankme": 10.0, "warnings": [], "probe": {"score": 0.6}},
        {"epoch": 1, "checkpoint": "b", "error": None, "rankme": 9.0, "warnings": [], "probe": {"score": 0.7}},
        {"epoch": 2, "checkpoint": "c", "error": None, "rankme": 11.0, "warnings": [], "probe": {"score": 0.7}},
    ]
    rec = recommend(rows)
    assert rec["epoch"] == 2 and rec["basis"] == "probe"
    assert "tied" in rec["reason"]
    rows[0]["finetune"] = {"val": {"score": 0.9}}
    assert recommend(rows)["epoch"] == 0  # fine-tune validation scores outrank the probe


# ---------------------------------------------------------------------------- a tiny real run
def _copy_run(tiny_run: dict[str, Path], tmp_path: Path) -> Path:
    """A private copy of the session run (without its report) that a test may damage."""
    target = tmp_path / "run"
    shutil.copytree(tiny_run["run"], target, ignore=shutil.ignore_patterns("report"))
    return target


def test_report_with_probe_on_tiny_run(tiny_run, tmp_path):
    run_dir = _copy_run(tiny_run, tmp_path)
    report = build_report(run_dir, task="icbhi", data=tiny_run["data"], probe=True, progress=False, num_crops=CROPS)
    out = run_dir / "report"
    for name in ("report.json", "report.md", "report.html", "loss_curves.png", "health.png", "probe.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    saved = json.loads((out / "report.json").read_text())
    assert {"run_dir", "generated_at", "task", "rows", "recommendation"} <= set(saved)
    assert saved["task"] == "icbhi"
    saved_epochs = [e for e, _ in ckpt_io.list_checkpoints(run_dir)]
    assert [r["epoch"] for r in saved["rows"]] == [0, *saved_epochs] == [0, 1, 2]
    assert saved["rows"][0]["source"] == "teacher"  # from scratch: epoch 0 is the frozen initial encoder
    for row in saved["rows"]:
        assert ROW_KEYS <= set(row)
        assert row["error"] is None
        assert row["rankme"] > 1.0 and 0.0 < row["ev_auc"] <= 1.0 and -1.0 <= row["drift_cos"] <= 1.0 + 1e-6
        assert {"sp", "se", "score", "accuracy"} <= set(row["probe"])
        assert row["finetune"] is None
    assert saved["rows"][0]["drift_cos"] == pytest.approx(1.0)
    assert saved["rows"][2]["loss"] is not None and saved["rows"][0]["loss"] is None
    rec = saved["recommendation"]
    assert {"epoch", "checkpoint", "reason", "warnings"} <= set(rec)
    assert rec["epoch"] in (0, 1, 2) and "probe" in rec["reason"]
    html = (out / "report.html").read_text()
    assert "<table>" in html and "src='health.png'" in html and "src='probe.png'" in html
    assert "Recommendation" in (out / "report.md").read_text()
    assert report["rows"] == saved["rows"]
    table = render_report_table(report)
    assert table.row_count == 3


def test_report_with_corrupt_and_missing_checkpoints(tiny_run, tmp_path):
    run_dir = _copy_run(tiny_run, tmp_path)
    (epoch1, path1), (_, path2) = ckpt_io.list_checkpoints(run_dir)
    (path2.parent / "checkpoint-3.pth").write_bytes(b"this is not a checkpoint" * 40)
    path1.unlink()
    report = build_report(run_dir, progress=False, num_crops=CROPS)
    rows = {r["epoch"]: r for r in report["rows"]}
    assert sorted(rows) == [0, 1, 2, 3]
    assert "missing" in rows[1]["error"]
    assert "checkpoint-3.pth" in rows[3]["error"]
    assert rows[2]["error"] is None and rows[2]["rankme"] is not None
    assert report["recommendation"]["epoch"] in (0, 2)
    assert "no labels" in report["recommendation"]["reason"]
    assert (run_dir / "report" / "report.json").is_file() and (run_dir / "report" / "report.html").is_file()
    assert "ERROR" in (run_dir / "report" / "report.md").read_text()


def test_report_without_training_audio_warns(tiny_run, tmp_path):
    """The data folder is gone: health metrics are skipped with a warning, curves still reported."""
    run_dir = _copy_run(tiny_run, tmp_path)
    text = (run_dir / "recipe.toml").read_text()
    (run_dir / "recipe.toml").write_text(text.replace(str(tiny_run["data"]), str(tmp_path / "gone")))
    report = build_report(run_dir, progress=False, num_crops=CROPS)
    assert any("label-free metrics skipped" in w for w in report["warnings"])
    assert all(r["rankme"] is None for r in report["rows"])
    assert report["rows"][-1]["loss"] is not None
    assert (run_dir / "report" / "loss_curves.png").is_file()


def test_update_progress_report_is_cached(tiny_run, tmp_path):
    run_dir = _copy_run(tiny_run, tmp_path)
    path = update_progress_report(run_dir, num_crops=CROPS)
    assert path == run_dir / "report" / "report.json"
    first = json.loads(path.read_text())
    assert first["kind"] == "progress" and all(r["probe"] is None for r in first["rows"])
    cache = json.loads((run_dir / "report" / "health_cache.json").read_text())
    assert len(cache["entries"]) == 2  # the two run checkpoints (the base is kept as embeddings)
    assert update_progress_report(run_dir, num_crops=CROPS) == path
    again = json.loads(path.read_text())
    assert [r["rankme"] for r in again["rows"]] == pytest.approx([r["rankme"] for r in first["rows"]])


def test_update_progress_report_never_raises(tmp_path):
    assert update_progress_report(tmp_path / "does-not-exist") is None
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "recipe.toml").write_text("this is = = not toml")
    (broken / "metrics.jsonl").write_text("{not json\n")
    assert update_progress_report(broken) is None


@pytest.mark.slow
def test_report_with_finetune_and_rerun_reuses_it(tiny_run, tmp_path):
    run_dir = _copy_run(tiny_run, tmp_path)
    ckpt_io.list_checkpoints(run_dir)[0][1].unlink()  # fine-tune two checkpoints, not three: ~5 s each
    recipe = tmp_path / "ft.toml"  # tiny_finetune cut to one epoch without worker processes: seconds per checkpoint
    recipe.write_text((REPO_ROOT / "recipes" / "tiny_finetune.toml").read_text()
                      .replace("epochs = 3", "epochs = 1").replace("num_workers = 2", "num_workers = 0"))
    report = build_report(run_dir, task="icbhi", data=tiny_run["data"], finetune=True,
                          finetune_recipe=str(recipe), progress=False, num_crops=CROPS)
    assert [r["epoch"] for r in report["rows"]] == [0, 1, 2] and "missing" in report["rows"][1]["error"]
    for row in (r for r in report["rows"] if not r["error"]):
        ft = row["finetune"]
        assert ft is not None, row["warnings"]
        assert Path(ft["run_dir"]) == run_dir / "report" / "finetune" / f"epoch-{row['epoch']}"
        assert {"sp", "se", "score"} <= set(ft["val"]) and {"sp", "se", "score"} <= set(ft["test"])
    assert report["recommendation"]["basis"] == "finetune"
    assert (run_dir / "report" / "finetune.png").is_file()
    again = build_report(run_dir, task="icbhi", data=tiny_run["data"], finetune=True, finetune_recipe=str(recipe),
                         progress=False, num_crops=CROPS)
    assert all(r["finetune"]["reused"] for r in again["rows"] if not r["error"])


def test_background_reporter_never_blocks_and_coalesces(monkeypatch, tmp_path):
    import threading
    import time as _time

    from m2dx_clinic.report import build as reporting

    started, release, calls = threading.Event(), threading.Event(), []

    def slow_report(run_dir, num_crops=256):
        calls.append(Path(run_dir))
        started.set()
        release.wait(5)

    monkeypatch.setattr(reporting, "update_progress_report", slow_report)
    hook = reporting.BackgroundReporter()
    t0 = _time.perf_counter()
    hook(tmp_path / "run" / "folder" / "checkpoint-1.pth")
    assert started.wait(5)
    hook(tmp_path / "run" / "folder" / "checkpoint-2.pth")  # arrives while the first refresh runs
    hook(tmp_path / "run" / "folder" / "checkpoint-3.pth")
    assert _time.perf_counter() - t0 < 1.0  # the training loop did not wait
    release.set()
    hook.close()
    assert calls == [tmp_path / "run", tmp_path / "run"]  # the first, then one coalesced refresh
