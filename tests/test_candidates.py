"""The best classifier for the data: linear evaluation and the baseline as classifiers, and `--mode compare`.

The synthetic set has a known answer: class `tone` is a pure 1 kHz tone in noise, class `normal` the
noise alone. Log-mel statistics separate it perfectly, so the baseline must score 100 % on
validation and, being the simplest, be recommended; every number is recomputed here from
predictions.csv with scikit-learn, and `m2dx predict` must reproduce each candidate's test
probabilities.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import confusion_matrix, roc_auc_score
from sklearn.preprocessing import StandardScaler

from m2dx_clinic.checkpoint.classifier import load_classifier
from m2dx_clinic.compare import compare_candidates
from m2dx_clinic.config import load_recipe
from m2dx_clinic.data.segment_cache import prepare_segments
from m2dx_clinic.data.tasks import load_task
from m2dx_clinic.errors import CheckpointError
from m2dx_clinic.finetune import finetune
from m2dx_clinic.inference import clip_embeddings
from m2dx_clinic.predict import predict
from m2dx_clinic.recipes import FinetuneRecipe

from conftest import write_wav

CLI = [sys.executable, "-m", "m2dx_clinic"]
SECONDS = 2.0


def _tone_set(root: Path) -> Path:
    """A CSV task: 12 train, 4 val, 4 test subjects, one recording per class each; `tone` = 1 kHz tone + noise."""
    rng = np.random.default_rng(0)
    t = np.arange(int(SECONDS * 16000)) / 16000
    rows = []
    for s in range(20):
        split = "train" if s < 12 else "val" if s < 16 else "test"
        for label in ("normal", "tone"):
            noise = 0.05 * rng.standard_normal(len(t))
            audio = noise + (0.3 * np.sin(2 * np.pi * 1000 * t) if label == "tone" else 0.0)
            path = write_wav(root / f"s{s:02d}_{label}.wav", audio.astype(np.float32))
            rows.append(f"{path.name},{label},s{s:02d},{split}")
    csv = root / "tone.csv"
    csv.write_text("\n".join(["path,label,subject,split", *rows]) + "\n")
    return csv


def _recipe(out: Path, *extra: str) -> FinetuneRecipe:
    return load_recipe(FinetuneRecipe, "tiny_finetune", [
        f"run.out='{out}'", f"data.cache_dir='{out.parent / 'cache'}'", f"data.cycle_seconds={SECONDS}",
        "optim.epochs=2", "run.num_workers=0", "run.bootstrap=50", *extra])


@pytest.fixture(scope="module")
def tone_csv(tmp_path_factory) -> Path:
    return _tone_set(tmp_path_factory.mktemp("tone"))


@pytest.fixture(scope="module")
def compared(tmp_path_factory, tone_csv, tiny_ckpt) -> Path:
    """One comparison of the three candidates on the tone set (trained once for the module)."""
    from m2dx_clinic.progress import console

    out = tmp_path_factory.mktemp("cmp") / "run"
    with console.capture() as said:
        run = compare_candidates(_recipe(out), task="csv", data=tone_csv, checkpoint=tiny_ckpt, progress=True).run_dir
    (run.parent / "console.txt").write_text(said.get())
    return run


def _recompute(rows: pd.DataFrame, classes: list[str], normal: int) -> dict[str, float]:
    """Sp / Se / Score and AUROC(abnormal) of the repeats' mean probabilities, with scikit-learn only."""
    cols = [f"prob_{c}" for c in classes]
    mean = rows.groupby("item_id")[cols].mean()
    truth = rows.drop_duplicates("item_id").set_index("item_id").loc[mean.index, "true_index"].to_numpy()
    pred = mean.to_numpy().argmax(axis=1)
    cm = confusion_matrix(truth, pred, labels=range(len(classes)))
    sp = cm[normal, normal] / cm[normal].sum()
    abnormal = [c for c in range(len(classes)) if c != normal]
    se = sum(cm[c, c] for c in abnormal) / cm[abnormal].sum()
    auroc = roc_auc_score(truth != normal, 1 - mean.to_numpy()[:, normal])
    return {"sp": sp, "se": se, "score": (sp + se) / 2, "auroc_abnormal": auroc}


