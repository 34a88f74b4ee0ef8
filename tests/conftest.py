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
