"""Run folders that are safe to share: one writer per folder, reuse only on matching inputs, exact
records after a crash, the geometry that was really trained, reproducible runs, and the newcomer's
papercuts (README, help texts, --version, cache commands, progress bars)."""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from m2dx_clinic import checkpoint as ckpt_io
from m2dx_clinic.config import load_recipe, read_toml
from m2dx_clinic.demo_data import demo_noise_dir, make_demo_icbhi
from m2dx_clinic.errors import ConfigError
from m2dx_clinic.models.m2d import M2D, PredictorConfig
from m2dx_clinic.models.vit import ViTConfig
from m2dx_clinic.progress import read_jsonl
from m2dx_clinic.recipes import FinetuneRecipe, PretrainRecipe
from m2dx_clinic.rundir import hold

REPO = Path(__file__).resolve().parents[1]
M2DX = [sys.executable, "-m", "m2dx_clinic"]
ENV = {**os.environ, "M2DX_NO_PROGRESS": "1"}


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("demo")
    make_demo_icbhi(root, num_patients=4, recordings_per_patient=1, seconds=6)
    return root


def tiny(tmp: Path, audio: Path, *extra: str) -> PretrainRecipe:
    return load_recipe(PretrainRecipe, "tiny_cpu", [
        f"data.data={audio}", f"data.noise={demo_noise_dir()}", f"run.out={tmp / 'run'}",
        f"data.cache_dir={tmp / 'cache'}", "data.min_ds_size=32", "data.norm_stats_samples=64",
        "optim.batch_size=8", "run.log_every=1", *extra])


# ---------------------------------------------------------------------------- one writer per folder
@pytest.mark.slow
def test_two_writers_started_together_exactly_one_runs(tmp_path, demo):
    out = tmp_path / "run"
    args = [*M2DX, "further-pretrain", "--recipe", "tiny_cpu", "--data", str(demo / "ICBHI_final_database"),
            "--noise", str(demo_noise_dir()), "--out", str(out), "--epochs", "2",
            "--set", f"data.cache_dir={tmp_path / 'cache'}", "--set", "data.min_ds_size=32"]
    procs = [subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV) for _ in range(2)]
    results = [(p.wait(300), p.stderr.read()) for p in procs]
    codes = sorted(code for code, _ in results)
    assert codes == [0, 2], results
    loser = next(err for code, err in results if code == 2)
    assert re.search(r"in use by m2dx further-pretrain \(pid \d+ on .+, started ", loser), loser
    assert len(loser.strip().splitlines()) == 1 and "Traceback" not in loser
    steps = [(r["step"], bool(r.get("epoch_end"))) for r in read_jsonl(out / "metrics.jsonl")]
    assert len(steps) == len(set(steps)), steps  # no row twice


def test_finetune_report_and_tune_refuse_a_held_folder(tmp_path, tiny_run):
    run_dir = tmp_path / "ft"
    with hold(run_dir, "a test holding the folder"):
        recipe = load_recipe(FinetuneRecipe, "tiny_finetune", [f"run.out={run_dir}", "optim.epochs=1"])
        with pytest.raises(ConfigError, match=r"in use by a test holding the folder \(pid"):
            from m2dx_clinic.finetune import finetune

            finetune(recipe, task="icbhi", data=tiny_run["data"],
                     checkpoint=ckpt_io.list_checkpoints(tiny_run["run"])[-1][1], progress=False)
    report_dir = tiny_run["run"] / "report"
    with hold(report_dir, "a test holding the report"):
        proc = subprocess.run([*M2DX, "report", str(tiny_run["run"])], capture_output=True, text=True, env=ENV)
        assert proc.returncode == 2 and "in use by a test holding the report" in proc.stderr
    # released by the OS when the holder dies: a crashed holder never locks a folder
    holder = subprocess.Popen([sys.executable, "-c", f"from m2dx_clinic.rundir import hold; import time; "
                               f"lock = hold({str(tmp_path / 'x')!r}, 'sleeper'); time.sleep(60)"])
    deadline = time.time() + 30
    while not (tmp_path / "x" / ".m2dx.lock").exists() and time.time() < deadline:
        time.sleep(0.1)
    time.sleep(0.5)
    with pytest.raises(ConfigError, match="in use by sleeper"):
        hold(tmp_path / "x", "me")
    holder.kill()
    holder.wait()
    hold(tmp_path / "x", "me").release()


