"""`m2dx evaluate`: a trained classifier scored unchanged on labelled data, with calibration and subgroups.

Every number is recomputed here from predictions.csv with this file's own code (sklearn and numpy),
never with the package's metric functions."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score

from m2dx_clinic.config import load_recipe
from m2dx_clinic.errors import ConfigError, DataError
from m2dx_clinic.evaluate import evaluate_classifier
from m2dx_clinic.finetune import finetune
from m2dx_clinic.recipes import FinetuneRecipe

CLI = [sys.executable, "-m", "m2dx_clinic"]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, demo_icbhi, tiny_ckpt) -> Path:
    """Two repeats on the demo ICBHI data (8-s cycles), scored on its test split by finetune."""
    out = tmp_path_factory.mktemp("ft_eval")
    recipe = load_recipe(FinetuneRecipe, "tiny_finetune", [
        f"run.out='{out / 'run'}'", f"data.cache_dir='{out / 'cache'}'", "optim.epochs=2", "run.repeats=2",
        "run.num_workers=0", "run.bootstrap=30"])
    return finetune(recipe, task="icbhi", data=demo_icbhi, checkpoint=tiny_ckpt, progress=False).run_dir


@pytest.fixture(scope="module")
def evaluated_test(finished_run, demo_icbhi, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("eval") / "test_split"
    evaluate_classifier(finished_run, task="icbhi", data=demo_icbhi, out=out, split="test", progress=False)
    return out


def _same(a, b) -> bool:
    if a is None or b is None:
        return a is None and b is None
    if isinstance(a, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return (math.isnan(a) and math.isnan(b)) if (math.isnan(a) or math.isnan(b)) else a == pytest.approx(b, abs=1e-12)


# ---------------------------------------------------------------------------- the run's own test split
def test_evaluate_reproduces_the_runs_test_metrics_exactly(finished_run, evaluated_test):
    run = json.loads((finished_run / "metrics.json").read_text())["ensemble"]
    got = json.loads((evaluated_test / "metrics.json").read_text())
    assert got["operating_point"] == run["operating_point"]
    assert got["result"]["n"] == run["test"]["n"] and got["result"]["bootstrap"] == run["test"]["bootstrap"]
    assert got["result"]["values"].keys() == run["test"]["values"].keys()
    for key, value in run["test"]["values"].items():
        assert _same(got["result"]["values"][key], value), key
    for key, interval in run["test"]["ci95"].items():
        assert _same(got["result"]["ci95"][key], interval), key
    rows = {r["metric"]: r for r in got["comparison"]}
    assert rows["score"]["difference"] == pytest.approx(0.0, abs=1e-12) and rows["score"]["cis_overlap"] is True
    for name in ("predictions.csv", "metrics.json", "confusion_matrix.png", "roc_pr.png", "reliability.png",
                 "EVALUATION_CARD.md", "evaluation_card.html"):
        assert (evaluated_test / name).is_file(), name


def test_finetune_reports_the_same_subgroups_and_calibration(finished_run, evaluated_test):
    run = json.loads((finished_run / "metrics.json").read_text())
    got = json.loads((evaluated_test / "metrics.json").read_text())
    assert run["subgroups"]["groupings"] and run["subgroups"] == got["subgroups"]
    for key in ("ece", "brier", "ece_abnormal", "brier_abnormal"):  # float32 batches differ in the last bits
        assert run["calibration"]["test"]["uncalibrated"][key] == pytest.approx(got["calibration"]["uncalibrated"][key],
                                                                                abs=1e-6), key
    card = (finished_run / "MODEL_CARD.md").read_text()
    assert "## Subgroups (test split)" in card and "### device" in card and "## Calibration (test)" in card


def test_predictions_match_the_runs_ensemble_probabilities(finished_run, evaluated_test):
    theirs = pd.read_csv(finished_run / "predictions.csv")
    theirs = theirs[theirs["split"] == "test"]
    probs = [c for c in theirs.columns if c.startswith("prob_")]
    expected = theirs.groupby("item_id")[probs].mean()
    ours = pd.read_csv(evaluated_test / "predictions.csv").set_index("item_id")
    assert np.abs(ours.loc[expected.index, probs].to_numpy() - expected.to_numpy()).max() < 1e-6


# ---------------------------------------------------------------------------- recomputed from predictions.csv
def _ece(confidence: np.ndarray, correct: np.ndarray, bins: int) -> float:
    total = 0.0
    for b in range(bins):
        lo, hi = b / bins, (b + 1) / bins
        inside = (confidence >= lo) & ((confidence < hi) if b < bins - 1 else (confidence <= hi))
        if inside.any():
            total += inside.mean() * abs(correct[inside].mean() - confidence[inside].mean())
    return total


def test_calibration_numbers_recompute_from_predictions(evaluated_test):
    metrics = json.loads((evaluated_test / "metrics.json").read_text())
    pred = pd.read_csv(evaluated_test / "predictions.csv")
    classes = metrics["classes"]
    probs = pred[[f"prob_{c}" for c in classes]].to_numpy()
    y = pred["true_index"].to_numpy()
    block = metrics["calibration"]["uncalibrated"]
    assert block["bins"] == 10
    onehot = np.zeros_like(probs)
    onehot[np.arange(len(y)), y] = 1
    assert block["brier"] == pytest.approx(((probs - onehot) ** 2).sum(1).mean(), abs=1e-6)
    assert block["ece"] == pytest.approx(_ece(probs.max(1), (probs.argmax(1) == y).astype(float), 10), abs=1e-6)
    p_abn = 1 - probs[:, metrics["normal_class_index"]]
    abnormal = (y != metrics["normal_class_index"]).astype(float)
    assert block["brier_abnormal"] == pytest.approx(((p_abn - abnormal) ** 2).mean(), abs=1e-6)
    assert block["ece_abnormal"] == pytest.approx(_ece(p_abn, abnormal, 10), abs=1e-6)


def _score(frame: pd.DataFrame, normal: int) -> float:
    normal_rows = frame["true_index"] == normal
    sp = (frame.loc[normal_rows, "pred_index"] == normal).mean()
    se = (frame.loc[~normal_rows, "pred_index"] == frame.loc[~normal_rows, "true_index"]).mean()
    return (sp + se) / 2


def test_subgroup_numbers_recompute_from_predictions(evaluated_test):
    metrics = json.loads((evaluated_test / "metrics.json").read_text())
    pred = pd.read_csv(evaluated_test / "predictions.csv")
    normal = metrics["normal_class_index"]
    groupings = metrics["subgroups"]["groupings"]
    assert {"device", "chest_location"} <= set(groupings)  # the demo names follow the ICBHI convention
    checked = 0
    for name, grouping in groupings.items():
        column = pred[f"group_{name}"].astype("string")
        for value, block in grouping["groups"].items():
            rows = pred[column == value]
            assert block["n"] == len(rows) and block["subjects"] == rows["subject"].nunique()
            score = _score(rows, normal)
            assert _same(block["values"]["score"], float(score)) if not np.isnan(score) else \
                block["values"]["score"] is None
            truth = rows["true_index"] != normal
            if truth.any() and not truth.all():
                assert block["values"]["auroc_abnormal"] == pytest.approx(roc_auc_score(truth, rows["p_abnormal"]),
                                                                          abs=1e-9)
                checked += 1
            rest = pred[column.notna() & (column != value)]
            assert block["rest"]["n"] == len(rest)
    assert checked


def test_the_card_speaks_one_decision_rule_and_names_no_path(evaluated_test, demo_icbhi):
    card = (evaluated_test / "EVALUATION_CARD.md").read_text()
    metrics = json.loads((evaluated_test / "metrics.json").read_text())
    assert f"P(abnormal) >= {metrics['operating_point']['threshold']:.6g}" in card
    for section in ("## Verdict", "## Decision rule", "## Calibration", "## Subgroups", "NOT FOR USE", "ECE over 10"):
        assert section in card, section
    assert str(demo_icbhi) not in card and "/tmp" not in card
    assert all(s not in card for s in pd.read_csv(evaluated_test / "predictions.csv")["recording"].unique())


@pytest.mark.slow
def test_the_evaluation_card_opens_in_chromium_with_every_image(evaluated_test):
    from test_browser import _chromium, _open

    seen = _open((evaluated_test / "evaluation_card.html").as_uri(), _chromium())
    assert not seen["problems"], seen["problems"]
    srcs = {i["src"] for i in seen["images"]}
    assert {"roc_pr.png", "confusion_matrix.png", "reliability.png"} <= srcs
    assert all(i["loaded"] for i in seen["images"]), seen["images"]
    assert all(i["width"] >= 600 for i in seen["images"]), seen["images"]  # readable at 100 % zoom


# ---------------------------------------------------------------------------- another site's labels
def _manifest(run: Path, data: Path, path: Path, relabel: dict[str, str] | None = None,
              keep: tuple[str, ...] | None = None) -> Path:
    """The run's test cycles as a CSV manifest (path,label,subject,start,end,site), optionally relabelled."""
    pred = pd.read_csv(run / "predictions.csv")
    pred = pred[(pred["split"] == "test") & (pred["repeat"] == 0)]
    rows = []
    for rec, rec_rows in pred.groupby("recording"):
        audio = next(data.rglob(f"{rec}.wav"))
        cycles = [line.split() for line in audio.with_suffix(".txt").read_text().splitlines() if line.strip()]
        for (start, end, *_), label in zip(cycles, rec_rows.sort_values("item_id")["true_label"]):
            label = (relabel or {}).get(label, label)
            if keep is None or label in keep:
                rows.append({"path": str(audio), "label": label, "subject": rec.split("_")[0], "start": start,
                             "end": end, "site": "A" if int(rec.split("_")[0]) % 2 else "B"})
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


