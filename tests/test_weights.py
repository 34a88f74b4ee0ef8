"""Published-weights table, name parsing, download_weights and resolve_checkpoint (local server)."""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import pytest
import torch

from m2dx_clinic import weights as registry
from m2dx_clinic.checkpoint import parse_geometry_from_name
from m2dx_clinic.fetch import is_completed
from m2dx_clinic.errors import CheckpointError, ConfigError, DownloadError
from m2dx_clinic.weights import (
    PUBLISHED_WEIGHTS,
    download_weights,
    get_published,
    resolve_checkpoint,
)
from local_http import LocalServer

BASE = "m2d_vit_base-80x200p16x4-230529"


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        (BASE, ((80, 200), (16, 4), 16000)),
        ("m2d_x_vit_base-80x200p16x4p16k-240514-x", ((80, 200), (16, 4), 16000)),
        ("m2d_as_vit_base-80x1001p16x16p32k-240413_enconly", ((80, 1001), (16, 16), 32000)),
        ("m2d_s_vit_base-80x608p80x2-230220", ((80, 608), (80, 2), 16000)),
        (f"/w/{BASE}/checkpoint-300.pth", ((80, 200), (16, 4), 16000)),
        (f"{BASE}.zip", ((80, 200), (16, 4), 16000)),
        ("checkpoint-300", None),
        ("checkpoint-300.pth", None),
        ("my_model", None),
    ],
)
def test_parse_geometry_from_name(name: str, expected):
    assert parse_geometry_from_name(name) == expected


def test_table_is_consistent():
    names = [w.name for w in PUBLISHED_WEIGHTS]
    assert len(names) == len(set(names)) and BASE in names
    base = get_published(BASE)
    assert base.input_size == (80, 200) and base.patch_size == (16, 4) and base.sample_rate == 16000
    assert "ICBHI" in base.purpose and not base.encoder_only
    assert base.url == f"https://github.com/nttcslab/m2d/releases/download/v0.1.0/{BASE}.zip"
    assert get_published("m2d_s_vit_base-80x608p80x2-230220").release_tag == "v0.2.0"
    p32k = get_published("m2d_as_vit_base-80x1001p16x16p32k-240413_enconly")
    assert p32k.encoder_only and p32k.sample_rate == 32000 and p32k.release_tag == "v0.3.0"
    assert get_published(f"{BASE}.zip") is base


def test_unknown_name_suggests_close_matches():
    with pytest.raises(ConfigError) as info:
        get_published("m2d_vit_base-80x200p16x4-230530")
    message = str(info.value)
    assert BASE in message and "m2dx weights list" in message and "\n" not in message


def test_weights_cache_dir_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    monkeypatch.setenv("M2DX_WEIGHTS", str(tmp_path))
    assert registry.weights_cache_dir() == tmp_path
    monkeypatch.delenv("M2DX_WEIGHTS")
    assert registry.weights_cache_dir() == Path.home() / ".cache" / "m2dx" / "weights"


def _checkpoint_bytes(epoch: int) -> bytes:
    buffer = io.BytesIO()
    torch.save({"model": {"cls_token": torch.zeros(1, 1, 4)}, "epoch": epoch}, buffer)
    return buffer.getvalue()


def _weights_zip(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buffer.getvalue()


def test_download_weights_nested_layout(http_server: LocalServer, tmp_path: Path):
    http_server.put(
        f"{BASE}.zip",
        _weights_zip({
            f"{BASE}/checkpoint-300.pth": _checkpoint_bytes(300),
            f"{BASE}/checkpoint-20.pth": _checkpoint_bytes(20),
        }),
    )
    cache = tmp_path / "weights"
    path = download_weights(BASE, cache, base_url=http_server.url, progress=False)
    assert path == cache / BASE / "checkpoint-300.pth"
    loaded = torch.load(path, weights_only=True)
    assert loaded["epoch"] == 300
    assert is_completed(cache / BASE) and not (cache / f"{BASE}.zip").exists()
    assert not list(cache.glob(".*extracting"))
    # idempotent: the second call makes no request
    assert download_weights(BASE, cache, base_url=http_server.url, progress=False) == path
    assert len(http_server.requests) == 1
    # a published name now resolves to the cached file
    assert resolve_checkpoint(BASE, cache_dir=cache) == path


def test_download_weights_flat_layout_env_base(
    http_server: LocalServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    name = "m2d_vit_base-80x608p16x16-221006-mr7"
    http_server.put(f"v0.1.0/{name}.zip", _weights_zip({"checkpoint-150.pth": _checkpoint_bytes(150)}))
    monkeypatch.setenv("M2DX_WEIGHTS_BASE_URL", http_server.url + "/{tag}")
    path = download_weights(name, tmp_path, progress=False)
    assert path == tmp_path / name / "checkpoint-150.pth"


def test_download_weights_corrupt_zip(http_server: LocalServer, tmp_path: Path):
    http_server.put(f"{BASE}.zip", b"this is not a zip file" * 100)
    with pytest.raises(DownloadError, match="not a readable zip"):
        download_weights(BASE, tmp_path / "w", base_url=http_server.url, progress=False)
    assert list((tmp_path / "w").iterdir()) == []  # no zip, no part file, no folder


def test_download_weights_without_checkpoint(http_server: LocalServer, tmp_path: Path):
    http_server.put(f"{BASE}.zip", _weights_zip({f"{BASE}/readme.txt": b"hi"}))
    with pytest.raises(DownloadError, match="no checkpoint"):
        download_weights(BASE, tmp_path, base_url=http_server.url, progress=False)
    assert not is_completed(tmp_path / BASE)


def test_resolve_checkpoint_paths(tmp_path: Path):
    folder = tmp_path / BASE
    folder.mkdir()
    for epoch in (5, 100, 40):
        (folder / f"checkpoint-{epoch}.pth").write_bytes(b"x")
    (folder / "checkpoint-best.pth").write_bytes(b"x")
    assert resolve_checkpoint(folder) == folder / "checkpoint-100.pth"
    assert resolve_checkpoint(str(folder / "checkpoint-5.pth")) == folder / "checkpoint-5.pth"
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CheckpointError, match="no checkpoint-<epoch>.pth"):
        resolve_checkpoint(empty)


def test_resolve_checkpoint_names(http_server: LocalServer, tmp_path: Path):
    cache = tmp_path / "cache"
    with pytest.raises(CheckpointError) as info:
        resolve_checkpoint(BASE, cache_dir=cache)
    assert f"run: m2dx weights download {BASE}" in str(info.value)
    with pytest.raises(CheckpointError, match="not a published weights name"):
        resolve_checkpoint(str(tmp_path / "missing.pth"), cache_dir=cache)
    with pytest.raises(CheckpointError, match="Did you mean"):
        resolve_checkpoint("m2d_vit_base-80x200p16x4", cache_dir=cache)


def test_resolve_checkpoint_downloads_when_asked(
    http_server: LocalServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    http_server.put(f"{BASE}.zip", _weights_zip({f"{BASE}/checkpoint-300.pth": _checkpoint_bytes(300)}))
    monkeypatch.setenv("M2DX_WEIGHTS_BASE_URL", http_server.url)
    path = resolve_checkpoint(BASE, download=True, cache_dir=tmp_path)
    assert path == tmp_path / BASE / "checkpoint-300.pth"