def test_a_command_that_fails_after_taking_its_folder_leaves_nothing(tmp_path, tiny_run, wav_writer):
    """An unreadable recording stops a fine-tune after it took its run folder: the folder goes again."""
    import numpy as np

    from m2dx_clinic.errors import AudioError
    from m2dx_clinic.finetune import finetune

    rows = []
    for i in range(10):
        wav_writer(f"a{i}.wav", 0.1 * np.random.default_rng(i).standard_normal(16000))
        rows.append(f"a{i}.wav,{'normal' if i % 2 else 'crackle'},s{i}")
    (tmp_path / "a3.wav").write_bytes(b"RIFF but not audio")
    (tmp_path / "labels.csv").write_text("path,label,subject\n" + "\n".join(rows) + "\n")
    recipe = load_recipe(FinetuneRecipe, "tiny_finetune", [f"run.out={tmp_path / 'never'}", "data.disk_cache=false"])
    with pytest.raises(AudioError):
        finetune(recipe, task="csv", data=tmp_path / "labels.csv",
                 checkpoint=ckpt_io.list_checkpoints(tiny_run["run"])[-1][1], progress=False)
    assert not (tmp_path / "never").exists()


# ---------------------------------------------------------------------------- reuse only on matching inputs
@pytest.mark.slow
def test_quickstart_refuses_to_reuse_work_made_from_other_data(tmp_path):
    out = tmp_path / "qs"
    first = subprocess.run([*M2DX, "quickstart", "--out", str(out)], capture_output=True, text=True, env=ENV)
    assert first.returncode == 0, first.stderr[-2000:]
    before = (out / "finetune" / "metrics.json").read_text()
    other = make_demo_icbhi(tmp_path / "other", num_patients=6, recordings_per_patient=1, seconds=6)
    again = subprocess.run([*M2DX, "quickstart", "--out", str(out), "--data", str(other), "--noise",
                            str(demo_noise_dir())], capture_output=True, text=True, env=ENV)
    assert again.returncode == 2, again.stderr[-2000:]
    line = again.stderr.strip().splitlines()[-1]
    assert "made from other inputs" in line and "data" in line and "further_pretrain" in line
    assert (out / "finetune" / "metrics.json").read_text() == before  # nothing was silently reused or lost
    same = subprocess.run([*M2DX, "quickstart", "--out", str(out)], capture_output=True, text=True, env=ENV)
    assert same.returncode == 0 and (out / "finetune" / "metrics.json").read_text() == before  # same inputs: reused


def test_tune_refuses_a_study_made_from_other_inputs(tmp_path, monkeypatch):
    from m2dx_clinic.tuning import study as tuning_study

    class Task:
        def __init__(self, sha: str):
            self.sha = sha

        def fingerprint(self, splits=None):
            return {"sha256": self.sha}

    def fake_finetune(recipe, **kwargs):
        from m2dx_clinic.finetune_outputs import FinetuneResult

        kwargs["epoch_callback"](1, {"score": 0.6})
        return FinetuneResult(run_dir=Path(recipe.run.out), runs=[{"val": {"score": 0.6}, "test": None}],
                              aggregate={}, selection="val")

    monkeypatch.setattr(tuning_study, "finetune", fake_finetune)
    args = dict(task="icbhi", data=tmp_path, checkpoint="c", tune_recipe="tiny_tune", trials=1,
                out=tmp_path / "out", progress=False, final_test=False)
    monkeypatch.setattr(tuning_study, "load_task", lambda *a, **k: Task("one"))
    tuning_study.tune(**args)
    monkeypatch.setattr(tuning_study, "load_task", lambda *a, **k: Task("two"))
    with pytest.raises(ConfigError, match="made from other inputs \\(data differ\\)"):
        tuning_study.tune(**{**args, "trials": 2})


