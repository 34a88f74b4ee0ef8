"""Downloads against a local HTTP server (127.0.0.1 only): resume, verification, zips, data sets."""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import subprocess
import zipfile
from pathlib import Path

import pytest

from m2dx_clinic import fetch as dl
from m2dx_clinic.data import corpora as data_dl
from m2dx_clinic.fileio import sha256_file as file_sha256
from m2dx_clinic.fetch import (
    download_file,
    extract_zip,
    is_completed,
    join_multipart_zip,
)
from m2dx_clinic.errors import DataError, DownloadError
from local_http import LocalServer


def _payload(n: int = 300_000) -> bytes:
    return os.urandom(n)


def _zip_bytes(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_STORED) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buffer.getvalue()


# --------------------------------------------------------------------------------------------
# download_file


def test_fresh_download_verifies_and_leaves_no_part(http_server: LocalServer, tmp_path: Path):
    data = _payload()
    http_server.put("a.bin", data)
    dest = tmp_path / "out" / "a.bin"
    got = download_file(
        f"{http_server.url}/a.bin",
        dest,
        expected_size=len(data),
        sha256=hashlib.sha256(data).hexdigest(),
        progress=False,
    )
    assert got == dest and dest.read_bytes() == data
    assert not dl.part_path(dest).exists()
    assert http_server.requests == [("a.bin", None)]
    # already there and verified: no new request
    download_file(f"{http_server.url}/a.bin", dest, expected_size=len(data), progress=False)
    assert len(http_server.requests) == 1


def test_resume_existing_part_uses_range(http_server: LocalServer, tmp_path: Path):
    data = _payload()
    http_server.put("a.bin", data)
    dest = tmp_path / "a.bin"
    dl.part_path(dest).write_bytes(data[:123_456])
    download_file(f"{http_server.url}/a.bin", dest, expected_size=len(data), progress=False)
    assert dest.read_bytes() == data
    assert http_server.requests == [("a.bin", "bytes=123456-")]


def test_dropped_connection_is_resumed(http_server: LocalServer, tmp_path: Path):
    data = _payload()
    http_server.put("a.bin", data)
    http_server.state.drop_after = 100_000
    dest = tmp_path / "a.bin"
    download_file(f"{http_server.url}/a.bin", dest, sha256=file_sha256(http_server.root / "a.bin"),
                  progress=False)
    assert dest.read_bytes() == data
    assert http_server.requests[0] == ("a.bin", None)
    assert http_server.requests[1] == ("a.bin", "bytes=100000-")


def test_server_ignoring_range_restarts(http_server: LocalServer, tmp_path: Path):
    data = _payload()
    http_server.put("a.bin", data)
    http_server.state.ignore_range = True
    dest = tmp_path / "a.bin"
    dl.part_path(dest).write_bytes(b"garbage-that-must-not-stay")
    download_file(f"{http_server.url}/a.bin", dest, progress=False)
    assert dest.read_bytes() == data
    assert http_server.requests[0][1] is not None  # it asked for a range, got 200, restarted


def test_complete_part_answered_416(http_server: LocalServer, tmp_path: Path):
    data = _payload(5000)
    http_server.put("a.bin", data)
    dest = tmp_path / "a.bin"
    dl.part_path(dest).write_bytes(data)
    download_file(f"{http_server.url}/a.bin", dest, progress=False)
    assert dest.read_bytes() == data


def test_sha256_mismatch_removes_part(http_server: LocalServer, tmp_path: Path):
    http_server.put("a.bin", _payload(10_000))
    dest = tmp_path / "a.bin"
    with pytest.raises(DownloadError, match=r"a\.bin.*sha256"):
        download_file(f"{http_server.url}/a.bin", dest, sha256="0" * 64, progress=False)
    assert not dest.exists() and not dl.part_path(dest).exists()


def test_size_mismatch_raises(http_server: LocalServer, tmp_path: Path):
    http_server.put("a.bin", _payload(10_000))
    dest = tmp_path / "a.bin"
    with pytest.raises(DownloadError, match="size is 10000 bytes, expected 9999"):
        download_file(f"{http_server.url}/a.bin", dest, expected_size=9999, progress=False)
    assert not dest.exists() and not dl.part_path(dest).exists()


