"""Tuning: the TOML search space, suggestions, best.toml round trip, resumable studies, pruning,
failure records, and the guarantee that trials never score (or select on) the test split.

All but one test replace `finetune` with a fast fake so the study machinery is tested in seconds;
the slow test runs the real loop on synthetic ICBHI-layout data with a tiny checkpoint.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import optuna
import pytest

import m2dx_clinic.tuning.study as tuning
from m2dx_clinic.config import load_recipe
from m2dx_clinic.errors import ConfigError, M2DXError
from m2dx_clinic.config import load_params_toml
from m2dx_clinic.finetune_outputs import FinetuneResult
from m2dx_clinic.recipes import FinetuneRecipe, TuneSettings
from m2dx_clinic.tuning import Param, load_search_space, parse_duration, suggest, tune

class _FakeTask:
    """Stands in for a loaded task: the tuner only passes it on (and fingerprints it)."""

    def fingerprint(self, splits=None) -> dict:
        return {"sha256": "fake-task"}


SENTINEL_TASK = _FakeTask()


def write_tune_recipe(tmp_path: Path, space: str, tune_table: str = "", name: str = "t_tune.toml",
                      finetune_recipe: str = "tiny_finetune") -> Path:
    path = tmp_path / name
    path.write_text(f'[tune]\nfinetune_recipe = "{finetune_recipe}"\n{tune_table}\n{space}\n')
    return path


LR_SPACE = '[space."optim.lr"]\ntype = "float"\nlow = 1e-4\nhigh = 1e-2\nlog = true\n'


class FakeFinetune:
    """Stands in for `finetune`: reports `epochs` fake validation scores and records how it was called."""

    def __init__(self, score=lambda call, recipe, epoch: 0.5 + 0.01 * epoch, fail=lambda call: False, epochs=None):
        self.score, self.fail, self.epochs = score, fail, epochs
        self.calls: list[dict] = []

    def __call__(self, recipe, *, task, data, checkpoint, normal_class=None, epoch_callback=None,
                 score_test=True, progress=True, task_data=None):
        call = len(self.calls)
        final = Path(recipe.run.out).name == "final"
        self.calls.append({"recipe": recipe, "score_test": score_test, "task_data": task_data, "final": final})
        if not final:
            assert score_test is False, "a tuning trial asked for test scores"
            assert recipe.run.selection != "test-best"
        Path(recipe.run.out).mkdir(parents=True, exist_ok=True)  # the real loop creates its run folder
        if self.fail(call):
            raise ValueError(f"boom in call {call}\nsecond line")
        val = None
        for epoch in range(1, (self.epochs or recipe.optim.epochs) + 1):
            s = self.score(call, recipe, epoch)
            val = {"sp": s, "se": s, "score": s, "accuracy": s, "loss": 1 - s}
            if epoch_callback is not None:
                epoch_callback(epoch, dict(val))
        test = {"sp": 0.7, "se": 0.5, "score": 0.6, "accuracy": 0.65} if score_test else None
        run = {"repeat": 0, "seed": recipe.run.seed, "selected_epoch": epoch, "val": val, "test": test}
        return FinetuneResult(run_dir=Path(recipe.run.out), runs=[run], aggregate={},
                              selection=recipe.run.selection)


@pytest.fixture
def fake(monkeypatch):
    """Install a FakeFinetune and a fake task loader (counts loads) into the tuning module."""
    loads = []

    def fake_load_task(task, data, **kwargs):
        loads.append((task, data, kwargs))
        return SENTINEL_TASK

    monkeypatch.setattr(tuning, "load_task", fake_load_task)
    holder = {"loads": loads}

    def install(**kwargs) -> FakeFinetune:
        f = FakeFinetune(**kwargs)
        monkeypatch.setattr(tuning, "finetune", f)
        holder["fake"] = f
        return f

    holder["install"] = install
    return holder


def run_tune(tmp_path: Path, recipe: Path | str, **kwargs):
    args = dict(task="icbhi", data=tmp_path / "data", checkpoint="ckpt", tune_recipe=recipe,
                out=tmp_path / "out", progress=False, final_test=False)
    args.update(kwargs)
    return tune(**args)


# ---------------------------------------------------------------------------- search space
def test_builtin_recipes_parse():
    settings, params = load_search_space("icbhi_tune")
    assert isinstance(settings, TuneSettings)
    assert settings.finetune_recipe == "icbhi_finetune" and settings.metric == "score"
    assert settings.direction == "maximize" and settings.timeout == 8 * 3600
    by_key = {p.key: p for p in params}
    assert by_key["optim.lr"] == Param("optim.lr", "float", 1e-6, 1e-3, log=True)
    assert by_key["optim.batch_size"].choices == [16, 32, 64]
    assert by_key["model.freeze_patch_embed"].choices == [True, False]
    assert all(type(c) is bool for c in by_key["model.freeze_patch_embed"].choices)
    assert by_key["augment.freq_mask"].type == "int" and by_key["augment.freq_mask"].high == 30
    assert set(by_key["optim.class_weighting"].choices) == {"none", "loss", "sampler"}
    tiny_settings, tiny = load_search_space("tiny_tune")
    assert tiny_settings.finetune_recipe == "tiny_finetune"
    assert {p.key for p in tiny} == {"optim.lr", "optim.batch_size", "optim.epochs", "augment.mixup_alpha"}


def test_nested_table_spelling_is_accepted(tmp_path):
    path = write_tune_recipe(tmp_path, '[space.optim.lr]\ntype = "float"\nlow = 1e-5\nhigh = 1e-3\n')
    _, params = load_search_space(path)
    assert [p.key for p in params] == ["optim.lr"]


@pytest.mark.parametrize(
    "space, needle",
    [
        ('[space."optim.lrr"]\ntype = "float"\nlow = 0.1\nhigh = 0.2', "optim.lrr"),
        ('[space."optimiser.lr"]\ntype = "float"\nlow = 0.1\nhigh = 0.2', "optimiser.lr"),
        ('[space."optim.lr"]\ntype = "float"\nlow = 0.2\nhigh = 0.1', "optim.lr"),
        ('[space."augment.freq_mask"]\ntype = "int"\nlow = 30\nhigh = 0', "augment.freq_mask"),
        ('[space."optim.lr"]\ntype = "float"\nlow = 0.0\nhigh = 0.1\nlog = true', "log=true needs low > 0"),
        ('[space."optim.epochs"]\ntype = "float"\nlow = 1\nhigh = 5', "optim.epochs"),
        ('[space."optim.epochs"]\ntype = "int"\nlow = 1.5\nhigh = 5', "optim.epochs"),
        ('[space."optim.class_weighting"]\ntype = "categorical"\nchoices = ["none", "bogus"]', "bogus"),
        ('[space."model.freeze_patch_embed"]\ntype = "categorical"\nchoices = ["yes", "no"]', "freeze_patch_embed"),
        ('[space."optim.lr"]\ntype = "uniform"\nlow = 0.1\nhigh = 0.2', "optim.lr"),
        ('[space."optim.lr"]\ntype = "float"\nlow = 0.1\nhigh = 0.2\nsteps = 2', "steps"),
        ('[space."optim"]\ntype = "float"\nlow = 0.1\nhigh = 0.2', "whole section"),
        ('[space."run.seed"]\ntype = "int"\nlow = 0\nhigh = 5', "run.seed"),
        ('[space."data.val_fraction"]\ntype = "float"\nlow = 0.1\nhigh = 0.2', "data.val_fraction"),
    ],
)
def test_bad_space_is_one_line_config_error(tmp_path, space, needle):
    path = write_tune_recipe(tmp_path, space)
    with pytest.raises(ConfigError) as info:
        load_search_space(path)
    assert needle in str(info.value) and "\n" not in str(info.value)


def test_bad_tune_settings(tmp_path):
    with pytest.raises(ConfigError, match="tune.trialz"):
        load_search_space(write_tune_recipe(tmp_path, LR_SPACE, "trialz = 3"))
    with pytest.raises(ConfigError, match="minimize"):
        load_search_space(write_tune_recipe(tmp_path, LR_SPACE, 'metric = "loss"'))
    with pytest.raises(ConfigError, match="duration"):
        load_search_space(write_tune_recipe(tmp_path, LR_SPACE, 'timeout = "soon"'))
    with pytest.raises(ConfigError, match="empty"):
        load_search_space(write_tune_recipe(tmp_path, ""))


def test_tune_flags_are_overrides_of_the_tune_table():
    """`m2dx tune --trials 7 --pruner Median --timeout 90m` reaches the [tune] table as overrides, checked like the file."""
    settings, _ = load_search_space("tiny_tune", ["tune.trials=7", 'tune.pruner="Median"', 'tune.timeout="90m"'])
    assert (settings.trials, settings.pruner, settings.timeout) == (7, "median", 5400.0)
    with pytest.raises(ConfigError, match=r"with tune.trials=0: tune.trials must be at least 1"):
        load_search_space("tiny_tune", ["tune.trials=0"])
    with pytest.raises(ConfigError, match="only \\[tune\\] keys"):
        load_search_space("tiny_tune", ["optim.lr=1e-4"])


def test_parse_duration():
    assert parse_duration("8h") == 8 * 3600
    assert parse_duration("1h30m") == 5400
    assert parse_duration("90") == 90 and parse_duration(45) == 45
    assert parse_duration(None) is None and parse_duration("") is None and parse_duration(0) is None
    with pytest.raises(ConfigError):
        parse_duration("8 hours")


# ---------------------------------------------------------------------------- suggestions and best.toml
def test_suggest_with_fixed_trial_gives_typed_overrides():
    _, params = load_search_space("icbhi_tune")
    values = {"optim.lr": 3e-5, "optim.batch_size": 32, "optim.epochs": 75, "optim.weight_decay": 0.01,
              "optim.class_weighting": "loss", "model.layer_decay": 0.75, "model.freeze_patch_embed": False,
              "augment.freq_mask": 12, "augment.time_mask": 40, "augment.mixup_alpha": 0.25}
    overrides = suggest(optuna.trial.FixedTrial(values), params)
    assert "model.freeze_patch_embed=false" in overrides and 'optim.class_weighting="loss"' in overrides
    recipe = load_recipe(FinetuneRecipe, "icbhi_finetune", overrides)
    assert recipe.optim.lr == pytest.approx(3e-5) and recipe.optim.batch_size == 32
    assert recipe.model.freeze_patch_embed is False and recipe.optim.class_weighting == "loss"
    assert recipe.augment.time_mask == 40 and isinstance(recipe.augment.time_mask, int)
    assert recipe.model.layer_decay == 0.75 and recipe.augment.mixup_alpha == 0.25


def test_best_toml_round_trip(tmp_path):
    best = {"optim.lr": 1.234e-4, "optim.batch_size": 16, "model.freeze_patch_embed": False,
            "optim.class_weighting": "sampler", "augment.mixup_alpha": 0.0}
    tables = tuning.params_to_tables(best, overrides=["optim.epochs=20", "run.device=cpu"])
    assert tables["optim"]["lr"] == 1.234e-4 and "run" not in tables  # run.* describes the machine
    path = tmp_path / "best.toml"
    path.write_text(tuning.dump_toml(tables, "header"))
    recipe = load_recipe(FinetuneRecipe, "icbhi_finetune", load_params_toml(path))
    assert recipe.optim.lr == 1.234e-4 and recipe.optim.batch_size == 16 and recipe.optim.epochs == 20
    assert recipe.model.freeze_patch_embed is False and recipe.optim.class_weighting == "sampler"


# ---------------------------------------------------------------------------- studies with a fake finetune
def test_resume_continues_the_study_and_writes_outputs(tmp_path, fake):
    f = fake["install"](score=lambda call, recipe, epoch: min(0.99, recipe.optim.lr * 50 + 0.01 * epoch))
    first = run_tune(tmp_path, "tiny_tune", trials=2, progress=True)
    assert first.n_complete == 2
    out = tmp_path / "out"
    study = optuna.load_study(study_name=first.study_name, storage=f"sqlite:///{out / 'optuna.db'}")
    assert len(study.trials) == 2

    second = run_tune(tmp_path, "tiny_tune", trials=4)
    study = optuna.load_study(study_name=second.study_name, storage=f"sqlite:///{out / 'optuna.db'}")
    assert len(study.trials) == 4 and second.n_complete + second.n_pruned == 4
    assert len(f.calls) == 4  # only the two missing trials ran the second time
    assert len(fake["loads"]) == 2  # the task is loaded once per tune call, shared by its trials
    assert all(c["task_data"] is SENTINEL_TASK for c in f.calls)
    assert all(c["recipe"].run.selection == "val" and c["recipe"].run.repeats == 1 for c in f.calls)

    assert second.best_value == pytest.approx(study.best_value)
    for name in ("best.toml", "trials.csv", "summary.json", "optimization_history.png"):
        assert (out / name).is_file(), name
    # importances from 3 complete trials are noise: left out, and the summary says why
    assert not (out / "param_importances.png").exists()
    assert any("need at least 8 complete trials" in w for w in json.loads((out / "summary.json").read_text())["warnings"])
    assert not list(out.glob(".*tmp*"))
    recipe = load_recipe(FinetuneRecipe, "tiny_finetune", load_params_toml(out / "best.toml"))
    assert recipe.optim.lr == pytest.approx(second.best_params["optim.lr"])
    assert recipe.optim.batch_size == second.best_params["optim.batch_size"]
    assert recipe.optim.epochs == second.best_params["optim.epochs"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["counts"]["complete"] == second.n_complete and summary["final"] is None
    assert summary["best_params"] == second.best_params
    assert "optim.lr" in (out / "trials.csv").read_text().splitlines()[0]
    assert "worker" not in (out / "trials.csv").read_text().splitlines()[0]  # no host:pid in a shareable table
    from m2dx_clinic.config import recipe_for_params

    assert Path(recipe_for_params(None, out / "best.toml")).stem == "tiny_finetune"  # best.toml brings its recipe
    # trial folders are per trial and carried in the recipe every trial was built from
    assert sorted(Path(c["recipe"].run.out).name for c in f.calls) == [f"trial_{i:04d}" for i in range(4)]


def test_pruning_stops_bad_trials(tmp_path, fake):
    fake["install"](score=lambda call, recipe, epoch: 0.9 if call == 0 else 0.1, epochs=4)
    recipe = write_tune_recipe(tmp_path, LR_SPACE, "pruner_startup_trials = 1\npruner_warmup_epochs = 0")
    result = run_tune(tmp_path, recipe, trials=3)
    assert result.n_pruned >= 1 and result.n_complete >= 1
    study = optuna.load_study(study_name=result.study_name, storage=result.storage)
    pruned = [t for t in study.trials if t.state == optuna.trial.TrialState.PRUNED]
    assert pruned and all(max(t.intermediate_values) < 4 for t in pruned)  # stopped before the last epoch
    # pruned trials count towards the target: 3 finished trials in all
    assert result.n_pruned + result.n_complete == 3


def test_importances_with_enough_trials_and_a_warning_when_all_score_alike(tmp_path, fake):
    fake["install"](score=lambda call, recipe, epoch: min(0.99, recipe.optim.lr * 50 + 0.01 * epoch))
    recipe = write_tune_recipe(tmp_path, LR_SPACE, "min_trials_for_importance = 3\npruner = \"none\"")
    result = run_tune(tmp_path, recipe, trials=3)
    assert (tmp_path / "out" / "param_importances.png").is_file() and result.n_complete == 3
    flat = tmp_path / "flat"
    flat.mkdir()
    fake["install"](score=lambda call, recipe, epoch: 0.5)
    result = run_tune(flat, write_tune_recipe(flat, LR_SPACE, "min_trials_for_importance = 2\npruner = \"none\""), trials=3)
    summary = json.loads((flat / "out" / "summary.json").read_text())
    assert any("was the same (50.00%)" in w for w in summary["warnings"])
    assert any("every complete trial scored the same" in w for w in summary["warnings"])
    assert not (flat / "out" / "param_importances.png").exists()


def test_failures_are_recorded_and_the_study_goes_on(tmp_path, fake):
    fake["install"](fail=lambda call: call == 1)
    result = run_tune(tmp_path, write_tune_recipe(tmp_path, LR_SPACE, "pruner_startup_trials = 9"), trials=3,
                      overrides=["optim.epochs=2"])
    assert result.n_failed == 1 and result.n_complete == 2  # this invocation ran its 3 trials
    study = optuna.load_study(study_name=result.study_name, storage=result.storage)
    failed = [t for t in study.trials if t.state == optuna.trial.TrialState.FAIL]
    assert failed[0].user_attrs["error"] == "ValueError: boom in call 1 second line"


def test_all_failing_stops_early_with_one_line_error(tmp_path, fake):
    f = fake["install"](fail=lambda call: True)
    recipe = write_tune_recipe(tmp_path, LR_SPACE, "max_consecutive_failures = 2")
    with pytest.raises(M2DXError, match="no trial completed.*ValueError: boom"):
        run_tune(tmp_path, recipe, trials=10)
    assert len(f.calls) == 2
    assert (tmp_path / "out" / "trials.csv").is_file() and (tmp_path / "out" / "summary.json").is_file()


def test_repeats_run_seeds_and_use_the_wilcoxon_pruner(tmp_path, fake):
    f = fake["install"](score=lambda call, recipe, epoch: 0.5 + 0.1 * recipe.run.seed, epochs=1)
    result = run_tune(tmp_path, write_tune_recipe(tmp_path, LR_SPACE), trials=2, repeats=3)
    assert result.n_complete == 2 and len(f.calls) == 6
    assert [c["recipe"].run.seed for c in f.calls[:3]] == [0, 1, 2]
    study = optuna.load_study(study_name=result.study_name, storage=result.storage)
    trial = study.trials[0]
    assert trial.intermediate_values == {0: pytest.approx(0.5), 1: pytest.approx(0.6), 2: pytest.approx(0.7)}
    assert trial.value == pytest.approx(0.6)
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["pruner"] == "WilcoxonPruner"
    with pytest.raises(ConfigError, match="repeats"):
        run_tune(tmp_path, write_tune_recipe(tmp_path, LR_SPACE), trials=1, pruner="wilcoxon")


def test_final_test_runs_once_with_the_best_params(tmp_path, fake):
    f = fake["install"](score=lambda call, recipe, epoch: recipe.optim.lr * 10)
    result = run_tune(tmp_path, "tiny_tune", trials=2, final_test=True)
    finals = [c for c in f.calls if c["final"]]
    assert len(finals) == 1 and finals[0]["score_test"] is True
    assert finals[0]["recipe"].optim.lr == pytest.approx(result.best_params["optim.lr"])
    assert finals[0]["task_data"] is SENTINEL_TASK
    assert result.final is not None and result.final.runs[0]["test"]["score"] == 0.6
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["final"]["test"]["score"]["mean"] == pytest.approx(0.6)
    # nothing left to search: a re-run keeps the earlier final run instead of training again
    again = run_tune(tmp_path, "tiny_tune", trials=2, final_test=True)
    assert len([c for c in f.calls if c["final"]]) == 1 and again.final is None
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["final"]["test"]["score"]["mean"] == 0.6


# ---------------------------------------------------------------------------- the test split stays unseen
def test_test_best_selection_is_refused_everywhere(tmp_path, fake):
    f = fake["install"]()
    with pytest.raises(ConfigError, match="tuning must select on validation"):
        run_tune(tmp_path, "tiny_tune", trials=1, overrides=["run.selection=test-best"])
    space = LR_SPACE + '\n[space."run.selection"]\ntype = "categorical"\nchoices = ["val", "test-best"]\n'
    with pytest.raises(ConfigError, match="tuning must select on validation"):
        run_tune(tmp_path, write_tune_recipe(tmp_path, space), trials=1)
    (tmp_path / "leaky_finetune.toml").write_text('[run]\nselection = "test-best"\n')
    leaky = write_tune_recipe(tmp_path, LR_SPACE, name="leaky_tune.toml", finetune_recipe="leaky_finetune")
    with pytest.raises(ConfigError, match="tuning must select on validation"):
        run_tune(tmp_path, leaky, trials=1)
    assert f.calls == [] and not (tmp_path / "out" / "optuna.db").exists()  # refused before the study


@pytest.mark.parametrize("mode", ["linear", "baseline", "compare"])
def test_tuning_a_mode_without_settings_to_search_is_refused_before_the_study(tmp_path, fake, mode):
    f = fake["install"]()
    with pytest.raises(ConfigError, match=f"run.mode={mode} has none to search"):
        run_tune(tmp_path, "tiny_tune", trials=1, overrides=[f"run.mode={mode}"])
    assert f.calls == [] and not (tmp_path / "out" / "optuna.db").exists()


def test_trial_that_returns_test_metrics_fails(tmp_path, monkeypatch, fake):
    fake["install"]()

    def leaky(recipe, **kwargs):
        run = {"selected_epoch": 1, "val": {"score": 0.5}, "test": {"score": 0.9}}
        return FinetuneResult(run_dir=Path(recipe.run.out), runs=[run], aggregate={}, selection="val")

    monkeypatch.setattr(tuning, "finetune", leaky)
    recipe = write_tune_recipe(tmp_path, LR_SPACE, "max_consecutive_failures = 1")
    with pytest.raises(M2DXError, match="test metrics"):
        run_tune(tmp_path, recipe, trials=1)


# ---------------------------------------------------------------------------- the real loop
@pytest.mark.slow
def test_tiny_tune_end_to_end_with_real_finetune(tmp_path):
    import torch

    from m2dx_clinic import checkpoint as ck
    from m2dx_clinic.demo_data import make_demo_icbhi
    from m2dx_clinic.models.m2d import M2D
    from m2dx_clinic.models.vit import ViTConfig

    data = make_demo_icbhi(tmp_path / "icbhi", num_patients=8, recordings_per_patient=1, seconds=8)
    cfg = ViTConfig(embed_dim=64, depth=2, num_heads=4)
    torch.manual_seed(0)
    model = M2D(cfg)
    folder = tmp_path / ck.checkpoint_folder_name(cfg, False)
    ck.atomic_torch_save(ck.training_checkpoint(model, epoch=1, optimizer=None, scaler=None, args={}, meta={}),
                         folder / "checkpoint-1.pth")
    result = tune(task="icbhi", data=data, checkpoint=folder, tune_recipe="tiny_tune", trials=2,
                  out=tmp_path / "tune", progress=False, final_test=True,
                  overrides=["optim.epochs=1", "run.num_workers=0", f"data.cache_dir={json.dumps(str(tmp_path / 'cache'))}"])
    assert result.n_complete + result.n_pruned + result.n_failed == 2 and result.n_complete >= 1, result
    assert 0.0 <= result.best_value <= 1.0
    assert result.final is not None and result.final.run_dir == tmp_path / "tune" / "final"
    test = result.final.runs[0]["test"]
    assert test is not None and all(math.isfinite(test[k]) or math.isnan(test[k]) for k in ("sp", "se", "score"))
    for trial_dir in (tmp_path / "tune" / "trials").iterdir():
        metrics = json.loads((trial_dir / "metrics.json").read_text())
        assert metrics["test_scored"] is False and all(r["test"] is None for r in metrics["runs"])
    for name in ("best.toml", "trials.csv", "summary.json", "optimization_history.png"):
        assert (tmp_path / "tune" / name).is_file(), name


def test_a_trial_left_running_by_a_killed_run_is_failed_and_retried(tmp_path, fake):
    f = fake["install"](score=lambda call, recipe, epoch: 0.5)
    first = run_tune(tmp_path, "tiny_tune", trials=1)
    storage = f"sqlite:///{tmp_path / 'out' / 'optuna.db'}"
    study = optuna.load_study(study_name=first.study_name, storage=storage)
    orphan = study.ask()  # what a kill -9 in the middle of a trial leaves behind
    orphan.suggest_float("optim.lr", 1e-4, 3e-3, log=True)
    run_tune(tmp_path, "tiny_tune", trials=2)
    study = optuna.load_study(study_name=first.study_name, storage=storage)
    states = {t.number: t.state for t in study.trials}
    assert states[orphan.number] == optuna.trial.TrialState.FAIL
    assert "killed" in study.trials[orphan.number].user_attrs["error"]
    retry = [t for t in study.trials if t.user_attrs.get("retry_of") == orphan.number]
    assert retry and retry[0].state == optuna.trial.TrialState.COMPLETE
    assert retry[0].params["optim.lr"] == pytest.approx(orphan.params["optim.lr"])
    assert len(f.calls) == 2
