"""Fine-tuning: correct gradient accumulation, no dropped samples, batch-independent predictions,
honest model selection, and outputs that can be recomputed from predictions.csv (docs/METHOD.md, "Fine-tuning")."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from m2dx_clinic import finetune as ft
from m2dx_clinic import recipes
from m2dx_clinic.audio import FrontEndConfig
from m2dx_clinic.checkpoint.classifier import load_classifier
from m2dx_clinic.augment import spec_augment
from m2dx_clinic.data import segment_cache
from m2dx_clinic.objectives import inverse_frequency_weights
from m2dx_clinic.config import RECIPES_DIR, load_recipe
from m2dx_clinic.data.tasks import load_task
from m2dx_clinic.errors import AudioError, CheckpointError, ConfigError
from m2dx_clinic.config import load_params_toml
from m2dx_clinic.data.segment_cache import prepare_segments as prepare_cycles
from m2dx_clinic.finetune import backward_batch, finetune, train_epoch
from m2dx_clinic.inference import class_probabilities
from m2dx_clinic.recipes import TEST_BEST_LABEL, FinetuneRecipe
from m2dx_clinic.metrics import aggregate_runs, icbhi_scores
from m2dx_clinic.models.classifier import Classifier
from m2dx_clinic.models.vit import AudioViT, ViTConfig

TINY = ViTConfig(embed_dim=64, depth=2, num_heads=4)
OUTPUTS = ("recipe.toml", "metrics.json", "epochs.csv", "predictions.csv", "confusion_matrix.png",
           "learning_curves.png", "best.pt")


# ---------------------------------------------------------------------------- fixtures
def recipe_for(tmp_path: Path, *overrides: str) -> FinetuneRecipe:
    """The tiny CPU recipe, 2 epochs, 2-s cycles (fast), outputs and cache under tmp_path."""
    base = [f"run.out='{tmp_path / 'run'}'", f"data.cache_dir='{tmp_path / 'cache'}'", "optim.epochs=2",
            "data.cycle_seconds=2.0", "run.num_workers=0"]
    return load_recipe(FinetuneRecipe, "tiny_finetune", [*base, *overrides])


def tiny_classifier(num_classes: int = 4) -> Classifier:
    torch.manual_seed(0)
    return Classifier(AudioViT(TINY), num_classes)


def recompute(pred: pd.DataFrame, classes: list[str], normal: int) -> dict:
    return icbhi_scores(pred["true_index"].to_numpy(), pred["pred_index"].to_numpy(), normal_class=normal,
                        num_classes=len(classes))


# ---------------------------------------------------------------------------- recipes
@pytest.mark.parametrize("name", ["icbhi_finetune", "sprsound_finetune", "tiny_finetune", "icbhi_linear_finetune",
                                  "tiny_compare_finetune"])
def test_recipes_parse(name):
    recipe = load_recipe(FinetuneRecipe, name)
    recipes.validate_finetune_recipe(recipe)


def test_paper_defaults_in_icbhi_recipe():
    r = load_recipe(FinetuneRecipe, "icbhi_finetune")
    assert (r.optim.optimizer, r.optim.lr, r.optim.batch_size, r.optim.epochs) == ("adam", 5e-5, 64, 150)
    assert r.model.freeze_patch_embed and r.data.pad == "circular" and r.data.cycle_seconds == 8.0
    assert "m2dx finetune --task icbhi --data DIR --checkpoint CKPT" in (RECIPES_DIR / "icbhi_finetune.toml").read_text()
    s = load_recipe(FinetuneRecipe, "sprsound_finetune")
    assert (s.optim.epochs, s.optim.lr) == (50, 5e-6)
    t = load_recipe(FinetuneRecipe, "tiny_finetune")
    assert (t.optim.batch_size, t.optim.epochs, t.optim.lr, t.data.cycle_seconds, t.run.device) == (16, 3, 1e-3, 8.0, "cpu")


@pytest.mark.parametrize("override, words", [
    ("optim.accum_steps=3", "not divisible"),
    ("optim.lr=0", "optim.lr"),
    ("run.repeats=0", "run.repeats"),
    ("model.layer_decay=1.5", "layer_decay"),
])
def test_bad_recipe_values(override, words):
    recipe = load_recipe(FinetuneRecipe, "tiny_finetune", [override])
    with pytest.raises(ConfigError, match=words):
        recipes.validate_finetune_recipe(recipe)


def test_test_best_without_test_scoring_is_refused():
    recipe = load_recipe(FinetuneRecipe, "tiny_finetune", ["run.selection=test-best"])
    with pytest.raises(ConfigError, match="test-best"):
        recipes.validate_finetune_recipe(recipe, score_test=False)


def test_load_params_toml_gives_overrides(tmp_path):
    path = tmp_path / "best.toml"
    path.write_text(
        '[about]\nnote = "from a study"\n\n[optim]\nlr = 0.00012\noptimizer = "adamw"\nbatch_size = 32\n\n'
        '[augment]\nmixup_alpha = 0.2\n\n[model]\nfreeze_patch_embed = false\n',
        encoding="utf-8",
    )
    overrides = load_params_toml(path)
    assert "optim.lr=0.00012" in overrides and 'optim.optimizer="adamw"' in overrides
    recipe = load_recipe(FinetuneRecipe, "tiny_finetune", overrides)
    assert recipe.optim.lr == pytest.approx(1.2e-4) and recipe.optim.optimizer == "adamw"
    assert recipe.optim.batch_size == 32 and recipe.augment.mixup_alpha == 0.2
    assert recipe.model.freeze_patch_embed is False


def test_load_params_toml_unknown_key_is_a_config_error(tmp_path):
    path = tmp_path / "best.toml"
    path.write_text("[optim]\nlearning_rate = 1e-4\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="learning_rate"):
        load_recipe(FinetuneRecipe, "tiny_finetune", load_params_toml(path))


# ---------------------------------------------------------------------------- the known defects
def _grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("n", [8, 5])
def test_accumulation_gives_the_same_gradients_as_one_batch(n):
    """Batch 8 in one pass == 2 micro-batches of 4; a partial batch of 5 == micro-batches 4 + 1."""
    model = tiny_classifier()
    model.train()  # no dropout in the encoder or head, so train mode is deterministic
    torch.manual_seed(1)
    x = torch.randn(n, 1, 80, 200)
    y = F.one_hot(torch.randint(0, 4, (n,)), 4).float()
    weights = torch.tensor([0.5, 1.0, 2.0, 1.5])
    results = []
    for micro in (n, 4, 1):
        model.zero_grad(set_to_none=True)
        loss, seen = backward_batch(model, x, y, micro_batch=micro, class_weights=weights)
        results.append((loss, _grads(model)))
        assert seen == n
    (loss_full, full), *others = results
    for loss, grads in others:
        assert loss == pytest.approx(loss_full, rel=1e-5)
        assert grads.keys() == full.keys()
        for name in full:
            torch.testing.assert_close(grads[name], full[name], atol=1e-5, rtol=1e-4, msg=name)


def test_accumulated_gradient_is_the_batch_mean_not_the_sum():
    model = tiny_classifier()
    torch.manual_seed(2)
    x = torch.randn(6, 1, 80, 200)
    y = F.one_hot(torch.randint(0, 4, (6,)), 4).float()
    model.zero_grad(set_to_none=True)
    backward_batch(model, x, y, micro_batch=2)
    accumulated = model.head.bias.grad.clone()
    model.zero_grad(set_to_none=True)
    F.cross_entropy(model(x), y.argmax(1)).backward()  # the reference: mean CE over the batch
    torch.testing.assert_close(accumulated, model.head.bias.grad, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("weighting", ["none", "sampler", "loss"])
def test_every_sample_is_trained_each_epoch(weighting):
    """11 items, batch 4 split into 2 micro-batches: 11 samples seen (the last partial batch too)."""
    recipe = load_recipe(FinetuneRecipe, "tiny_finetune",
                         ["optim.batch_size=4", "optim.accum_steps=2", f"optim.class_weighting={weighting}"])
    model = tiny_classifier()
    seen_by_forward = []
    model.register_forward_hook(lambda m, inp, out: seen_by_forward.append(inp[0].shape[0]))
    optimizer = ft.make_optimizer(model, recipe.optim, 1.0)
    lms = torch.randn(11, 80, 40) * 2 - 6
    labels = [0, 1, 2, 3, 0, 1, 0, 0, 1, 2, 0]
    weights = inverse_frequency_weights(labels, 4) if weighting == "loss" else None
    stats = train_epoch(model, optimizer, lms, labels, recipe, epoch=0, device=torch.device("cpu"),
                        class_weights=weights)
    assert stats["train_samples"] == 11
    assert sum(seen_by_forward) == 11
    assert max(seen_by_forward) == 2  # micro-batches of batch_size / accum_steps


def test_a_diverged_loss_stops_with_a_clear_error():
    from m2dx_clinic.runtime import TrainingDiverged

    recipe = load_recipe(FinetuneRecipe, "tiny_finetune", ["optim.batch_size=4"])
    model = tiny_classifier()
    with torch.no_grad():
        model.head.bias.fill_(float("nan"))
    optimizer = ft.make_optimizer(model, recipe.optim, 1.0)
    with pytest.raises(TrainingDiverged, match="lower optim.lr"):
        train_epoch(model, optimizer, torch.randn(4, 80, 40), [0, 1, 0, 1], recipe, epoch=0,
                    device=torch.device("cpu"))


def test_predictions_do_not_depend_on_batching():
    """Per-sample normalisation with fixed statistics: batch 1 and batch 7 give the same probabilities."""
    model = tiny_classifier()
    torch.manual_seed(3)
    lms = torch.randn(9, 80, 120) * 3 - 7
    lms[4] += 20  # an outlier would shift any batch statistics (min-max / batch mean)
    one = class_probabilities(model, lms, batch_size=1, device=torch.device("cpu"))
    seven = class_probabilities(model, lms, batch_size=7, device=torch.device("cpu"))
    torch.testing.assert_close(one, seven, atol=1e-6, rtol=1e-5)
    assert torch.equal(one.argmax(1), seven.argmax(1))
    alone = class_probabilities(model, lms[:1], batch_size=1, device=torch.device("cpu"))
    torch.testing.assert_close(alone[0], seven[0], atol=1e-6, rtol=1e-5)


def test_normalisation_uses_the_encoder_statistics():
    encoder = AudioViT(TINY, norm_stats=(-6.0, 4.0))
    lms = torch.full((1, 80, 10), -2.0)
    assert torch.allclose(encoder.normalize(lms), torch.ones_like(lms))


# ---------------------------------------------------------------------------- cycle cache
def test_cycles_are_cached_on_disk_and_reused(tmp_path, demo_icbhi, monkeypatch):
    items = load_task("icbhi", demo_icbhi).split("train")[:3]
    frontend = FrontEndConfig()
    segment_cache.clear_memory_cache()
    first = prepare_cycles(items, frontend=frontend, length_s=2.0, pad="circular", cache_dir=tmp_path)
    assert first.shape == (3, 80, 201)
    assert [p.suffix for p in sorted(tmp_path.iterdir())] == [".bin", ".idx"]  # one shard for the three
    segment_cache.clear_memory_cache()

    def no_decoding(*args, **kwargs):
        raise AssertionError("the cache should have been used")

    monkeypatch.setattr(segment_cache, "load_fixed_length", no_decoding)
    again = prepare_cycles(items, frontend=frontend, length_s=2.0, pad="circular", cache_dir=tmp_path)
    assert torch.equal(first[:], again[:])
    with pytest.raises(AssertionError):  # another setting is another key
        prepare_cycles(items, frontend=frontend, length_s=2.0, pad="zero", cache_dir=tmp_path)


# ---------------------------------------------------------------------------- end to end
def test_end_to_end_outputs_recompute_from_predictions(tmp_path, demo_icbhi, tiny_ckpt):
    recipe = recipe_for(tmp_path, "data.cycle_seconds=8.0")
    result = finetune(recipe, task="icbhi", data=demo_icbhi, checkpoint=tiny_ckpt, progress=False)
    run = result.run_dir
    for name in OUTPUTS:
        assert (run / name).is_file(), name
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["selection"].startswith("val") and "optimistic" not in metrics["selection"]
    assert metrics["classes"] == ["normal", "crackle", "wheeze", "both"] and metrics["normal_class"] == "normal"
    assert metrics["checkpoint"] == str(tiny_ckpt)
    pred = pd.read_csv(run / "predictions.csv")
    classes, normal = metrics["classes"], metrics["normal_class_index"]
    td = load_task("icbhi", demo_icbhi)
    assert len(pred[pred["split"] == "test"]) == len(td.split("test"))
    probs = pred[[f"prob_{c}" for c in classes]].to_numpy()
    assert np.allclose(probs.sum(1), 1.0, atol=1e-5)
    assert (probs.argmax(1) == pred["pred_index"].to_numpy()).all()
    for run_metrics in metrics["runs"]:
        for split in ("val", "test"):
            rows = pred[(pred["repeat"] == run_metrics["repeat"]) & (pred["split"] == split)]
            again = recompute(rows, classes, normal)
            for key in ("sp", "se", "score", "accuracy"):
                stored = run_metrics[split][key]
                assert (stored is None and np.isnan(again[key])) or stored == pytest.approx(again[key]), (split, key)
            assert run_metrics[split]["confusion_matrix"] == again["confusion_matrix"]
    assert metrics["aggregate"]["score"]["mean"] == pytest.approx(metrics["runs"][0]["test"]["score"])
    epochs = pd.read_csv(run / "epochs.csv")
    assert list(epochs["epoch"]) == [1, 2]
    assert (epochs["train_samples"] == len(td.split("train"))).all()  # nothing dropped
    assert {"train_loss", "val_loss", "val_sp", "val_se", "val_score", "lr"} <= set(epochs.columns)
    assert epochs["selected"].sum() == 1
    # the resolved recipe loads back; best.pt (the selected repeat's classifier file) loads safely
    again = load_recipe(FinetuneRecipe, run / "recipe.toml")
    # recipe.toml is handed on: it names no folder (a re-run with --recipe picks its own; docs: provenance)
    assert again.data.cycle_seconds == 8.0 and again.run.out == "" and str(run) not in (run / "recipe.toml").read_text()
    best = torch.load(run / "best.pt", weights_only=True)  # plain tensors and values: not even the Namespace allow-list
    clf = load_classifier(run / "best.pt")
    assert clf.classes == classes and clf.meta["norm_stats"] == pytest.approx([-6.0, 4.0])
    model = Classifier(AudioViT(TINY, norm_stats=(-6.0, 4.0)), len(classes))
    model.load_state_dict(clf.model.state_dict())
    assert best["epoch"] == metrics["runs"][0]["selected_epoch"]


def test_test_best_is_labelled_everywhere(tmp_path, demo_icbhi, tiny_ckpt, capsys):
    recipe = recipe_for(tmp_path, "run.selection=test-best")
    result = finetune(recipe, task="icbhi", data=demo_icbhi, checkpoint=tiny_ckpt, progress=True)
    assert result.selection == TEST_BEST_LABEL
    metrics = json.loads((result.run_dir / "metrics.json").read_text())
    assert metrics["selection"] == TEST_BEST_LABEL
    pred = pd.read_csv(result.run_dir / "predictions.csv")
    assert (pred["selection"] == TEST_BEST_LABEL).all()
    epochs = pd.read_csv(result.run_dir / "epochs.csv")
    assert {"test_score", "test_sp", "test_se", "test_loss"} <= set(epochs.columns)
    best_epoch = int(epochs.loc[epochs["selected"], "epoch"].iloc[0])
    assert epochs.loc[epochs["epoch"] == best_epoch, "test_score"].iloc[0] == pytest.approx(epochs["test_score"].max())
    printed = " ".join(capsys.readouterr().err.split())
    assert "test-best (literature protocol; optimistic)" in printed


def test_score_test_false_never_reads_the_test_audio(tmp_path, demo_icbhi, tiny_ckpt):
    td = load_task("icbhi", demo_icbhi)
    missing = tmp_path / "does-not-exist.wav"
    td.items = [dataclasses.replace(it, path=missing) if it.split == "test" else it for it in td.items]
    recipe = recipe_for(tmp_path, "optim.epochs=1")
    result = finetune(recipe, task="icbhi", data=demo_icbhi, checkpoint=tiny_ckpt, score_test=False,
                      progress=False, task_data=td)
    assert result.aggregate_split == "val"
    assert all(run["test"] is None for run in result.runs)
    pred = pd.read_csv(result.run_dir / "predictions.csv")
    assert set(pred["split"]) == {"val"}
    # the same task with test scoring does read the (missing) test audio
    with pytest.raises(AudioError, match="does-not-exist"):
        finetune(recipe_for(tmp_path / "second", "optim.epochs=1"), task="icbhi", data=demo_icbhi,
                 checkpoint=tiny_ckpt, progress=False, task_data=td)


def test_repeats_are_aggregated(tmp_path, demo_icbhi, tiny_ckpt):
    recipe = recipe_for(tmp_path, "run.repeats=2", "run.seed=5", "optim.epochs=1")
    result = finetune(recipe, task="icbhi", data=demo_icbhi, checkpoint=tiny_ckpt, progress=False)
    assert [r["seed"] for r in result.runs] == [5, 6]
    expected = aggregate_runs([r["test"] for r in result.runs], ("sp", "se", "score", "accuracy"))
    for key in ("sp", "score", "accuracy"):
        assert result.aggregate[key]["n"] == 2
        assert result.aggregate[key]["mean"] == pytest.approx(expected[key]["mean"])
    pred = pd.read_csv(result.run_dir / "predictions.csv")
    assert set(pred["repeat"]) == {0, 1}
    metrics = json.loads((result.run_dir / "metrics.json").read_text())
    assert len(metrics["runs"]) == 2 and metrics["repeats"] == 2
    for run_metrics in metrics["runs"]:
        rows = pred[(pred["repeat"] == run_metrics["repeat"]) & (pred["split"] == "test")]
        assert run_metrics["test"]["score"] == pytest.approx(recompute(rows, metrics["classes"], 0)["score"])


def test_epoch_callback_sees_val_metrics_and_can_stop_training(tmp_path, demo_icbhi, tiny_ckpt):
    seen = []
    result = finetune(recipe_for(tmp_path / "a"), task="icbhi", data=demo_icbhi, checkpoint=tiny_ckpt,
                      progress=False, epoch_callback=lambda epoch, m: seen.append((epoch, m)))
    assert [e for e, _ in seen] == [1, 2]
    assert all({"sp", "se", "score", "loss"} <= set(m) for _, m in seen)
    epochs = pd.read_csv(result.run_dir / "epochs.csv")
    assert seen[1][1]["score"] == pytest.approx(epochs["val_score"].iloc[1])

    class Pruned(Exception):
        pass

    def stop(epoch, metrics):
        raise Pruned(f"stop at {epoch}")

    recipe = recipe_for(tmp_path / "b", "optim.epochs=5")
    with pytest.raises(Pruned, match="stop at 1"):
        finetune(recipe, task="icbhi", data=demo_icbhi, checkpoint=tiny_ckpt, progress=False, epoch_callback=stop)
    run = tmp_path / "b" / "run"
    assert len(pd.read_csv(run / "epochs.csv")) == 1  # stopped after the first epoch
    assert not (run / "metrics.json").exists()


def test_bad_inputs_fail_before_training(tmp_path, demo_icbhi, tiny_ckpt):
    with pytest.raises(CheckpointError):
        finetune(recipe_for(tmp_path), task="icbhi", data=demo_icbhi, checkpoint=tmp_path / "nope.pth", progress=False)
    with pytest.raises(ConfigError, match="validation split"):
        finetune(recipe_for(tmp_path, "data.val_fraction=0.0"), task="icbhi", data=demo_icbhi,
                 checkpoint=tiny_ckpt, progress=False)
    with pytest.raises(ConfigError, match="normal class"):
        finetune(recipe_for(tmp_path), task="icbhi", data=demo_icbhi, checkpoint=tiny_ckpt,
                 normal_class="healthy", progress=False)
    assert not (tmp_path / "run").exists()  # nothing was written


def test_augmentations_and_options_run(tmp_path, demo_icbhi, tiny_ckpt):
    """SpecAugment, mixup, loss weighting, AdamW with layer decay, warm-up + cosine, accumulation."""
    recipe = recipe_for(tmp_path, "augment.freq_mask=10", "augment.time_mask=20", "augment.mixup_alpha=0.4",
                        "optim.class_weighting=loss", "optim.optimizer=adamw", "model.layer_decay=0.75",
                        "optim.warmup_epochs=1", "optim.schedule=cosine", "optim.accum_steps=4",
                        "optim.weight_decay=0.01", "run.selection=last", "optim.clip_grad=1.0")
    result = finetune(recipe, task="icbhi", data=demo_icbhi, checkpoint=tiny_ckpt, progress=False)
    assert result.runs[0]["selected_epoch"] == 2
    epochs = pd.read_csv(result.run_dir / "epochs.csv")
    assert np.isfinite(epochs["train_loss"]).all()


def test_spec_augment_masks_per_sample():
    torch.manual_seed(0)
    x = torch.ones(16, 1, 80, 100)
    out = spec_augment(x, 20, 30)
    zero_fraction = (out == 0).float().mean(dim=(1, 2, 3))
    assert zero_fraction.max() > 0 and len(set(zero_fraction.tolist())) > 1  # masks differ between samples
    assert torch.equal(spec_augment(x, 0, 0), x)


# ---------------------------------------------------------------------------- real data
@pytest.mark.slow
@pytest.mark.realdata
def test_tiny_recipe_one_epoch_on_the_shared_icbhi_subset(tmp_path, icbhi_dir, tiny_ckpt):
    recipe = load_recipe(FinetuneRecipe, "tiny_finetune", [
        f"run.out='{tmp_path / 'run'}'", f"data.cache_dir='{tmp_path / 'cache'}'", "optim.epochs=1",
        "data.max_items_per_split=128",
    ])
    result = finetune(recipe, task="icbhi", data=icbhi_dir, checkpoint=tiny_ckpt, progress=False)
    metrics = json.loads((result.run_dir / "metrics.json").read_text())
    td = load_task("icbhi", icbhi_dir)  # the run's own split (same seed) gives the subset sizes
    assert metrics["items"] == {split: min(128, len(td.split(split))) for split in ("train", "val", "test")}
    assert any("max_items_per_split" in note for note in metrics["notes"])
    pred = pd.read_csv(result.run_dir / "predictions.csv")
    rows = pred[pred["split"] == "test"]
    assert metrics["runs"][0]["test"]["score"] == pytest.approx(recompute(rows, metrics["classes"], 0)["score"])
