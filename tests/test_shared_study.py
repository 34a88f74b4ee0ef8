"""Distributed tuning on a real PostgreSQL server: two worker processes share one study, one is killed
mid-trial, its trial is failed by the heartbeat and re-run, and the study ends with exactly the
requested finished trials and one best.toml."""

from __future__ import annotations

import datetime as dt
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import torch

from m2dx_clinic.checkpoint import atomic_torch_save, checkpoint_folder_name, training_checkpoint
from m2dx_clinic.demo_data import make_demo_icbhi
from m2dx_clinic.models.m2d import M2D, PredictorConfig
from m2dx_clinic.models.vit import ViTConfig

from local_postgres import postgres_server  # noqa: F401 - the fixture

TINY = ViTConfig(embed_dim=64, depth=2, num_heads=4)
TRIALS = 4
TUNE_RECIPE = '''[tune]
finetune_recipe = "tiny_finetune"
pruner = "none"
sampler_startup_trials = 10
heartbeat_interval = 1
grace_period = 3
max_retry = 3

[space."optim.lr"]
type = "float"
low = 1e-4
high = 1e-2
log = true
'''


def _worker(storage: str, out: Path, data: Path, ckpt: Path, recipe: Path, log: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "m2dx_clinic", "tune", "--task", "icbhi", "--data", str(data), "--checkpoint",
           str(ckpt), "--recipe", str(recipe), "--trials", str(TRIALS), "--storage", storage, "--study", "shared",
           "--out", str(out), "--set", "optim.epochs=4", "--set", "data.cycle_seconds=2.0",
           "--set", "run.num_workers=0", "--set", "run.bootstrap=10"]
    return subprocess.Popen(cmd, stdout=open(log, "w"), stderr=subprocess.STDOUT,
                            env={**__import__("os").environ, "M2DX_NO_PROGRESS": "1"})


@pytest.mark.slow
def test_two_workers_one_killed_mid_trial(postgres_server, tmp_path):
    pytest.importorskip("psycopg", reason="the PostgreSQL driver is the postgres extra (in [dev])")
    data = make_demo_icbhi(tmp_path / "icbhi", num_patients=8, recordings_per_patient=1, seconds=8)
    torch.manual_seed(0)
    model = M2D(TINY, PredictorConfig(dim=32, depth=1, num_heads=1), norm_stats=(-6.0, 4.0))
    folder = tmp_path / checkpoint_folder_name(TINY, offline=False, date=dt.date(2024, 1, 1))
    ckpt = atomic_torch_save(training_checkpoint(model, epoch=1, optimizer=None, scaler=None, args={}, meta={}),
                             folder / "checkpoint-1.pth")
    recipe = tmp_path / "shared_tune.toml"
    recipe.write_text(TUNE_RECIPE)
    out = tmp_path / "out"
    storage = postgres_server.url

    a = _worker(storage, out, data, ckpt, recipe, tmp_path / "a.log")
    b = _worker(storage, out, data, ckpt, recipe, tmp_path / "b.log")
    killed_trial = None
    deadline = time.time() + 240
    while killed_trial is None and time.time() < deadline and b.poll() is None:
        try:
            study = optuna.load_study(study_name="shared", storage=storage)
            running = [t for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))
                       if t.user_attrs.get("worker", "").endswith(f":{b.pid}")]
        except KeyError:  # the study does not exist yet
            running = []
        if running:
            time.sleep(0.3)  # well inside the trial
            b.kill()
            killed_trial = running[0].number
        time.sleep(0.2)
    assert killed_trial is not None, (tmp_path / "b.log").read_text()[-2000:]
    b.wait(30)
    assert a.wait(300) == 0, (tmp_path / "a.log").read_text()[-3000:]

    study = optuna.load_study(study_name="shared", storage=storage)
    trials = study.get_trials(deepcopy=False)
    TS = optuna.trial.TrialState
    finished = [t for t in trials if t.state in (TS.COMPLETE, TS.PRUNED)]
    assert len(finished) == TRIALS  # exactly the requested number: none lost, none extra
    killed = next(t for t in trials if t.number == killed_trial)
    assert killed.state == TS.FAIL  # failed by the heartbeat, not left RUNNING
    retried = [t for t in finished if t.system_attrs.get("failed_trial") == killed_trial]
    assert len(retried) == 1 and retried[0].params == killed.params  # re-run once, with the same parameters
    assert not [t for t in trials if t.state in (TS.RUNNING, TS.WAITING)]
    workers = {t.user_attrs["worker"] for t in finished}
    assert len(workers) == 2 or all(w.endswith(f":{a.pid}") for w in workers)
    assert sorted(p.name for p in out.glob("best*.toml")) == ["best.toml"]
    assert (out / "summary.json").is_file() and (out / "final" / "metrics.json").is_file()