def test_missing_url_is_one_line_error(http_server: LocalServer, tmp_path: Path):
    with pytest.raises(DownloadError, match="HTTP 404") as info:
        download_file(f"{http_server.url}/nope.bin", tmp_path / "nope.bin", progress=False)
    assert "\n" not in str(info.value)


def test_progress_bar_runs(http_server: LocalServer, tmp_path: Path):
    http_server.put("a.bin", _payload(50_000))
    download_file(f"{http_server.url}/a.bin", tmp_path / "a.bin", progress=True)
    assert (tmp_path / "a.bin").stat().st_size == 50_000


# --------------------------------------------------------------------------------------------
# zips


def test_extract_zip_marks_completed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    archive = tmp_path / "a.zip"
    archive.write_bytes(_zip_bytes({"d/x.txt": b"hello", "y.txt": b"!"}))
    out = tmp_path / "out"
    extract_zip(archive, out)
    assert (out / "d" / "x.txt").read_bytes() == b"hello" and is_completed(out)

    def boom(*args: object, **kwargs: object) -> None:
        raise AssertionError("must not re-open the archive")

    monkeypatch.setattr(zipfile, "ZipFile", boom)
    assert extract_zip(archive, out) == out


@pytest.mark.parametrize("evil", ["../evil.txt", "/abs/evil.txt", "ok/../../evil.txt", "C:/evil.txt"])
def test_extract_zip_refuses_zip_slip(tmp_path: Path, evil: str):
    archive = tmp_path / "evil.zip"
    archive.write_bytes(_zip_bytes({"fine.txt": b"1", evil: b"2"}))
    out = tmp_path / "deep" / "out"
    with pytest.raises(DownloadError, match="unsafe member"):
        extract_zip(archive, out)
    assert not (tmp_path / "evil.txt").exists() and not is_completed(out)
    assert not (out / "fine.txt").exists()  # nothing extracted at all


