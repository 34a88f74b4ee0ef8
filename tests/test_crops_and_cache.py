"""Pre-training data: listing, the content-addressed log-mel cache, stats, crops, noise cycling, mixing."""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from m2dx_clinic.audio import LOG_EPS, FrontEndConfig, list_audio_files
from m2dx_clinic.data import logmel_cache as pd_
from m2dx_clinic.data.crops import (
    CropDataset,
    KeyedSampler,
    NoiseCropDataset,
    PretrainItems,
    compute_norm_stats,
    mix_in_log_domain,
    normalize,
)
from m2dx_clinic.data.logmel_cache import LogMelCache
from m2dx_clinic.data.segments import Segment
from m2dx_clinic.data.segments import list_segments
from m2dx_clinic.data.segments import read_manifest
from m2dx_clinic.errors import ConfigError, DataError


def _tone(seconds: float, freq: float = 440.0, sr: int = 16000) -> np.ndarray:
    t = np.arange(int(seconds * sr)) / sr
    return 0.3 * np.sin(2 * np.pi * freq * t)


# -- listing -------------------------------------------------------------------------------


def test_list_folder_recursive(wav_writer, tmp_path):
    wav_writer("a.wav", _tone(0.5))
    wav_writer("sub/b.wav", _tone(0.5))
    (tmp_path / "notes.txt").write_text("x")
    segs = list_segments(tmp_path)
    assert [s.path.name for s in segs] == ["a.wav", "b.wav"]
    assert all(s.start is None and s.end is None for s in segs)


def test_list_empty_folder(tmp_path):
    with pytest.raises(DataError, match=str(tmp_path)):
        list_segments(tmp_path)


def test_list_csv_manifest(wav_writer, tmp_path):
    wav_writer("audio/a.wav", _tone(1.0))
    absolute = wav_writer("b.wav", _tone(1.0))
    manifest = tmp_path / "lists" / "train.csv"
    manifest.parent.mkdir()
    manifest.write_text(f"path,subject,label,start,end\n../audio/a.wav,p1,crackle,0.1,0.6\n{absolute},p2,,,\n")
    segs = list_segments(manifest)
    classes = read_manifest(manifest).classes
    first, second = ((s.path, s.start, s.end, None if s.label is None else classes[s.label], s.subject) for s in segs)
    assert first == (tmp_path / "lists" / "../audio/a.wav", 0.1, 0.6, "crackle", "p1")
    assert segs[0].path.is_file()
    assert second == (absolute, None, None, None, "p2")


def test_list_csv_errors(wav_writer, tmp_path):
    wav_writer("a.wav", _tone(0.5))
    no_col = tmp_path / "nocol.csv"
    no_col.write_text("file,label\na.wav,x\n")
    with pytest.raises(DataError, match="missing column 'path'"):
        list_segments(no_col)
    missing = tmp_path / "missing.csv"
    missing.write_text("path\na.wav\ngone1.wav\ngone2.wav\n")
    with pytest.raises(DataError, match=r"2 audio file\(s\) not found.*gone1.wav.*gone2.wav"):
        list_segments(missing)
    bad_time = tmp_path / "badtime.csv"
    bad_time.write_text("path,start\na.wav,soon\n")
    with pytest.raises(DataError, match="line 2"):
        list_segments(bad_time)
    with pytest.raises(DataError, match="not found"):
        list_segments(tmp_path / "nope")


# -- cache ---------------------------------------------------------------------------------


def test_cache_builds_once_and_matches_frontend(wav_writer, tmp_path):
    a = wav_writer("data/a.wav", _tone(1.0))
    b = wav_writer("data/b.wav", _tone(0.7, 880.0))
    segs = [Segment(a), Segment(b), Segment(a, 0.2, 0.5)]
    cache = LogMelCache(tmp_path / "cache", FrontEndConfig())
    arrays, bad = cache.build(segs, workers=1, progress=False)
    assert bad == [] and cache.last_stats["computed"] == 3
    assert arrays[0].shape == (80, 101) and arrays[0].dtype == np.float32
    assert arrays[2].shape == (80, FrontEndConfig().num_frames(int(0.3 * 16000)))
    # one shard and its index for the three entries, not a file per entry
    entries = sorted((tmp_path / "cache" / "lms").iterdir())
    assert [p.suffix for p in entries] == [".bin", ".idx"]
    mtimes = [p.stat().st_mtime_ns for p in entries]

    again, _ = LogMelCache(tmp_path / "cache", FrontEndConfig()).build(segs, workers=1, progress=False)
    assert sorted((tmp_path / "cache" / "lms").iterdir()) == entries
    assert [p.stat().st_mtime_ns for p in entries] == mtimes
    for x, y in zip(arrays, again):
        np.testing.assert_array_equal(x, y)