# ---------------------------------------------------------------------------- exact records after a crash
def test_resume_drops_rows_past_the_resume_point_and_stale_temp_files(tmp_path, demo):
    from m2dx_clinic.pretrain import resume_run, start_run

    start_run(tiny(tmp_path, demo / "ICBHI_final_database", "optim.epochs=1"), progress=False)
    run = tmp_path / "run"
    rows = read_jsonl(run / "metrics.jsonl")
    last_step = max(r["step"] for r in rows)
    with open(run / "metrics.jsonl", "a") as f:  # what a process killed during epoch 2 leaves behind
        f.write(json.dumps({"step": last_step + 1, "epoch": 2, "loss": 9.9}) + "\n")
        f.write(json.dumps({"step": last_step + 2, "epoch": 2, "loss": 9.8}) + "\n")
        f.write('{"step": 99, "torn')
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # a pid that no longer runs
    stale = run / "report" / f".loss_curves.png.{dead.pid}.0a1b2c3d.tmp"
    stale.parent.mkdir(exist_ok=True)
    stale.write_bytes(b"")
    resume_run(run, ["optim.epochs=2"], progress=False)
    assert not stale.exists()
    after = read_jsonl(run / "metrics.jsonl")
    steps = [r["step"] for r in after if not r.get("epoch_end")]
    assert steps == sorted(set(steps)) and all(r.get("loss") != 9.9 for r in after)
    assert [r["epoch"] for r in after if r.get("epoch_end")] == [1, 2]
    assert not list(run.rglob(".*.tmp"))


def test_recipe_toml_states_the_geometry_that_was_trained(tmp_path, demo):
    from m2dx_clinic.pretrain import start_run

    other = ViTConfig(input_size=(80, 200), patch_size=(16, 8), embed_dim=32, depth=1, num_heads=2)
    torch.manual_seed(0)
    base = M2D(other, PredictorConfig(dim=32, depth=1, num_heads=2))
    folder = tmp_path / ckpt_io.checkpoint_folder_name(other, offline=False, date=dt.date(2024, 1, 1))
    path = ckpt_io.atomic_torch_save(ckpt_io.training_checkpoint(base, epoch=1, optimizer=None, scaler=None,
                                                                 args={}, meta={}), folder / "checkpoint-1.pth")
    recipe = tiny(tmp_path, demo / "ICBHI_final_database", f"base={path}", "optim.epochs=1")
    run = Path(start_run(recipe, progress=False))
    model = read_toml(run / "recipe.toml")["model"]
    assert (model["patch_size"], model["embed_dim"], model["depth"], model["num_heads"]) == ([16, 8], 32, 1, 2)
    assert (model["predictor_dim"], model["predictor_depth"], model["predictor_heads"]) == (32, 1, 2)
    saved = ckpt_io.LoadedCheckpoint(ckpt_io.list_checkpoints(run)[-1][1])
    assert saved.vit_config.patch_size == (16, 8) and saved.meta["recipe"]["model"]["embed_dim"] == 32


# ---------------------------------------------------------------------------- determinism
@pytest.mark.slow
def test_two_same_seed_runs_give_identical_losses(tmp_path, demo):
    """With the progress report refreshing in a background thread after every save, as by default."""
    from m2dx_clinic.pretrain import start_run
    from m2dx_clinic.report import BackgroundReporter

    losses = []
    for name in ("a", "b"):
        reporter = BackgroundReporter(num_crops=16)
        recipe = tiny(tmp_path / name, demo / "ICBHI_final_database", "optim.epochs=3", "run.save_every=1",
                      "data.min_ds_size=64")
        run = Path(start_run(recipe, on_save=reporter, progress=False))
        reporter.close()
        losses.append([(r["step"], r["loss"]) for r in read_jsonl(run / "metrics.jsonl")])
    assert losses[0] == losses[1]


def test_building_a_checkpoint_encoder_leaves_the_random_stream_alone(tmp_path):
    cfg = ViTConfig(embed_dim=32, depth=1, num_heads=2)
    path = ckpt_io.atomic_torch_save(ckpt_io.training_checkpoint(M2D(cfg, PredictorConfig(32, 1, 2)), epoch=1,
                                     optimizer=None, scaler=None, args={}, meta={}), tmp_path / "m" / "checkpoint-1.pth")
    torch.manual_seed(5)
    expected = torch.rand(4)
    torch.manual_seed(5)
    ckpt_io.LoadedCheckpoint(path).encoder()
    assert torch.equal(torch.rand(4), expected)