def _predict_matches(run: Path, data_dir: Path, out: Path) -> float:
    """Largest |predict - predictions.csv| over the test recordings (one segment each; the repeats' mean)."""
    classes = json.loads((run / "metrics.json").read_text())["classes"]
    cols = [f"prob_{c}" for c in classes]
    pred = pd.read_csv(run / "predictions.csv")
    expected = pred[pred["split"] == "test"].groupby("recording")[cols].mean()
    got = predict(run, [data_dir / n for n in expected.index], out, progress=False).segments
    got = got.set_index(got["recording"].map(lambda r: Path(r).name))
    return float(np.abs(got.loc[expected.index, cols].to_numpy() - expected.to_numpy()).max())


# ---------------------------------------------------------------------------- the fit as arrays
@pytest.mark.parametrize("present", [[0, 1], [0, 2, 3], [0, 1, 2, 3]])
def test_linear_fit_arrays_give_scikit_learns_probabilities(present):
    """Binary, multinomial and a class absent from training: the arrays reproduce predict_proba."""
    from m2dx_clinic.evaluation.linear import fit_linear

    rng = np.random.default_rng(1)
    y = rng.choice(present, size=60)
    x = rng.normal(size=(60, 5)) + y[:, None] * 0.7
    x[:, 4] = 3.0  # a constant feature: scale 1, as scikit-learn does
    fitted = fit_linear({"train": x}, {"train": y}, num_classes=4, normal=0, balanced=True, c_grid=(0.5,))
    scaler = StandardScaler().fit(x)
    lr = LogisticRegression(C=0.5, max_iter=2000, class_weight="balanced").fit(scaler.transform(x), y)
    theirs = np.zeros((60, 4))
    theirs[:, lr.classes_] = lr.predict_proba(scaler.transform(x))
    np.testing.assert_allclose(fitted.probabilities(x), theirs, atol=1e-8)
    weight, bias = fitted.folded()  # the standardisation folded into one linear layer
    np.testing.assert_allclose(x @ weight.T + bias, fitted.logits(x), atol=1e-8)
    assert fitted.scale[4] == 1.0 and fitted.C == 0.5