def test_cache_second_build_computes_nothing(wav_writer, tmp_path, monkeypatch):
    a = wav_writer("a.wav", _tone(0.5))
    cache = LogMelCache(tmp_path / "cache", FrontEndConfig())
    cache.build([Segment(a)], workers=1, progress=False)
    calls = []
    monkeypatch.setattr(pd_, "_compute_entry", lambda args: calls.append(args))
    monkeypatch.setattr(pd_, "sha256_file", lambda p: calls.append(p))
    arrays, _ = cache.build([Segment(a)], workers=1, progress=False)
    assert calls == [] and cache.last_stats == {"segments": 1, "computed": 0, "cached": 1, "bad": 0}
    assert arrays[0].shape[0] == 80


def test_cache_key_survives_rename_and_edit_invalidates(wav_writer, tmp_path):
    a = wav_writer("a.wav", _tone(0.5))
    cache = LogMelCache(tmp_path / "cache", FrontEndConfig())
    cache.build([Segment(a)], workers=1, progress=False)
    moved = tmp_path / "elsewhere" / "renamed.wav"
    moved.parent.mkdir()
    os.replace(a, moved)
    cache.build([Segment(moved)], workers=1, progress=False)
    assert cache.last_stats["computed"] == 0 and cache.last_stats["cached"] == 1
    wav_writer("elsewhere/renamed.wav", _tone(0.5, 300.0))  # same name, new content
    cache.build([Segment(moved)], workers=1, progress=False)
    assert cache.last_stats["computed"] == 1
    # Another front-end is another key.
    other = LogMelCache(tmp_path / "cache", FrontEndConfig(n_mels=64))
    arrays, _ = other.build([Segment(moved)], workers=1, progress=False)
    assert other.last_stats["computed"] == 1 and arrays[0].shape[0] == 64


def test_cache_reports_all_bad_files_together(wav_writer, tmp_path):
    good = wav_writer("good.wav", _tone(0.5))
    silent = wav_writer("silent.wav", np.zeros(8000))
    tiny = wav_writer("tiny.wav", _tone(0.01))  # 160 samples < one 400-sample window
    broken = tmp_path / "broken.wav"
    broken.write_bytes(b"not audio at all")
    segs = [Segment(p) for p in (good, silent, tiny, broken)] + [Segment(good, 0.4999, 0.5)]
    cache = LogMelCache(tmp_path / "cache", FrontEndConfig())
    with pytest.raises(DataError) as info:
        cache.build(segs, workers=1, progress=False)
    message = str(info.value)
    assert "\n" not in message and message.startswith("4 of 5 ")
    for name in ("silent.wav", "tiny.wav", "broken.wav", "good.wav [0.4999-0.5 s]", "--skip-bad"):
        assert name in message
    assert "shorter than one frame" in message

    arrays, bad = cache.build(segs, workers=1, skip_bad=True, progress=False)
    assert len(arrays) == 1 and [s.path.name for s, _ in bad] == ["silent.wav", "tiny.wav", "broken.wav", "good.wav"]
    assert cache.last_good_segments == [segs[0]]


def test_cache_lists_first_ten_and_count(tmp_path):
    segs = [Segment(tmp_path / f"missing{i:02d}.wav") for i in range(13)]
    with pytest.raises(DataError, match=r"13 of 13 .*missing09.wav.*and 3 more; fix or remove them") as info:
        LogMelCache(tmp_path / "cache").build(segs, workers=1, progress=False)
    assert "missing10.wav" not in str(info.value)


def test_cache_parallel_workers(wav_writer, tmp_path):
    paths = [wav_writer(f"w{i}.wav", _tone(0.3, 200.0 + 100 * i)) for i in range(4)]
    cache = LogMelCache(tmp_path / "cache", FrontEndConfig())
    parallel, _ = cache.build([Segment(p) for p in paths], workers=2, progress=False)
    assert cache.last_stats["computed"] == 4
    serial, _ = LogMelCache(tmp_path / "other", FrontEndConfig()).build([Segment(p) for p in paths], workers=1, progress=False)
    for x, y in zip(parallel, serial):
        np.testing.assert_array_equal(x, y)


# -- statistics ------------------------------------------------------------------------------