# ---------------------------------------------------------------------------- papercuts
def _readme_commands() -> list[str]:
    text = (REPO / "README.md").read_text()
    blocks = re.findall(r"```(?:bash|sh)?\n(.*?)```", text, flags=re.S)
    return [line.strip() for block in blocks for line in block.splitlines() if line.strip()]


def test_readme_runs_as_written_and_documents_what_a_newcomer_needs():
    text = (REPO / "README.md").read_text()
    bare = [line for line in _readme_commands() if re.match(r"^m2dx\b", line)]
    assert not bare, f"README calls a bare m2dx, which is not on PATH after the set-up: {bare}"
    assert "M2DX_SHARED_DATA" in text  # how to point the real-data tests at the data
    assert "m2dx data export" in text and "path,label,subject" in text and "m2dx predict" in text
    assert "## Use your classifier" in text and "load_classifier" in text
    assert "m2dx cache info" in text and "--storage postgresql://" in text


def test_every_option_has_help_and_the_cli_basics():
    import click
    import typer.main

    from m2dx_clinic.cli import app

    def walk(command: click.Command, path: str):
        for param in command.params:
            if isinstance(param, click.Option) and param.name not in ("help", "install_completion", "show_completion"):
                assert param.help, f"{path} {param.opts}: no help text"
        for name, sub in getattr(command, "commands", {}).items():
            walk(sub, f"{path} {name}")

    walk(typer.main.get_command(app), "m2dx")
    version = subprocess.run([*M2DX, "--version"], capture_output=True, text=True)
    from m2dx_clinic import __version__

    assert version.returncode == 0 and version.stdout.strip() == f"m2dx_clinic {__version__}"
    assert f'version = "{__version__}"' in (REPO / "pyproject.toml").read_text()
    embed = typer.main.get_command(app).commands["embed"]
    assert next(p for p in embed.params if p.name == "device").default == "auto"
    data_help = subprocess.run([*M2DX, "data", "--help"], capture_output=True, text=True).stdout
    assert "export" in data_help and "path,label,subject" in data_help
    assert "m2dx_quickstart/" in (REPO / ".gitignore").read_text().split()


def test_cache_info_and_clean(tmp_path):
    cache = tmp_path / "cache"
    (cache / "lms" / "ab").mkdir(parents=True)
    (cache / "lms" / "ab" / "x.npy").write_bytes(b"0" * 2048)
    (cache / "cycles" / "cd").mkdir(parents=True)
    (cache / "cycles" / "cd" / "y.npy").write_bytes(b"0" * 1024)
    (cache / "file_hashes.json").write_text("{}")
    info = subprocess.run([*M2DX, "cache", "info", "--cache-dir", str(cache)], capture_output=True, text=True)
    assert info.returncode == 0 and "2 entries" in info.stderr + info.stdout and "3.0 KB" in info.stderr + info.stdout
    clean = subprocess.run([*M2DX, "cache", "clean", "--cache-dir", str(cache), "--yes"], capture_output=True, text=True)
    assert clean.returncode == 0 and not (cache / "lms").exists() and not (cache / "file_hashes.json").exists()
    assert cache.is_dir()


def test_the_pretraining_bar_reaches_its_total(tmp_path, demo, monkeypatch):
    from m2dx_clinic import pretrain

    seen = []
    real = pretrain.make_progress

    def recording(*args, **kwargs):
        bar = real(*args, **kwargs)
        seen.append(bar)
        return bar

    monkeypatch.setattr(pretrain, "make_progress", recording)
    # 5 batches per epoch and 2 accumulation steps: 4 iterations are trained per epoch
    pretrain.start_run(tiny(tmp_path, demo / "ICBHI_final_database", "data.min_ds_size=40", "optim.epochs=2",
                            "optim.accum_steps=2"), progress=False)
    task = seen[-1].tasks[0]
    assert task.total == 8 and task.completed == task.total
    pretrain.start_run(tiny(tmp_path / "short", demo / "ICBHI_final_database", "optim.epochs=3", "run.max_steps=3"),
                       progress=False)
    task = seen[-1].tasks[0]
    assert task.completed == task.total == 6  # stopped after 3 optimiser steps of 2 iterations


def test_the_report_prints_its_recommendation_once(tiny_run):
    proc = subprocess.run([*M2DX, "report", str(tiny_run["run"])], capture_output=True, text=True, env=ENV)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (proc.stdout + proc.stderr).count("recommended:") == 1
