"""What a team hands on: no identifiers in shipped files, the exported classifier is the scored one, the
card's Reproduce line reproduces the run, tuned settings keep their recipe, the README's Python runs."""

from __future__ import annotations

import getpass
import json
import re
import shlex
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import m2dx_clinic
from m2dx_clinic.config import dump_toml, load_params_toml, load_recipe, recipe_for_params
from m2dx_clinic.data.segment_cache import prepare_segments
from m2dx_clinic.data.tasks import load_task
from m2dx_clinic.errors import ConfigError
from m2dx_clinic.finetune import finetune
from m2dx_clinic.provenance import INTERNAL_RECORDS, scrub, scrub_text
from m2dx_clinic.recipes import FinetuneRecipe

from conftest import write_wav

PLANTED = "JaneDoe"  # a patient's name in the folder, file, CSV and subject names
CLI = [sys.executable, "-m", "m2dx_clinic"]
OVERRIDES = ["optim.epochs=1", "data.cycle_seconds=2.0", "run.num_workers=0", "run.bootstrap=20", "run.repeats=2"]


@pytest.fixture(scope="module")
def planted(tmp_path_factory, tiny_ckpt) -> dict[str, Path]:
    """A 2-repeat fine-tune of a CSV task whose every name carries a patient's name, plus both exports."""
    root = tmp_path_factory.mktemp("handing_on") / f"{PLANTED}_ward7"
    rng = np.random.default_rng(0)
    t = np.arange(16000 * 2) / 16000
    rows = []
    for subject in range(16):
        for k in range(2):
            label = "tone" if (subject + k) % 2 else "normal"
            wave = 0.05 * rng.standard_normal(t.size) + (0.3 * np.sin(2 * np.pi * 1000 * t) if label == "tone" else 0)
            name = f"{PLANTED}_{subject:02d}_{k}.wav"
            write_wav(root / name, wave)
            rows.append(f"{name},{label},{PLANTED}-{subject:02d}")
    csv = root / f"{PLANTED}_labels.csv"
    csv.write_text("path,label,subject\n" + "\n".join(rows) + "\n")
    recipe = load_recipe(FinetuneRecipe, "tiny_finetune", [
        f"run.out='{root / 'run'}'", f"data.cache_dir='{root / 'cache'}'", *OVERRIDES])
    run = finetune(recipe, task="csv", data=csv, checkpoint=tiny_ckpt, progress=False).run_dir
    exports = root / "run" / "exports"
    for fmt, name in (("onnx", "model.onnx"), ("safetensors", "model.safetensors")):
        proc = subprocess.run([*CLI, "export", "--model", str(run), "--format", fmt, "--out", str(exports / name)],
                              capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr
        assert "the mean of the 2 repeats' probabilities" in " ".join((proc.stdout + proc.stderr).split())
    return {"root": root, "run": run, "csv": csv, "ckpt": tiny_ckpt, "exports": exports}


def _shipped(run: Path) -> list[Path]:
    return [p for p in sorted(run.rglob("*")) if p.is_file() and p.name not in INTERNAL_RECORDS]


def test_nothing_shipped_names_the_patient_the_machine_or_its_paths(planted):
    run = planted["run"]
    shipped = _shipped(run)
    names = {p.name for p in shipped}
    assert {"MODEL_CARD.md", "model_card.html", "best.pt", "recipe.toml", "model.onnx", "model.onnx.json",
            "model.safetensors", "model.safetensors.json"} <= names
    assert not (run / ".m2dx.lock").exists()  # the lock (host, pid) went with the run
    needles = {PLANTED, str(Path.home()), str(Path(m2dx_clinic.__file__).resolve().parent.parent), sys.prefix}
    needles |= {n for n in (socket.gethostname(), getpass.getuser()) if len(n) >= 5}
    for path in shipped:
        data = path.read_bytes()
        for needle in needles:
            assert needle.encode() not in data, f"{path.relative_to(run)} contains {needle!r}"
    # ... while the internal records keep what recomputing needs, and the card says they are internal
    assert PLANTED in (run / "predictions.csv").read_text()
    card = (run / "MODEL_CARD.md").read_text()
    assert "predictions.csv" in card and "stay inside the team" in card
    metrics = json.loads((run / "metrics.json").read_text())
    fp = metrics["data_fingerprint"]["sha256"]
    assert card.startswith(f"# Model card: csv-{fp[:8]} (normal, tone)")


def test_the_evaluation_card_names_no_patient_machine_or_path(planted):
    """m2dx evaluate's shipped outputs (card, plots) are as clean as the run's; its records stay internal."""
    out = planted["root"] / "evaluation"
    proc = subprocess.run([*CLI, "evaluate", "--model", str(planted["run"]), "--task", "csv", "--data",
                           str(planted["csv"]), "--out", str(out), "--bootstrap", "20"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    shipped = _shipped(out)
    assert {"EVALUATION_CARD.md", "evaluation_card.html"} <= {p.name for p in shipped}
    needles = {PLANTED, str(Path.home()), str(planted["root"]), sys.prefix}
    needles |= {n for n in (socket.gethostname(), getpass.getuser()) if len(n) >= 5}
    for path in shipped:
        for needle in needles:
            assert needle.encode() not in path.read_bytes(), f"{path.name} contains {needle!r}"
    assert PLANTED in (out / "predictions.csv").read_text()  # the internal record keeps what recomputing needs


def test_full_provenance_opts_back_in(planted, tmp_path):
    recipe = load_recipe(FinetuneRecipe, "tiny_finetune", [
        f"run.out='{tmp_path / 'run'}'", f"data.cache_dir='{planted['root'] / 'cache'}'", *OVERRIDES,
        "run.repeats=1", "run.provenance=full", "run.model_name=lung-v1", "run.baseline=false"])
    run = finetune(recipe, task="csv", data=planted["csv"], checkpoint=planted["ckpt"], progress=False).run_dir
    card = (run / "MODEL_CARD.md").read_text()
    assert str(planted["csv"].resolve()) in card and card.startswith("# Model card: lung-v1 (")


def test_a_published_name_is_found_named_and_kept_out_of_shipped_paths(planted, tmp_path, monkeypatch):
    """--checkpoint <published name>: the internal record says the name AND the file it found in the weights
    cache (it used to say None); shipped files name the weights by that name and carry no cache path."""
    from m2dx_clinic.checkpoint.classifier import load_classifier
    from m2dx_clinic.recipes import ICBHI_BASE

    cache = tmp_path / "weights"
    found = cache / ICBHI_BASE / "checkpoint-1.pth"  # the tiny checkpoint has the published name's geometry
    found.parent.mkdir(parents=True)
    shutil.copy(planted["ckpt"], found)
    monkeypatch.setenv("M2DX_WEIGHTS", str(cache))
    recipe = load_recipe(FinetuneRecipe, "tiny_finetune", [
        f"run.out='{tmp_path / 'run'}'", f"data.cache_dir='{planted['root'] / 'cache'}'", *OVERRIDES,
        "run.repeats=1", "run.baseline=false"])
    run = finetune(recipe, task="csv", data=planted["csv"], checkpoint=ICBHI_BASE, progress=False).run_dir
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["checkpoint"] == ICBHI_BASE and metrics["checkpoint_published"] == ICBHI_BASE
    assert metrics["checkpoint_resolved"] == str(found.resolve())
    assert load_classifier(run / "best.pt").meta["base_checkpoint"] == ICBHI_BASE
    assert f"base checkpoint: {ICBHI_BASE}" in (run / "MODEL_CARD.md").read_text()
    for path in _shipped(run):
        assert str(tmp_path).encode() not in path.read_bytes(), f"{path.relative_to(run)} names a path"


def test_scrub_keeps_prose_and_removes_paths():
    assert scrub_text("mean / std of train/val, Se/Sp") == "mean / std of train/val, Se/Sp"
    assert scrub_text("csv (/home/jane/ward7/labels.csv): empty") == "csv (<path>): empty"
    assert scrub({"out": "/home/jane/runs/x", "n": 3, "l": ["~/a/b c"]}) == {"out": "", "n": 3, "l": ["<path> c"]}


def _test_items(planted: dict[str, Path]):
    recipe = load_recipe(FinetuneRecipe, "tiny_finetune", OVERRIDES)
    td = load_task("csv", planted["csv"], val_fraction=recipe.data.val_fraction, seed=recipe.run.seed)
    return td.split("test")


def test_the_exported_classifier_is_the_one_predict_and_the_card_use(planted):
    import onnxruntime as ort

    from m2dx_clinic.export import load_safetensors_classifiers
    from m2dx_clinic.predict import load_model_set, probabilities

    run, exports = planted["run"], planted["exports"]
    models = load_model_set(run)
    clf = models.first
    items = _test_items(planted)
    lms = prepare_segments(items, frontend=clf.frontend, length_s=clf.segment_seconds, pad=clf.pad,
                           cache_dir=None)[:]  # every row, as one tensor
    by_predict = probabilities(models, lms, device=torch.device("cpu"), batch_size=8)
    # independently: the mean over repeats of the probabilities the run itself recorded
    pred = pd.read_csv(run / "predictions.csv")
    cols = [f"prob_{c}" for c in clf.classes]
    recorded = pred[pred["split"] == "test"].groupby("item_id")[cols].mean().loc[[it.item_id for it in items]]
    assert np.abs(by_predict - recorded.to_numpy()).max() < 1e-5
    x = clf.model.encoder.normalize(lms).unsqueeze(1).numpy()
    got = ort.InferenceSession(str(exports / "model.onnx")).run(None, {"lms": x})[0]
    assert np.abs(got - recorded.to_numpy()).max() < 1e-4
    side = json.loads((exports / "model.onnx.json").read_text())
    metrics = json.loads((run / "metrics.json").read_text())
    assert side["members"] == 2 and side["operating_point"] == metrics["ensemble"]["operating_point"]
    members = load_safetensors_classifiers(exports / "model.safetensors")
    with torch.inference_mode():
        mean = sum(torch.softmax(m.model(torch.from_numpy(x)), -1) for m in members) / len(members)
    assert len(members) == 2 and np.abs(mean.numpy() - recorded.to_numpy()).max() < 1e-4


def test_the_cards_reproduce_line_reproduces_the_run(planted, tmp_path):
    run = planted["run"]
    command = re.search(r"command: `([^`]+)`", (run / "MODEL_CARD.md").read_text()).group(1)
    fill = {"DATA": str(planted["csv"]), "CHECKPOINT": str(planted["ckpt"]), "recipe.toml": str(run / "recipe.toml")}
    argv = [fill.get(a, a) for a in shlex.split(command)]
    assert argv[:2] == ["m2dx", "finetune"]
    proc = subprocess.run([*CLI, *argv[1:], "--out", str(tmp_path / "again"), "--set",
                           f"data.cache_dir={planted['root'] / 'cache'}"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    first = pd.read_csv(run / "predictions.csv")
    again = pd.read_csv(tmp_path / "again" / "predictions.csv")
    cols = [c for c in first.columns if c.startswith("prob_")]
    assert len(first) == len(again) and sorted(first["repeat"].unique()) == [0, 1]
    assert np.abs(first[cols].to_numpy() - again[cols].to_numpy()).max() < 1e-6


def test_readme_python_example_runs(planted, tmp_path, capsys):
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    code = re.search(r"From Python:\n\n```python\n(.*?)```", readme, flags=re.S).group(1)
    wav = sorted(planted["root"].glob("*.wav"))[0]
    code = (code.replace('"runs/lung_ft"', repr(str(planted["run"])))
            .replace('"runs/lung_ft/best.pt"', repr(str(planted["run"] / "best.pt")))
            .replace('"new_recording.wav"', repr(str(wav))).replace('"predictions/"', repr(str(tmp_path / "p"))))
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)
    assert "abnormal_fraction" in capsys.readouterr().out
    assert namespace["clf"].classes == ["normal", "tone"] and len(namespace["result"].recordings) == 1


def test_tuned_params_bring_their_recipe(tmp_path):
    best = tmp_path / "best.toml"
    best.write_text(dump_toml({"about": {"finetune_recipe": "tiny_finetune"}, "optim": {"lr": 0.001}}, "best"))
    assert recipe_for_params(None, best) == "tiny_finetune"
    assert recipe_for_params("tiny_finetune", best) == "tiny_finetune"
    assert load_params_toml(best) == ["optim.lr=0.001"]
    with pytest.raises(ConfigError, match="tuned with recipe 'tiny_finetune', but --recipe 'icbhi_finetune'"):
        recipe_for_params("icbhi_finetune", best)
    older = tmp_path / "old.toml"  # written before [about] existed: the header names the recipe
    older.write_text("# fine-tune recipe: tiny_finetune\n[optim]\nlr = 0.001\n")
    assert recipe_for_params(None, older) == "tiny_finetune"
    assert recipe_for_params(None, None) == "icbhi_finetune"


def test_warnings_on_test_baseline_and_a_silent_operating_point():
    from m2dx_clinic.evaluation.checks import result_warnings

    probs = np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4]])
    labels = np.array([0, 1, 0])
    common = dict(classes=["n", "a"], normal=0, splits={"test": (probs, labels)}, model_val_score=0.8,
                  baseline_val_score=0.7, chance=None)
    assert result_warnings(**common, test_score=0.9, baseline_test_score=0.8,
                           test_operating={"op_sensitivity": 0.5, "op_ppv": 1.0}) == []
    below = result_warnings(**common, test_score=0.476, baseline_test_score=0.52)
    assert below == ["the model's test Score 47.6% is below the log-mel statistics + logistic regression "
                     "baseline's 52.0%: on unseen subjects the simple thing does better"]
    silent = result_warnings(**common, test_score=0.9, test_operating={"op_sensitivity": 0.0, "op_ppv": float("nan")})
    assert len(silent) == 1 and "test sensitivity 0" in silent[0]
    undefined = result_warnings(**common, test_score=0.9, test_operating={"op_sensitivity": float("nan"),
                                                                           "op_ppv": float("nan")})
    assert len(undefined) == 1 and "PPV is undefined" in undefined[0]


def test_an_interrupted_finetune_resumes_keeping_finished_repeats(planted, tmp_path, monkeypatch):
    import m2dx_clinic.finetune as ft

    out = tmp_path / "run"
    recipe = load_recipe(FinetuneRecipe, "tiny_finetune", [
        f"run.out='{out}'", f"data.cache_dir='{planted['root'] / 'cache'}'", *OVERRIDES, "run.baseline=false"])
    real = ft.run_repeat
    trained = []

    def interrupted_in_repeat_1(prep, repeat, **kwargs):
        if repeat == 1:
            raise KeyboardInterrupt
        trained.append(repeat)
        return real(prep, repeat, **kwargs)

    monkeypatch.setattr(ft, "run_repeat", interrupted_in_repeat_1)
    with pytest.raises(KeyboardInterrupt):
        finetune(recipe, task="csv", data=planted["csv"], checkpoint=planted["ckpt"], progress=True)
    assert trained == [0] and (out / "repeats" / "repeat-0.json").is_file() and not (out / "metrics.json").exists()
    assert not (out / ".m2dx.lock").exists()
    with pytest.raises(ConfigError, match="--resume"):  # a plain re-run does not silently start again
        finetune(recipe, task="csv", data=planted["csv"], checkpoint=planted["ckpt"], progress=False)

    def counting(prep, repeat, **kwargs):
        trained.append(repeat)
        return real(prep, repeat, **kwargs)

    monkeypatch.setattr(ft, "run_repeat", counting)
    finetune(recipe, task="csv", data=planted["csv"], checkpoint=planted["ckpt"], progress=False, resume=True)
    assert trained == [0, 1]  # repeat 0 was kept, only repeat 1 trained
    # the resumed run equals an uninterrupted one (CPU runs are deterministic)
    whole = tmp_path / "whole"
    recipe.run.out = str(whole)
    finetune(recipe, task="csv", data=planted["csv"], checkpoint=planted["ckpt"], progress=False)
    a, b = pd.read_csv(out / "predictions.csv"), pd.read_csv(whole / "predictions.csv")
    cols = [c for c in a.columns if c.startswith("prob_")]
    assert np.abs(a[cols].to_numpy() - b[cols].to_numpy()).max() < 1e-6
    assert json.loads((out / "metrics.json").read_text())["ensemble"] == json.loads((whole / "metrics.json").read_text())["ensemble"]


def test_card_verdict_in_words_next_to_baseline_and_chance():
    from m2dx_clinic.model_card import verdict

    def metrics(model: float, base: float) -> dict:
        return {"ensemble": {"test": {"values": {"score": model, "auroc_abnormal": 0.7}, "ci95": {"score": [0.4, 0.6]}}},
                "baseline": {"test": {"values": {"score": base}}},
                "chance": {"always_normal": {"score": 0.45}, "class_prior": {"score": 0.44}}}

    below = verdict(metrics(0.476, 0.52), "test")
    assert below.startswith("ICBHI Score 47.6 % (95 % CI 40.0-60.0) on the test split")
    assert "baseline reaches 52.0 %" in below and "chance 45.0 %" in below and "NOT BETTER THAN THE BASELINE" in below
    assert "NOT USEFUL" in verdict(metrics(0.44, 0.40), "test")
    good = verdict(metrics(0.8, 0.6), "test")
    assert "better than the baseline and chance" in good and "AUROC (abnormal vs normal) is 70.0 %" in good


def test_predict_json_and_one_line_per_recording(planted, tmp_path):
    wavs = sorted(planted["root"].glob("*.wav"))[:2]
    proc = subprocess.run([*CLI, "predict", "--model", str(planted["run"]), "--out", str(tmp_path / "j"), "--json",
                           *map(str, wavs)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    table = pd.read_csv(tmp_path / "j" / "recordings.csv")
    assert [Path(r["recording"]).name for r in data["recordings"]] == [w.name for w in wavs]
    assert [r["abnormal_fraction"] for r in data["recordings"]] == pytest.approx(table["abnormal_fraction"].tolist())
    proc = subprocess.run([*CLI, "predict", "--model", str(planted["run"]), "--out", str(tmp_path / "t"),
                           *map(str, wavs)], capture_output=True, text=True)
    text = proc.stdout + proc.stderr
    assert proc.returncode == 0 and all(f"{w.name}: " in text for w in wavs)


def test_resume_with_other_settings_is_one_line(tmp_path):
    proc = subprocess.run([*CLI, "finetune", "--resume", str(tmp_path), "--task", "csv", "--data", str(tmp_path / "x.csv"),
                           "--checkpoint", "c", "--epochs", "3", "--set", "model.layer_decay=0.5"],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1
    assert "drop --epochs, --set" in proc.stderr