def test_norm_stats_constant_and_known():
    const = [np.full((4, 50), -3.0, np.float32), np.full((4, 10), -3.0, np.float32)]
    mean, std = compute_norm_stats(const, crop_frames=20, num_samples=200)
    assert mean == pytest.approx(-3.0) and std == pytest.approx(0.0, abs=1e-6)
    # Short clip (3 frames < crop 8): padding is excluded, so values 0/1/2 count equally.
    short = [np.tile(np.array([0.0, 1.0, 2.0], np.float32), (2, 1))]
    mean, std = compute_norm_stats(short, crop_frames=8, num_samples=50)
    assert mean == pytest.approx(1.0) and std == pytest.approx(math.sqrt(2 / 3))
    rng = np.random.default_rng(1)
    big = [rng.normal(2.0, 3.0, (8, 400)).astype(np.float32) for _ in range(5)]
    mean, std = compute_norm_stats(big, crop_frames=50, num_samples=500)
    assert mean == pytest.approx(2.0, abs=0.05) and std == pytest.approx(3.0, abs=0.05)
    assert compute_norm_stats(big, 50, 100, seed=3) == compute_norm_stats(big, 50, 100, seed=3)
    x = torch.tensor([1.0, 3.0])
    assert torch.equal(normalize(x, 1.0, 2.0), torch.tensor([0.0, 1.0]))


# -- crops -----------------------------------------------------------------------------------


def test_crop_shapes_and_circular_padding():
    long = np.arange(3 * 100, dtype=np.float32).reshape(3, 100)
    short = np.arange(3 * 5, dtype=np.float32).reshape(3, 5)
    ds = CropDataset([long, short], crop_frames=12)
    torch.manual_seed(0)
    for _ in range(20):
        item = ds[0]
        x = item["lms"]
        assert x.shape == (1, 3, 12) and x.dtype == torch.float32 and item["index"] == 0
        start = int(x[0, 0, 0].item())
        np.testing.assert_array_equal(x[0].numpy(), long[:, start : start + 12])
    padded = ds[1]["lms"][0].numpy()
    np.testing.assert_array_equal(padded, short[:, np.arange(12) % 5])
    assert "label" not in ds[1]
    exact = CropDataset([np.zeros((3, 12), np.float32)], crop_frames=12)
    assert exact[0]["lms"].shape == (1, 3, 12)


def test_crop_start_is_uniform_and_follows_torch_seed():
    lms = np.tile(np.arange(10, dtype=np.float32), (2, 1))
    ds = CropDataset([lms], crop_frames=4)
    torch.manual_seed(5)
    starts = [int(ds[0]["lms"][0, 0, 0]) for _ in range(700)]
    assert set(starts) == set(range(7))  # every start in [0, frames - crop] occurs
    torch.manual_seed(5)
    assert [int(ds[0]["lms"][0, 0, 0]) for _ in range(700)] == starts


def test_inflation_length_and_equal_coverage():
    clips = [np.full((2, 20), float(i), np.float32) for i in range(3)]
    assert len(CropDataset(clips, 8)) == 3
    assert len(CropDataset(clips, 8, min_ds_size=3)) == 3
    ds = CropDataset(clips, 8, min_ds_size=10)
    assert len(ds) == 12
    counts = np.bincount([ds[i]["index"] for i in range(len(ds))])
    assert counts.tolist() == [4, 4, 4]
    assert all(float(ds[i]["lms"][0, 0, 0]) == ds[i]["index"] for i in range(len(ds)))
    with pytest.raises(IndexError):
        ds[12]


def test_crop_labels_single_and_multi():
    clips = [np.zeros((2, 20), np.float32) for _ in range(2)]
    single = CropDataset(clips, 8, labels=[1, 0])
    assert single[0]["label"].dtype == torch.long and int(single[0]["label"]) == 1
    multi = CropDataset(clips, 8, labels=[[0, 2], []], num_classes=3)
    assert multi[0]["label"].tolist() == [1.0, 0.0, 1.0] and multi[1]["label"].sum() == 0
    with pytest.raises(ValueError):
        CropDataset(clips, 8, labels=[1])
    with pytest.raises(DataError):
        CropDataset([], 8)


# -- noise -----------------------------------------------------------------------------------


def _noise_clips(n: int = 5) -> list[np.ndarray]:
    # Clip i holds the constant i, so a crop tells which clip it came from; clip 0 is short.
    return [np.full((2, 3 if i == 0 else 30), float(i), np.float32) for i in range(n)]