def test_the_baseline_model_computes_the_baselines_features():
    """LogMelStatsClassifier (torch, from the normalised input) = evaluation.baseline.logmel_statistics (numpy)."""
    from m2dx_clinic.evaluation.baseline import logmel_statistics
    from m2dx_clinic.models.baseline import LogMelStatsClassifier

    lms = torch.randn(5, 80, 201) * 3.0 - 6.0  # raw log-mel [N, n_mels, frames]
    model = LogMelStatsClassifier(80, 3, norm_stats=(-6.0, 4.0))
    with torch.inference_mode():
        ours = model.features(model.normalize(lms).unsqueeze(1)).double().numpy()
    np.testing.assert_allclose(ours, logmel_statistics(lms), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------- linear evaluation
def test_linear_evaluation_is_a_classifier_that_recomputes_and_predicts(tmp_path, tone_csv, tiny_ckpt):
    run = finetune(_recipe(tmp_path / "run", "run.mode=linear"), task="csv", data=tone_csv, checkpoint=tiny_ckpt,
                   progress=False).run_dir
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["mode"] == "linear" and "frozen" in metrics["method"]
    classes, normal = metrics["classes"], metrics["normal_class_index"]
    pred = pd.read_csv(run / "predictions.csv")
    for split in ("val", "test"):
        again = _recompute(pred[pred["split"] == split], classes, normal)
        for key in ("sp", "se", "score", "auroc_abnormal"):
            assert metrics["ensemble"][split]["values"][key] == pytest.approx(again[key]), (split, key)
    # the file: frozen encoder + folded head, the fit's own tensors, loads with weights_only=True
    raw = torch.load(run / "best.pt", weights_only=True)
    clf = load_classifier(run / "best.pt")
    assert clf.kind == "linear" and raw["m2dx"]["linear"]["C"] in [0.001, 0.01, 0.1, 1.0, 10.0, 100.0]
    mean, scale = raw["standardise"]["mean"], raw["standardise"]["scale"]
    coef, intercept = raw["logistic"]["coef"], raw["logistic"]["intercept"]
    torch.testing.assert_close(clf.model.head.weight.double(), coef / scale, rtol=1e-5, atol=1e-6)
    # scikit-learn's own fit on the embeddings m2dx computes gives the same classifier
    td = load_task("csv", tone_csv)
    lms = {s: prepare_segments(td.split(s), frontend=clf.frontend, length_s=SECONDS, pad="circular", cache_dir=None)[:]
           for s in ("train", "test")}
    emb = {s: clip_embeddings(clf.model.encoder, x) for s, x in lms.items()}
    scaler = StandardScaler().fit(emb["train"])
    lr = LogisticRegression(C=raw["m2dx"]["linear"]["C"], max_iter=2000).fit(
        scaler.transform(emb["train"]), [it.label for it in td.split("train")])
    np.testing.assert_allclose(scaler.mean_, mean.numpy(), rtol=1e-6, atol=1e-7)
    ours = pred[pred["split"] == "test"].set_index("item_id").loc[[it.item_id for it in td.split("test")]]
    theirs = lr.predict_proba(scaler.transform(emb["test"]))
    assert np.abs(ours[[f"prob_{c}" for c in classes]].to_numpy() - theirs).max() < 1e-3
    # predict applies the file and reproduces the run's test probabilities
    assert _predict_matches(run, tone_csv.parent, tmp_path / "pred") < 1e-5


def test_linear_evaluation_reuses_cached_embeddings(tmp_path, tone_csv, tiny_ckpt, monkeypatch):
    first = finetune(_recipe(tmp_path / "a", "run.mode=linear"), task="csv", data=tone_csv, checkpoint=tiny_ckpt,
                     progress=False).run_dir
    import m2dx_clinic.linear_eval as linear_eval

    def refuse(*args, **kwargs):
        raise AssertionError("embeddings were computed again")

    monkeypatch.setattr(linear_eval, "clip_embeddings", refuse)
    second = finetune(_recipe(tmp_path / "b", "run.mode=linear", "run.repeats=2"), task="csv", data=tone_csv,
                      checkpoint=tiny_ckpt, progress=False).run_dir
    a, b = (pd.read_csv(r / "predictions.csv") for r in (first, second))
    cols = [c for c in a.columns if c.startswith("prob_")]
    np.testing.assert_array_equal(a[cols].to_numpy(), b.loc[b["repeat"] == 0, cols].to_numpy())
    # deterministic fit: the repeats are the same classifier, and the run says so
    np.testing.assert_array_equal(b.loc[b["repeat"] == 0, cols].to_numpy(), b.loc[b["repeat"] == 1, cols].to_numpy())
    notes = json.loads((second / "metrics.json").read_text())["notes"]
    assert any("repeats are the same classifier" in n for n in notes)


# ---------------------------------------------------------------------------- the comparison
def _row(score: float, low: float, high: float) -> dict:
    return {"val": {"values": {"score": score}, "ci95": {"score": [low, high]}}}


@pytest.mark.parametrize("scores, chosen, words", [
    ({"baseline": (0.60, 0.5, 0.7), "linear": (0.80, 0.7, 0.9), "full": (0.70, 0.6, 0.8)}, "linear", "scored best"),
    ({"baseline": (0.50, 0.4, 0.6), "linear": (0.74, 0.6, 0.8), "full": (0.80, 0.72, 0.9)}, "linear",
     "within the uncertainty of the best one (the fully fine-tuned encoder"),
    ({"baseline": (0.50, 0.4, 0.6), "linear": (0.70, 0.6, 0.8), "full": (0.90, 0.85, 0.95)}, "full", "scored best"),
    ({"baseline": (0.90, 0.8, 1.0), "linear": (0.90, 0.8, 1.0), "full": (0.95, 0.89, 1.0)}, "baseline", "within"),
    ({"baseline": (0.70, 0.6, 0.8), "linear": (0.90, 0.8, 1.0), "full": (0.90, 0.8, 1.0)}, "linear",
     "as well as any other"),
])
def test_the_recommendation_rule(scores, chosen, words):
    from m2dx_clinic.compare import recommend

    got, reason = recommend({k: _row(*v) for k, v in scores.items()})
    assert got == chosen and words in reason and "test recordings were scored once" in reason


def test_a_candidates_validation_operating_point_is_read_on_its_scaled_probabilities(tmp_path):
    """The threshold was chosen after temperature scaling, so the comparison scores validation the same way."""
    from m2dx_clinic.compare import _candidate

    rng = np.random.default_rng(0)
    n, threshold, temperature = 60, 0.6, 3.0
    truth = rng.integers(0, 2, n)
    p_abn = np.clip(0.5 + (truth - 0.5) * rng.uniform(0.0, 0.9, n) + rng.normal(0, 0.1, n), 0.01, 0.99)
    folder = tmp_path / "linear"
    folder.mkdir()
    pd.DataFrame({"split": "val", "item_id": [f"i{k}" for k in range(n)], "subject": [f"s{k % 12}" for k in range(n)],
                  "true_index": truth, "prob_N": 1 - p_abn, "prob_A": p_abn}).to_csv(folder / "predictions.csv")
    (folder / "metrics.json").write_text(json.dumps({
        "classes": ["N", "A"], "normal_class_index": 0, "seconds": 1.0, "calibration": {},
        "ensemble": {"operating_point": {"threshold": threshold}, "calibration": {"temperature": temperature}}}))
    row = _candidate("linear", folder, 1.0, _recipe(tmp_path / "unused"))
    logits = np.log(np.stack([1 - p_abn, p_abn], axis=1)) / temperature
    scaled_abn = np.exp(logits[:, 1]) / np.exp(logits).sum(axis=1)
    flagged = scaled_abn >= threshold
    assert flagged.sum() != (p_abn >= threshold).sum()  # the data tells scaled from unscaled apart
    assert row["val"]["values"]["op_sensitivity"] == pytest.approx(flagged[truth == 1].mean())
    assert row["val"]["values"]["op_specificity"] == pytest.approx(1 - flagged[truth == 0].mean())
    assert row["temperature"] == temperature


def test_compare_recommends_the_baseline_on_a_pure_tone(compared, capsys):
    metrics = json.loads((compared / "metrics.json").read_text())
    assert set(metrics["candidates"]) == {"baseline", "linear", "full"}
    base = metrics["candidates"]["baseline"]
    assert base["val"]["values"]["score"] == 1.0 and base["test"]["values"]["score"] == 1.0
    assert metrics["recommended"] == "baseline" and "log-mel baseline" in metrics["reason"]
    said = " ".join((compared.parent / "console.txt").read_text().split())  # the console says so plainly
    assert "Recommended: the log-mel baseline" in said and "best.pt is the baseline candidate" in said
    assert len({row["data_sha256"] for row in metrics["candidates"].values()}) == 1  # exactly the same items
    assert all(base["val"]["values"]["score"] >= row["val"]["values"]["score"] for row in metrics["candidates"].values())
    assert json.loads((compared / "candidates.json").read_text())["recommended"] == "baseline"
    assert (compared / "best.pt").read_bytes() == (compared / "baseline" / "best.pt").read_bytes()
    card = (compared / "MODEL_CARD.md").read_text()
    assert metrics["reason"] in card and all(k in card for k in ("baseline (recommended)", "linear", "full"))
    assert card.splitlines()[0].startswith(f"# Model card: which classifier to use for {metrics['name']} (")
    assert metrics["name"].startswith("csv-") and str(compared) not in card  # named by fingerprint, no paths
    after = card.split("## Warnings about the recommended classifier (baseline)", 1)[1].split("## Glossary")[0]
    assert all(w in after for w in base["warnings"]) and (base["warnings"] or "None." in after)
    # every candidate's numbers recompute from the comparison's predictions.csv
    pred = pd.read_csv(compared / "predictions.csv")
    for kind, row in metrics["candidates"].items():
        for split in ("val", "test"):
            again = _recompute(pred[(pred["candidate"] == kind) & (pred["split"] == split)], metrics["classes"],
                               metrics["normal_class_index"])
            assert row[split]["values"]["score"] == pytest.approx(again["score"]), (kind, split)
            assert row[split]["values"]["auroc_abnormal"] == pytest.approx(again["auroc_abnormal"]), (kind, split)
        assert row["seconds"] > 0 and (compared / row["classifier"]).is_file()
        # calibration of what the candidate ships: top-label ECE (10 equal-width bins) and Brier, recomputed here
        rows = pred[(pred["candidate"] == kind) & (pred["split"] == "test")]
        cols = [f"prob_{c}" for c in metrics["classes"]]
        mean = rows.groupby("item_id")[cols].mean()
        probs = mean.to_numpy()
        if row["temperature"]:
            probs = np.exp(np.log(np.clip(probs, 1e-12, None)) / row["temperature"])
            probs /= probs.sum(axis=1, keepdims=True)
        truth = rows.drop_duplicates("item_id").set_index("item_id").loc[mean.index, "true_index"].to_numpy()
        conf, hit = probs.max(axis=1), (probs.argmax(axis=1) == truth).astype(float)
        which = np.minimum((conf * 10).astype(int), 9)
        ece = sum(abs(hit[which == b].mean() - conf[which == b].mean()) * (which == b).mean()
                  for b in range(10) if (which == b).any())
        assert row["calibration"]["test"]["ece"] == pytest.approx(ece, abs=1e-6), kind
        brier = ((probs - np.eye(len(cols))[truth]) ** 2).sum(axis=1).mean()
        assert row["calibration"]["test"]["brier"] == pytest.approx(brier, abs=1e-6), kind
        line = next(t for t in card.splitlines() if t.startswith(f"| {kind}"))  # the card's table shows it
        assert f"| {100 * ece:.1f} | {brier:.3f} |" in line, line


@pytest.mark.parametrize("candidate", [None, "linear"])
def test_evaluate_scores_a_comparison_folder_as_its_candidate(compared, tone_csv, tmp_path, candidate):
    """m2dx evaluate on a --mode compare folder: the recommended (or named) candidate, its own test result beside."""
    from m2dx_clinic.evaluate import evaluate_classifier

    result = evaluate_classifier(compared, task="csv", data=tone_csv, out=tmp_path / "ev", split="test",
                                 candidate=candidate, progress=False)
    metrics = json.loads((result.out_dir / "metrics.json").read_text())
    own = json.loads((compared / (candidate or "baseline") / "metrics.json").read_text())["ensemble"]["test"]
    assert metrics["original"]["values"] == own["values"]  # its own test result, found in the candidate's folder
    for key in ("score", "sp", "se", "auroc_abnormal"):
        assert metrics["result"]["values"][key] == pytest.approx(own["values"][key]), key


@pytest.mark.parametrize("candidate", [None, "baseline", "linear", "full"])
def test_predict_reproduces_each_candidate(compared, tone_csv, tmp_path, candidate):
    run = compared / (candidate or "baseline")
    classes = json.loads((run / "metrics.json").read_text())["classes"]
    cols = [f"prob_{c}" for c in classes]
    pred = pd.read_csv(compared / "predictions.csv")
    rows = pred[(pred["candidate"] == (candidate or "baseline")) & (pred["split"] == "test")]
    expected = rows.groupby("recording")[cols].mean()
    got = predict(compared, [tone_csv.parent / n for n in expected.index], tmp_path / "p",
                  candidate=candidate, progress=False)
    assert got.summary["classifier_kind"] == (candidate or "baseline")
    frame = got.segments.set_index(got.segments["recording"].map(lambda r: Path(r).name))
    assert np.abs(frame.loc[expected.index, cols].to_numpy() - expected.to_numpy()).max() < 1e-5


def test_export_and_cli_with_the_recommended_baseline(compared, tone_csv, tmp_path):
    import onnxruntime as ort

    from m2dx_clinic.export import export_classifier, load_safetensors_classifier
    from m2dx_clinic.predict import load_model_set

    models = load_model_set(compared)
    clf = models.first
    assert clf.kind == "baseline" and "no encoder" in clf.describe()
    td = load_task("csv", tone_csv)
    lms = prepare_segments(td.split("test"), frontend=clf.frontend, length_s=SECONDS, pad="circular", cache_dir=None)[:]
    x = clf.model.normalize(lms).unsqueeze(1)
    with torch.inference_mode():
        expected = torch.softmax(clf.model(x), dim=-1).numpy()
    onnx_path = export_classifier(models, "onnx", tmp_path / "b.onnx")
    got = ort.InferenceSession(str(onnx_path)).run(None, {"lms": x.numpy()})[0]
    assert np.abs(got - expected).max() < 1e-5
    side = json.loads((tmp_path / "b.onnx.json").read_text())
    assert side["input"]["shape"][1:] == list(x.shape[1:]) and side["norm_stats"] == clf.meta["norm_stats"]
    assert side["classifier_kind"] == "baseline" and "no encoder" in side["method"]
    back = load_safetensors_classifier(export_classifier(models, "safetensors", tmp_path / "b.safetensors"))
    for (name, a), (_, b) in zip(clf.model.state_dict().items(), back.model.state_dict().items()):
        assert torch.equal(a, b), name
    proc = subprocess.run([*CLI, "export", "--model", str(compared), "--candidate", "linear", "--format", "safetensors",
                           "--out", str(tmp_path / "lin.safetensors")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    lin = load_safetensors_classifier(tmp_path / "lin.safetensors")
    assert lin.kind == "linear" and lin.model.encoder.config.embed_dim == 64
    proc = subprocess.run([*CLI, "predict", "--model", str(compared), "--candidate", "nope", "--out",
                           str(tmp_path / "o"), str(tone_csv.parent / "s19_tone.wav")], capture_output=True, text=True)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1 and "no candidate 'nope'" in proc.stderr
    with pytest.raises(CheckpointError, match="--candidate picks"):
        load_model_set(compared / "full", candidate="linear")
    from m2dx_clinic.weights import load_encoder

    with pytest.raises(CheckpointError, match="no encoder"):  # m2dx embed -c: one line, not a traceback
        load_encoder(compared / "best.pt")
    assert load_encoder(compared / "linear" / "best.pt").config.embed_dim == 64  # the frozen encoder


@pytest.mark.realdata
@pytest.mark.slow
def test_compare_end_to_end_on_the_shared_icbhi_subset(tmp_path, icbhi_dir, tiny_ckpt):
    """`m2dx finetune --mode compare` through the CLI on real recordings (tiny recipe, CPU, a subset)."""
    from m2dx_clinic.audio import AUDIO_SUFFIXES

    run = tmp_path / "run"
    proc = subprocess.run([*CLI, "finetune", "--recipe", "tiny_compare_finetune", "--task", "icbhi", "--data",
                           str(icbhi_dir), "--checkpoint", str(tiny_ckpt), "--out", str(run), "--epochs", "1",
                           "--set", "data.max_items_per_split=64", "--set", f"data.cache_dir='{tmp_path / 'cache'}'"],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    said = proc.stdout + proc.stderr  # the rich console writes to stderr
    assert "Recommended:" in said and "best.pt is the" in said
    metrics = json.loads((run / "metrics.json").read_text())
    assert set(metrics["candidates"]) == {"baseline", "linear", "full"} and metrics["recommended"] in metrics["candidates"]
    assert (run / "best.pt").read_bytes() == (run / metrics["recommended"] / "best.pt").read_bytes()
    pred = pd.read_csv(run / "predictions.csv")
    classes, normal = metrics["classes"], metrics["normal_class_index"]
    cols = [f"prob_{c}" for c in classes]
    for kind, row in metrics["candidates"].items():
        for split in ("val", "test"):
            again = _recompute(pred[(pred["candidate"] == kind) & (pred["split"] == split)], classes, normal)
            assert row[split]["values"]["score"] == pytest.approx(again["score"]), (kind, split)
        rows = pred[(pred["candidate"] == kind) & (pred["split"] == "test")]
        names = sorted(rows["recording"].unique())[:4]
        files = [next(p for p in icbhi_dir.rglob(f"{n}.*") if p.suffix in AUDIO_SUFFIXES) for n in names]
        got = predict(run, files, tmp_path / f"pred-{kind}", candidate=kind, progress=False).segments
        got.index = [f"{Path(r).stem}#{s:03d}" for r, s in zip(got["recording"], got["segment"])]
        expected = rows.set_index("item_id")[cols]  # predictions.csv: before the candidate's temperature
        if row["temperature"]:  # predict ships the scaled probabilities: softmax(log p / T), by this test's code
            z = np.exp(np.log(np.clip(expected.to_numpy(), 1e-12, 1)) / row["temperature"])
            expected = pd.DataFrame(z / z.sum(axis=1, keepdims=True), index=expected.index, columns=cols)
        common = expected.index.intersection(got.index)
        assert len(common) >= 3, kind
        assert np.abs(got.loc[common, cols].to_numpy() - expected.loc[common].to_numpy()).max() < 1e-5, kind


def test_bad_mode_and_candidate_flags_are_one_line(tmp_path, tone_csv, tiny_ckpt):
    proc = subprocess.run([*CLI, "finetune", "--mode", "ensemble", "--task", "csv", "--data", str(tone_csv),
                           "--checkpoint", str(tiny_ckpt), "--out", str(tmp_path / "r")], capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        "error: --mode must be full, linear, baseline or compare, got 'ensemble'"]
    with pytest.raises(Exception, match="test-best is for full fine-tuning"):
        finetune(_recipe(tmp_path / "r2", "run.mode=linear", "run.selection=test-best"), task="csv", data=tone_csv,
                 checkpoint=tiny_ckpt, progress=False)