def test_unknown_classes_are_one_line_naming_both_sets(finished_run, demo_icbhi, tmp_path):
    csv = _manifest(finished_run, demo_icbhi, tmp_path / "other.csv", relabel={"wheeze": "stridor"})
    with pytest.raises(DataError, match=r"data's classes \(.*stridor.*\) do not match the classifier's \(normal, "
                                        r"crackle, wheeze, both\)"):
        evaluate_classifier(finished_run, task="csv", data=csv, out=tmp_path / "e", progress=False)
    done = subprocess.run([*CLI, "evaluate", "--model", str(finished_run), "--task", "csv", "--data", str(csv),
                           "--out", str(tmp_path / "cli")], capture_output=True, text=True)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and "stridor" in done.stderr
    assert not (tmp_path / "cli" / "metrics.json").exists()


def test_absent_classes_warn_and_a_manifest_column_is_a_subgroup(finished_run, demo_icbhi, tmp_path):
    csv = _manifest(finished_run, demo_icbhi, tmp_path / "site.csv", keep=("normal", "crackle"))
    result = evaluate_classifier(finished_run, task="csv", data=csv, out=tmp_path / "e", subgroups=["site"],
                                 bootstrap=10, progress=False)
    assert any("absent from this data" in w and "wheeze" in w and "both" in w for w in result.metrics["warnings"])
    site = result.metrics["subgroups"]["groupings"]["site"]["groups"]
    pred = pd.read_csv(tmp_path / "e" / "predictions.csv")
    assert {k: v["n"] for k, v in site.items()} == pred["group_site"].value_counts().to_dict()
    assert "device" in result.metrics["subgroups"]["groupings"]  # ICBHI names inside a manifest still count
    with pytest.raises(DataError, match="no column 'ward'"):
        evaluate_classifier(finished_run, task="csv", data=csv, out=tmp_path / "f", subgroups=["ward"], progress=False)