def test_noise_cycle_covers_every_clip_once_per_cycle():
    noise = NoiseCropDataset(_noise_clips(), crop_frames=8, seed=1)
    assert noise.mean == pytest.approx(np.mean([0.0, 1.0, 2.0, 3.0, 4.0]), abs=0.3)
    batch = noise.batch(0, 15)  # 3 cycles of 5
    assert batch.shape == (15, 1, 2, 8)
    drawn = [int(v) for v in batch[:, 0, 0, 0]]
    assert drawn == [noise.clip_at(p) for p in range(15)]
    for cycle in range(3):
        assert sorted(drawn[cycle * 5 : cycle * 5 + 5]) == [0, 1, 2, 3, 4]
    assert drawn[:5] != drawn[5:10] or drawn[5:10] != drawn[10:15]  # reshuffled, not a fixed order
    with pytest.raises(ValueError):
        noise.clip_at(-1)


def test_noise_is_a_pure_function_of_seed_and_position():
    """What makes resume exact and workers interchangeable: no hidden state, any order of access."""
    a = NoiseCropDataset(_noise_clips(), crop_frames=8, seed=2, mean=0.0)
    b = NoiseCropDataset(_noise_clips(), crop_frames=8, seed=2, mean=0.0)
    forward = [a.crop_at(p) for p in range(12)]
    backward = [b.crop_at(p) for p in reversed(range(12))][::-1]
    assert all(torch.equal(x, y) for x, y in zip(forward, backward))
    assert torch.equal(a.batch(7, 4), torch.stack(forward[7:11]))
    other = NoiseCropDataset(_noise_clips(), crop_frames=8, seed=3, mean=0.0)
    assert [other.clip_at(p) for p in range(10)] != [a.clip_at(p) for p in range(10)]


def test_noise_crops_are_random_and_short_clips_repeat():
    ramp = np.tile(np.arange(40, dtype=np.float32), (2, 1))
    short = np.tile(np.array([100.0, 200.0, 300.0], np.float32), (2, 1))
    noise = NoiseCropDataset([ramp, short], crop_frames=8, mean=0.0)
    starts = set()
    for crop in noise.batch(0, 40):
        row = crop[0, 0].numpy()
        if row[0] >= 100:  # the short clip, repeated from its start
            np.testing.assert_array_equal(row, [100, 200, 300, 100, 200, 300, 100, 200])
        else:
            np.testing.assert_array_equal(np.diff(row), np.ones(7))
            starts.add(int(row[0]))
    assert len(starts) > 3


def _loader_batches(items: PretrainItems, workers: int, epochs: range,
                    stop_after: int | None = None) -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator()
    sampler = KeyedSampler(torch.utils.data.RandomSampler(items, generator=gen))
    loader = torch.utils.data.DataLoader(items, batch_size=4, sampler=sampler, drop_last=True, num_workers=workers,
                                         persistent_workers=workers > 0, generator=torch.Generator().manual_seed(0))
    out = []
    for epoch in epochs:
        gen.manual_seed(100 + epoch)
        sampler.set_epoch(epoch)
        for i, batch in enumerate(loader):
            if stop_after is not None and i >= stop_after:
                break  # as the training loop does with a partial accumulation cycle or max_steps
            out.append(batch)
    return out


def test_pretrain_batches_do_not_depend_on_workers_or_restarts():
    """Persistent workers, no workers, or a loader rebuilt at epoch 2 (a resume): the same batches."""
    clips = [np.tile(np.arange(50, dtype=np.float32) + 100 * i, (2, 1)) for i in range(5)]
    items = PretrainItems(CropDataset(clips, 8, min_ds_size=10),
                          NoiseCropDataset(_noise_clips(), crop_frames=8, seed=4, mean=0.0), seed=9)
    torch.manual_seed(0)
    inline = _loader_batches(items, 0, range(3))
    rng_after = torch.get_rng_state()
    workers = _loader_batches(items, 2, range(3))
    resumed = _loader_batches(items, 0, range(2, 3))
    assert len(inline) == 3 * 2 and set(inline[0]) == {"lms", "index", "noise"}
    assert inline[0]["noise"].shape == (4, 1, 2, 8)
    for a, b in zip(inline, workers):
        assert all(torch.equal(a[k], b[k]) for k in a)
    for a, b in zip(inline[4:], resumed):
        assert all(torch.equal(a[k], b[k]) for k in a)
    # persistent workers left mid-epoch still hand the next epoch exactly its own batches
    cut_inline, cut_workers = _loader_batches(items, 0, range(3), 1), _loader_batches(items, 2, range(3), 1)
    assert len(cut_workers) == 3
    for a, b in zip(cut_inline, cut_workers):
        assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(inline[0]["lms"], inline[2]["lms"])  # epochs differ
    torch.manual_seed(0)
    torch.rand(1)
    assert not torch.equal(rng_after, torch.get_rng_state())  # sanity: the check below can fail
    torch.manual_seed(0)
    _loader_batches(items, 0, range(1))
    assert torch.equal(torch.get_rng_state(), rng_after)  # the loader leaves the global RNG (masks) alone
    # the noise stream continues across epochs: item p of epoch e is at stream position e * len + p
    sampler = KeyedSampler(range(10))
    sampler.set_epoch(2)
    assert [(k.epoch, k.position, k.index) for k in sampler] == [(2, 20 + i, i) for i in range(10)]


