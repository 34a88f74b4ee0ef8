"""Real scale on one machine: the sharded cache, bounded descriptors, crash-safe builds, OS limits in one line."""

from __future__ import annotations

import errno
import os
import resource
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from m2dx_clinic.audio import FrontEndConfig
from m2dx_clinic.data import shards
from m2dx_clinic.data.logmel_cache import LogMelCache
from m2dx_clinic.data.segment_cache import SegmentArrays, clear_memory_cache, prepare_segments
from m2dx_clinic.data.segments import Segment
from m2dx_clinic.data.shards import ShardStore, ShardWriter
from m2dx_clinic.errors import DataError, ResourceLimitError, os_limit_error
from m2dx_clinic.evaluation.baseline import logmel_statistics

SR = 16000


def _wav(path: Path, seconds: float, seed: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    sf.write(str(path), (0.1 * rng.standard_normal(int(seconds * SR))).astype(np.float32), SR, subtype="PCM_16")
    return path


def _key(i: int) -> str:
    return f"{i:064x}"


# ---------------------------------------------------------------------------- the store
def test_store_reads_back_what_was_written_in_both_dtypes(tmp_path):
    rng = np.random.default_rng(0)
    arrays = [rng.normal(-5, 4, size=(80, n)).astype(np.float32) for n in (1, 37, 401)]
    for dtype in ("float32", "float16"):
        store = ShardStore(tmp_path / dtype)
        with store.writer(dtype) as w:
            for i, a in enumerate(arrays):
                w.add(_key(i), a)
        store.refresh()
        pos = store.find([_key(2), _key(0), _key(99)])
        assert pos[2] == -1 and (pos[:2] >= 0).all()
        got = store.arrays(pos[:2])
        assert got.shape(0) == (80, 401) and got[0].dtype == np.dtype(dtype)
        expected = [arrays[2], arrays[0]]
        for g, e in zip(got, expected):
            if dtype == "float32":
                np.testing.assert_array_equal(g, e)
            else:  # float16 rounding: relative error at most its unit roundoff, 2^-11
                assert np.all(np.abs(g.astype(np.float32) - e) <= 2.0 ** -11 * np.abs(e) + 1e-7)


def test_descriptors_stay_bounded_however_many_shards(tmp_path, monkeypatch):
    store = ShardStore(tmp_path)
    with ShardWriter(tmp_path, shard_bytes=1) as w:  # every entry closes its shard: 100 shards
        for i in range(100):
            w.add(_key(i), np.full((2, 3), i, dtype=np.float32))
    assert len(list(tmp_path.glob("shard-*.bin"))) == 100
    store.refresh()
    got = store.arrays(store.find([_key(i) for i in range(100)]))
    before = len(os.listdir("/proc/self/fd"))
    for _round in range(2):
        for i in range(100):
            assert got[i][0, 0] == i
            assert got.open_descriptors() <= shards.MAX_OPEN_SHARDS
    assert len(os.listdir("/proc/self/fd")) - before <= shards.MAX_OPEN_SHARDS
    got.close()
    assert got.open_descriptors() == 0


def test_a_killed_build_keeps_what_it_committed_and_drops_the_rest(tmp_path):
    store = ShardStore(tmp_path)
    w = ShardWriter(tmp_path)
    w.add(_key(1), np.ones((2, 2), np.float32))
    w.commit()
    w.add(_key(2), np.ones((2, 2), np.float32))  # written, never committed: then the process "dies"
    os.close(w._fd)
    orphan = tmp_path / "shard-00000000000000-1-deadbeef.bin"  # killed before its first commit
    orphan.write_bytes(b"\0" * 64)
    store.refresh()
    assert list(store.find([_key(1), _key(2)]) >= 0) == [True, False]
    with store.writer() as again:  # the next build's writer removes the orphan, keeps the committed shard
        again.add(_key(2), np.full((2, 2), 2.0, np.float32))
    assert not orphan.exists()
    store.refresh()
    both = store.arrays(store.find([_key(1), _key(2)]))
    assert both[0][0, 0] == 1.0 and both[1][0, 0] == 2.0


def test_arrays_survive_pickling_for_loader_workers(tmp_path):
    import pickle

    store = ShardStore(tmp_path)
    with store.writer() as w:
        w.add(_key(7), np.arange(6, dtype=np.float32).reshape(2, 3))
    store.refresh()
    got = store.arrays(store.find([_key(7)]))
    _ = got[0]
    clone = pickle.loads(pickle.dumps(got))
    np.testing.assert_array_equal(clone[0], got[0])


# ---------------------------------------------------------------------------- the caches on top
def test_old_one_file_per_entry_cache_moves_into_shards_without_decoding(tmp_path, monkeypatch):
    from m2dx_clinic.data import logmel_cache

    wav = _wav(tmp_path / "a.wav", 1.0, 0)
    cache = LogMelCache(tmp_path / "cache")
    first, _ = cache.build([Segment(wav)], workers=1, progress=False)
    expected = first[0].copy()
    # rebuild the old layout: the same key as one .npy file, and no shards
    key = logmel_cache.content_key(logmel_cache.sha256_file(wav), None, None, FrontEndConfig())
    for p in (tmp_path / "cache" / "lms").glob("shard-*"):
        p.unlink()
    old = cache.legacy_entry_path(key)
    old.parent.mkdir(parents=True)
    np.save(old, expected)
    monkeypatch.setattr(logmel_cache, "_compute_entry", lambda args: pytest.fail("decoded again"))
    again, _ = LogMelCache(tmp_path / "cache").build([Segment(wav)], workers=1, progress=False)
    np.testing.assert_array_equal(again[0], expected)
    assert not old.exists()


def test_float16_cache_differs_from_float32_by_its_rounding_only(tmp_path):
    wavs = [_wav(tmp_path / f"{i}.wav", 1.5, i) for i in range(3)]
    f32, _ = LogMelCache(tmp_path / "c", dtype="float32").build([Segment(w) for w in wavs], workers=1, progress=False)
    f16, _ = LogMelCache(tmp_path / "c", dtype="float16").build([Segment(w) for w in wavs], workers=1, progress=False)
    assert (tmp_path / "c" / "lms").is_dir() and f16[0].dtype == np.float16
    for a, b in zip(f32, f16):
        diff = np.abs(a - b.astype(np.float32))
        # log-mel values lie within (-16, 16), where float16 rounds to within 2^-7 (2^-11 relative)
        assert np.abs(a).max() < 16 and diff.max() <= 2.0 ** -7
        assert np.all(diff <= 2.0 ** -11 * np.abs(a) + 1e-7)
        assert diff.max() / 4.2 < 0.002  # in units of the normalised input (AudioSet std 4.2)


def test_a_build_that_would_fill_the_disk_is_refused_first(tmp_path, monkeypatch):
    from collections import namedtuple

    wav = _wav(tmp_path / "a.wav", 2.0, 0)
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr("shutil.disk_usage", lambda p: usage(10**9, 10**9, 1000))
    with pytest.raises(DataError, match=r"needs about .* GB but only .* free.*data.cache_dir.*float16") as info:
        LogMelCache(tmp_path / "cache").build([Segment(wav)], workers=1, progress=False)
    assert "\n" not in str(info.value)
    assert not list((tmp_path / "cache" / "lms").glob("shard-*.bin"))
    with pytest.raises(DataError, match="segment cache"):
        prepare_segments([Segment(wav)], frontend=FrontEndConfig(), length_s=2.0, pad="circular",
                         cache_dir=tmp_path / "cycles")


def test_segment_arrays_read_like_the_stacked_tensor(tmp_path):
    clear_memory_cache()
    items = [Segment(_wav(tmp_path / f"{i}.wav", 0.5 + 0.25 * i, i)) for i in range(5)]
    disk = prepare_segments(items, frontend=FrontEndConfig(), length_s=1.0, pad="circular", cache_dir=tmp_path / "c")
    memory = prepare_segments(items, frontend=FrontEndConfig(), length_s=1.0, pad="circular", cache_dir=None)
    assert isinstance(disk, SegmentArrays) and disk.shape == (5, 80, 101)
    stacked = memory[:]
    assert torch.equal(disk[:], stacked)
    assert torch.equal(disk[torch.tensor([4, 0, 4])], stacked[[4, 0, 4]])
    mask = torch.tensor([True, False, True, False, True])
    assert torch.equal(disk[mask], stacked[mask]) and torch.equal(disk.subset(mask)[:], stacked[mask])
    assert torch.equal(disk[3], stacked[3])


def test_baseline_statistics_in_chunks_equal_one_pass_over_the_split(tmp_path):
    rng = np.random.default_rng(1)
    x = rng.normal(-6, 3, size=(150, 80, 51)).astype(np.float32)
    x64 = x.astype(np.float64)
    whole = np.concatenate([x64.mean(-1), x64.std(-1), np.diff(x64, axis=-1).std(-1)], axis=1)
    np.testing.assert_array_equal(logmel_statistics(torch.from_numpy(x)), whole)
    np.testing.assert_array_equal(logmel_statistics(x, chunk_rows=7), whole)


# ---------------------------------------------------------------------------- OS limits
def test_os_limits_become_one_line_with_the_fix():
    emfile = os_limit_error(OSError(errno.EMFILE, "Too many open files", "/data/x.wav"))
    assert isinstance(emfile, ResourceLimitError) and "ulimit -n" in str(emfile) and "/data/x.wav" in str(emfile)
    from_worker = os_limit_error(RuntimeError("Caught OSError in DataLoader worker 0: [Errno 24] Too many open files"))
    assert from_worker is not None and "ulimit -n" in str(from_worker)
    assert "cache clean" in str(os_limit_error(OSError(errno.ENOSPC, "No space left on device")))
    assert "max_map_count" in str(os_limit_error(OSError(errno.ENOMEM, "mmap failed: Cannot allocate memory")))
    assert os_limit_error(OSError(errno.ENOENT, "No such file")) is None


@pytest.mark.slow
def test_further_pretrain_runs_to_the_end_under_ulimit_256(tmp_path):
    """1,000 recordings and 1,500 noise clips with 256 open files allowed (one descriptor each would need 2,500)."""
    data, noise = tmp_path / "data", tmp_path / "noise"
    for i in range(1000):
        _wav(data / f"{i // 100}" / f"r{i:04d}.wav", 0.5, i)
    for j in range(1500):
        _wav(noise / f"{j // 100}" / f"n{j:04d}.wav", 0.3, 10_000 + j)

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, 256))

    run = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "m2dx_clinic", "further-pretrain", "--recipe", "tiny_cpu", "--data", str(data),
         "--noise", str(noise), "--out", str(run), "--set", f"data.cache_dir='{tmp_path / 'cache'}'",
         "--set", "optim.epochs=1", "--set", "optim.warmup_epochs=0", "--set", "data.min_ds_size=0",
         "--set", "data.norm_stats_samples=500", "--set", "data.loader_workers=2"],
        capture_output=True, text=True, timeout=900, preexec_fn=limit,
        env={**os.environ, "M2DX_NO_PROGRESS": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert list(run.rglob("checkpoint-1.pth"))
    shard_files = list((tmp_path / "cache" / "lms").glob("shard-*.bin"))
    assert 1 <= len(shard_files) <= 4  # 2,500 entries in a few files, not 2,500
