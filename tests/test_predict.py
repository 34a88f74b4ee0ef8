"""Using the classifier: the classifier file, `m2dx predict` (consistency with training, ensembles, bad
inputs), `m2dx embed -c CLASSIFIER`, and the ONNX / safetensors exports."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import soundfile as sf
import torch

from m2dx_clinic.audio import AUDIO_SUFFIXES, load_audio
from m2dx_clinic.checkpoint import atomic_torch_save, load_checkpoint_file
from m2dx_clinic.checkpoint.classifier import load_classifier
from m2dx_clinic.config import load_recipe
from m2dx_clinic.data.segment_cache import prepare_segments
from m2dx_clinic.data.tasks import load_task
from m2dx_clinic.embed import embed_files, encode_waveform
from m2dx_clinic.errors import CheckpointError, ConfigError
from m2dx_clinic.finetune import finetune
from m2dx_clinic.models.vit import ViTConfig
from m2dx_clinic.inference import Recording, plan_segments
from m2dx_clinic.predict import predict
from m2dx_clinic.recipes import FinetuneRecipe

from conftest import write_wav

TINY = ViTConfig(embed_dim=64, depth=2, num_heads=4)
CLI = [sys.executable, "-m", "m2dx_clinic"]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, demo_icbhi, tiny_ckpt) -> Path:
    """Two repeats of 8-s cycles (every demo cycle is shorter, so the padding rule matters)."""
    out = tmp_path_factory.mktemp("ft")
    recipe = load_recipe(FinetuneRecipe, "tiny_finetune", [
        f"run.out='{out / 'run'}'", f"data.cache_dir='{out / 'cache'}'", "optim.epochs=2", "run.repeats=2",
        "run.num_workers=0", "run.bootstrap=20"])
    return finetune(recipe, task="icbhi", data=demo_icbhi, checkpoint=tiny_ckpt, progress=False).run_dir


def _test_recordings(run: Path, data: Path) -> list[Path]:
    pred = pd.read_csv(run / "predictions.csv")
    names = sorted(pred.loc[pred["split"] == "test", "recording"].unique())
    return [next(p for p in data.rglob(f"{name}.*") if p.suffix in AUDIO_SUFFIXES) for name in names]


def _predicted_by_item(result_segments: pd.DataFrame, classes: list[str]) -> pd.DataFrame:
    frame = result_segments.copy()
    frame["item_id"] = [f"{Path(r).stem}#{s:03d}" for r, s in zip(frame["recording"], frame["segment"])]
    return frame.set_index("item_id")[[f"prob_{c}" for c in classes]]


def _training_rows(run: Path, classes: list[str], repeat: int | None) -> pd.DataFrame:
    pred = pd.read_csv(run / "predictions.csv")
    test = pred[pred["split"] == "test"]
    if repeat is not None:
        return test[test["repeat"] == repeat].set_index("item_id")[[f"prob_{c}" for c in classes]]
    return test.groupby("item_id")[[f"prob_{c}" for c in classes]].mean()  # the ensemble


# ---------------------------------------------------------------------------- the classifier file
def test_every_repeat_writes_a_self_describing_classifier_file(finished_run):
    metrics = json.loads((finished_run / "metrics.json").read_text())
    files = [finished_run / f for f in metrics["classifiers"]["files"]]
    assert [f.name for f in files] == ["repeat-0.pt", "repeat-1.pt"]
    assert files[0].parent.name.endswith("-classifier") and "80x200p16x4p16k" in files[0].parent.name
    chosen = metrics["classifiers"]["selected_repeat"]
    assert (finished_run / "best.pt").read_bytes() == files[chosen].read_bytes()
    raw = torch.load(files[1], weights_only=True)  # no allow-list needed at all
    assert "pos_embed" in raw["model"] and "head.weight" not in raw["model"]  # the published encoder layout
    clf = load_classifier(files[1])
    meta = clf.meta
    assert clf.classes == metrics["classes"] and meta["normal_class"] == "normal"
    assert meta["segment"] == {"seconds": 8.0, "pad": "circular", "positions": "chunked"}
    assert meta["frontend"]["sample_rate"] == 16000 and meta["norm_stats"] == pytest.approx([-6.0, 4.0])
    assert meta["data"]["sha256"] == metrics["data_fingerprint"]["sha256"] and meta["data"]["counts"]["train"]
    assert meta["scores"]["test"]["score"] == pytest.approx(metrics["runs"][1]["test"]["score"])
    assert meta["operating_point"]["threshold"] > 0 and meta["package_version"]
    assert meta["recipe"]["run"]["repeats"] == 2 and meta["repeat"] == 1


def test_embed_reads_the_classifier_encoder(finished_run, demo_icbhi, tmp_path):
    audio = next(demo_icbhi.rglob("*.wav"))
    result = embed_files(finished_run / "best.pt", [audio], tmp_path, progress=False)
    assert not result.failed
    clf = load_classifier(finished_run / "best.pt")
    with torch.inference_mode():
        expected = encode_waveform(clf.model.encoder, load_audio(audio, 16000)).numpy()
    np.testing.assert_allclose(np.load(result.written[0]), expected, rtol=0, atol=1e-6)


# ---------------------------------------------------------------------------- predict = training
def test_predict_reproduces_the_runs_test_probabilities(finished_run, demo_icbhi, tmp_path):
    classes = json.loads((finished_run / "metrics.json").read_text())["classes"]
    files = _test_recordings(finished_run, demo_icbhi)
    one = predict(finished_run, files, tmp_path / "one", repeat=0, progress=False)
    assert set(one.segments["source"]) == {"annotations"} and not one.failed
    expected = _training_rows(finished_run, classes, repeat=0)
    got = _predicted_by_item(one.segments, classes).loc[expected.index]
    assert np.abs(got.to_numpy() - expected.to_numpy()).max() < 1e-5
    # the default for a run folder: the repeats' probabilities averaged
    both = predict(finished_run, files, tmp_path / "both", progress=False)
    assert both.summary["ensemble"] and len(both.summary["classifier_files"]) == 2
    ensemble = _training_rows(finished_run, classes, repeat=None)
    got = _predicted_by_item(both.segments, classes).loc[ensemble.index]
    assert np.abs(got.to_numpy() - ensemble.to_numpy()).max() < 1e-5
    point = json.loads((finished_run / "metrics.json").read_text())["ensemble"]["operating_point"]
    assert both.summary["operating_point"] == point
    assert (both.segments["abnormal"] == (both.segments["p_abnormal"] >= point["threshold"])).all()


def test_a_different_padding_breaks_the_consistency(finished_run, demo_icbhi, tmp_path):
    """The mutation check: with zero padding instead of the trained circular padding, predict disagrees."""
    classes = json.loads((finished_run / "metrics.json").read_text())["classes"]
    raw = load_checkpoint_file(finished_run / "best.pt")
    raw["m2dx"]["segment"]["pad"] = "zero"
    mutated = atomic_torch_save(raw, tmp_path / "mutated.pt")
    chosen = raw["m2dx"]["repeat"]
    got = predict(mutated, _test_recordings(finished_run, demo_icbhi), tmp_path / "p", progress=False)
    expected = _training_rows(finished_run, classes, repeat=chosen)
    diff = np.abs(_predicted_by_item(got.segments, classes).loc[expected.index].to_numpy() - expected.to_numpy())
    assert diff.max() > 1e-5


def test_recordings_table_summarises_segments(finished_run, demo_icbhi, tmp_path):
    files = _test_recordings(finished_run, demo_icbhi)[:2]
    result = predict(finished_run, files, tmp_path, progress=False)
    recs, segs = pd.read_csv(tmp_path / "recordings.csv"), pd.read_csv(tmp_path / "segments.csv")
    for _, rec in recs.iterrows():
        mine = segs[segs["recording"] == rec["recording"]]
        assert rec["segments"] == len(mine)
        assert rec["abnormal_fraction"] == pytest.approx(mine["abnormal"].mean())
        assert rec["max_p_abnormal"] == pytest.approx(mine["p_abnormal"].max())
        for c in result.summary["classes"]:
            assert rec[f"mean_prob_{c}"] == pytest.approx(mine[f"prob_{c}"].mean())
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["recordings"] == 2 and summary["real_time_factor"] > 0


def test_predict_speaks_one_decision_rule(finished_run, demo_icbhi, tmp_path):
    """The flag follows P(abnormal) at the operating point; the most probable class is named as secondary."""
    files = _test_recordings(finished_run, demo_icbhi)[:2]
    proc = subprocess.run([*CLI, "predict", "--model", str(finished_run), "--out", str(tmp_path / "p"),
                           *map(str, files)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    summary = json.loads((tmp_path / "p" / "summary.json").read_text())
    threshold = summary["operating_point"]["threshold"]
    assert f"P(abnormal) >= {threshold:.6g}" in summary["decision_rule"] and "argmax" in summary["secondary_figure"]
    recs = pd.read_csv(tmp_path / "p" / "recordings.csv")
    printed = " ".join((proc.stdout + proc.stderr).split())  # the console writes to stderr
    for _, rec in recs.iterrows():
        line = (f"{Path(rec['recording']).name}: {100 * rec['abnormal_fraction']:.0f} % of {rec['segments']} "
                f"segment(s) flagged abnormal (P(abnormal) >= {threshold:.3g};")
        assert line in printed, (line, printed)
        assert f"secondary: most probable class on average {rec['predicted']} (which class, not whether to flag)" in printed
    assert "predicted normal," not in printed


def test_windows_any_rate_and_channels_and_csv_ranges(finished_run, tmp_path):
    rng = np.random.default_rng(0)
    stereo = write_wav(tmp_path / "in" / "stereo_44k.wav", 0.1 * rng.standard_normal((44100 * 19, 2)), 44100)
    short = write_wav(tmp_path / "in" / "short_8k.wav", 0.1 * rng.standard_normal(8000 * 3), 8000)
    result = predict(finished_run, [tmp_path / "in"], tmp_path / "out", progress=False)
    segs = result.segments
    assert set(segs["source"]) == {"window"} and not result.failed
    # 19 s in 8-s windows: 0-8, 8-16, and 16-19 dropped (shorter than half a window); 3 s: one window
    assert segs[segs["recording"] == str(stereo)][["start", "end"]].values.tolist() == [[0, 8], [8, 16]]
    assert segs[segs["recording"] == str(short)][["start", "end"]].values.tolist() == [[0, 3.0]]
    manifest = tmp_path / "m.csv"
    manifest.write_text(f"path,start,end\n{stereo},1.5,4.0\n{stereo},10,12\n")
    ranged = predict(finished_run, [manifest], tmp_path / "out2", progress=False).segments
    assert ranged[["start", "end"]].values.tolist() == [[1.5, 4.0], [10.0, 12.0]] and set(ranged["source"]) == {"csv"}


def test_plan_segments_hop_and_modes(tmp_path):
    rec = Recording(tmp_path / "a.wav")
    plan, source = plan_segments(rec, 10.0, mode="window", window=4.0, hop=2.0)
    assert source == "window" and plan == [(0.0, 4.0), (2.0, 6.0), (4.0, 8.0), (6.0, 10.0), (8.0, 10.0)]
    with pytest.raises(Exception, match=r"no annotation beside it \(ICBHI a.txt"):
        plan_segments(rec, 10.0, mode="annotations", window=4.0, hop=4.0)
    (tmp_path / "a.txt").write_text("0.5\t1.5\t0\t1\n2.0\t3.0\t1\t0\n")
    assert plan_segments(rec, 10.0, mode="auto", window=4.0, hop=4.0) == ([(0.5, 1.5), (2.0, 3.0)], "annotations")


# ---------------------------------------------------------------------------- bad inputs
def test_bad_files_are_named_one_line_each_the_rest_written(finished_run, demo_icbhi, tmp_path):
    good = next(demo_icbhi.rglob("*.wav"))
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "garbage.wav").write_bytes(b"not audio at all" * 10)
    sf.write(str(bad / "empty.wav"), np.zeros(0), 16000, subtype="PCM_16")
    sf.write(str(bad / "nan.wav"), np.full(16000, np.nan, dtype=np.float32), 16000, subtype="FLOAT")
    sf.write(str(bad / "tiny.wav"), 0.1 * np.ones(100), 16000, subtype="PCM_16")
    out = tmp_path / "out"
    proc = subprocess.run([*CLI, "predict", "--model", str(finished_run), "--out", str(out), str(good), str(bad)],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert sorted(Path(line.split(": ")[1]).name for line in errors) == ["empty.wav", "garbage.wav", "nan.wav", "tiny.wav"]
    assert "Traceback" not in proc.stderr
    recs = pd.read_csv(out / "recordings.csv")
    assert recs["recording"].tolist() == [str(good)]
    assert len(json.loads((out / "summary.json").read_text())["failed"]) == 4


@pytest.mark.parametrize("workers", [0, 3])
def test_reading_ahead_changes_nothing_but_the_speed(finished_run, demo_icbhi, tmp_path, workers):
    """Recordings decoded by threads ahead of the model: the same rows in the same order, a bad file still
    failed where it stood, as without read-ahead (`--read-workers 0`)."""
    files = sorted(demo_icbhi.rglob("*.wav"))[:5]
    bad = tmp_path / "garbage.wav"
    bad.write_bytes(b"not audio at all" * 10)
    inputs = [*files[:2], bad, *files[2:]]
    one = predict(finished_run, inputs, tmp_path / "one", read_workers=1, progress=False)
    other = predict(finished_run, inputs, tmp_path / "other", read_workers=workers, progress=False)
    pd.testing.assert_frame_equal(one.segments, other.segments)
    assert one.failed == other.failed and [Path(p).name for p, _ in other.failed] == ["garbage.wav"]
    assert json.loads((tmp_path / "other" / "summary.json").read_text())["read_workers"] == workers
    with pytest.raises(ConfigError, match="--read-workers must be >= 0"):
        predict(finished_run, inputs, tmp_path / "neg", read_workers=-1, progress=False)


def test_a_pretraining_checkpoint_or_a_broken_classifier_is_one_line(finished_run, tiny_ckpt, tmp_path):
    wav = write_wav(tmp_path / "a.wav", 0.1 * np.random.default_rng(0).standard_normal(16000))
    proc = subprocess.run([*CLI, "predict", "--model", str(tiny_ckpt), "--out", str(tmp_path / "o"), str(wav)],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "a pre-training checkpoint, not a fine-tuned classifier" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    raw = load_checkpoint_file(finished_run / "best.pt")
    raw["m2dx"]["vit_config"]["depth"] = 3  # the file claims another geometry than its weights
    other = atomic_torch_save(raw, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="does not fit the model"):
        load_classifier(other)
    proc = subprocess.run([*CLI, "predict", "--model", str(other), "--out", str(tmp_path / "o2"), str(wav)],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1 and "missing keys" in proc.stderr


# ---------------------------------------------------------------------------- exports
def _temperature_scaled(probs: np.ndarray, meta: dict) -> np.ndarray:
    """softmax(log p / T) with the file's temperature (unchanged when none was fitted), by this test's own code."""
    temperature = (meta.get("calibration") or {}).get("temperature")
    if not temperature:
        return probs
    z = np.log(np.clip(probs, 1e-12, 1)) / temperature
    z = np.exp(z - z.max(axis=1, keepdims=True))
    return z / z.sum(axis=1, keepdims=True)


def _segments_lms(clf, data: Path, task: str = "icbhi", n: int = 6) -> torch.Tensor:
    items = load_task(task, data).split("test")[:n]
    lms = prepare_segments(items, frontend=clf.frontend, length_s=clf.segment_seconds, pad=clf.pad,
                           cache_dir=None)[:]  # every row, as one tensor
    return clf.model.encoder.normalize(lms).unsqueeze(1)


def _check_onnx_and_safetensors(run: Path, data: Path, tmp_path: Path) -> None:
    import onnxruntime as ort

    from m2dx_clinic.export import export_classifier, load_safetensors_classifier

    clf = load_classifier(run / "best.pt")
    x = _segments_lms(clf, data)
    with torch.inference_mode():
        expected = _temperature_scaled(torch.softmax(clf.model(x), dim=-1).numpy(), clf.meta)
    onnx_path = export_classifier(clf, "onnx", tmp_path / "model.onnx")
    session = ort.InferenceSession(str(onnx_path))
    got = session.run(None, {"lms": x.numpy()})[0]
    assert np.abs(got - expected).max() < 1e-4
    side = json.loads((tmp_path / "model.onnx.json").read_text())
    assert side["classes"] == clf.classes and side["operating_point"] == clf.operating_point
    assert side["input"]["shape"][1:] == list(x.shape[1:])
    st = export_classifier(clf, "safetensors", tmp_path / "model.safetensors")
    back = load_safetensors_classifier(st)
    for (name, a), (_, b) in zip(clf.model.state_dict().items(), back.model.state_dict().items()):
        assert torch.equal(a, b), name
    assert back.meta == clf.meta


def test_onnx_and_safetensors_exports_synthetic(finished_run, demo_icbhi, tmp_path):
    _check_onnx_and_safetensors(finished_run, demo_icbhi, tmp_path)


@pytest.mark.realdata
@pytest.mark.slow
def test_predict_and_exports_on_real_icbhi(icbhi_dir, tiny_ckpt, tmp_path):
    recipe = load_recipe(FinetuneRecipe, "tiny_finetune", [
        f"run.out='{tmp_path / 'run'}'", f"data.cache_dir='{tmp_path / 'cache'}'", "optim.epochs=1",
        "data.max_items_per_split=64", "run.bootstrap=20"])
    run = finetune(recipe, task="icbhi", data=icbhi_dir, checkpoint=tiny_ckpt, progress=False).run_dir
    classes = json.loads((run / "metrics.json").read_text())["classes"]
    files = _test_recordings(run, icbhi_dir)[:6]
    result = predict(run, files, tmp_path / "pred", progress=False)
    expected = _training_rows(run, classes, repeat=0)  # predict applies the file's temperature to these
    expected.loc[:, :] = _temperature_scaled(expected.to_numpy(), load_classifier(run / "best.pt").meta)
    got = _predicted_by_item(result.segments, classes)
    common = expected.index.intersection(got.index)  # the run used a subset of each recording's cycles
    assert len(common) >= 3
    assert np.abs(got.loc[common].to_numpy() - expected.loc[common].to_numpy()).max() < 1e-5
    _check_onnx_and_safetensors(run, icbhi_dir, tmp_path)
    shutil.rmtree(tmp_path / "cache")