# -- mixing ----------------------------------------------------------------------------------


def _mix_numpy(clean, noise, r, cm, nm, std):
    c = clean.astype(np.float64) - cm
    n = noise.astype(np.float64) - nm
    mixed = np.log(np.maximum(r * np.exp(n) + (1 - r) * np.exp(c), LOG_EPS))
    return c / std, mixed / std


def test_mix_matches_formula_and_limits():
    rng = np.random.default_rng(0)
    clean = rng.uniform(-15.9, 3.0, (2, 1, 8, 16)).astype(np.float32)
    noise = rng.uniform(-15.9, 3.0, (2, 1, 8, 16)).astype(np.float32)
    for r in (0.0, 0.01, 0.3, 0.7, 1.0):
        got_c, got_m = mix_in_log_domain(torch.from_numpy(clean), torch.from_numpy(noise), r, -6.0, -5.0, 4.2)
        want_c, want_m = _mix_numpy(clean, noise, r, -6.0, -5.0, 4.2)
        np.testing.assert_allclose(got_c.numpy(), want_c, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(got_m.numpy(), want_m, rtol=1e-5, atol=1e-5)
        assert got_m.dtype == torch.float32
    c, m = mix_in_log_domain(torch.from_numpy(clean), torch.from_numpy(noise), 0.0, -6.0, -5.0, 4.2)
    assert torch.equal(c, m)  # r = 0: no noise at all
    _, m1 = mix_in_log_domain(torch.from_numpy(clean), torch.from_numpy(noise), 1.0, -6.0, -5.0, 4.2)
    np.testing.assert_allclose(m1.numpy(), (noise + 5.0) / 4.2, rtol=1e-6, atol=1e-6)
    # The floor: two near-silent inputs give log(eps), scaled.
    low = torch.full((1, 4), -100.0)
    _, floor = mix_in_log_domain(low, low, 0.5, 0.0, 0.0, 2.0)
    np.testing.assert_allclose(floor.numpy(), np.full((1, 4), math.log(LOG_EPS) / 2.0), rtol=1e-6)
    # No overflow where a naive exp would give inf in half precision.
    _, big = mix_in_log_domain(torch.full((3,), 50.0, dtype=torch.float16), torch.zeros(3), 0.5, 0.0, 0.0, 1.0)
    assert torch.isfinite(big).all()
    with pytest.raises(ConfigError):
        mix_in_log_domain(low, low, 1.5, 0.0, 0.0, 1.0)


# -- real noise clips -------------------------------------------------------------------------


@pytest.mark.realdata
def test_real_noise_clips_cache_and_cycle(noise_dir: Path, tmp_path):
    files = list_audio_files(noise_dir / "esc10")[:4]
    cache = LogMelCache(tmp_path / "cache", FrontEndConfig())
    arrays, bad = cache.build([Segment(p) for p in files], workers=1, progress=False)
    assert bad == [] and all(a.shape[0] == 80 and a.shape[1] > 400 for a in arrays)
    noise = NoiseCropDataset(arrays, crop_frames=200, num_stat_samples=200)
    assert -16.0 < noise.mean < 5.0
    batch = noise.batch(0, 6)
    assert batch.shape == (6, 1, 80, 200) and torch.isfinite(batch).all()
    mean, std = compute_norm_stats(arrays, 200, num_samples=200)
    clean, mixed = mix_in_log_domain(batch, batch.flip(0), 0.3, mean, noise.mean, std)
    assert torch.isfinite(mixed).all() and not torch.equal(clean, mixed)