def test_bad_options_are_one_line(finished_run, demo_icbhi, tmp_path):
    with pytest.raises(ConfigError, match="--split 'everything'"):
        evaluate_classifier(finished_run, task="icbhi", data=demo_icbhi, out=tmp_path / "x", split="everything")
    with pytest.raises(ConfigError, match="--subgroup"):
        evaluate_classifier(finished_run, task="icbhi", data=demo_icbhi, out=tmp_path / "x", subgroups=["site"])


# ---------------------------------------------------------------------------- the shared ICBHI data
@pytest.mark.realdata
@pytest.mark.slow
def test_train_on_three_devices_evaluate_on_the_fourth(icbhi_dir, tiny_ckpt, tmp_path):
    """A user's journey: export ICBHI as a manifest, fine-tune on three devices, evaluate on the AKG C417L."""
    from m2dx_clinic.data.tasks import load_task
    from m2dx_clinic.data.task_data import export_manifest

    table = pd.read_csv(export_manifest(load_task("icbhi", icbhi_dir), tmp_path / "all.csv"))
    held = table["path"].str.contains("_AKGC417L")
    table[~held].to_csv(tmp_path / "three.csv", index=False)
    table[held].drop(columns="split").to_csv(tmp_path / "fourth.csv", index=False)
    recipe = load_recipe(FinetuneRecipe, "tiny_finetune", [
        f"run.out='{tmp_path / 'run'}'", f"data.cache_dir='{tmp_path / 'cache'}'", "optim.epochs=1",
        "data.cycle_seconds=4.0", "data.max_items_per_split=96", "run.bootstrap=20", "run.num_workers=0"])
    run = finetune(recipe, task="csv", data=tmp_path / "three.csv", checkpoint=tiny_ckpt, progress=False).run_dir
    done = subprocess.run([*CLI, "evaluate", "--model", str(run), "--task", "csv", "--data", str(tmp_path / "fourth.csv"),
                           "--out", str(tmp_path / "eval"), "--bootstrap", "20"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    pred = pd.read_csv(tmp_path / "eval" / "predictions.csv")
    assert metrics["items"] == len(pred) == int(held.sum())
    groupings = metrics["subgroups"]["groupings"]
    assert list(groupings["device"]["groups"]) == ["AKG C417L"]
    assert {"chest_location", "sex", "age_band"} <= set(groupings)
    # sex and age band straight from the demographic file, read here with this test's own code
    people = {}
    for line in (icbhi_dir / "demographic_info.txt").read_text().splitlines():
        fields = line.split()
        if fields:
            age = float(fields[1]) if fields[1] != "NA" else None
            people[fields[0]] = (fields[2], None if age is None else "<18" if age < 18 else "18-64" if age < 65 else "65+")
    for subject, rows in pred.groupby("subject"):
        sex, band = people[str(subject)]
        assert set(rows["group_sex"].fillna("?")) == {{"F": "female", "M": "male"}.get(sex, "?")}
        assert set(rows["group_age_band"].fillna("?")) == {band or "?"}
    rows = [r for r in metrics["comparison"] if r["cis_overlap"] is False]
    assert {r["metric"] for r in rows} == {w.split(":")[0] for w in metrics["warnings"] if "do not overlap" in w}
    for row in metrics["comparison"]:  # the difference and the overlap, recomputed
        assert row["difference"] == pytest.approx(row["here"] - row["original"])
        if row["cis_overlap"] is not None:
            (a, b), (c, d) = row["original_ci95"], row["here_ci95"]
            assert row["cis_overlap"] == (a <= d and c <= b)
    calibration = metrics["calibration"]["uncalibrated"]
    assert calibration["n"] == len(pred) and 0 <= calibration["ece"] <= 1 and 0 <= calibration["brier"] <= 2
    card = (tmp_path / "eval" / "EVALUATION_CARD.md").read_text()
    assert "### device" in card and "AKG C417L" in card and "reliability.png" in card
    assert str(icbhi_dir) not in card and str(tmp_path) not in card


# ---------------------------------------------------------------------------- temperature scaling end to end
def _softmax_log(probs: np.ndarray, temperature: float) -> np.ndarray:
    z = np.log(np.clip(probs, 1e-12, 1)) / temperature
    z = np.exp(z - z.max(axis=1, keepdims=True))
    return z / z.sum(axis=1, keepdims=True)


@pytest.fixture(scope="module")
def tone_run(tmp_path_factory, tiny_ckpt) -> dict[str, Path]:
    """Enough validation items (40) for a temperature: noise vs noise + a 1 kHz tone, 60 subjects, a quarter
    of the labels flipped (so validation is not separable and the fitted T lies inside its bounds)."""
    from conftest import write_wav

    root = tmp_path_factory.mktemp("tone_t")
    rng = np.random.default_rng(0)
    t = np.arange(16000) / 16000
    rows = []
    for subject in range(60):
        for k in range(2):
            tone = bool((subject + k) % 2)
            label = ("normal" if tone else "tone") if rng.uniform() < 0.25 else ("tone" if tone else "normal")
            wave = 0.05 * rng.standard_normal(t.size) + (0.05 * np.sin(2 * np.pi * 1000 * t) if tone else 0)
            write_wav(root / f"s{subject:02d}_{k}.wav", wave)
            rows.append(f"s{subject:02d}_{k}.wav,{label},s{subject:02d}")
    (root / "labels.csv").write_text("path,label,subject\n" + "\n".join(rows) + "\n")
    recipe = load_recipe(FinetuneRecipe, "tiny_finetune", [
        f"run.out='{root / 'run'}'", f"data.cache_dir='{root / 'cache'}'", "optim.epochs=2", "data.cycle_seconds=1.0",
        "data.val_fraction=0.4", "run.num_workers=0", "run.bootstrap=20", "run.baseline=false"])
    run = finetune(recipe, task="csv", data=root / "labels.csv", checkpoint=tiny_ckpt, progress=False).run_dir
    return {"run": run, "csv": root / "labels.csv", "root": root}


def test_temperature_is_fitted_on_validation_stored_and_applied_everywhere(tone_run, tmp_path):
    from sklearn.metrics import roc_curve

    from m2dx_clinic.checkpoint.classifier import load_classifier
    from m2dx_clinic.export import export_classifier
    from m2dx_clinic.predict import load_model_set, predict

    run = tone_run["run"]
    metrics = json.loads((run / "metrics.json").read_text())
    temperature = metrics["ensemble"]["calibration"]["temperature"]
    assert metrics["ensemble"]["calibration"]["fitted_on"] == "validation"
    assert not metrics["ensemble"]["calibration"]["at_bound"] and abs(math.log(temperature)) > 0.05
    clf = load_classifier(run / "best.pt")
    assert clf.meta["calibration"]["temperature"] == pytest.approx(temperature)  # one repeat: the same fit
    pred = pd.read_csv(run / "predictions.csv")
    cols = ["prob_normal", "prob_tone"]
    val, test = pred[pred["split"] == "val"], pred[pred["split"] == "test"]
    # the operating point was chosen on the SCALED validation probabilities (Youden J, this test's own code)
    scaled_val = _softmax_log(val[cols].to_numpy(), temperature)
    fpr, tpr, thresholds = roc_curve(val["true_index"] != 0, scaled_val[:, 1], drop_intermediate=False)
    best = int(np.argmax(tpr[1:] - fpr[1:])) + 1
    assert metrics["ensemble"]["operating_point"]["threshold"] == pytest.approx(thresholds[best], abs=1e-6)  # CSV keeps 8 digits
    # before / after on test, recomputed from the raw probabilities the loop recorded
    block = metrics["calibration"]["test"]
    raw, y = test[cols].to_numpy(), test["true_index"].to_numpy()
    for key, probs in (("before_scaling", raw), ("after_scaling", _softmax_log(raw, temperature))):
        onehot = np.eye(2)[y]
        assert block[key]["brier"] == pytest.approx(((probs - onehot) ** 2).sum(1).mean(), abs=1e-6)
        assert block[key]["ece"] == pytest.approx(_ece(probs.max(1), (probs.argmax(1) == y).astype(float), 10), abs=1e-6)
    assert "Temperature T = " in (run / "MODEL_CARD.md").read_text() and (run / "reliability.png").is_file()
    # predict applies it
    files = [tone_run["root"] / f"{Path(i).stem.split('#')[0]}.wav" for i in test["item_id"]]
    got = predict(run, files, tmp_path / "pred", progress=False).segments
    expected = _softmax_log(raw, temperature)
    assert np.abs(got[cols].to_numpy() - expected).max() < 1e-5
    # evaluate applies it and reproduces the run's test block exactly
    evaluate_classifier(run, task="csv", data=tone_run["csv"], out=tmp_path / "eval", split="test", progress=False)
    again = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    for key, value in metrics["ensemble"]["test"]["values"].items():
        assert _same(again["result"]["values"][key], value), key
    assert again["calibration"]["temperature"] == pytest.approx(temperature)
    # export: the sidecar says so, and the ONNX graph outputs the scaled probabilities
    written = export_classifier(load_model_set(run), "safetensors", tmp_path / "m.safetensors")
    side = json.loads(Path(f"{written}.json").read_text())
    assert side["temperature"] == pytest.approx(temperature) and "temperature scaling" in side["calibration"]
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    from m2dx_clinic.data.segment_cache import prepare_segments

    onnx_file = export_classifier(load_model_set(run), "onnx", tmp_path / "m.onnx")
    assert json.loads(Path(f"{onnx_file}.json").read_text())["temperature"] == pytest.approx(temperature)
    items = [it for it in load_task_items(tone_run["csv"]) if it.split == "test"]
    lms = prepare_segments(items, frontend=clf.frontend, length_s=clf.segment_seconds, pad=clf.pad, cache_dir=None)[:]
    x = clf.model.encoder.normalize(lms).unsqueeze(1).numpy()
    out = ort.InferenceSession(str(onnx_file)).run(None, {"lms": x})[0]
    by_id = test.set_index("item_id").loc[[it.item_id for it in items], cols].to_numpy()
    assert np.abs(out - _softmax_log(by_id, temperature)).max() < 1e-4


def load_task_items(csv: Path) -> list:
    from m2dx_clinic.data.tasks import load_task

    return load_task("csv", csv, val_fraction=0.4).items