def _split(blob: bytes, folder: Path, stem: str, pieces: int = 3) -> list[Path]:
    size = -(-len(blob) // pieces)
    chunks = [blob[i : i + size] for i in range(0, len(blob), size)]
    names = [f"{stem}.z{i:02d}" for i in range(1, len(chunks))] + [f"{stem}.zip"]
    paths = []
    for name, chunk in zip(names, chunks):
        (folder / name).write_bytes(chunk)
        paths.append(folder / name)
    return paths


def test_join_multipart_zip(tmp_path: Path):
    blob = _zip_bytes({f"FSD50K.dev_audio/{i}.wav": os.urandom(2000) for i in range(5)})
    parts = _split(blob, tmp_path, "FSD50K.dev_audio")
    out = join_multipart_zip(list(reversed(parts)), tmp_path / "joined.zip")  # order is fixed inside
    assert out.read_bytes() == blob
    assert not dl.part_path(out).exists()
    with zipfile.ZipFile(out) as zf:
        assert len(zf.namelist()) == 5


def test_join_multipart_missing_piece(tmp_path: Path):
    blob = _zip_bytes({"x": os.urandom(3000)})
    parts = _split(blob, tmp_path, "a", pieces=3)
    with pytest.raises(DownloadError, match="incomplete"):
        join_multipart_zip([parts[1], parts[2]], tmp_path / "joined.zip")


@pytest.mark.skipif(shutil.which("zip") is None, reason="`zip` tool not installed")
def test_join_real_zip_split_archive(tmp_path: Path):
    src = tmp_path / "src"
    src.mkdir()
    # Members smaller than a piece, like FSD50K's clips (zip 3.0 cannot re-join a single member
    # that spans three pieces, which real data sets never have).
    names = [f"clip{i}.bin" for i in range(6)]
    for name in names:
        (src / name).write_bytes(os.urandom(30_000))
    subprocess.run(["zip", "-q", "-0", "-s", "64k", str(tmp_path / "split.zip"), *names],
                   cwd=src, check=True, stdin=subprocess.DEVNULL, timeout=30)
    parts = sorted(tmp_path.glob("split.z*"))
    assert len(parts) >= 3 and parts[0].read_bytes()[:4] == b"PK\x07\x08"  # split signature
    out = join_multipart_zip(parts, tmp_path / "joined.zip")
    with zipfile.ZipFile(out) as zf:
        for name in names:
            assert zf.read(name) == (src / name).read_bytes()


# --------------------------------------------------------------------------------------------
# data sets


def test_data_root_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    monkeypatch.setenv("M2DX_DATA", str(tmp_path / "env"))
    assert data_dl.data_root() == tmp_path / "env"
    assert data_dl.data_root(tmp_path / "x") == tmp_path / "x"
    monkeypatch.delenv("M2DX_DATA")
    assert data_dl.data_root() == Path.home() / ".cache" / "m2dx" / "data"


def test_resolve_noise_missing_dataset_message(tmp_path: Path):
    with pytest.raises(DataError) as info:
        data_dl.resolve_noise("fsd50k", root=tmp_path)
    message = str(info.value)
    assert str(tmp_path / "fsd50k") in message
    assert "m2dx data download fsd50k" in message and "\n" not in message
    with pytest.raises(DataError, match="not a known noise set"):
        data_dl.resolve_noise(str(tmp_path / "nowhere"), root=tmp_path)
    assert data_dl.resolve_noise(str(tmp_path), root=tmp_path) == tmp_path


def test_download_esc50_and_resolve(http_server: LocalServer, tmp_path: Path):
    http_server.put(
        "ESC-50-master.zip",
        _zip_bytes({"ESC-50-master/audio/1-1.wav": b"RIFF", "ESC-50-master/meta/esc50.csv": b"x"}),
    )
    root = tmp_path / "data"
    got = data_dl.download_dataset("esc50", root, base_url=http_server.url, progress=False)
    assert got == (root / "esc50" / "ESC-50-master" / "audio").resolve()
    assert (got / "1-1.wav").is_file()
    n = len(http_server.requests)
    assert data_dl.download_dataset("esc50", root, base_url=http_server.url, progress=False) == got
    assert len(http_server.requests) == n  # idempotent: no request
    assert data_dl.resolve_noise("esc50", root=root).resolve() == got


def test_download_fsd50k_joins_parts(http_server: LocalServer, tmp_path: Path, monkeypatch):
    blob = _zip_bytes({f"FSD50K.dev_audio/{i}.wav": os.urandom(1000) for i in range(6)})
    _split(blob, http_server.root, "FSD50K.dev_audio", pieces=6)
    monkeypatch.setenv("M2DX_DATA_BASE_URL", http_server.url)
    root = tmp_path / "data"
    got = data_dl.download_dataset("fsd50k", root, progress=False)
    assert sorted(p.name for p in got.iterdir()) == [f"{i}.wav" for i in range(6)]
    assert {name for name, _ in http_server.requests} == {
        "FSD50K.dev_audio.zip", *(f"FSD50K.dev_audio.z{i:02d}" for i in range(1, 6))
    }
    assert data_dl.resolve_noise("fsd50k", root=root) == root / "fsd50k" / "FSD50K.dev_audio"
    assert not (root / "fsd50k" / "downloads").exists()  # archives cleaned up


def test_download_icbhi_layout(http_server: LocalServer, tmp_path: Path):
    http_server.put("ICBHI_final_database.zip",
                    _zip_bytes({"ICBHI_final_database/101_1b1_Al_sc_Meditron.txt": b"0.0\t1.0\t0\t0\n"}))
    http_server.put("ICBHI_challenge_train_test.txt", b"101_1b1_Al_sc_Meditron\ttest\n")
    got = data_dl.download_dataset("icbhi", tmp_path, base_url=http_server.url, progress=False)
    assert (got / "ICBHI_final_database" / "101_1b1_Al_sc_Meditron.txt").is_file()
    assert (got / "ICBHI_challenge_train_test.txt").is_file()


def test_unknown_dataset(tmp_path: Path):
    with pytest.raises(DataError, match="icbhi, fsd50k, esc50"):
        data_dl.download_dataset("audioset", tmp_path)


def test_no_network_is_worded_as_no_network(tmp_path):
    import socket

    with socket.socket() as s:  # a port nothing listens on: connection refused, like a machine offline
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(DownloadError) as err:
        dl.download_file(f"http://127.0.0.1:{port}/w.zip", tmp_path / "w.zip", retries=0, progress=False)
    text = str(err.value)
    assert "could not reach 127.0.0.1" in text and "network connection" in text and "resume" not in text
