"""Shared test fixtures: the real data in ../shared/data (skipped when absent) and tiny helpers."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from local_http import http_server  # noqa: F401 - the 127.0.0.1 file server fixture

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("M2DX_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))

torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """../shared/data, or skip: a user's fresh clone has no ../shared."""
    if not (SHARED_DATA / "icbhi2017").is_dir():
        pytest.skip("../shared/data is not present")
    return SHARED_DATA


@pytest.fixture(scope="session")
def icbhi_dir(shared_data: Path) -> Path:
    return shared_data / "icbhi2017"


@pytest.fixture(scope="session")
def noise_dir(shared_data: Path) -> Path:
    return shared_data / "noise"


def write_wav(path: Path, samples: np.ndarray, sample_rate: int = 16000) -> Path:
    """Write float samples as 16-bit PCM (mono [n] or multi-channel [n, c])."""
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(str(path), samples, sample_rate, subtype="PCM_16")
    return path


@pytest.fixture
def wav_writer(tmp_path: Path):
    """Returns write(name, samples, sr) -> Path inside tmp_path."""

    def write(name: str, samples: np.ndarray, sample_rate: int = 16000) -> Path:
        return write_wav(tmp_path / name, samples, sample_rate)

    return write


@pytest.fixture(scope="session")
def demo_icbhi(tmp_path_factory) -> Path:
    """A generated ICBHI-layout corpus: 8 patients, one 8-s recording each (read-only for the tests)."""
    from m2dx_clinic.demo_data import make_demo_icbhi

    return make_demo_icbhi(tmp_path_factory.mktemp("icbhi"), num_patients=8, recordings_per_patient=1, seconds=8)


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory) -> Path:
    """A tiny M2D (64-d x 2 blocks) saved exactly like a published checkpoint: folder name + training dict."""
    import datetime as dt

    from m2dx_clinic.checkpoint import atomic_torch_save, checkpoint_folder_name, training_checkpoint
    from m2dx_clinic.models.m2d import M2D, PredictorConfig
    from m2dx_clinic.models.vit import ViTConfig

    torch.manual_seed(0)
    cfg = ViTConfig(embed_dim=64, depth=2, num_heads=4)
    model = M2D(cfg, PredictorConfig(dim=32, depth=1, num_heads=1), norm_stats=(-6.0, 4.0))
    folder = tmp_path_factory.mktemp("ckpt") / checkpoint_folder_name(cfg, offline=False, date=dt.date(2024, 1, 1))
    obj = training_checkpoint(model, epoch=1, optimizer=None, scaler=None, args={}, meta={})
    return atomic_torch_save(obj, folder / "checkpoint-1.pth")


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> dict[str, Path]:
    """A 2-epoch tiny_cpu run on demo ICBHI data (trained once per session)."""
    from m2dx_clinic.config import load_recipe
    from m2dx_clinic.demo_data import demo_noise_dir, make_demo_icbhi
    from m2dx_clinic.pretrain import start_run
    from m2dx_clinic.recipes import PretrainRecipe

    tmp = tmp_path_factory.mktemp("report_run")
    make_demo_icbhi(tmp / "data", num_patients=6, recordings_per_patient=1, seconds=8)
    recipe = load_recipe(PretrainRecipe, "tiny_cpu", [
        f"data.data={tmp}/data/ICBHI_final_database", f"data.noise={demo_noise_dir()}", f"run.out={tmp}/run",
        f"data.cache_dir={tmp}/cache", "data.min_ds_size=32", "optim.epochs=2"])
    run_dir = start_run(recipe, progress=False)
    return {"root": tmp, "run": Path(run_dir), "data": tmp / "data"}
